//! Options shared by every command that reads an image.

use std::path::PathBuf;

use clap::Args;

use crate::image::ImageRequest;

/// Options shared by every command that reads an image.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Platform to select from a multi-platform index, as os/arch[/variant] (default: this
    /// host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
    /// Layer cache directory (default: $FLEDGE_CACHE_DIR, else $XDG_CACHE_HOME/fledge, else
    /// ~/.cache/fledge).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Use a temporary cache, deleted when the command ends.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
    /// Reach this registry (host[:port]) over plain HTTP; repeatable. Loopback registries
    /// always are. Also $FLEDGE_INSECURE_REGISTRIES (comma-separated).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// Extra CA certificates (PEM) to trust for registries (also $FLEDGE_REGISTRY_CA).
    #[arg(long, value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
}

impl ImageArgs {
    /// The library's request.
    pub fn request(&self) -> ImageRequest {
        ImageRequest {
            platform: self.platform.clone(),
            cache_dir: self.cache_dir.clone(),
            no_cache: self.no_cache,
            insecure_registries: self.insecure_registries.clone(),
            registry_ca: self.registry_ca.clone(),
        }
    }
}
