//! `fledge doctor`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{print_json, print_stdout, CliError};
use crate::doctor::{self, DoctorRequest};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print a JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Cache directory to check (default: the layer cache's default).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Also try to reach the configured registries (docker config `auths`/`credHelpers`, the
    /// registry of ./fledge.toml's image, and FLEDGE_ONLINE_REGISTRIES). Without it, doctor
    /// uses no network.
    #[arg(long)]
    pub online: bool,
}

impl DoctorArgs {
    /// The library's request.
    pub fn request(&self) -> DoctorRequest {
        DoctorRequest {
            cache_dir: self.cache_dir.clone(),
            online: self.online,
        }
    }
}

/// Exit status: 0 when every filesystem type has a usable backend, 2 when only some do, 1
/// when none does.
pub fn run(args: &DoctorArgs) -> Result<ExitCode, CliError> {
    let report = doctor::report(&args.request());
    if args.json {
        print_json(&report, "doctor report")?;
    } else {
        print_stdout(&report.render_text());
    }
    Ok(ExitCode::from(report.exit_code))
}
