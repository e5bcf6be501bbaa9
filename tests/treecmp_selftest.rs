//! Proves the tree comparer in tests/support/treecmp.rs can fail: each test changes
//! exactly one property of a freshly built tree and asserts that `diff` reports
//! exactly that difference, and nothing else.

mod support;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use support::treecmp::{diff, escape, snapshot, DiffOptions, Kind};

const T0: i64 = 1_600_000_000;

fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let ts = TimeSpec::new(sec, nsec);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Whether user.* xattrs work in the temp dir's file system.
fn xattrs_supported(dir: &Path) -> bool {
    let probe = dir.join(".xattr-probe");
    fs::write(&probe, b"").unwrap();
    let ok = xattr::set(&probe, "user.probe", b"1").is_ok();
    fs::remove_file(&probe).unwrap();
    ok
}

/// A small tree with every kind of entry the comparer distinguishes, all mtimes fixed:
///   /a, /b (hard links), /s -> a, /d/, /d/f (with user.x xattr if supported),
///   /d/e (empty), /p (fifo)
fn build(root: &Path) -> bool {
    let xattrs = xattrs_supported(root);
    write(&root.join("a"), b"shared content\n", 0o644);
    fs::hard_link(root.join("a"), root.join("b")).unwrap();
    symlink("a", root.join("s")).unwrap();
    fs::create_dir(root.join("d")).unwrap();
    fs::set_permissions(root.join("d"), fs::Permissions::from_mode(0o755)).unwrap();
    write(&root.join("d/f"), b"hello\n", 0o644);
    write(&root.join("d/e"), b"", 0o600);
    nix::unistd::mkfifo(
        &root.join("p"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    if xattrs {
        xattr::set(root.join("d/f"), "user.x", &[0x00, 0xff, 0x10]).unwrap();
    }
    for p in ["a", "s", "d/f", "d/e", "p", "d", ""] {
        set_mtime(&root.join(p), T0, 123_456_789);
    }
    xattrs
}

fn fixture() -> (tempfile::TempDir, support::treecmp::Snapshot, bool) {
    let dir = tempfile::tempdir().unwrap();
    let xattrs = build(dir.path());
    let snap = snapshot(dir.path()).unwrap();
    (dir, snap, xattrs)
}

fn dirs_mtime_ignored() -> DiffOptions {
    DiffOptions {
        ignore_dir_mtime: true,
        ..Default::default()
    }
}

fn after(dir: &Path) -> support::treecmp::Snapshot {
    snapshot(dir).unwrap()
}

#[test]
fn snapshot_records_every_property() {
    let (_dir, s, xattrs) = fixture();
    let keys: Vec<String> = s.entries.keys().map(|k| escape(k)).collect();
    assert_eq!(keys, ["/", "/a", "/b", "/d", "/d/e", "/d/f", "/p", "/s"]);
    let a = s.get("/a").unwrap();
    assert_eq!(a.kind, Kind::File);
    assert_eq!(a.mode, 0o644);
    assert_eq!(a.size, Some(15));
    assert_eq!(a.sha256.as_ref().map(String::len), Some(64));
    assert_eq!((a.mtime_sec, a.mtime_nsec), (T0, 123_456_789));
    let link = a.link.as_ref().unwrap();
    assert_eq!((link.canonical.as_slice(), link.nlink), (&b"/a"[..], 2));
    assert_eq!(s.get("/b").unwrap().link, a.link);
    assert_eq!(s.get("/d/f").unwrap().link, None);
    let sl = s.get("/s").unwrap();
    assert_eq!(sl.kind, Kind::Symlink);
    assert_eq!(sl.target.as_deref(), Some(&b"a"[..]));
    assert_eq!(sl.size, Some(1));
    assert_eq!(s.get("/p").unwrap().kind, Kind::Fifo);
    assert_eq!(s.get("/d/e").unwrap().mode, 0o600);
    assert_eq!(s.get("/d").unwrap().size, None);
    if xattrs {
        assert_eq!(
            s.get("/d/f").unwrap().xattrs.get(&b"user.x"[..]),
            Some(&vec![0x00, 0xff, 0x10])
        );
    }
}

#[test]
fn sha256_is_of_content() {
    let (_dir, s, _) = fixture();
    // sha256("hello\n")
    assert_eq!(
        s.get("/d/f").unwrap().sha256.as_deref(),
        Some("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")
    );
}

#[test]
fn identical_trees_have_no_diff() {
    let (dir, s1, _) = fixture();
    let s2 = after(dir.path());
    assert_eq!(
        diff(&s1, &s2, &DiffOptions::default()),
        Vec::<String>::new()
    );
    // and a second, independently built tree equal in everything but inode numbers
    let other = tempfile::tempdir().unwrap();
    build(other.path());
    let s3 = after(other.path());
    assert_eq!(
        diff(&s1, &s3, &DiffOptions::default()),
        Vec::<String>::new()
    );
}

#[test]
fn mode_change_is_reported() {
    let (dir, before, _) = fixture();
    fs::set_permissions(dir.path().join("d/f"), fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(
        diff(&before, &after(dir.path()), &DiffOptions::default()),
        ["/d/f: mode 0644 != 4755"]
    );
}

#[test]
fn owner_change_is_reported() {
    if !support::is_root() {
        eprintln!("SKIP: owner_change_is_reported: needs root to chown");
        return;
    }
    let (dir, before, _) = fixture();
    let f = dir.path().join("d/f");
    nix::unistd::chown(&f, Some(1234.into()), None).unwrap();
    assert_eq!(
        diff(&before, &after(dir.path()), &DiffOptions::default()),
        ["/d/f: uid 0 != 1234"]
    );
    nix::unistd::chown(&f, Some(0.into()), Some(70000.into())).unwrap();
    assert_eq!(
        diff(&before, &after(dir.path()), &DiffOptions::default()),
        ["/d/f: gid 0 != 70000"]
    );
}

#[test]
fn content_change_of_same_size_is_reported() {
    let (dir, before, _) = fixture();
    let f = dir.path().join("d/f");
    fs::write(&f, b"jello\n").unwrap();
    set_mtime(&f, T0, 123_456_789);
    let lines = diff(&before, &after(dir.path()), &DiffOptions::default());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("/d/f: sha256 5891b5b5"), "{lines:?}");
}

#[test]
fn size_change_is_reported() {
    let (dir, before, _) = fixture();
    let f = dir.path().join("d/e");
    fs::write(&f, b"x").unwrap();
    set_mtime(&f, T0, 123_456_789);
    let lines = diff(&before, &after(dir.path()), &DiffOptions::default());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], "/d/e: size 0 != 1");
    assert!(lines[1].starts_with("/d/e: sha256 e3b0c442"), "{lines:?}");
}

#[test]
fn symlink_target_change_is_reported() {
    let (dir, before, _) = fixture();
    let s = dir.path().join("s");
    fs::remove_file(&s).unwrap();
    symlink("b", &s).unwrap();
    set_mtime(&s, T0, 123_456_789);
    assert_eq!(
        diff(&before, &after(dir.path()), &dirs_mtime_ignored()),
        ["/s: symlink target a != b"]
    );
}

#[test]
fn xattr_value_change_is_reported() {
    let (dir, before, xattrs) = fixture();
    if !xattrs {
        eprintln!("SKIP: xattr_value_change_is_reported: no user xattrs on the temp fs");
        return;
    }
    let f = dir.path().join("d/f");
    xattr::set(&f, "user.x", &[0x00, 0xff, 0x11]).unwrap();
    assert_eq!(
        diff(&before, &after(dir.path()), &DiffOptions::default()),
        ["/d/f: xattr user.x 0x00ff10 != 0x00ff11"]
    );
    xattr::remove(&f, "user.x").unwrap();
    xattr::set(&f, "user.y", b"").unwrap();
    assert_eq!(
        diff(&before, &after(dir.path()), &DiffOptions::default()),
        [
            "/d/f: xattr user.x 0x00ff10 != none",
            "/d/f: xattr user.y none != 0x"
        ]
    );
}

#[test]
fn mtime_change_is_reported_down_to_the_nanosecond() {
    let (dir, before, _) = fixture();
    set_mtime(&dir.path().join("p"), T0, 123_456_790);
    assert_eq!(
        diff(&before, &after(dir.path()), &DiffOptions::default()),
        ["/p: mtime 1600000000.123456789 != 1600000000.123456790"]
    );
}

#[test]
fn directory_and_root_mtime_options() {
    let (dir, before, _) = fixture();
    set_mtime(dir.path(), T0 + 5, 0);
    set_mtime(&dir.path().join("d"), T0 + 7, 0);
    let now = after(dir.path());
    assert_eq!(
        diff(&before, &now, &DiffOptions::default()),
        [
            "/: mtime 1600000000.123456789 != 1600000005.000000000",
            "/d: mtime 1600000000.123456789 != 1600000007.000000000"
        ]
    );
    let root_only = DiffOptions {
        ignore_root_mtime: true,
        ..Default::default()
    };
    assert_eq!(
        diff(&before, &now, &root_only),
        ["/d: mtime 1600000000.123456789 != 1600000007.000000000"]
    );
    assert_eq!(
        diff(&before, &now, &dirs_mtime_ignored()),
        Vec::<String>::new()
    );
    // file mtimes are still compared with ignore_dir_mtime
    set_mtime(&dir.path().join("d/f"), T0, 0);
    assert_eq!(
        diff(&before, &after(dir.path()), &dirs_mtime_ignored()),
        ["/d/f: mtime 1600000000.123456789 != 1600000000.000000000"]
    );
}

#[test]
fn hard_link_split_is_reported() {
    let (dir, before, _) = fixture();
    let (a, b, tmp) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("b.tmp"),
    );
    // replace b by an identical but separate file
    write(&tmp, &fs::read(&a).unwrap(), 0o644);
    set_mtime(&tmp, T0, 123_456_789);
    fs::rename(&tmp, &b).unwrap();
    assert_eq!(
        diff(&before, &after(dir.path()), &dirs_mtime_ignored()),
        [
            "/a: hard link linked to /a (nlink 2) != not hard-linked",
            "/b: hard link linked to /a (nlink 2) != not hard-linked"
        ]
    );
}

#[test]
fn hard_link_regrouping_is_reported() {
    let (dir, before, _) = fixture();
    // /d/e gains a second name: its group and the new path both show up
    fs::hard_link(dir.path().join("d/e"), dir.path().join("d/e2")).unwrap();
    assert_eq!(
        diff(&before, &after(dir.path()), &dirs_mtime_ignored()),
        [
            "/d/e: hard link not hard-linked != linked to /d/e (nlink 2)",
            "extra: /d/e2"
        ]
    );
}

#[test]
fn extra_and_missing_files_are_reported() {
    let (dir, before, _) = fixture();
    write(&dir.path().join("d/new"), b"new\n", 0o644);
    fs::remove_file(dir.path().join("d/f")).unwrap();
    let now = after(dir.path());
    assert_eq!(
        diff(&before, &now, &dirs_mtime_ignored()),
        ["missing: /d/f", "extra: /d/new"]
    );
    // reversed roles
    assert_eq!(
        diff(&now, &before, &dirs_mtime_ignored()),
        ["extra: /d/f", "missing: /d/new"]
    );
}

#[test]
fn type_change_is_reported_once() {
    let (dir, before, _) = fixture();
    let e = dir.path().join("d/e");
    fs::remove_file(&e).unwrap();
    fs::create_dir(&e).unwrap();
    assert_eq!(
        diff(&before, &after(dir.path()), &dirs_mtime_ignored()),
        ["/d/e: type regular file != directory"]
    );
}

#[test]
fn device_numbers_are_compared() {
    if !support::is_root() {
        eprintln!("SKIP: device_numbers_are_compared: needs root for mknod");
        return;
    }
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let (dir, _, _) = fixture();
    let node = dir.path().join("dev");
    mknod(
        &node,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    set_mtime(&node, T0, 0);
    let before = after(dir.path());
    assert_eq!(before.get("/dev").unwrap().rdev, Some((1, 3)));
    fs::remove_file(&node).unwrap();
    mknod(
        &node,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 5),
    )
    .unwrap();
    set_mtime(&node, T0, 0);
    assert_eq!(
        diff(&before, &after(dir.path()), &dirs_mtime_ignored()),
        ["/dev: device 1,3 != 1,5"]
    );
    fs::remove_file(&node).unwrap();
    mknod(
        &node,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    set_mtime(&node, T0, 0);
    assert_eq!(
        diff(&before, &after(dir.path()), &dirs_mtime_ignored()),
        ["/dev: type char device != block device"]
    );
}

#[test]
fn ignored_paths_hide_their_subtree_only() {
    let (dir, before, _) = fixture();
    write(&dir.path().join("d/new"), b"x", 0o644);
    // /a and /b are one inode: the mode change shows on both names
    fs::set_permissions(dir.path().join("a"), fs::Permissions::from_mode(0o600)).unwrap();
    let now = after(dir.path());
    let opts = dirs_mtime_ignored().ignore("/d");
    assert_eq!(
        diff(&before, &now, &opts),
        ["/a: mode 0644 != 0600", "/b: mode 0644 != 0600"]
    );
    // a trailing slash still means the path itself; siblings sharing a prefix stay
    let opts = dirs_mtime_ignored()
        .ignore("/a/")
        .ignore("/b")
        .ignore("/d/ne");
    assert_eq!(diff(&before, &now, &opts), ["extra: /d/new"]);
    let opts = DiffOptions::default().ignore("/");
    assert_eq!(diff(&before, &now, &opts), Vec::<String>::new());
}

#[test]
fn odd_names_are_escaped() {
    let (dir, before, _) = fixture();
    let name = OsStr::from_bytes(b"bad\nname \xff\\x");
    write(&dir.path().join(name), b"", 0o644);
    assert_eq!(
        diff(&before, &after(dir.path()), &dirs_mtime_ignored()),
        ["extra: /bad\\nname \\xff\\\\x"]
    );
    assert_eq!(escape("ünï\tcode\u{7}".as_bytes()), "ünï\\tcode\\u{7}");
}

#[test]
fn report_is_capped() {
    let lines: Vec<String> = (0..5).map(|i| format!("line {i}")).collect();
    assert_eq!(
        support::treecmp::report(&lines, 2),
        "line 0\nline 1\n... and 3 more differences\n"
    );
    assert_eq!(support::treecmp::report(&lines[..1], 2), "line 0\n");
}
