//! Phase timings for profiling: `FLEDGE_LOG=fledge::timing=debug` (or `-vv`) prints how long
//! each step of a build took, so a slow build can be taken apart without a profiler; the
//! marks are also kept, and `fledge build --json` reports them.

use std::time::{Duration, Instant};

use serde::Serialize;

/// One finished phase: its name and how long it took.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
}

/// Marks the end of consecutive phases; each mark logs the time since the previous one.
pub struct Stopwatch {
    start: Instant,
    last: Instant,
    phases: Vec<Phase>,
}

impl Stopwatch {
    pub fn start() -> Stopwatch {
        let now = Instant::now();
        Stopwatch {
            start: now,
            last: now,
            phases: Vec::new(),
        }
    }

    /// Log the phase that ends now, and return how long it took.
    pub fn mark(&mut self, phase: &str) -> Duration {
        let now = Instant::now();
        let took = now - self.last;
        tracing::debug!(
            target: "fledge::timing",
            "{phase}: {:.1} ms (at {:.1} ms)",
            took.as_secs_f64() * 1e3,
            (now - self.start).as_secs_f64() * 1e3
        );
        self.last = now;
        self.phases.push(Phase {
            name: phase.to_string(),
            seconds: took.as_secs_f64(),
        });
        took
    }

    /// Time since the stopwatch started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The phases marked so far, in order.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_kept_in_order() {
        let mut sw = Stopwatch::start();
        sw.mark("one");
        sw.mark("two");
        let names: Vec<&str> = sw.phases().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["one", "two"]);
        let sum: f64 = sw.phases().iter().map(|p| p.seconds).sum();
        assert!(sum <= sw.elapsed().as_secs_f64());
    }
}
