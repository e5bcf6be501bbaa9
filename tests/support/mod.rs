//! Shared harness for fledge's integration tests (`mod support;`).
//!
//! - [`kit`]: tar and OCI layout writers, hashing, mount guards (shared with the unit tests).
//! - [`treecmp`]: snapshot a directory tree and diff it against another.
//! - test images made by `scripts/make-test-images.sh` (location, skip/fail policy).
//! - running `fledge mount` as a child and waiting for / tearing down the FUSE mount.
//! - [`servers`]: a registry, podman's Docker API, canned HTTP servers and a refusing port,
//!   each provably the test's own.
#![allow(dead_code)]

pub mod kit;
#[allow(unused_imports)]
pub use kit::{setup_wanted, skip_unless_setup};
pub mod servers;
pub mod treecmp;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Default output directory of scripts/make-test-images.sh.
pub const DEFAULT_IMAGES_DIR: &str = "/var/tmp/fledge-test-images";
/// How many diff lines a failing comparison prints.
pub const DIFF_CAP: usize = 200;

/// `$FLEDGE_TEST_IMAGES` or the default.
pub fn images_dir() -> PathBuf {
    match std::env::var_os("FLEDGE_TEST_IMAGES") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_IMAGES_DIR),
    }
}

/// Whether we run in CI, where a missing precondition must fail instead of skipping.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Print the standard SKIP line for `test`.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIP: {test}: {reason}");
}

/// The base image tar of the unprivileged-container test (debootstrap minbase), made by
/// scripts/make-test-images.sh.
pub fn container_base_tar() -> PathBuf {
    images_dir().join("container/debian-minbase.tar")
}

/// A build manifest (`DIR/r.manifest.json` beside the image) with the one field that names
/// where the image was written (`rootfs.url`, an absolute path) taken out, and that url.
pub fn manifest_without_url(path: &Path) -> (serde_json::Value, String) {
    let text = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut m: serde_json::Value = serde_json::from_slice(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let url = m["rootfs"]
        .as_object_mut()
        .and_then(|r| r.remove("url"))
        .and_then(|u| u.as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("{} has no rootfs.url", path.display()));
    (m, url)
}

/// `fledge.toml` for a build of `reference` with this `[filesystem]` body, written in `dir`.
/// Builds meant to be byte-identical need byte-identical config files: a reproducible
/// build's identity (UUID, hash seed) is derived from the config file's bytes.
pub fn write_build_config(dir: &Path, reference: &str, filesystem: &str) -> PathBuf {
    let path = dir.join("fledge.toml");
    fs::write(
        &path,
        format!(
            "version = \"1\"\nstrategy = \"oci_rootfs\"\n[source]\nimage = \"{reference}\"\n\
             [filesystem]\n{filesystem}"
        ),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// The Debian test image, as (OCI layout dir, image reference `oci:DIR:test`, oracle
/// rootfs). None (after printing SKIP) when the images were not built; a panic in CI.
pub struct DebianImage {
    pub layout: PathBuf,
    pub reference: String,
    pub oracle_rootfs: PathBuf,
}

/// [`debian_image`] for a test that needs root: when not root, says why the test is
/// skipped (`why`) and gives `None`.
pub fn debian_image_as_root(test: &str, why: &str) -> Option<DebianImage> {
    if !is_root() {
        skip(test, why);
        return None;
    }
    debian_image(test)
}

pub fn debian_image(test: &str) -> Option<DebianImage> {
    let dir = images_dir();
    let layout = dir.join("debian");
    let oracle_rootfs = dir.join("oracle/debian-test/rootfs");
    let ready = layout.join("index.json").is_file() && oracle_rootfs.is_dir();
    if !ready {
        let msg = format!(
            "run scripts/make-test-images.sh first ({} or its oracle is missing)",
            layout.join("index.json").display()
        );
        if in_ci() {
            panic!("test image missing in CI: {msg}");
        }
        eprintln!("SKIP: {test}: {msg}");
        return None;
    }
    Some(DebianImage {
        reference: format!("oci:{}:test", layout.display()),
        layout,
        oracle_rootfs,
    })
}

/// A copy of the Debian test image (blobs hard-linked) with one more layer that deletes every
/// device node and gives the one file with a sub-second mtime a whole-second one: what images
/// from a registry usually look like (Docker keeps /dev empty).
pub fn registry_like_image(img: &DebianImage, dir: &Path) -> String {
    // The extra layer: whiteouts for device nodes, index.html again at a whole second.
    let mut entries = Vec::new();
    let mut stack = vec![img.oracle_rootfs.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_char_device() || ft.is_block_device() {
                let rel = e
                    .path()
                    .strip_prefix(&img.oracle_rootfs)
                    .unwrap()
                    .to_path_buf();
                let wh = rel.with_file_name(format!(
                    ".wh.{}",
                    rel.file_name().unwrap().to_string_lossy()
                ));
                use std::os::unix::ffi::OsStrExt;
                entries.push(kit::RawEntry {
                    mtime: 0,
                    ..kit::RawEntry::file(wh.as_os_str().as_bytes(), b"")
                });
            }
        }
    }
    let html = fs::read(img.oracle_rootfs.join("var/www/html/index.html")).unwrap();
    entries.push(kit::RawEntry::file(b"var/www/html/index.html", &html));
    let layer = kit::tar(&entries);
    kit::derive_with_layer(&img.layout, &dir.join("layout"), &layer, "nodev")
}

/// File system type of the mount whose mount point is exactly `mp` (the last one
/// if stacked), from /proc/self/mountinfo.
pub fn mount_fstype(mp: &Path) -> Option<String> {
    mount_info(mp).map(|(fstype, _)| fstype)
}

/// (fstype, per-mount options such as "ro,nosuid,...") of the mount whose mount
/// point is exactly `mp` (the last one if stacked), from /proc/self/mountinfo.
pub fn mount_info(mp: &Path) -> Option<(String, String)> {
    let mp = fs::canonicalize(mp).unwrap_or_else(|_| mp.to_path_buf());
    fledge::mountinfo::entries()
        .into_iter()
        .rev()
        .find(|e| e.mount_point == mp)
        .map(|e| (e.fstype, e.mount_options))
}

/// A running `fledge mount` child plus its mount point; tears everything down on drop.
pub struct FledgeMount {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
}

impl FledgeMount {
    /// Spawn `cmd` (a fully built `fledge mount ...` command line, possibly wrapped in
    /// runuser) with stdout+stderr going to `log`.
    pub fn spawn(mut cmd: Command, mountpoint: &Path, log: &Path) -> io::Result<Self> {
        let out = fs::File::create(log)?;
        let err = out.try_clone()?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn()?;
        Ok(FledgeMount {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the mount point shows a FUSE mount; fail early if the child exits.
    /// Returns the fstype seen in mountinfo.
    pub fn wait_mounted(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = mount_fstype(&self.mountpoint) {
                if t.starts_with("fuse") {
                    return Ok(t);
                }
            }
            if let Some(child) = self.child.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        self.child = None;
                        return Err(format!(
                            "fledge mount exited with {status} before mounting; output:\n{}",
                            self.log_text()
                        ));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(format!("waiting for fledge mount: {e}")),
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no FUSE mount at {} after {timeout:?}; output:\n{}",
                    self.mountpoint.display(),
                    self.log_text()
                ));
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// Pid of the spawned child, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Non-blocking check whether the child has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Err(io::Error::other("fledge mount was already reaped")),
        }
    }

    /// Send `sig` to the child and wait (up to `timeout`) for it to exit.
    pub fn stop(&mut self, sig: Signal, timeout: Duration) -> Result<ExitStatus, String> {
        let pid = self.pid().ok_or("fledge mount is not running")?;
        let pid = i32::try_from(pid).map_err(|e| e.to_string())?;
        self.stop_via(pid, sig, timeout)
    }

    /// Send `sig` to `pid` (the child or one of its descendants, e.g. the process
    /// runuser started) and wait (up to `timeout`) for the child to exit.
    pub fn stop_via(
        &mut self,
        pid: i32,
        sig: Signal,
        timeout: Duration,
    ) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else {
            return Err("fledge mount is not running".to_string());
        };
        kill(Pid::from_raw(pid), sig).map_err(|e| format!("kill({pid}, {sig}): {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "fledge mount did not exit within {timeout:?} after {sig}; output:\n{}",
                        self.log_text()
                    ));
                }
                Ok(None) => sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("waiting for fledge mount: {e}")),
            }
        }
    }

    pub fn is_mounted(&self) -> bool {
        mount_fstype(&self.mountpoint).is_some_and(|t| t.starts_with("fuse"))
    }
}

impl Drop for FledgeMount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.is_mounted() {
            force_unmount(&self.mountpoint);
        }
    }
}

/// Best-effort lazy unmount of a FUSE mount left behind by a failed test.
pub fn force_unmount(mp: &Path) {
    for (prog, args) in [
        ("fusermount3", &["-u", "-z"][..]),
        ("fusermount", &["-u", "-z"][..]),
        ("umount", &["-l"][..]),
    ] {
        let ok = Command::new(prog)
            .args(args)
            .arg(mp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
    }
}

/// Whether `prog` is found on PATH.
/// Mounts whose mount point is `dir` or below it (lines of /proc/self/mountinfo): what a
/// build must not leave behind.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|mp| mp.starts_with(&d)))
        .map(str::to_string)
        .collect()
}

/// Loop devices whose backing file is `dir` or below it ("loopN: path"), from sysfs.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    let mut found = Vec::new();
    for e in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
            if b.starts_with(&d) {
                found.push(format!("{}: {}", e.file_name().to_string_lossy(), b.trim()));
            }
        }
    }
    found
}

/// Panic, naming `what` and printing the checker's output, unless the filesystem checker of
/// `fs` (`e2fsck -fn`, `xfs_repair -n`, `btrfs check`) finds `image` clean.
pub fn assert_fsck_clean(image: &Path, fs: &str, what: &str) {
    let (prog, args): (&str, &[&str]) = match fs {
        "ext4" => ("e2fsck", &["-fn"]),
        "xfs" => ("xfs_repair", &["-n"]),
        "btrfs" => ("btrfs", &["check"]),
        // Lists every inode with its attributes: reads and checks all metadata tables.
        "squashfs" => ("unsquashfs", &["-no-progress", "-lls"]),
        "erofs" => {
            // Decodes every file too; fails on `<E>` lines as well as the exit status.
            if let Err(e) = kit::fsck_erofs(&["--extract"], image) {
                panic!("{what}: {e}");
            }
            return;
        }
        other => panic!("{what}: no checker known for {other}"),
    };
    let out = Command::new(prog).args(args).arg(image).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {prog} {args:?} {} finds errors:\n{}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sha256 of a file, as lower-case hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    io::copy(&mut f, &mut h).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hex::encode(h.finalize())
}

/// The filesystem UUID of an image file, as `blkid -p` (low-level probe) reads it.
pub fn fs_uuid(image: &Path) -> String {
    let out = run_ok(
        Command::new("blkid")
            .args(["-p", "-s", "UUID", "-o", "value"])
            .arg(image),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn have_program(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(prog).is_file()))
}

/// Run a command to completion, capturing output; panics with the output on failure
/// to start or non-zero exit.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Options for comparing a mounted view with the umoci oracle: everything is
/// compared, including the root directory (layer 1 of the test image has a "./"
/// entry, whose metadata umoci applies to the bundle's rootfs).
pub fn oracle_diff_options() -> treecmp::DiffOptions {
    treecmp::DiffOptions::default()
}

/// Snapshot `actual`, compare it with the oracle snapshot and panic with a capped
/// report of every difference.
pub fn assert_same_tree(
    oracle: &treecmp::Snapshot,
    actual_root: &Path,
    opts: &treecmp::DiffOptions,
    what: &str,
) {
    let actual = treecmp::snapshot(actual_root)
        .unwrap_or_else(|e| panic!("snapshot of {}: {e}", actual_root.display()));
    let lines = treecmp::diff(oracle, &actual, opts);
    assert!(
        lines.is_empty(),
        "{what}: {} differences (expected = oracle, actual = {}):\n{}",
        lines.len(),
        actual_root.display(),
        treecmp::report(&lines, DIFF_CAP)
    );
    assert!(
        actual.len() > 1 || oracle.len() <= 1,
        "{what}: snapshot of {} is empty",
        actual_root.display()
    );
}

/// The unprivileged user the rootless tests run as.
pub const TEST_USER: &str = "fledge-test";

pub fn fuse_conf_allows_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf")
        .is_ok_and(|s| s.lines().any(|l| l.trim() == "user_allow_other"))
}

pub fn dev_fuse_is_world_rw() -> bool {
    std::fs::metadata("/dev/fuse").is_ok_and(|m| m.permissions().mode() & 0o666 == 0o666)
}

/// Ensure the unprivileged-mount preconditions, fixing them when allowed.
/// Returns the test user's (uid, gid), or the reason to skip.
pub fn unprivileged_preconditions() -> Result<(u32, u32), String> {
    if !is_root() {
        return Err("needs root (creates the mount point for, and runs as, the test user)".into());
    }
    for prog in ["runuser", "fusermount3"] {
        if !have_program(prog) {
            return Err(format!("{prog} not installed"));
        }
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse not available".into());
    }
    let setup = setup_wanted();
    let mut user = nix::unistd::User::from_name(TEST_USER).ok().flatten();
    if user.is_none() && setup {
        run_ok(Command::new("useradd").args(["--system", "--create-home", TEST_USER]));
        user = nix::unistd::User::from_name(TEST_USER).ok().flatten();
    }
    let Some(user) = user else {
        return Err(format!(
            "user {TEST_USER} missing (set FLEDGE_TEST_SETUP=1 to create it)"
        ));
    };
    if !dev_fuse_is_world_rw() {
        if !setup {
            return Err("/dev/fuse is not mode 0666 (set FLEDGE_TEST_SETUP=1)".into());
        }
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666))
            .map_err(|e| format!("chmod /dev/fuse: {e}"))?;
    }
    if !fuse_conf_allows_other() {
        if !setup {
            return Err("/etc/fuse.conf lacks user_allow_other (set FLEDGE_TEST_SETUP=1)".into());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/etc/fuse.conf")
            .map_err(|e| format!("open /etc/fuse.conf: {e}"))?;
        std::io::Write::write_all(&mut f, b"\nuser_allow_other\n")
            .map_err(|e| format!("write /etc/fuse.conf: {e}"))?;
    }
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}
