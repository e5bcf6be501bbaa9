//! Recovery after a build that could not clean up (SIGKILL, power loss).
//!
//! Every build works in a private `.fledge-build-*` directory next to its output and records
//! its pid there ([`PID_FILE`]). Loop devices, mounts and FUSE mounts a build holds all live
//! under, or are backed by files under, that directory. Before building, fledge looks at the
//! output directory for work directories whose recorded process is gone, and releases exactly
//! what lies under them: mounts (deepest first), then loop devices backed by their files, then
//! the directory. Work directories of live builds, and everything else on the host, are left
//! alone.

use std::fs;
use std::path::{Path, PathBuf};

pub const PREFIX: &str = crate::mountinfo::WORK_DIR_PREFIX;
pub const PID_FILE: &str = "fledge.pid";

/// Record the current process as the owner of `work`.
pub fn claim(work: &Path) -> std::io::Result<()> {
    fs::write(work.join(PID_FILE), format!("{}\n", std::process::id()))
}

/// What a recovery released.
#[derive(Debug, Default)]
pub struct Recovered {
    pub dirs: Vec<PathBuf>,
    pub mounts: usize,
    pub loops: usize,
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks for existence; EPERM means it exists but is not ours.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == nix::Error::EPERM,
    }
}

/// Whether `work` belongs to a build that is no longer running.
fn is_stale(work: &Path) -> bool {
    match fs::read_to_string(work.join(PID_FILE)) {
        Ok(s) => match s.trim().parse::<i32>() {
            Ok(pid) if pid > 0 => !pid_alive(pid),
            _ => true,
        },
        // No pid file: a build killed before it wrote one (it writes it first thing), or
        // something that is not ours; only claim it when it is old.
        Err(_) => fs::metadata(work)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > 3600),
    }
}

/// Mount points at or below `dir`, deepest first, from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

fn unescape(field: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Loop devices whose backing file lies under `dir`.
fn loops_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| {
            let backing = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = PathBuf::from(
                backing
                    .trim_end_matches('\n')
                    .trim_end_matches(" (deleted)"),
            );
            backing
                .starts_with(dir)
                .then(|| PathBuf::from("/dev").join(e.file_name()))
        })
        .collect()
}

/// Unmount `mp` at once, else lazily, else (an unprivileged user's FUSE mount) with
/// `fusermount3 -u -z`.
fn release_mount(mp: &Path) -> bool {
    use crate::hostmount::{unmount, Detach, Fusermount, Policy};
    let policy = Policy {
        not_mounted_is_success: false,
        detach: Detach::Always,
        fusermount: Fusermount::LastResort,
    };
    unmount(mp, policy).is_ok()
}

/// Release what stale builds left in `out_dir`.
pub fn recover(out_dir: &Path) -> Recovered {
    let mut r = Recovered::default();
    let Ok(entries) = fs::read_dir(out_dir) else {
        return r;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(PREFIX) || !e.path().is_dir() {
            continue;
        }
        let work = e.path();
        if !is_stale(&work) {
            continue;
        }
        for mp in mounts_under(&work) {
            if release_mount(&mp) {
                r.mounts += 1;
            } else {
                tracing::warn!("cannot unmount {} left by a killed build", mp.display());
            }
        }
        for dev in loops_under(&work) {
            match loopdev::LoopDevice::open(&dev).and_then(|d| d.detach()) {
                Ok(()) => r.loops += 1,
                Err(err) => tracing::warn!("cannot detach {}: {err}", dev.display()),
            }
        }
        if mounts_under(&work).is_empty() {
            match fs::remove_dir_all(&work) {
                Ok(()) => r.dirs.push(work),
                Err(err) => tracing::warn!("cannot remove {}: {err}", work.display()),
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn stale_and_live_work_dirs() {
        let out = tempfile::tempdir().unwrap();
        let live = out.path().join(format!("{PREFIX}live"));
        let dead = out.path().join(format!("{PREFIX}dead"));
        let other = out.path().join("not-ours");
        for d in [&live, &dead, &other] {
            fs::create_dir(d).unwrap();
        }
        claim(&live).unwrap();
        // A pid that cannot exist (above the kernel's pid_max limit of 2^22).
        fs::write(dead.join(PID_FILE), "4194305\n").unwrap();
        let r = recover(out.path());
        assert_eq!(r.dirs, vec![dead.clone()]);
        assert!(live.exists() && other.exists() && !dead.exists());
    }
}
