//! `fledge man [-o DIR]`: man pages generated from the clap definitions.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory};
use clap_mangen::Man;

use super::{print_stdout, Cli, CliError};
use crate::ui::Ui;

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write fledge.1 and one page per command (fledge-build.1, ...) into this directory
    /// instead of printing fledge.1 on stdout.
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,
}

/// The command tree as the pages describe it: built (so each subcommand's name is
/// `fledge-build` etc.) and without the `help` pseudo-command.
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

fn page(cmd: clap::Command) -> Man {
    let title = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_uppercase();
    Man::new(cmd).title(title)
}

/// fledge.1 as roff text.
pub fn main_page() -> Result<Vec<u8>, std::io::Error> {
    let mut out = Vec::new();
    page(command()).render(&mut out)?;
    Ok(out)
}

/// Write the page of `cmd` and of every subcommand under it into `dir`; returns the files.
fn write_pages(
    cmd: &clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), CliError> {
    let man = page(cmd.clone());
    let path = dir.join(man.get_filename());
    man.generate_to(dir).map_err(|source| CliError::Write {
        path: path.clone(),
        source,
    })?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

/// Write every page into `dir`; returns the files written, fledge.1 first.
pub fn write_all(dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    let mut written = Vec::new();
    write_pages(&command(), dir, &mut written)?;
    Ok(written)
}

pub fn run(args: &ManArgs, ui: &Ui) -> Result<ExitCode, CliError> {
    match &args.output {
        None => {
            let text = main_page().map_err(|source| CliError::Write {
                path: PathBuf::from("stdout"),
                source,
            })?;
            print_stdout(&String::from_utf8_lossy(&text));
        }
        Some(dir) => {
            let written = write_all(dir)?;
            ui.info(format!(
                "wrote {} man pages to {}",
                written.len(),
                dir.display()
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_command() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_all(dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "fledge.1",
            "fledge-build.1",
            "fledge-cache-prune.1",
            "fledge-man.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
        let build = std::fs::read_to_string(dir.path().join("fledge-build.1")).unwrap();
        assert!(
            build.starts_with(".ie") || build.contains(".TH FLEDGE-BUILD"),
            "{build}"
        );
    }
}
