//! How chatty the library is: the output sink every command reports through.
//!
//! [`Ui`] is plain data (verbosity, quiet, whether progress bars are drawn), chosen by the
//! front end: the command line sets it from `-v`/`-q` and whether stderr is a terminal; a
//! program using the library can pass [`Ui::silent`]. Messages go to stderr, never stdout,
//! which belongs to the commands' reports (`--json`).

/// Verbosity and progress display of one command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ui {
    /// 0: the usual messages; 1: steps and decisions too; 2 and more: debug.
    pub verbose: u8,
    /// Print nothing but errors.
    pub quiet: bool,
    /// Draw progress bars (on stderr).
    pub bars: bool,
}

impl Ui {
    /// No messages and no progress bars.
    pub fn silent() -> Ui {
        Ui {
            verbose: 0,
            quiet: true,
            bars: false,
        }
    }

    /// A progress line on stderr unless quiet.
    pub fn info(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// A line about steps and decisions, shown with `-v` and more.
    pub fn detail(&self, msg: impl AsRef<str>) {
        if self.verbose > 0 {
            self.info(msg);
        }
    }

    /// Whether progress bars should be drawn.
    pub fn progress_bars(&self) -> bool {
        self.bars && !self.quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_draws_no_bars() {
        let ui = Ui {
            verbose: 0,
            quiet: true,
            bars: true,
        };
        assert!(!ui.progress_bars());
        assert!(!Ui::silent().progress_bars());
        assert!(Ui {
            bars: true,
            ..Ui::default()
        }
        .progress_bars());
    }
}
