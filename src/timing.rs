//! Phase timings for profiling: `FLEDGE_LOG=fledge::timing=debug` (or `-vv`) prints how long
//! each step of a build took, so a slow build can be taken apart without a profiler.

use std::time::Instant;

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

    /// Log the phase that ends now.
    pub fn mark(&mut self, phase: &str) {
        let now = Instant::now();
        tracing::debug!(
            target: "fledge::timing",
            "{phase}: {:.1} ms (at {:.1} ms)",
            (now - self.last).as_secs_f64() * 1e3,
            (now - self.start).as_secs_f64() * 1e3
        );
        self.last = now;
    }
}
