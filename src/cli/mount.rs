//! `fledge mount`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::{CliError, ImageArgs};
use crate::error::Error;
use crate::fusefs::{self, MountOptions};
use crate::image;
use crate::ui::Ui;

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Image reference, e.g. oci:./layout:tag.
    pub reference: String,
    /// Existing empty directory to mount on.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub image: ImageArgs,
    /// Let other users (and root) see the mount; the kernel then checks the image's own
    /// permissions. Unprivileged users need `user_allow_other` in /etc/fuse.conf.
    #[arg(long)]
    pub allow_other: bool,
}

pub fn run(args: &MountArgs, ui: &Ui) -> Result<ExitCode, CliError> {
    let opts = args.image.request().open_options()?;
    let opened = image::open_tree(&args.reference, &opts, ui)?;
    let tree = Arc::new(opened.tree);
    let mount_opts = MountOptions {
        allow_other: args.allow_other,
        fsname: format!("fledge:{}", args.reference),
        ..MountOptions::default()
    };
    let mountpoint = &args.mountpoint;
    fusefs::serve_foreground(tree, mountpoint, &mount_opts, || {
        ui.info(format!(
            "mounted {} at {} (read-only); unmount or press Ctrl-C to stop",
            args.reference,
            mountpoint.display()
        ));
    })
    .map_err(Error::from)?;
    ui.info(format!("unmounted {}", mountpoint.display()));
    Ok(ExitCode::SUCCESS)
}
