//! Black-box conformance of `fledge mount` against `umoci unpack`.
//!
//! The Debian test image and its umoci oracle come from scripts/make-test-images.sh
//! (`$FLEDGE_TEST_IMAGES`, default /var/tmp/fledge-test-images). Tests that need it
//! print `SKIP: ...` when it is missing, except under `CI`, where that fails.
//! The bad-input tests need only the fledge binary.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::kit::{self, Layer, LayoutBuilder, RawEntry};
use support::treecmp::{self, snapshot};
use support::FledgeMount;

/// The binary under test: this build's fledge, or `$FLEDGE_TEST_BIN` (e.g. a
/// release build, or a fake used to check the harness itself).
fn fledge_bin() -> PathBuf {
    match std::env::var_os("FLEDGE_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_fledge")),
    }
}
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
use support::TEST_USER;

fn have_fuse() -> bool {
    Path::new("/dev/fuse").exists()
}

fn oracle_snapshot(img: &support::DebianImage) -> treecmp::Snapshot {
    snapshot(&img.oracle_rootfs)
        .unwrap_or_else(|e| panic!("snapshot of oracle {}: {e}", img.oracle_rootfs.display()))
}

/// Stop the mount with `sig` (sent to `via`, default the child) and check that it
/// exited (with status 0 when `require_success`) and left no mount behind.
fn assert_clean_exit(m: &mut FledgeMount, sig: Signal, via: Option<i32>, require_success: bool) {
    let status = match via {
        Some(pid) => m.stop_via(pid, sig, EXIT_TIMEOUT),
        None => m.stop(sig, EXIT_TIMEOUT),
    }
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.success() || !require_success,
        "fledge mount exited with {status} after {sig}; output:\n{}",
        m.log_text()
    );
    assert!(
        !m.is_mounted(),
        "{} is still mounted after fledge exited",
        m.mountpoint.display()
    );
}

/// The mount is read-only: flagged "ro" in mountinfo, and writes fail.
fn assert_read_only(mp: &Path) {
    let (_, options) = support::mount_info(mp).expect("mount vanished");
    assert!(
        options.split(',').any(|o| o == "ro"),
        "{} is not mounted read-only: {options}",
        mp.display()
    );
    assert!(
        fs::write(mp.join("fledge-write-probe"), b"x").is_err(),
        "could create a file in the read-only mount {}",
        mp.display()
    );
    let existing = mp.join("etc/debian_version");
    assert!(existing.is_file(), "{} missing", existing.display());
    assert!(
        fs::OpenOptions::new().append(true).open(&existing).is_err(),
        "could open {} for writing",
        existing.display()
    );
}

// ---------------------------------------------------------------------------------
// harness self-checks (need no fledge)
// ---------------------------------------------------------------------------------

#[test]
fn harness_mountinfo_lookup_works() {
    let root = support::mount_fstype(Path::new("/"));
    assert!(root.is_some(), "/ not found in /proc/self/mountinfo");
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("not a mount point");
    fs::create_dir(&sub).unwrap();
    assert_eq!(support::mount_fstype(&sub), None);
}

/// The oracle comparison must hold for two independent `umoci unpack`s of the
/// same image: proves the comparison is stable and that the cached oracle is sound.
#[test]
fn harness_second_umoci_unpack_matches_oracle() {
    let test = "harness_second_umoci_unpack_matches_oracle";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    if !support::is_root() {
        support::skip(test, "needs root for a faithful umoci unpack");
        return;
    }
    if !support::have_program("umoci") {
        support::skip(test, "umoci not installed");
        return;
    }
    let oracle = oracle_snapshot(&img);
    let dir = tempfile::tempdir_in(support::images_dir()).unwrap();
    let bundle = dir.path().join("bundle");
    support::run_ok(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:test", img.layout.display()))
            .arg(&bundle),
    );
    support::assert_same_tree(
        &oracle,
        &bundle.join("rootfs"),
        &support::oracle_diff_options(),
        "second umoci unpack",
    );
    // and the comparison is not vacuous: the oracle holds the image's edge cases
    for (path, check) in [
        ("/opt/devs/null", "char device 1,3"),
        ("/opt/links/a", "hard link group of 3"),
        ("/usr/bin/ping", "security.capability xattr"),
        ("/etc/nginx/sites-enabled/fledge", "opaque dir child"),
    ] {
        let e = oracle
            .get(path)
            .unwrap_or_else(|| panic!("oracle lacks {path} ({check})"));
        let ok = match path {
            "/opt/devs/null" => e.rdev == Some((1, 3)),
            "/opt/links/a" => e.link.as_ref().is_some_and(|l| l.nlink == 3),
            "/usr/bin/ping" => e.xattrs.contains_key(&b"security.capability"[..]),
            _ => e.kind == treecmp::Kind::File,
        };
        assert!(ok, "oracle {path}: expected {check}, got {e:?}");
    }
    assert!(oracle.get("/etc/nginx/sites-enabled/default").is_none());
}

/// The mount harness itself (spawn, wait for the FUSE mount, snapshot through
/// FUSE, signal, clean exit) works end to end, using fuse-overlayfs over the oracle
/// as a stand-in FUSE server.
#[test]
fn harness_fuse_view_of_oracle_matches_oracle() {
    let test = "harness_fuse_view_of_oracle_matches_oracle";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    if !support::is_root() || !have_fuse() || !support::have_program("fuse-overlayfs") {
        support::skip(test, "needs root, /dev/fuse and fuse-overlayfs");
        return;
    }
    let oracle = oracle_snapshot(&img);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let mut cmd = Command::new("fuse-overlayfs");
    cmd.arg("-f")
        .arg("-o")
        .arg(format!("lowerdir={}", img.oracle_rootfs.display()))
        .arg(&mp);
    let mut m = FledgeMount::spawn(cmd, &mp, &dir.path().join("fuse.log")).unwrap();
    let fstype = m
        .wait_mounted(MOUNT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fstype, "fuse.fuse-overlayfs");
    let (_, options) = support::mount_info(&mp).unwrap();
    assert!(options.contains("noatime"), "mount options: {options}");
    let view = snapshot(&mp).unwrap_or_else(|e| panic!("snapshot of {}: {e}", mp.display()));
    // fuse-overlayfs does not always give all names of a hard-link group one inode
    // number; that is its quirk, not the harness's: every other property must match.
    let lines: Vec<String> = treecmp::diff(&oracle, &view, &support::oracle_diff_options())
        .into_iter()
        .filter(|l| !l.contains(": hard link "))
        .collect();
    assert!(
        lines.is_empty(),
        "fuse-overlayfs view differs from the oracle:\n{}",
        treecmp::report(&lines, support::DIFF_CAP)
    );
    assert!(view.len() > 1000, "fuse-overlayfs view is nearly empty");
    assert_clean_exit(&mut m, Signal::SIGINT, None, false);
}

/// The unprivileged path of the harness (runuser, allow_other, signalling the
/// process runuser started) works, using fuse-overlayfs as the FUSE server.
#[test]
fn harness_unprivileged_fuse_lifecycle() {
    let test = "harness_unprivileged_fuse_lifecycle";
    if !support::have_program("fuse-overlayfs") {
        support::skip(test, "fuse-overlayfs not installed");
        return;
    }
    let (uid, gid) = match support::unprivileged_preconditions() {
        Ok(ids) => ids,
        Err(reason) => {
            support::skip(test, &reason);
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (lower, mp) = (dir.path().join("lower"), dir.path().join("mnt"));
    fs::create_dir(&lower).unwrap();
    fs::write(lower.join("hello"), b"hi\n").unwrap();
    fs::create_dir(&mp).unwrap();
    nix::unistd::chown(&mp, Some(uid.into()), Some(gid.into())).unwrap();
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", TEST_USER, "--", "fuse-overlayfs", "-f", "-o"])
        .arg(format!("allow_other,lowerdir={}", lower.display()))
        .arg(&mp);
    let mut m = FledgeMount::spawn(cmd, &mp, &dir.path().join("fuse.log")).unwrap();
    m.wait_mounted(MOUNT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fs::read(mp.join("hello")).unwrap(), b"hi\n");
    let target = m.pid().map(child_pids).and_then(|c| c.first().copied());
    assert!(target.is_some(), "runuser started no child process");
    assert_clean_exit(&mut m, Signal::SIGTERM, target, false);
}

// ---------------------------------------------------------------------------------
// 1. root mount
// ---------------------------------------------------------------------------------

#[test]
fn mount_as_root_matches_umoci_oracle() {
    let test = "mount_as_root_matches_umoci_oracle";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    if !support::is_root() {
        support::skip(test, "needs root (compares ownership and reads every file)");
        return;
    }
    if !have_fuse() {
        support::skip(test, "/dev/fuse not available");
        return;
    }
    let oracle = oracle_snapshot(&img);
    let dir = tempfile::tempdir().unwrap();
    let (mp, cache) = (dir.path().join("mnt"), dir.path().join("cache"));
    fs::create_dir(&mp).unwrap();
    fs::create_dir(&cache).unwrap();
    let mut cmd = Command::new(fledge_bin());
    cmd.arg("mount")
        .arg("--cache-dir")
        .arg(&cache)
        .arg(&img.reference)
        .arg(&mp);
    let mut m = FledgeMount::spawn(cmd, &mp, &dir.path().join("fledge.log")).unwrap();
    let fstype = m
        .wait_mounted(MOUNT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fstype, "fuse.fledge");
    assert_read_only(&mp);

    support::assert_same_tree(
        &oracle,
        &mp,
        &support::oracle_diff_options(),
        "fledge mount",
    );
    assert_clean_exit(&mut m, Signal::SIGINT, None, true);
}

// ---------------------------------------------------------------------------------
// 2. unprivileged mount with --allow-other
// ---------------------------------------------------------------------------------

/// Pids of the direct children of `pid` (runuser forks the real command).
fn child_pids(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

#[test]
fn mount_unprivileged_with_allow_other_matches_umoci_oracle() {
    let test = "mount_unprivileged_with_allow_other_matches_umoci_oracle";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let (uid, gid) = match support::unprivileged_preconditions() {
        Ok(ids) => ids,
        Err(reason) => {
            support::skip(test, &reason);
            return;
        }
    };
    let oracle = oracle_snapshot(&img);
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("fledge");
    fs::copy(fledge_bin(), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let (mp, cache) = (dir.path().join("mnt"), dir.path().join("cache"));
    for d in [&mp, &cache] {
        fs::create_dir(d).unwrap();
        nix::unistd::chown(d, Some(uid.into()), Some(gid.into())).unwrap();
    }
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", TEST_USER, "--"])
        .arg(&bin)
        .arg("mount")
        .arg("--allow-other")
        .arg("--cache-dir")
        .arg(&cache)
        .arg(&img.reference)
        .arg(&mp);
    let mut m = FledgeMount::spawn(cmd, &mp, &dir.path().join("fledge.log")).unwrap();
    let fstype = m
        .wait_mounted(MOUNT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fstype, "fuse.fledge");
    assert_read_only(&mp);

    // root reads it thanks to allow_other and sees the image's ownership
    support::assert_same_tree(
        &oracle,
        &mp,
        &support::oracle_diff_options(),
        "unprivileged fledge mount",
    );

    // signal fledge itself: runuser would re-raise a signal it got and exit non-zero
    let target = m.pid().map(child_pids).and_then(|c| c.first().copied());
    assert_clean_exit(&mut m, Signal::SIGTERM, target, true);
}

// ---------------------------------------------------------------------------------
// 3. bad input through the CLI
// ---------------------------------------------------------------------------------

/// A tiny valid OCI layout (one gzip layer holding /hello.txt), tag `test`, for the
/// host platform. Returns the layer blob's hex digest.
fn make_tiny_layout(layout: &Path) -> String {
    let data = b"hello from a tiny layer\n".repeat(64);
    let layer = Layer::gzip(kit::tar(&[RawEntry::file(b"hello.txt", &data)]));
    let b = LayoutBuilder::at(layout);
    let config = serde_json::json!({
        "architecture": kit::host_arch(),
        "os": "linux",
        "config": {"Cmd": ["/hello.txt"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
    });
    let layer_hex = kit::sha256_hex(&layer.blob);
    let m = b.image_with_config(
        &format!("linux/{}", kit::host_arch()),
        &[layer],
        &config,
        kit::OCI_MANIFEST,
    );
    b.write_index_json(&[(m, Some("test"))]);
    layer_hex
}

/// Run `fledge mount ARGS... REF MP` on bad input: it must exit non-zero, without a
/// panic and without mounting. Returns its combined output.
fn run_mount_expect_failure(dir: &Path, extra: &[&str], reference: &str) -> String {
    let (mp, cache) = (dir.join("mnt"), dir.join("cache"));
    fs::create_dir_all(&mp).unwrap();
    fs::create_dir_all(&cache).unwrap();
    let mut cmd = Command::new(fledge_bin());
    cmd.arg("mount")
        .args(extra)
        .arg("--cache-dir")
        .arg(&cache)
        .arg(reference)
        .arg(&mp);
    let log = dir.join("fledge.log");
    let mut m = FledgeMount::spawn(cmd, &mp, &log).unwrap();
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    let status = loop {
        if let Some(status) = m.try_wait().unwrap() {
            break status;
        }
        assert!(
            !m.is_mounted(),
            "fledge mounted {reference} despite bad input; output:\n{}",
            m.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "fledge mount of bad input {reference} still running after {MOUNT_TIMEOUT:?}; output:\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = m.log_text();
    assert!(
        !status.success(),
        "fledge mount {reference} succeeded on bad input; output:\n{text}"
    );
    assert!(!text.contains("panicked"), "fledge panicked:\n{text}");
    assert!(!text.trim().is_empty(), "fledge failed without a message");
    text
}

#[test]
fn bad_input_directory_is_not_an_oci_layout() {
    let dir = tempfile::tempdir().unwrap();
    let not_layout = dir.path().join("not-a-layout");
    fs::create_dir(&not_layout).unwrap();
    fs::write(not_layout.join("README"), b"just a directory\n").unwrap();
    let reference = format!("oci:{}:test", not_layout.display());
    let err = run_mount_expect_failure(&dir.path().join("run"), &[], &reference);
    assert!(
        err.contains(&*not_layout.to_string_lossy()),
        "error does not name {}:\n{err}",
        not_layout.display()
    );
}

#[test]
fn bad_input_unknown_tag_lists_existing_tags() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    make_tiny_layout(&layout);
    let reference = format!("oci:{}:no-such-tag", layout.display());
    let err = run_mount_expect_failure(&dir.path().join("run"), &[], &reference);
    assert!(
        err.contains("no-such-tag"),
        "error does not name the tag:\n{err}"
    );
    assert!(
        err.contains("test"),
        "error does not list the existing tag `test`:\n{err}"
    );
}

#[test]
fn bad_input_corrupt_layer_blob_names_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let layer_hex = make_tiny_layout(&layout);
    let blob = layout.join("blobs/sha256").join(&layer_hex);
    let mut data = fs::read(&blob).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    fs::write(&blob, &data).unwrap();
    let reference = format!("oci:{}:test", layout.display());
    let err = run_mount_expect_failure(&dir.path().join("run"), &[], &reference);
    assert!(
        err.contains(&layer_hex) || err.contains(&layer_hex[..12]),
        "error does not name the corrupt blob sha256:{layer_hex}:\n{err}"
    );
}

#[test]
fn bad_input_unknown_platform_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    make_tiny_layout(&layout);
    let reference = format!("oci:{}:test", layout.display());
    let err = run_mount_expect_failure(
        &dir.path().join("run"),
        &["--platform", "windows/mips64"],
        &reference,
    );
    assert!(
        err.contains("windows/mips64"),
        "error does not name the platform:\n{err}"
    );
}

/// The hand-made layout of the bad-input tests is itself valid (else those tests
/// would prove nothing): umoci accepts and unpacks it.
#[test]
fn tiny_layout_is_accepted_by_umoci() {
    let test = "tiny_layout_is_accepted_by_umoci";
    if !support::have_program("umoci") {
        support::skip(test, "umoci not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    make_tiny_layout(&layout);
    let bundle: PathBuf = dir.path().join("bundle");
    let mut cmd = Command::new("umoci");
    cmd.arg("unpack");
    if !support::is_root() {
        cmd.arg("--rootless");
    }
    support::run_ok(
        cmd.arg("--image")
            .arg(format!("{}:test", layout.display()))
            .arg(&bundle),
    );
    let hello = fs::read(bundle.join("rootfs/hello.txt")).unwrap();
    assert_eq!(hello, b"hello from a tiny layer\n".repeat(64));
}
