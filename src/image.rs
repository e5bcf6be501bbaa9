//! From a reference to a merged tree: resolve the image, make sure every layer is in the
//! uncompressed layer cache (verified), and merge the layers.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::Error;
use crate::layer::{LayerError, LayerStore};
use crate::merge::{MergeError, TreeBuilder};
use crate::source::{self, ImageSource, Platform, ResolvedImage};
use crate::tree::Tree;
use crate::ui::Ui;

/// What a command asks for when it reads an image, as given (the command line's image
/// options): [`ImageRequest::open_options`] checks it and turns it into [`OpenOptions`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageRequest {
    /// Platform to select from a multi-platform index, as `os/arch[/variant]`; `None`: this
    /// host's.
    pub platform: Option<String>,
    /// Layer cache directory; `None`: [`crate::cache::default_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Use a temporary cache, deleted when the last copy of the options is dropped.
    pub no_cache: bool,
    /// Registries (`host[:port]`) reached over plain HTTP, besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Extra CA certificates (PEM) to trust for registries.
    pub registry_ca: Option<PathBuf>,
}

impl ImageRequest {
    /// Parse the platform and create the temporary cache, if one is asked for.
    pub fn open_options(&self) -> Result<OpenOptions, Error> {
        let platform = match &self.platform {
            Some(p) => Platform::parse(p)?,
            None => Platform::host(),
        };
        let (cache_dir, temp_cache) = if self.no_cache {
            let base = std::env::temp_dir();
            let tmp = tempfile::Builder::new()
                .prefix("fledge-cache-")
                .tempdir_in(&base)
                .map_err(|e| {
                    Error::Usage(format!(
                        "cannot create a temporary cache in {}: {e}",
                        base.display()
                    ))
                })?;
            (Some(tmp.path().to_path_buf()), Some(Arc::new(tmp)))
        } else {
            (self.cache_dir.clone(), None)
        };
        Ok(OpenOptions {
            platform,
            platform_explicit: self.platform.is_some(),
            cache_dir,
            insecure_registries: self.insecure_registries.clone(),
            registry_ca: self.registry_ca.clone(),
            temp_cache,
        })
    }
}

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub platform: Platform,
    /// The platform was asked for (`--platform`): an image for another platform is an error
    /// rather than a warning.
    pub platform_explicit: bool,
    /// Layer cache directory; `None` means [`crate::cache::default_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Registries reached over plain HTTP (besides loopback ones).
    pub insecure_registries: Vec<String>,
    /// Extra CA certificates for registries.
    pub registry_ca: Option<PathBuf>,
    /// Keeps a `--no-cache` temporary cache directory alive (and deletes it when the last
    /// copy of the options is dropped).
    pub temp_cache: Option<Arc<tempfile::TempDir>>,
}

impl OpenOptions {
    /// The source options these image options imply (environment settings included).
    pub fn source_options(&self) -> Result<source::SourceOptions, Error> {
        let mut s = source::SourceOptions::from_env();
        s.cache_dir = Some(cache_dir(self)?);
        s.insecure_registries
            .extend(self.insecure_registries.iter().cloned());
        if self.registry_ca.is_some() {
            s.registry_ca = self.registry_ca.clone();
        }
        Ok(s)
    }
}

/// A resolved image whose layers are merged but not yet frozen, so that files can be added
/// (the build injects its own files through the same view).
pub struct MergedImage {
    pub resolved: ResolvedImage,
    pub builder: TreeBuilder,
    pub layer_files: Vec<Arc<File>>,
}

impl MergedImage {
    pub fn freeze(self) -> (ResolvedImage, Tree) {
        (self.resolved, self.builder.freeze(self.layer_files))
    }
}

/// A resolved image with its frozen tree.
pub struct OpenedImage {
    pub resolved: ResolvedImage,
    pub tree: Tree,
}

/// The cache directory to use: the option, else [`crate::cache::default_dir`].
pub fn cache_dir(opts: &OpenOptions) -> Result<PathBuf, Error> {
    crate::cache::dir(opts.cache_dir.as_deref()).map_err(|_| LayerError::NoCacheDir.into())
}

/// Open the source and resolve the reference for the platform.
pub fn resolve(
    reference: &str,
    opts: &OpenOptions,
) -> Result<(Box<dyn ImageSource>, ResolvedImage), Error> {
    let src = source::open_with(reference, &opts.source_options()?)?;
    let resolved = src.resolve(&opts.platform)?;
    if opts.platform_explicit && !opts.platform.matches(&resolved.platform) {
        return Err(source::SourceError::PlatformNotFound {
            wanted: opts.platform.to_string(),
            blob: resolved.manifest_digest.clone(),
            available: vec![resolved.platform.to_string()],
        }
        .into());
    }
    Ok((src, resolved))
}

/// Resolve, fetch/decode the layers into the cache and merge them.
pub fn merge(reference: &str, opts: &OpenOptions, ui: &Ui) -> Result<MergedImage, Error> {
    let mut sw = crate::timing::Stopwatch::start();
    let (src, resolved) = resolve(reference, opts)?;
    sw.mark("resolved");
    tracing::info!(
        "resolved {} from {} to {} ({}, {} layers)",
        reference,
        src.describe(),
        resolved.manifest_digest,
        resolved.platform,
        resolved.layers.len()
    );
    let store = LayerStore::new(cache_dir(opts)?);
    let paths = store.uncompressed_all(src.as_ref(), &resolved)?;
    sw.mark("layers ready");
    let ready = sw.elapsed();
    let mut builder = TreeBuilder::new();
    let mut layer_files = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        let file = File::open(path).map_err(|e| LayerError::Io {
            path: path.clone(),
            source: e,
        })?;
        builder
            .apply_layer(i as u32, &file)
            .map_err(|e: MergeError| Error::Merge(e))?;
        layer_files.push(Arc::new(file));
    }
    let merging = sw.mark("merged");
    ui.detail(format!(
        "layers ready in {:.2}s, merged in {:.2}s",
        ready.as_secs_f64(),
        merging.as_secs_f64()
    ));
    Ok(MergedImage {
        resolved,
        builder,
        layer_files,
    })
}

/// Resolve, fetch and merge, then freeze: the read-only tree of the image as it is.
pub fn open_tree(reference: &str, opts: &OpenOptions, ui: &Ui) -> Result<OpenedImage, Error> {
    let (resolved, tree) = merge(reference, opts, ui)?.freeze();
    Ok(OpenedImage { resolved, tree })
}

/// What [`pull`] did.
#[derive(Debug)]
pub struct Pulled {
    /// Where the image came from, as the source describes itself.
    pub source: String,
    pub manifest_digest: String,
    pub platform: Platform,
    pub layers: usize,
}

/// Resolve the image and fetch, verify and decode every layer into the cache.
pub fn pull(reference: &str, opts: &OpenOptions) -> Result<Pulled, Error> {
    let (src, resolved) = resolve(reference, opts)?;
    let store = LayerStore::new(cache_dir(opts)?);
    store.uncompressed_all(src.as_ref(), &resolved)?;
    Ok(Pulled {
        source: src.describe(),
        manifest_digest: resolved.manifest_digest.clone(),
        platform: resolved.platform.clone(),
        layers: resolved.layers.len(),
    })
}
