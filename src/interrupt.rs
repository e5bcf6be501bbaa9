//! Ctrl-C and SIGTERM handling for long operations.
//!
//! Once [`install`] has run, SIGINT, SIGTERM and SIGHUP no longer kill the process; they set a
//! flag that long loops and the external-tool runner poll. Those then return an
//! "interrupted" error, so the normal error path runs and every RAII guard (loop devices,
//! mounts, FUSE sessions, temporary files) releases what it holds. A second signal while the
//! first is being handled terminates at once (the default action is restored by
//! signal-hook's conditional shutdown), so a wedged cleanup can still be killed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Route SIGINT/SIGTERM/SIGHUP to the interrupt flag. Idempotent.
pub fn install() -> std::io::Result<()> {
    if FLAG.get().is_some() {
        return Ok(());
    }
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        // A second signal after the flag is set exits with the conventional status.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag))?;
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    let _ = FLAG.set(flag);
    Ok(())
}

/// Whether a termination signal has arrived since [`install`].
pub fn requested() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// Mark the process as interrupted (tests and fault injection use this).
pub fn request() {
    if let Some(f) = FLAG.get() {
        f.store(true, Ordering::Relaxed);
    }
}
