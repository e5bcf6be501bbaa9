//! `fledge cache`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::CliError;
use crate::error::Error;
use crate::layer::LayerStore;
use crate::ui::Ui;

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Delete everything in the cache (decoded layers, downloaded blobs, partial downloads,
    /// compressed squashfs blocks).
    Prune {
        /// Cache directory (default: $FLEDGE_CACHE_DIR, else $XDG_CACHE_HOME/fledge, else
        /// ~/.cache/fledge).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

pub fn run(args: &CacheArgs, ui: &Ui) -> Result<ExitCode, CliError> {
    match &args.command {
        CacheCommand::Prune { cache_dir } => {
            let dir = crate::cache::dir(cache_dir.as_deref())
                .map_err(|_| Error::from(crate::layer::LayerError::NoCacheDir))?;
            let mut report = LayerStore::new(&dir).prune().map_err(Error::from)?;
            crate::layer::prune_dir(&dir.join(crate::squashfs::cache::SUBDIR), &mut report)
                .map_err(Error::from)?;
            ui.info(format!(
                "pruned {}: {} files, {:.1} MiB freed",
                dir.display(),
                report.files,
                report.bytes as f64 / (1024.0 * 1024.0)
            ));
            Ok(ExitCode::SUCCESS)
        }
    }
}
