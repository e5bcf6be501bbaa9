//! `fledge pull`.

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;

use super::{CliError, ImageArgs};
use crate::image;
use crate::ui::Ui;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference, e.g. docker://registry:5000/app:tag or nginx:alpine.
    pub reference: String,
    #[command(flatten)]
    pub image: ImageArgs,
}

pub fn run(args: &PullArgs, ui: &Ui) -> Result<ExitCode, CliError> {
    let started = Instant::now();
    let opts = args.image.request().open_options()?;
    let pulled = image::pull(&args.reference, &opts)?;
    ui.info(format!(
        "pulled {} from {}: {} ({}, {} layers) in {:.2}s",
        args.reference,
        pulled.source,
        pulled.manifest_digest,
        pulled.platform,
        pulled.layers,
        started.elapsed().as_secs_f64()
    ));
    Ok(ExitCode::SUCCESS)
}
