//! Capability probes, shared by `fledge doctor` and the choice of build backend.
//!
//! Each probe is cheap (a file read, an `open`, or one `-V`/`--help` run of a tool) and
//! reports a [`Probe`] with a stable id. Status meaning:
//! - [`Status::Ok`]: the capability is there;
//! - [`Status::Warn`]: absent or limited, but some backend works without it (not root, a
//!   filesystem not listed in `/proc/filesystems` that may load as a module, tools for a
//!   non-default filesystem, ...);
//! - [`Status::Fail`]: absent or unusable where fledge's default path needs it.
//!
//! The backends read specific ids; doctor prints them all. Heavier checks (a real FUSE mount,
//! attaching a loop device) belong to the backends and are not done here.

use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use serde::Serialize;

use crate::runner::{package_for, Tool};

/// Bytes an unprivileged process could still write on the filesystem holding `path`
/// (`statvfs`: available blocks times the fragment size). The one free-space measure of
/// `doctor`, the build's space checks and the kernel backend's copy.
pub fn free_bytes(path: &std::path::Path) -> nix::Result<u64> {
    nix::sys::statvfs::statvfs(path).map(|st| st.blocks_available() * st.fragment_size())
}

/// `CAP_SYS_ADMIN` bit number.
pub const CAP_SYS_ADMIN: u32 = 21;
/// First e2fsprogs release whose `mkfs.ext4` has `-d` (populate from a directory).
pub const MKE2FS_MIN_POPULATE: Version = Version(1, 43, 0);

/// Probe outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One capability check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// Stable id, `area.name` (`privileges.euid`, `tools.mkfs_ext4`, ...).
    pub id: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Probe {
    pub fn new(id: &'static str, status: Status, detail: impl Into<String>) -> Probe {
        Probe {
            id,
            status,
            detail: detail.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Probe {
        self.hint = Some(hint.into());
        self
    }

    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }
}

/// The probe with `id` in `probes`.
pub fn find<'a>(probes: &'a [Probe], id: &str) -> Option<&'a Probe> {
    probes.iter().find(|p| p.id == id)
}

/// A dotted version number (missing parts are 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Version(pub u32, pub u32, pub u32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The first version-looking token of a tool's version text: digits with at least one dot,
/// optionally after a `v` (`mke2fs 1.47.0 (5-Feb-2023)`, `btrfs-progs v6.2`,
/// `mkfs.xfs version 6.1.0`).
pub fn parse_version(text: &str) -> Option<Version> {
    text.split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter_map(|tok| {
            let tok = tok.strip_prefix('v').unwrap_or(tok);
            if !tok.starts_with(|c: char| c.is_ascii_digit()) || !tok.contains('.') {
                return None;
            }
            let mut parts = tok.split('.').map(|p| {
                let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u32>().ok()
            });
            let major = parts.next()??;
            let minor = parts.next()??;
            let patch = parts.next().flatten().unwrap_or(0);
            Some(Version(major, minor, patch))
        })
        .next()
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Filesystem names of a `/proc/filesystems` text (`nodev` flags dropped).
pub fn parse_filesystems(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|n| *n != "nodev")
        .map(str::to_owned)
        .collect()
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `privileges.euid`.
pub fn probe_euid() -> Probe {
    let euid = nix::unistd::geteuid().as_raw();
    if euid == 0 {
        Probe::new("privileges.euid", Status::Ok, "running as root (euid 0)")
    } else {
        Probe::new(
            "privileges.euid",
            Status::Warn,
            format!("running as euid {euid}: only the rootless backend is available"),
        )
        .hint("run with sudo for the kernel (loop mount) backend")
    }
}

/// Whether this process has CAP_SYS_ADMIN effective (None when `/proc/self/status` cannot
/// be read or has no `CapEff` line).
pub fn cap_sys_admin_effective() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status).map(|mask| mask & (1u64 << CAP_SYS_ADMIN) != 0)
}

/// `privileges.cap_sys_admin`, from `CapEff` in `/proc/self/status`.
pub fn probe_cap_sys_admin() -> Probe {
    const ID: &str = "privileges.cap_sys_admin";
    let status = match std::fs::read_to_string("/proc/self/status") {
        Ok(s) => s,
        Err(e) => {
            return Probe::new(
                ID,
                Status::Warn,
                format!("cannot read /proc/self/status: {e}"),
            )
        }
    };
    match parse_cap_eff(&status) {
        Some(mask) if mask & (1u64 << CAP_SYS_ADMIN) != 0 => Probe::new(
            ID,
            Status::Ok,
            format!("CAP_SYS_ADMIN effective (CapEff {mask:016x})"),
        ),
        Some(mask) => Probe::new(
            ID,
            Status::Warn,
            format!("CAP_SYS_ADMIN not effective (CapEff {mask:016x}): cannot mount"),
        )
        .hint("run as root, or use the rootless backend"),
        None => Probe::new(ID, Status::Warn, "no CapEff line in /proc/self/status"),
    }
}

/// Judge user namespace availability from `max_user_namespaces`,
/// `kernel.unprivileged_userns_clone` (Debian/Ubuntu kernels) and
/// `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 23.10+); `None` = file absent.
pub fn userns_verdict(
    max: Option<u64>,
    unprivileged_clone: Option<u64>,
    apparmor_restrict: Option<u64>,
    root: bool,
) -> Probe {
    const ID: &str = "kernel.userns";
    match max {
        Some(0) => {
            return Probe::new(
                ID,
                Status::Warn,
                "user namespaces disabled (max_user_namespaces = 0)",
            )
            .hint("sysctl user.max_user_namespaces=15000")
        }
        None => return Probe::new(ID, Status::Warn, "kernel without user namespaces"),
        Some(_) => {}
    }
    if root {
        return Probe::new(ID, Status::Ok, "user namespaces available");
    }
    if unprivileged_clone == Some(0) {
        return Probe::new(
            ID,
            Status::Warn,
            "unprivileged user namespaces disabled (kernel.unprivileged_userns_clone = 0)",
        )
        .hint("sysctl kernel.unprivileged_userns_clone=1");
    }
    if apparmor_restrict == Some(1) {
        return Probe::new(
            ID,
            Status::Warn,
            "unprivileged user namespaces restricted by AppArmor",
        )
        .hint("sysctl kernel.apparmor_restrict_unprivileged_userns=0");
    }
    Probe::new(ID, Status::Ok, "unprivileged user namespaces available")
}

/// `kernel.userns`.
pub fn probe_userns() -> Probe {
    userns_verdict(
        read_u64("/proc/sys/user/max_user_namespaces"),
        read_u64("/proc/sys/kernel/unprivileged_userns_clone"),
        read_u64("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
        is_root(),
    )
}

fn probe_device_rw(id: &'static str, path: &str, missing_hint: &str, denied_hint: &str) -> Probe {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Probe::new(id, Status::Ok, format!("{path} opens read-write")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Probe::new(id, Status::Fail, format!("{path} does not exist")).hint(missing_hint)
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Probe::new(id, Status::Fail, format!("{path}: permission denied")).hint(denied_hint)
        }
        Err(e) => Probe::new(id, Status::Fail, format!("cannot open {path}: {e}")),
    }
}

/// `kernel.loop_control`: `/dev/loop-control` opens read-write.
pub fn probe_loop_control() -> Probe {
    probe_device_rw(
        "kernel.loop_control",
        "/dev/loop-control",
        "modprobe loop (in a container: pass the loop devices through)",
        "run as root for the kernel backend, or use the rootless backend",
    )
}

/// `fuse.dev`: `/dev/fuse` opens read-write.
pub fn probe_fuse_dev() -> Probe {
    probe_device_rw(
        "fuse.dev",
        "/dev/fuse",
        "modprobe fuse (in a container: --device /dev/fuse)",
        "add yourself to the group owning /dev/fuse, or chmod 0666 /dev/fuse",
    )
}

/// `kernel.fs_ext4`, `kernel.fs_xfs`, `kernel.fs_btrfs`, `kernel.fs_fuse` from the text of
/// `/proc/filesystems` (`None`: unreadable).
pub fn filesystem_probes(proc_filesystems: Option<&str>) -> Vec<Probe> {
    let names = proc_filesystems.map(parse_filesystems);
    [
        ("kernel.fs_ext4", "ext4"),
        ("kernel.fs_xfs", "xfs"),
        ("kernel.fs_btrfs", "btrfs"),
        ("kernel.fs_fuse", "fuse"),
    ]
    .into_iter()
    .map(|(id, fs)| match &names {
        None => Probe::new(id, Status::Warn, "cannot read /proc/filesystems"),
        Some(n) if n.iter().any(|x| x == fs) => {
            Probe::new(id, Status::Ok, format!("{fs} in /proc/filesystems"))
        }
        Some(_) => Probe::new(
            id,
            Status::Warn,
            format!("{fs} not in /proc/filesystems (it may still load as a module on mount)"),
        )
        .hint(format!("modprobe {fs}")),
    })
    .collect()
}

/// The filesystem probes for this machine.
pub fn probe_filesystems() -> Vec<Probe> {
    let text = std::fs::read_to_string("/proc/filesystems").ok();
    filesystem_probes(text.as_deref())
}

/// `fuse.fusermount3`: present, and setuid root when not running as root.
pub fn probe_fusermount() -> Probe {
    const ID: &str = "fuse.fusermount3";
    let Some(path) = crate::runner::which("fusermount3") else {
        return Probe::new(ID, Status::Fail, "fusermount3 not found").hint("apt-get install fuse3");
    };
    let md = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) => {
            return Probe::new(
                ID,
                Status::Fail,
                format!("cannot stat {}: {e}", path.display()),
            )
        }
    };
    let setuid_root = md.uid() == 0 && md.permissions().mode() & 0o4000 != 0;
    if setuid_root || is_root() {
        let how = if setuid_root { ", setuid root" } else { "" };
        Probe::new(ID, Status::Ok, format!("{}{how}", path.display()))
    } else {
        Probe::new(
            ID,
            Status::Fail,
            format!(
                "{} is not setuid root: unprivileged FUSE mounts fail",
                path.display()
            ),
        )
        .hint(format!("chmod u+s {}", path.display()))
    }
}

/// Run a tool for a probe; `Err` carries the finished probe (tool missing or not runnable).
fn tool_text(
    id: &'static str,
    program: &str,
    args: &[&str],
    missing: Status,
) -> Result<String, Probe> {
    match Tool::new(program).args(args).output() {
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push('\n');
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            Ok(text)
        }
        Err(crate::runner::RunError::NotFound { package, .. }) => {
            let p = Probe::new(id, missing, format!("{program} not found"));
            Err(match package {
                Some(pkg) => p.hint(format!("apt-get install {pkg}")),
                None => p,
            })
        }
        Err(e) => Err(Probe::new(id, Status::Fail, e.to_string())),
    }
}

/// Judge `mkfs.ext4 -V` output: `-d` needs e2fsprogs >= 1.43.
pub fn mkfs_ext4_verdict(version_text: &str) -> Probe {
    const ID: &str = "tools.mkfs_ext4";
    match parse_version(version_text) {
        Some(v) if v >= MKE2FS_MIN_POPULATE => {
            Probe::new(ID, Status::Ok, format!("e2fsprogs {v}, supports -d"))
        }
        Some(v) => Probe::new(
            ID,
            Status::Fail,
            format!("e2fsprogs {v} is too old for -d (needs >= {MKE2FS_MIN_POPULATE})"),
        )
        .hint("upgrade e2fsprogs"),
        None => Probe::new(
            ID,
            Status::Warn,
            format!(
                "cannot tell the e2fsprogs version from: {}",
                first_line(version_text)
            ),
        ),
    }
}

/// Judge `mkfs.btrfs --help` text and version: `--rootdir` must be listed.
pub fn mkfs_btrfs_verdict(help_text: &str, version_text: &str) -> Probe {
    const ID: &str = "tools.mkfs_btrfs";
    let v = parse_version(version_text)
        .map(|v| format!("btrfs-progs {v}"))
        .unwrap_or_else(|| "mkfs.btrfs".into());
    if help_text.contains("--rootdir") {
        Probe::new(ID, Status::Ok, format!("{v}, supports --rootdir"))
    } else {
        Probe::new(ID, Status::Warn, format!("{v} does not list --rootdir"))
            .hint("upgrade btrfs-progs")
    }
}

fn first_line(s: &str) -> &str {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// `tools.mkfs_ext4`.
pub fn probe_mkfs_ext4() -> Probe {
    match tool_text("tools.mkfs_ext4", "mkfs.ext4", &["-V"], Status::Fail) {
        Ok(text) => mkfs_ext4_verdict(&text),
        Err(p) => p,
    }
}

/// `tools.mkfs_btrfs`.
pub fn probe_mkfs_btrfs() -> Probe {
    const ID: &str = "tools.mkfs_btrfs";
    let help = match tool_text(ID, "mkfs.btrfs", &["--help"], Status::Warn) {
        Ok(t) => t,
        Err(p) => return p,
    };
    let version = tool_text(ID, "mkfs.btrfs", &["--version"], Status::Warn).unwrap_or_default();
    mkfs_btrfs_verdict(&help, &version)
}

/// A tool whose only requirement is to run and print a version.
fn version_probe(id: &'static str, program: &str, args: &[&str], missing: Status) -> Probe {
    match tool_text(id, program, args, missing) {
        Ok(text) => match parse_version(&text) {
            Some(v) => {
                let pkg = package_for(program).unwrap_or(program);
                Probe::new(id, Status::Ok, format!("{program} ({pkg} {v})"))
            }
            None => Probe::new(
                id,
                Status::Warn,
                format!(
                    "{program} runs but prints no version: {}",
                    first_line(&text)
                ),
            ),
        },
        Err(p) => p,
    }
}

/// `tools.mkfs_xfs` (protofile `-p` support exists in every xfsprogs).
pub fn probe_mkfs_xfs() -> Probe {
    version_probe("tools.mkfs_xfs", "mkfs.xfs", &["-V"], Status::Warn)
}

/// `tools.mksquashfs` (the userspace squashfs backend).
pub fn probe_mksquashfs() -> Probe {
    version_probe(
        "tools.mksquashfs",
        "mksquashfs",
        &["-version"],
        Status::Warn,
    )
}

/// `tools.mkfs_erofs` (the userspace EROFS backend). erofs-utils 1.5 has no version flag
/// (it prints its version only when it builds): a usage text on `--help` is the proof.
pub fn probe_mkfs_erofs() -> Probe {
    const ID: &str = "tools.mkfs_erofs";
    match tool_text(ID, "mkfs.erofs", &["--help"], Status::Warn) {
        Ok(text) if text.contains("usage:") => match parse_version(&text) {
            Some(v) => Probe::new(ID, Status::Ok, format!("mkfs.erofs (erofs-utils {v})")),
            None => Probe::new(ID, Status::Ok, "mkfs.erofs (erofs-utils)"),
        },
        Ok(text) => Probe::new(
            ID,
            Status::Warn,
            format!("mkfs.erofs --help prints no usage: {}", first_line(&text)),
        ),
        Err(p) => p,
    }
}

/// `tools.e2fsck`.
pub fn probe_e2fsck() -> Probe {
    version_probe("tools.e2fsck", "e2fsck", &["-V"], Status::Fail)
}

/// `tools.resize2fs` (it has no `-V`; without arguments it prints its version and usage).
pub fn probe_resize2fs() -> Probe {
    version_probe("tools.resize2fs", "resize2fs", &[], Status::Fail)
}

/// `tools.debugfs`.
pub fn probe_debugfs() -> Probe {
    version_probe("tools.debugfs", "debugfs", &["-V"], Status::Warn)
}

/// `tools.xfs_repair`.
pub fn probe_xfs_repair() -> Probe {
    version_probe("tools.xfs_repair", "xfs_repair", &["-V"], Status::Warn)
}

/// `tools.btrfs`.
pub fn probe_btrfs() -> Probe {
    version_probe("tools.btrfs", "btrfs", &["--version"], Status::Warn)
}

/// Every probe this module implements, in a stable order. Tool probes run in parallel.
pub fn probe_all() -> Vec<Probe> {
    probe_selected(|_| true)
}

/// The probes of [`probe_all`], but only the formatter tools whose id `want_tool` accepts
/// (each tool probe starts a process; `fledge build` asks only about the tools of its
/// filesystem type).
pub fn probe_selected(want_tool: impl Fn(&str) -> bool) -> Vec<Probe> {
    let mut probes = vec![
        probe_euid(),
        probe_cap_sys_admin(),
        probe_userns(),
        probe_loop_control(),
    ];
    probes.extend(probe_filesystems());
    probes.push(probe_fuse_dev());
    probes.push(probe_fusermount());
    type ProbeFn = fn() -> Probe;
    let tools: [(&'static str, ProbeFn); 10] = [
        ("tools.mkfs_ext4", probe_mkfs_ext4),
        ("tools.e2fsck", probe_e2fsck),
        ("tools.resize2fs", probe_resize2fs),
        ("tools.debugfs", probe_debugfs),
        ("tools.mkfs_xfs", probe_mkfs_xfs),
        ("tools.xfs_repair", probe_xfs_repair),
        ("tools.mkfs_btrfs", probe_mkfs_btrfs),
        ("tools.btrfs", probe_btrfs),
        ("tools.mksquashfs", probe_mksquashfs),
        ("tools.mkfs_erofs", probe_mkfs_erofs),
    ];
    let results: Vec<Probe> = std::thread::scope(|s| {
        let handles: Vec<_> = tools
            .iter()
            .filter(|(id, _)| want_tool(id))
            .map(|(id, f)| (*id, s.spawn(f)))
            .collect();
        handles
            .into_iter()
            .map(|(id, h)| {
                h.join()
                    .unwrap_or_else(|_| Probe::new(id, Status::Fail, "probe panicked"))
            })
            .collect()
    });
    probes.extend(results);
    probes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parsing() {
        let cases = [
            (
                "mke2fs 1.47.0 (5-Feb-2023)\n\tUsing EXT2FS Library version 1.47.0",
                Some(Version(1, 47, 0)),
            ),
            ("mke2fs 1.42.9 (28-Dec-2013)", Some(Version(1, 42, 9))),
            (
                "mkfs.btrfs, part of btrfs-progs v6.2",
                Some(Version(6, 2, 0)),
            ),
            ("btrfs-progs v6.6.3\n-EXPERIMENTAL", Some(Version(6, 6, 3))),
            ("mkfs.xfs version 6.1.0", Some(Version(6, 1, 0))),
            ("xfs_repair version 5.10.0-rc1", Some(Version(5, 10, 0))),
            (
                "resize2fs 1.47.0 (5-Feb-2023)\nUsage: resize2fs [-d debug_flags]",
                Some(Version(1, 47, 0)),
            ),
            ("no version here", None),
            ("mkfs.ext4 42", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_version(text), want, "{text}");
        }
        assert!(Version(1, 43, 0) > Version(1, 42, 99));
        assert_eq!(Version(1, 47, 0).to_string(), "1.47.0");
    }

    #[test]
    fn cap_eff_parsing() {
        let status = "Name:\tcat\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000001fffeffffff\nCapBnd:\t000001ffffffffff\n";
        let mask = parse_cap_eff(status).unwrap();
        assert_eq!(mask, 0x1fffeffffff);
        assert_ne!(mask & (1 << CAP_SYS_ADMIN), 0);
        let user = "CapEff:\t0000000000000000\n";
        assert_eq!(parse_cap_eff(user), Some(0));
        // CAP_SYS_ADMIN alone is bit 21.
        assert_eq!(parse_cap_eff("CapEff:\t0000000000200000"), Some(1 << 21));
        assert_eq!(parse_cap_eff("CapEff:\tzz"), None);
        assert_eq!(parse_cap_eff("Name: x"), None);
    }

    #[test]
    fn proc_filesystems_parsing() {
        let text = "nodev\tsysfs\nnodev\ttmpfs\n\text4\n\txfs\nnodev\tfuse\n\tfuseblk\n";
        assert_eq!(
            parse_filesystems(text),
            vec!["sysfs", "tmpfs", "ext4", "xfs", "fuse", "fuseblk"]
        );
        let probes = filesystem_probes(Some(text));
        let st: Vec<(&str, Status)> = probes.iter().map(|p| (p.id, p.status)).collect();
        assert_eq!(
            st,
            vec![
                ("kernel.fs_ext4", Status::Ok),
                ("kernel.fs_xfs", Status::Ok),
                ("kernel.fs_btrfs", Status::Warn),
                ("kernel.fs_fuse", Status::Ok),
            ]
        );
        assert_eq!(probes[2].hint.as_deref(), Some("modprobe btrfs"));
        // fuseblk must not count as fuse.
        let p = filesystem_probes(Some("\tfuseblk\n"));
        assert_eq!(p[3].status, Status::Warn);
        assert!(filesystem_probes(None)
            .iter()
            .all(|p| p.status == Status::Warn));
    }

    #[test]
    fn userns_verdicts() {
        let cases = [
            (Some(0), None, None, true, Status::Warn),
            (None, None, None, false, Status::Warn),
            (Some(100), Some(0), None, true, Status::Ok),
            (Some(100), Some(0), None, false, Status::Warn),
            (Some(100), Some(1), Some(1), false, Status::Warn),
            (Some(100), Some(1), Some(0), false, Status::Ok),
            (Some(100), None, None, false, Status::Ok),
        ];
        for (max, clone, aa, root, want) in cases {
            let p = userns_verdict(max, clone, aa, root);
            assert_eq!(
                p.status, want,
                "{max:?} {clone:?} {aa:?} {root}: {}",
                p.detail
            );
            assert_eq!(p.id, "kernel.userns");
            if want == Status::Warn && max.is_some() {
                assert!(p.hint.is_some());
            }
        }
    }

    #[test]
    fn tool_verdicts() {
        assert_eq!(
            mkfs_ext4_verdict("mke2fs 1.47.0 (5-Feb-2023)").status,
            Status::Ok
        );
        assert_eq!(
            mkfs_ext4_verdict("mke2fs 1.43.0 (17-May-2016)").status,
            Status::Ok
        );
        let old = mkfs_ext4_verdict("mke2fs 1.42.13 (17-May-2015)");
        assert_eq!(old.status, Status::Fail);
        assert_eq!(
            old.detail,
            "e2fsprogs 1.42.13 is too old for -d (needs >= 1.43.0)"
        );
        assert_eq!(mkfs_ext4_verdict("garbage\n").status, Status::Warn);
        let ok = mkfs_btrfs_verdict(
            "  -r|--rootdir DIR   copy files from DIR",
            "mkfs.btrfs, part of btrfs-progs v6.2",
        );
        assert_eq!(ok.status, Status::Ok);
        assert_eq!(ok.detail, "btrfs-progs 6.2.0, supports --rootdir");
        assert_eq!(
            mkfs_btrfs_verdict("usage: mkfs.btrfs", "").status,
            Status::Warn
        );
    }

    #[test]
    fn missing_tool_probe_names_the_package() {
        let p = version_probe("tools.x", "mkfs.xfs-not-here", &["-V"], Status::Warn);
        assert_eq!(p.status, Status::Warn);
        assert_eq!(p.detail, "mkfs.xfs-not-here not found");
        let p = version_probe("tools.x", "no-such-tool", &[], Status::Fail);
        assert_eq!(p.status, Status::Fail);
        assert_eq!(p.hint, None);
    }

    #[test]
    fn probes_on_this_machine() {
        let start = std::time::Instant::now();
        let probes = probe_all();
        let took = start.elapsed();
        // Each probe is meant to take well under 100 ms; leave room for a loaded machine.
        eprintln!("probe_all took {took:?}");
        assert!(took.as_millis() < 2000, "probe_all took {took:?}");

        let mut ids: Vec<&str> = probes.iter().map(|p| p.id).collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate probe ids");
        for id in [
            "privileges.euid",
            "privileges.cap_sys_admin",
            "kernel.userns",
            "kernel.loop_control",
            "kernel.fs_ext4",
            "fuse.dev",
            "fuse.fusermount3",
            "tools.mkfs_ext4",
            "tools.mkfs_xfs",
            "tools.mkfs_btrfs",
            "tools.resize2fs",
            "tools.e2fsck",
            "tools.xfs_repair",
            "tools.btrfs",
            "tools.debugfs",
            "tools.mksquashfs",
            "tools.mkfs_erofs",
        ] {
            assert!(find(&probes, id).is_some(), "missing probe {id}");
        }
        for p in &probes {
            assert!(!p.detail.is_empty(), "{} has no detail", p.id);
        }

        let euid = find(&probes, "privileges.euid").unwrap();
        assert_eq!(euid.is_ok(), nix::unistd::geteuid().is_root(), "{euid:?}");

        // Device probes agree with a direct open.
        for (id, dev) in [
            ("kernel.loop_control", "/dev/loop-control"),
            ("fuse.dev", "/dev/fuse"),
        ] {
            let direct = OpenOptions::new().read(true).write(true).open(dev).is_ok();
            assert_eq!(find(&probes, id).unwrap().is_ok(), direct, "{id}");
        }

        // Tool probes agree with `which`: a present tool never reports "not found".
        for (id, prog) in [
            ("tools.mkfs_ext4", "mkfs.ext4"),
            ("tools.e2fsck", "e2fsck"),
            ("tools.resize2fs", "resize2fs"),
            ("tools.mkfs_xfs", "mkfs.xfs"),
            ("tools.mkfs_btrfs", "mkfs.btrfs"),
            ("tools.btrfs", "btrfs"),
            ("tools.mksquashfs", "mksquashfs"),
            ("tools.mkfs_erofs", "mkfs.erofs"),
        ] {
            let p = find(&probes, id).unwrap();
            let present = crate::runner::which(prog).is_some();
            assert_eq!(!p.detail.ends_with("not found"), present, "{p:?}");
            if present {
                assert!(p.is_ok(), "{p:?}");
            } else {
                eprintln!("SKIP: {prog} not installed; only its absence was checked");
            }
        }

        let json = serde_json::to_value(&probes).unwrap();
        assert_eq!(json[0]["id"], "privileges.euid");
        assert!(["ok", "warn", "fail"].contains(&json[0]["status"].as_str().unwrap()));
    }

    #[test]
    fn root_has_cap_sys_admin() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: not root");
            return;
        }
        let p = probe_cap_sys_admin();
        // Root in a container may lack CAP_SYS_ADMIN; the probe must then agree with CapEff.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let has = parse_cap_eff(&status).unwrap() & (1 << CAP_SYS_ADMIN) != 0;
        assert_eq!(p.is_ok(), has, "{p:?}");
    }
}
