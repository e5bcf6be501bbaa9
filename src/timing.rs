//! Phase timings for profiling: `FLEDGE_LOG=fledge::timing=debug` (or `-vv`) prints how long
//! each step of a build took, so a slow build can be taken apart without a profiler.

use std::time::{Duration, Instant};

/// Marks the end of consecutive phases; each mark logs the time since the previous one.
pub struct Stopwatch {
    start: Instant,
    last: Instant,
}

impl Stopwatch {
    pub fn start() -> Stopwatch {
        let now = Instant::now();
        Stopwatch {
            start: now,
            last: now,
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
        took
    }

    /// Time since the stopwatch started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}
