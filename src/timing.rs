//! Phase timings for profiling: `FLEDGE_LOG=fledge::timing=debug` (or `-vv`) prints how long
//! each step of a build took, so a slow build can be taken apart without a profiler; the
//! marks are also kept, and `fledge build --json` reports them. Each logged mark also shows
//! the process's resident memory then and its peak so far (`VmRSS`, `VmHWM` of
//! `/proc/self/status`), so the phase that makes a build large can be found the same way.

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
        if tracing::enabled!(target: "fledge::timing", tracing::Level::DEBUG) {
            let mem = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| memory(&s))
                .map(|(rss, peak)| format!(", rss {} MiB, peak {} MiB", rss >> 10, peak >> 10))
                .unwrap_or_default();
            tracing::debug!(
                target: "fledge::timing",
                "{phase}: {:.1} ms (at {:.1} ms{mem})",
                took.as_secs_f64() * 1e3,
                (now - self.start).as_secs_f64() * 1e3
            );
        }
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

/// `VmRSS` and `VmHWM` (current and peak resident memory, KiB) from the text of
/// `/proc/self/status`.
fn memory(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_from_proc_status() {
        let status = "Name:\tfledge\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t1\n";
        assert_eq!(memory(status), Some((102_400, 204_800)));
        assert_eq!(memory("Name:\tfledge\nVmRSS:\t1 kB\n"), None);
        // This process has both lines.
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(memory(&own).is_some_and(|(rss, peak)| rss > 0 && peak >= rss));
    }

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
