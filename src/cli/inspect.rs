//! `fledge inspect`.

use std::process::ExitCode;

use clap::Args;

use super::{print_json, print_stdout, CliError, ImageArgs};
use crate::inspect;
use crate::ui::Ui;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Image reference, e.g. oci:./layout:tag.
    pub reference: String,
    #[command(flatten)]
    pub image: ImageArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also fetch and merge the layers, and report the merged tree's totals.
    #[arg(long)]
    pub tree: bool,
}

pub fn run(args: &InspectArgs, ui: &Ui) -> Result<ExitCode, CliError> {
    let opts = args.image.request().open_options()?;
    let report = inspect::inspect(&args.reference, &opts, args.tree, ui)?;
    if args.json {
        print_json(&report, "report")?;
    } else {
        print_stdout(&report.render_text());
    }
    Ok(ExitCode::SUCCESS)
}
