//! The command line: argument parsing (clap), logging set-up, dispatch, and error reporting.
//! Nothing outside this module knows about clap: each command's arguments turn into the
//! library's plain request types ([`crate::output::BuildRequest`],
//! [`crate::doctor::DoctorRequest`], [`crate::image::ImageRequest`]), and the library reports
//! through [`crate::ui::Ui`] and returns its results for this module to print.
//!
//! Every command returns `Result<ExitCode, CliError>`; an error is printed once, as the whole
//! cause chain on one line plus a hint where one helps, and the process exits non-zero.

mod build;
mod cache;
mod completions;
mod doctor;
mod image_args;
mod inspect;
mod man;
mod mount;
mod pull;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;
use thiserror::Error;

use crate::error::Error;
use crate::ui::Ui;

pub use image_args::ImageArgs;

#[derive(Debug, Parser)]
#[command(
    name = "fledge",
    version,
    about = "Turn Docker/OCI container images into bootable microVM root filesystem images",
    propagate_version = true
)]
pub struct Cli {
    /// More output (-v: steps and decisions, -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Print only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a root filesystem image and its plugin manifest from fledge.toml.
    Build(build::BuildArgs),
    /// Check what this host can do and which backend `build` will choose.
    Doctor(doctor::DoctorArgs),
    /// Mount an image's merged layers read-only through FUSE (foreground until unmounted).
    Mount(mount::MountArgs),
    /// Show an image's manifest digest, platform, config and layers.
    Inspect(inspect::InspectArgs),
    /// Fetch an image's layers into the cache (download, verify, decompress) without
    /// mounting or building anything.
    Pull(pull::PullArgs),
    /// Manage the layer and blob cache.
    Cache(cache::CacheArgs),
    /// Print a shell completion script on stdout.
    Completions(completions::CompletionsArgs),
    /// Print the man page (fledge.1) on stdout, or write one page per command into a
    /// directory.
    Man(man::ManArgs),
    /// Print the version.
    Version,
}

/// Errors of the command line itself; everything else is the library's [`Error`].
#[derive(Debug, Error)]
pub enum CliError {
    #[error(transparent)]
    Fledge(#[from] Error),
    #[error("cannot encode the {what} as JSON: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CliError {
    /// A one-line hint for the user, when the error has an obvious remedy.
    pub fn hint(&self) -> Option<String> {
        match self {
            CliError::Fledge(e) => e.hint(),
            CliError::Json { .. } => {
                Some("run again with -vv and report the output if it persists".into())
            }
            CliError::Write { .. } => {
                Some("check that the directory exists and is writable".into())
            }
        }
    }
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let ui = Ui {
        verbose: cli.verbose,
        quiet: cli.quiet,
        bars: std::io::stderr().is_terminal(),
    };
    match run(cli.command, &ui) {
        Ok(code) => code,
        Err(err) => {
            report_error(&err);
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, ui: &Ui) -> Result<ExitCode, CliError> {
    match command {
        Command::Build(args) => build::run(&args, ui),
        Command::Doctor(args) => doctor::run(&args),
        Command::Mount(args) => mount::run(&args, ui),
        Command::Inspect(args) => inspect::run(&args, ui),
        Command::Pull(args) => pull::run(&args, ui),
        Command::Cache(args) => cache::run(&args, ui),
        Command::Completions(args) => completions::run(&args),
        Command::Man(args) => man::run(&args, ui),
        Command::Version => {
            print_stdout(&format!("fledge {}\n", env!("CARGO_PKG_VERSION")));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Write a command's report to stdout. A closed pipe (e.g. `| head`) is not an error worth
/// reporting.
fn print_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `value` as pretty JSON and a newline, on stdout.
fn print_json(value: &impl Serialize, what: &'static str) -> Result<(), CliError> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|source| CliError::Json { what, source })?;
    text.push('\n');
    print_stdout(&text);
    Ok(())
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    // Other crates only speak up on errors unless -vv asks for more. fuser logs races at
    // unmount (a reply to a request the kernel already dropped) as errors although nothing
    // failed; fledge reports real FUSE failures itself, so fuser is silent below -vv.
    let others = if verbose >= 2 {
        "warn"
    } else {
        "error,fuser=off"
    };
    let filter = EnvFilter::try_from_env("FLEDGE_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{others},fledge={default}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .try_init();
}

/// An error as one line: the whole cause chain, each cause once.
pub fn error_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // thiserror's `transparent` and `#[from]` wrappers often repeat their cause's text.
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// Print an error as one line (the whole cause chain) plus a hint line when there is one.
pub fn report_error(err: &CliError) {
    eprintln!("error: {}", error_line(err));
    if let Some(hint) = err.hint() {
        eprintln!("hint: {hint}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cli_errors_print_the_library_chain_unchanged() {
        let lib = Error::Usage("bad thing".into());
        let expect = error_line(&lib);
        let wrapped = CliError::from(Error::Usage("bad thing".into()));
        assert_eq!(error_line(&wrapped), expect);
        assert_eq!(wrapped.hint(), lib.hint());
    }

    #[test]
    fn every_command_is_listed() {
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        for want in [
            "build",
            "doctor",
            "mount",
            "inspect",
            "pull",
            "cache",
            "completions",
            "man",
            "version",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
    }
}
