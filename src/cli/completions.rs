//! `fledge completions SHELL`: a completion script generated from the clap definitions.

use std::process::ExitCode;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{print_stdout, Cli, CliError};

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The completion script for `shell`.
pub fn script(shell: Shell) -> String {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "fledge", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub fn run(args: &CompletionsArgs) -> Result<ExitCode, CliError> {
    print_stdout(&script(args.shell));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_commands() {
        // Elvish and PowerShell scripts complete commands and options, not option values.
        for (shell, values) in [
            (Shell::Bash, true),
            (Shell::Zsh, true),
            (Shell::Fish, true),
            (Shell::Elvish, false),
            (Shell::PowerShell, false),
        ] {
            let s = script(shell);
            for word in ["build", "doctor", "completions", "man", "backend"] {
                assert!(s.contains(word), "{shell}: no {word}");
            }
            if values {
                for word in ["auto", "kernel", "userspace", "native"] {
                    assert!(s.contains(word), "{shell}: no {word}");
                }
            }
        }
    }
}
