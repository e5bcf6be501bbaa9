//! The read-only FUSE view of a [`crate::tree::Tree`].
//!
//! [`MountedView::mount`] serves a tree in the background (for formatters that copy the view),
//! [`serve_foreground`] serves it until the mount is unmounted from outside or the process gets
//! SIGINT/SIGTERM. The view is exact: modes (setuid/setgid/sticky kept), owners, device numbers,
//! timestamps with nanoseconds (before 1970 and after 2038), hard links (one inode) and binary
//! xattrs are those of the tree. Directories report a size of 4096. Everything that would
//! modify the view fails with `EROFS`.
//!
//! The mount is `ro,nosuid,nodev` (the view is data to copy, never something to execute from
//! or open devices through). Without `allow_other` only the mounting user (and no permission
//! check at all: that user reads everything) can access it; with `allow_other` every user can,
//! and the kernel checks permissions against the image's modes (`default_permissions`).
//!
//! Device numbers travel in FUSE's 32-bit `rdev` (the kernel's `new_encode_dev` layout), so
//! majors above 4095 or minors above 2^20-1 cannot be shown exactly and are truncated. Extended
//! attributes, including `security.capability` and `system.posix_acl_*`, are returned byte for
//! byte (ACLs are not enforced by the view).
//!
//! Requests are served by [`MountOptions::threads`] threads, each with its own cloned
//! `/dev/fuse` descriptor (`FUSE_DEV_IOC_CLONE`, Linux 4.5+).
//!
//! Unmounting ([`crate::hostmount`]) first tries a normal unmount; if the view is still in use
//! it is detached lazily and, when the fuse control filesystem is available, its connection is
//! aborted so that the session always ends. An unprivileged user's view is unmounted with
//! `fusermount3 -u` (`-u -z` when busy).

mod fs;
use crate::mountinfo;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use thiserror::Error;

use crate::runner::Tool;
use crate::tree::Tree;
use fs::TreeFs;

/// The `/dev/fuse` device fuser talks to.
const DEV_FUSE: &str = "/dev/fuse";

/// The mount's subtype: it shows as `fuse.fledge` in /proc/self/mountinfo.
pub const SUBTYPE: &str = "fledge";

/// How long unmounting waits for the session threads to finish.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the FUSE view; each names the mountpoint or device concerned.
#[derive(Debug, Error)]
pub enum FuseError {
    #[error("mountpoint {} does not exist", mountpoint.display())]
    MountpointMissing { mountpoint: PathBuf },
    #[error("mountpoint {} is not a directory", mountpoint.display())]
    MountpointNotDir { mountpoint: PathBuf },
    /// `/dev/fuse` (or the unprivileged mount helper) cannot be used; `hint` says how to fix it.
    #[error("{reason}")]
    DevFuseUnavailable { reason: String, hint: String },
    #[error("cannot mount the fuse view at {}: {source}", mountpoint.display())]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount the fuse view at {}: {reason}", mountpoint.display())]
    Unmount { mountpoint: PathBuf, reason: String },
    #[error("the fuse session serving {} failed: {source}", mountpoint.display())]
    Session {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot install the SIGINT/SIGTERM handlers for {}: {source}", mountpoint.display())]
    Signals {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FuseError {
    /// A one-line remedy for the user, when there is an obvious one.
    pub fn hint(&self) -> Option<&str> {
        match self {
            FuseError::DevFuseUnavailable { hint, .. } => Some(hint),
            FuseError::MountpointMissing { .. } => Some("create the mountpoint directory first"),
            _ => None,
        }
    }
}

/// How to mount the view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// Let every user access the view (kernel permission checks against the image's modes
    /// apply then). Unprivileged users need `user_allow_other` in `/etc/fuse.conf`.
    pub allow_other: bool,
    /// The mount source shown in `/proc/self/mountinfo` (commas are replaced by `_`).
    pub fsname: String,
    /// Threads serving requests; 0 picks [`default_threads`].
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: false,
            fsname: "fledge".to_string(),
            threads: default_threads(),
        }
    }
}

/// The number of serving threads used by default: the available parallelism, at least 2 and
/// at most 16.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 16)
}

/// A tree mounted in the background. Dropping it unmounts the view and waits for the session
/// (never panics; failures are logged).
#[derive(Debug)]
pub struct MountedView {
    mountpoint: PathBuf,
    session: Option<JoinHandle<io::Result<()>>>,
    /// The kernel device number of the mount (names its fuse control directory).
    conn: Option<u64>,
}

impl MountedView {
    /// Mount `tree` read-only at `mountpoint` and serve it on background threads. The view is
    /// usable when this returns.
    pub fn mount(
        tree: Arc<Tree>,
        mountpoint: &Path,
        opts: &MountOptions,
    ) -> Result<MountedView, FuseError> {
        let (session, mountpoint) = new_session(tree, mountpoint, opts)?;
        let conn = mountinfo::fuse_connection(&mountpoint);
        let thread = std::thread::Builder::new()
            .name("fledge-fuse".to_string())
            .spawn(move || session.run());
        match thread {
            Ok(handle) => Ok(MountedView {
                mountpoint,
                session: Some(handle),
                conn,
            }),
            // The session was moved into the failed closure and dropped: that unmounted it.
            Err(source) => Err(FuseError::Mount { mountpoint, source }),
        }
    }

    /// The (canonical) path the view is mounted at.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmount the view and wait for its session to end.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), FuseError> {
        let Some(handle) = self.session.take() else {
            return Ok(());
        };
        let unmounted = if handle.is_finished() {
            // Unmounted from outside already.
            Ok(())
        } else {
            unmount_mountpoint(&self.mountpoint, self.conn)
        };
        let joined = join_session(handle, JOIN_TIMEOUT);
        unmounted.and(joined).map_err(|reason| FuseError::Unmount {
            mountpoint: self.mountpoint.clone(),
            reason,
        })
    }
}

impl Drop for MountedView {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("{e}");
        }
    }
}

/// Mount `tree` at `mountpoint`, call `on_ready` once the view is usable, then serve it until
/// it is unmounted from outside (`fusermount3 -u`, `umount`) or the process receives SIGINT or
/// SIGTERM (the view is then unmounted and this returns `Ok`). The signal handlers stay
/// installed for the rest of the process's life (signal-hook cannot restore the defaults), so
/// callers should exit soon after this returns.
pub fn serve_foreground(
    tree: Arc<Tree>,
    mountpoint: &Path,
    opts: &MountOptions,
    on_ready: impl FnOnce(),
) -> Result<(), FuseError> {
    let (session, mountpoint) = new_session(tree, mountpoint, opts)?;
    let conn = mountinfo::fuse_connection(&mountpoint);
    // Installed only once mounted, so a failed mount leaves the process's signals alone. On
    // failure here the session is dropped, which unmounts it.
    let watcher = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .and_then(|signals| SignalWatcher::start(signals, mountpoint.clone(), conn))
    .map_err(|source| FuseError::Signals {
        mountpoint: mountpoint.clone(),
        source,
    })?;
    on_ready();
    let served = session.run();
    drop(watcher);
    served.map_err(|source| FuseError::Session { mountpoint, source })
}

/// A thread that unmounts the view on SIGINT/SIGTERM; dropping it stops the thread.
struct SignalWatcher {
    handle: signal_hook::iterator::Handle,
    thread: Option<JoinHandle<()>>,
}

impl SignalWatcher {
    fn start(
        mut signals: signal_hook::iterator::Signals,
        mountpoint: PathBuf,
        conn: Option<u64>,
    ) -> io::Result<Self> {
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("fledge-fuse-signals".to_string())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    tracing::info!(signal, "unmounting {} on signal", mountpoint.display());
                    if let Err(reason) = unmount_mountpoint(&mountpoint, conn) {
                        tracing::warn!("cannot unmount {}: {reason}", mountpoint.display());
                    }
                }
            })?;
        Ok(SignalWatcher {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for SignalWatcher {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Check the mountpoint and `/dev/fuse`, then mount and return the session (already past
/// the FUSE handshake) and the canonical mountpoint.
fn new_session(
    tree: Arc<Tree>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<(Session<TreeFs>, PathBuf), FuseError> {
    match std::fs::metadata(mountpoint) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(FuseError::MountpointNotDir {
                mountpoint: mountpoint.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(FuseError::MountpointMissing {
                mountpoint: mountpoint.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(FuseError::Mount {
                mountpoint: mountpoint.to_path_buf(),
                source,
            })
        }
    }
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|source| FuseError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        })?;
    check_dev_fuse()?;
    let config = session_config(opts);
    match Session::new(TreeFs::new(tree), &mountpoint, &config) {
        Ok(session) => Ok((session, mountpoint)),
        Err(e) => Err(mount_error(mountpoint, e)),
    }
}

/// The fuser configuration for `opts`.
fn session_config(opts: &MountOptions) -> Config {
    let fsname: String = opts
        .fsname
        .chars()
        .map(|c| if c == ',' || c.is_control() { '_' } else { c })
        .collect();
    let mut mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::FSName(if fsname.is_empty() {
            "fledge".to_string()
        } else {
            fsname
        }),
        // `subtype=` as a kernel option: fuser passes `Subtype` only to fusermount3, while
        // this reaches both the direct mount(2) (as root) and fusermount3.
        MountOption::CUSTOM(format!("subtype={SUBTYPE}")),
    ];
    if opts.allow_other {
        mount_options.push(MountOption::DefaultPermissions);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(if opts.threads == 0 {
        default_threads()
    } else {
        opts.threads
    });
    config.clone_fd = true;
    config
}

/// Fail early, with a remedy, when `/dev/fuse` cannot be opened.
pub(crate) fn check_dev_fuse() -> Result<(), FuseError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_FUSE)
    {
        Ok(_) => Ok(()),
        Err(e) => Err(dev_fuse_error(&e)),
    }
}

fn dev_fuse_error(e: &io::Error) -> FuseError {
    let (reason, hint) = match e.kind() {
        io::ErrorKind::PermissionDenied => (
            format!("permission denied opening {DEV_FUSE}"),
            format!("make {DEV_FUSE} accessible (chmod 0666 {DEV_FUSE}) or run as root"),
        ),
        io::ErrorKind::NotFound => (
            format!("{DEV_FUSE} does not exist"),
            format!(
                "load the fuse kernel module (modprobe fuse); in a container pass the device \
                 (--device {DEV_FUSE})"
            ),
        ),
        _ => (
            format!("cannot open {DEV_FUSE}: {e}"),
            "check that the fuse kernel module is loaded and the device is usable".to_string(),
        ),
    };
    FuseError::DevFuseUnavailable { reason, hint }
}

/// Turn a fuser mount failure into a one-line error with a remedy where there is one.
fn mount_error(mountpoint: PathBuf, e: io::Error) -> FuseError {
    let root = nix::unistd::geteuid().is_root();
    if !root && e.kind() == io::ErrorKind::NotFound && !fusermount_available() {
        return FuseError::DevFuseUnavailable {
            reason: format!(
                "fusermount3 is not installed (needed to mount {} without root)",
                mountpoint.display()
            ),
            hint: "install fuse3 (fusermount3) or run as root".to_string(),
        };
    }
    FuseError::Mount {
        mountpoint,
        source: one_line(e),
    }
}

/// Messages relayed from fusermount3 may span several lines; errors are one line.
fn one_line(e: io::Error) -> io::Error {
    let text = e.to_string();
    let trimmed = text.trim();
    if trimmed.contains('\n') || trimmed.len() != text.len() {
        let joined: Vec<&str> = trimmed.lines().map(str::trim).collect();
        io::Error::new(e.kind(), joined.join("; "))
    } else {
        e
    }
}

fn fusermount_available() -> bool {
    ["fusermount3", "fusermount"]
        .iter()
        .any(|bin| Tool::new(bin).arg("-V").output().is_ok())
}

/// Unmount the view at `mountpoint`: a normal unmount, or when it is busy a lazy one followed
/// by aborting the fuse connection `conn` (when the fuse control filesystem allows it), so the
/// session ends. Unprivileged callers go through `fusermount3 -u` (`-u -z` when busy). Not
/// being mounted any more is success.
fn unmount_mountpoint(mountpoint: &Path, conn: Option<u64>) -> Result<(), String> {
    use crate::hostmount::{unmount, Detach, Fusermount, Policy, Unmounted};
    let policy = Policy {
        not_mounted_is_success: true,
        detach: Detach::WhenBusy,
        fusermount: Fusermount::WhenNotPermitted,
    };
    match unmount(mountpoint, policy) {
        Ok(Unmounted::Now | Unmounted::NotMounted) => Ok(()),
        Ok(Unmounted::Detached { .. }) => {
            abort_connection(conn);
            Ok(())
        }
        Err(e) => Err(e.reason()),
    }
}

/// Abort fuse connection `conn` through the fuse control filesystem, if mounted and allowed
/// (best effort: the connection otherwise ends when its last open file is closed).
fn abort_connection(conn: Option<u64>) {
    let Some(conn) = conn else { return };
    let path = format!("/sys/fs/fuse/connections/{conn}/abort");
    match std::fs::write(&path, b"1") {
        Ok(()) => tracing::info!("aborted fuse connection {conn} of a busy view"),
        Err(e) => tracing::debug!("cannot abort fuse connection through {path}: {e}"),
    }
}

/// Wait up to `timeout` for the session thread; it is left running (detached) past that.
fn join_session(handle: JoinHandle<io::Result<()>>, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return Err(format!(
                "the view is still in use after {}s; it was detached and is served until its \
                 last open file is closed",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    match handle.join() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the session ended with an error: {e}")),
        Err(_) => Err("the session thread panicked".to_string()),
    }
}
