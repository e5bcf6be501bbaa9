//! Unmounting, the one way: the build's own mounts (`output::kernel`), the FUSE view
//! ([`crate::fusefs`]) and what recovery finds left by a killed build
//! ([`crate::output::recover`]) are all released by [`unmount`].
//!
//! A normal `umount2` comes first. What follows when it fails is the caller's [`Policy`]:
//! whether "not mounted" counts as success, whether the mount is then detached lazily
//! (`MNT_DETACH`: on `EBUSY` only, or on any failure), and whether an unprivileged user's FUSE
//! mount is handed to `fusermount3` (run through [`crate::runner`]).

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use thiserror::Error;

use crate::runner::Tool;

/// When [`unmount`] detaches a mount lazily after the normal unmount failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detach {
    Never,
    /// Only when the mount is busy (`EBUSY`).
    WhenBusy,
    /// Whatever the failure was.
    Always,
}

/// When [`unmount`] hands a mount to `fusermount3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fusermount {
    Never,
    /// When the kernel refuses the unmount (`EPERM`: an unprivileged user's FUSE mount):
    /// `fusermount3 -u` (`fusermount` where there is no `fusermount3`), and `-u -z` when that
    /// says the mount is busy. A mount gone by then counts as unmounted.
    WhenNotPermitted,
    /// When everything else failed, detaching included: `fusermount3 -u -z`.
    LastResort,
}

/// What [`unmount`] does when the normal unmount fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Whether `EINVAL`/`ENOENT` from the normal unmount (nothing mounted there) is success.
    pub not_mounted_is_success: bool,
    pub detach: Detach,
    pub fusermount: Fusermount,
}

/// How a mount went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted at once.
    Now,
    /// Nothing was mounted there (only with [`Policy::not_mounted_is_success`]).
    NotMounted,
    /// Detached lazily (by `MNT_DETACH` or `fusermount3 -u -z`) after the normal unmount
    /// failed with `first`; it is gone from the tree, but still served until its last user
    /// leaves.
    Detached { first: Errno },
}

/// A mount [`unmount`] could not release.
#[derive(Debug, Error)]
pub enum UnmountError {
    #[error("cannot unmount {}: {source}", path.display())]
    Unmount { path: PathBuf, source: Errno },
    #[error("cannot unmount {}: lazy unmount failed: {source}", path.display())]
    Detach {
        path: PathBuf,
        /// Why the normal unmount failed.
        first: Errno,
        source: Errno,
    },
    #[error("cannot unmount {}: {reason}", path.display())]
    Fusermount {
        path: PathBuf,
        /// Why the normal unmount failed.
        first: Errno,
        /// `cannot run fusermount3: ...` or `fusermount3 -u failed: ...`.
        reason: String,
    },
}

impl UnmountError {
    /// Why the normal unmount failed (the first thing tried).
    pub fn first(&self) -> Errno {
        match self {
            UnmountError::Unmount { source, .. } => *source,
            UnmountError::Detach { first, .. } | UnmountError::Fusermount { first, .. } => *first,
        }
    }

    /// What went wrong last, without the path.
    pub fn reason(&self) -> String {
        match self {
            UnmountError::Unmount { source, .. } => source.to_string(),
            UnmountError::Detach { source, .. } => format!("lazy unmount failed: {source}"),
            UnmountError::Fusermount { reason, .. } => reason.clone(),
        }
    }
}

/// Unmount whatever is mounted on `path`, following `policy` when a normal unmount fails.
pub fn unmount(path: &Path, policy: Policy) -> Result<Unmounted, UnmountError> {
    let first = match umount2(path, MntFlags::empty()) {
        Ok(()) => return Ok(Unmounted::Now),
        Err(Errno::EINVAL | Errno::ENOENT) if policy.not_mounted_is_success => {
            return Ok(Unmounted::NotMounted)
        }
        Err(e) => e,
    };
    let detach = match policy.detach {
        Detach::Never => false,
        Detach::WhenBusy => first == Errno::EBUSY,
        Detach::Always => true,
    };
    if detach {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => return Ok(Unmounted::Detached { first }),
            Err(source) if policy.fusermount != Fusermount::LastResort => {
                return Err(UnmountError::Detach {
                    path: path.to_path_buf(),
                    first,
                    source,
                })
            }
            Err(_) => {}
        }
    }
    let fusermount_err = |reason| UnmountError::Fusermount {
        path: path.to_path_buf(),
        first,
        reason,
    };
    match policy.fusermount {
        Fusermount::WhenNotPermitted if first == Errno::EPERM => {
            fusermount_unmount(path, first).map_err(fusermount_err)
        }
        Fusermount::LastResort => fusermount("fusermount3", path, true, false)
            .map(|()| Unmounted::Detached { first })
            .map_err(fusermount_err),
        _ => Err(UnmountError::Unmount {
            path: path.to_path_buf(),
            source: first,
        }),
    }
}

/// `fusermount3 -u` (then `-u -z` when busy) for an unprivileged user's mount.
fn fusermount_unmount(path: &Path, first: Errno) -> Result<Unmounted, String> {
    let bin = if Tool::new("fusermount3").arg("-V").output().is_ok() {
        "fusermount3"
    } else {
        "fusermount"
    };
    match fusermount(bin, path, false, true) {
        Ok(()) => Ok(Unmounted::Now),
        Err(_) if !crate::mountinfo::is_mounted(path) => Ok(Unmounted::NotMounted),
        Err(e) if e.contains("busy") => {
            fusermount(bin, path, true, true)?;
            Ok(Unmounted::Detached { first })
        }
        Err(e) => Err(e),
    }
}

/// Run `bin -u [-z] [--] path`; the error is one line.
fn fusermount(bin: &str, path: &Path, lazy: bool, end_of_options: bool) -> Result<(), String> {
    let out = Tool::new(bin)
        .arg("-u")
        .args(lazy.then_some("-z"))
        .args(end_of_options.then_some("--"))
        .arg(path)
        .output()
        .map_err(|e| e.cannot_run().unwrap_or_else(|| e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.trim().lines().map(str::trim).collect();
    Err(format!("{bin} -u failed: {}", lines.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: Policy = Policy {
        not_mounted_is_success: false,
        detach: Detach::Never,
        fusermount: Fusermount::Never,
    };

    #[test]
    fn not_mounted() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: hostmount::not_mounted needs root (umount2 says EPERM otherwise)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let err = unmount(d.path(), STRICT).unwrap_err();
        assert_eq!(err.first(), Errno::EINVAL, "{err:?}");
        assert!(matches!(err, UnmountError::Unmount { .. }));
        assert!(
            err.to_string()
                .starts_with(&format!("cannot unmount {}: ", d.path().display())),
            "{err}"
        );
        let lenient = Policy {
            not_mounted_is_success: true,
            ..STRICT
        };
        assert_eq!(unmount(d.path(), lenient).unwrap(), Unmounted::NotMounted);
        let missing = d.path().join("missing");
        assert_eq!(unmount(&missing, lenient).unwrap(), Unmounted::NotMounted);
        // Detaching what is not mounted fails too; the error says both steps.
        let detach = Policy {
            detach: Detach::Always,
            ..STRICT
        };
        let err = unmount(d.path(), detach).unwrap_err();
        assert!(matches!(err, UnmountError::Detach { .. }), "{err:?}");
        assert!(err.reason().starts_with("lazy unmount failed: "), "{err}");
    }

    #[test]
    fn mounted_tmpfs() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: hostmount::mounted_tmpfs needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mount = || {
            nix::mount::mount(
                Some("tmpfs"),
                d.path(),
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
        };
        mount().unwrap();
        assert_eq!(unmount(d.path(), STRICT).unwrap(), Unmounted::Now);
        // Busy: an open file keeps it; the strict policy fails, WhenBusy detaches.
        mount().unwrap();
        let f = std::fs::File::create(d.path().join("f")).unwrap();
        let err = unmount(d.path(), STRICT).unwrap_err();
        assert_eq!(err.first(), Errno::EBUSY);
        let busy = Policy {
            detach: Detach::WhenBusy,
            ..STRICT
        };
        assert_eq!(
            unmount(d.path(), busy).unwrap(),
            Unmounted::Detached {
                first: Errno::EBUSY
            }
        );
        drop(f);
        assert!(!crate::mountinfo::is_mounted(d.path()));
    }
}
