//! The EROFS writer against its oracles: erofs-utils' `fsck.erofs` (the image checked, then
//! `--extract` to a directory) and, as root, the kernel (`mount -t erofs -o loop,ro`).
//! Synthetic trees cover every node kind and the awkward cases (hard links,
//! setuid/setgid/sticky, 255-byte names, names sorting around `.` and `..`, a directory of
//! 12,000 entries over many blocks, ids above 65535, compact and extended inodes, mtimes
//! with nanoseconds, before 1970 and after 2106, xattrs in every namespace EROFS indexes,
//! shared and long ones, inline tails at every block boundary, zero runs, a file over
//! 4 GiB). Each image is read back entry by entry: type, mode, uid, gid, mtime, size,
//! content sha256, symlink target, device numbers, xattrs, link counts and hard-link inode
//! sharing must all match. Without erofs-utils, or without root for the mounts, the checks
//! that need them are skipped with a message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::compress::{compress_unit, full_index, Extent};
use super::{write, Compression, ErofsError, ErofsOptions, ErofsReport};
use crate::testkit::Mount;
use crate::tree::{Content, Meta, NodeKind, Timestamp, Tree};
use crate::treetest::{
    capability, compare, expected, host_tree, is_root, meta, noise, run, sha, text, with_x, x, T,
};

const BUILD_TIME: u64 = 1_700_000_000;

/// What EROFS gives back for a tree time: all of it.
fn erofs_time(t: Timestamp) -> (i64, u32) {
    (t.sec, t.nsec)
}

fn have_erofs_utils() -> bool {
    Command::new("fsck.erofs").arg("-V").output().is_ok()
}

/// `fsck.erofs ARGS IMAGE` through the test kit's strict check (`<E>` lines fail too).
fn fsck(args: &[String], image: &Path) -> Result<(), String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    crate::testkit::fsck_erofs(&args, image)
}

/// Metadata at exactly the build time: an inode that can be compact.
fn at_build(mode: u32, uid: u32, gid: u32) -> Meta {
    Meta {
        mode,
        uid,
        gid,
        mtime: Timestamp::new(BUILD_TIME as i64, 0),
        xattrs: Default::default(),
    }
}

fn symlink(target: &[u8]) -> NodeKind {
    NodeKind::Symlink {
        target: target.into(),
    }
}

/// A `system.posix_acl_access` value: owner rwx, group r-x, mask r-x, other r-x.
fn acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 7u16, u32::MAX),
        (4, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 5, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// The tree with everything: every kind of node and the awkward cases.
fn everything() -> Tree {
    let bs = 4096usize;
    let mut t = T::new();
    t.nodes[0].meta = with_x(meta(0o755, 0, 0, 1_650_000_000), vec![x("user.root", b"r")]);
    let m = |mode| meta(mode, 0, 0, 1_600_000_000);
    // Sizes around every boundary: empty, tiny, block - 1, block, block + 1, more blocks,
    // and tails of every size class (some inline, some not).
    for (i, size) in [
        0,
        1,
        bs - 100,
        bs - 1,
        bs,
        bs + 1,
        3 * bs,
        2 * bs + 77,
        5 * bs + 3000,
        100_000,
        1 << 20,
    ]
    .into_iter()
    .enumerate()
    {
        t.file(0, &format!("size-{size}"), &text(size, i as u32), m(0o644));
    }
    let tails = t.dir(0, "tails", m(0o755));
    for i in 0..200u32 {
        let size = (i as usize * 37) % 4000 + 1 + (i as usize % 3) * bs;
        t.file(tails, &format!("t{i:03}"), &text(size, 500 + i), m(0o644));
    }
    // Zeros: runs inside, at the end, and a file of zeros only (long runs become holes).
    let mut sparse = text(bs, 1);
    sparse.extend(std::iter::repeat_n(0u8, 40 * bs));
    sparse.extend(text(bs / 2, 2));
    t.file(0, "sparse-middle", &sparse, m(0o644));
    let mut zero_end = text(bs, 3);
    zero_end.extend(std::iter::repeat_n(0u8, 20 * bs + 100));
    t.file(0, "sparse-end", &zero_end, m(0o644));
    t.file(0, "zeros", &vec![0u8; 30 * bs], m(0o600));
    // Compact inodes: at the build time, small ids; and each reason for an extended one.
    t.file(0, "compact", b"compact", at_build(0o644, 1000, 1000));
    t.dir(0, "compact-dir", at_build(0o750, 65_535, 65_535));
    t.add(
        0,
        b"compact-link",
        symlink(b"compact"),
        at_build(0o777, 0, 0),
    );
    t.file(0, "big-uid", b"ids", at_build(0o644, 4_000_000_000, 0));
    t.file(0, "big-gid", b"ids", at_build(0o644, 0, 65_536));
    let mut ns = at_build(0o644, 0, 0);
    ns.mtime.nsec = 1;
    t.file(0, "t-nsec", b"ns", ns);
    t.file(0, "t-zero", b"t0", meta(0o644, 0, 0, 0));
    t.file(0, "t-neg", b"tneg", meta(0o644, 0, 0, -86_400 * 365));
    t.file(0, "t-far", b"tfar", meta(0o644, 0, 0, 10_000_000_000));
    // Special bits.
    t.file(
        0,
        "setuid",
        b"#!/bin/sh\n",
        meta(0o4755, 0, 0, 1_600_000_000),
    );
    t.file(
        0,
        "setgid",
        b"#!/bin/sh\n:\n",
        meta(0o2711, 0, 50, 1_600_000_000),
    );
    t.dir(0, "sticky", meta(0o1777, 0, 0, 1_600_000_000));
    // Xattrs: every name index, shared ones (the same capability on 50 files), a long
    // value, many attributes, on files, a directory, a symlink, a device.
    let caps = t.dir(0, "caps", m(0o755));
    for i in 0..50 {
        t.file(
            caps,
            &format!("bin{i:02}"),
            &text(100 + i, 900 + i as u32),
            with_x(
                m(0o755),
                vec![
                    x("security.capability", &capability()),
                    x("security.selinux", b"system_u:object_r:bin_t:s0\0"),
                    x("user.unique", format!("{i}").as_bytes()),
                ],
            ),
        );
    }
    t.file(
        0,
        "xattr-kinds",
        b"\x7fELF",
        with_x(
            m(0o755),
            vec![
                x("security.capability", &capability()),
                x("user.mime_type", b"application/x-executable"),
                x("user.empty", b""),
                x("trusted.overlay.opaque", b"y"),
                x("system.posix_acl_access", &acl()),
            ],
        ),
    );
    t.file(
        0,
        "xattr-long",
        &text(5000, 7),
        with_x(
            m(0o644),
            vec![
                x("user.long", &text(6000, 8)),
                x(&format!("user.{}", "n".repeat(250)), b"long name"),
            ],
        ),
    );
    let many: Vec<_> = (0..100)
        .map(|i| x(&format!("user.k{i:03}"), &[i as u8; 30]))
        .collect();
    t.file(0, "xattr-many", b"m", with_x(m(0o644), many));
    let xd = t.dir(
        0,
        "xattr-dir",
        with_x(
            m(0o755),
            vec![
                x("user.dir", &vec![b'd'; 300]),
                x("system.posix_acl_default", &acl()),
            ],
        ),
    );
    t.file(xd, "inside", b"inside", m(0o644));
    t.add(
        xd,
        b"link-x",
        symlink(b"inside"),
        with_x(m(0o777), vec![x("trusted.sym", b"s")]),
    );
    // Symlinks: short, long (4095 bytes: not inline, a block of its own), absolute.
    t.add(0, b"sym-short", symlink(b"size-1"), m(0o777));
    let long_target: Vec<u8> = (0..4095)
        .map(|i| {
            if i % 100 == 99 {
                b'/'
            } else {
                b'a' + (i % 26) as u8
            }
        })
        .collect();
    t.add(0, b"sym-long", symlink(&long_target), m(0o777));
    t.add(0, b"sym-3000", symlink(&long_target[..3000]), m(0o777));
    t.add(
        0,
        b"sym-abs",
        symlink(b"/etc/passwd"),
        meta(0o777, 1000, 1000, 1_600_000_000),
    );
    // Devices and a fifo.
    let dev = t.dir(0, "dev", m(0o755));
    let devs = [
        ("null", NodeKind::CharDevice { major: 1, minor: 3 }, 0o666),
        ("sda", NodeKind::BlockDevice { major: 8, minor: 0 }, 0o660),
        (
            "big",
            NodeKind::CharDevice {
                major: 4095,
                minor: 0xf_ffff,
            },
            0o600,
        ),
        (
            "mid",
            NodeKind::BlockDevice {
                major: 259,
                minor: 70_000,
            },
            0o600,
        ),
    ];
    for (name, kind, mode) in devs {
        t.add(dev, name.as_bytes(), kind, m(mode));
    }
    t.add(
        dev,
        b"fifo",
        NodeKind::Fifo,
        with_x(
            meta(0o620, 5, 6, 1_600_000_000),
            vec![x("trusted.dev", b"1")],
        ),
    );
    // Hard links: one file with three names in two directories, and a linked symlink.
    let hl = t.file(0, "hard-a", &text(bs + 10, 77), m(0o640));
    t.link(0, b"hard-b", hl);
    t.link(dev, b"hard-c", hl);
    let hs = t.add(0, b"hard-sym-a", symlink(b"hard-a"), m(0o777));
    t.link(0, b"hard-sym-b", hs);
    // Names of 255 bytes, and names that sort around "." and "..".
    let long = t.dir(0, "long-names", m(0o755));
    t.file(long, &"n".repeat(255), b"255", m(0o644));
    t.file(long, &format!("{}z", "m".repeat(254)), b"255b", m(0o644));
    let dots = t.dir(0, "dots", m(0o755));
    for name in ["!", "-", ".-x", ".a", "..a", "...", "a", "\u{e9}"] {
        t.file(dots, name, name.as_bytes(), m(0o644));
    }
    // An empty directory, a deep chain.
    t.dir(0, "empty", m(0o700));
    let mut d = t.dir(0, "deep", m(0o755));
    for i in 0..20 {
        d = t.dir(d, &format!("d{i}"), m(0o755));
    }
    t.file(d, "bottom", b"bottom", m(0o644));
    // A large directory: 12,000 entries, some with long names, across many blocks, with a
    // subdirectory in the middle.
    let big = t.dir(0, "big", m(0o755));
    for i in 0..12_000u32 {
        let name = if i % 9 == 0 {
            format!("{i:05}-{}", "L".repeat(180))
        } else {
            format!("{i:05}")
        };
        t.file(big, &name, format!("entry {i}\n").as_bytes(), m(0o644));
    }
    let mid = t.dir(big, "06000-sub", m(0o755));
    t.file(mid, "in-sub", b"sub", m(0o644));
    t.tree()
}

fn opts() -> ErofsOptions {
    ErofsOptions {
        build_time: BUILD_TIME,
        uuid: *b"fledge-erofs-uid",
        ..ErofsOptions::default()
    }
}

fn build(tree: &Tree, o: &ErofsOptions, dir: &Path, name: &str) -> (PathBuf, ErofsReport) {
    let image = dir.join(name);
    let r = write(tree, o, &image).unwrap();
    (image, r)
}

/// Every oracle on one image: its length and hash, `fsck.erofs`, `fsck.erofs --extract`,
/// a kernel mount (as root), and lookups of absent names in the big directory.
fn check_image(tree: &Tree, image: &Path, report: &ErofsReport) {
    let bytes = std::fs::read(image).unwrap();
    assert_eq!(bytes.len() as u64, report.bytes);
    assert_eq!(bytes.len() % 4096, 0);
    assert_eq!(sha(&bytes), report.sha256, "the reported sha256");
    if !have_erofs_utils() {
        crate::testkit::skip_line(
            "fsck.erofs checks: erofs-utils not installed (apt-get install erofs-utils)",
        );
    } else {
        fsck(&[], image).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("x");
        let mut args = vec![format!("--extract={}", dest.display())];
        if !is_root() {
            crate::testkit::skip_line("ownership in fsck.erofs --extract: not root");
            args.push("--no-preserve-owner".into());
        }
        fsck(&args, image).unwrap();
        if is_root() {
            compare_extraction(tree, &dest);
        }
    }
    if !is_root() {
        crate::testkit::skip_line("kernel mount checks: not root");
        return;
    }
    let m = Mount::image(image, "erofs", "loop,ro");
    compare(tree, m.path(), "kernel mount", erofs_time);
    let (want, _) = expected(tree, erofs_time);
    for name in [
        "00000",
        "0000",
        "05999x",
        "06000-sua",
        "11999~",
        "zzz",
        "!",
        ".b",
    ] {
        let p = m.path().join("big").join(name);
        let exists = want.contains_key(format!("big/{name}").as_bytes());
        assert_eq!(p.symlink_metadata().is_ok(), exists, "lookup of big/{name}");
    }
}

/// fsck.erofs 1.5 extracts contents, symlinks, devices, modes, owners and times, but no
/// xattrs, each hard link as a file of its own, and regular files without setuid/setgid
/// (it sets the mode before the owner; mkfs.erofs' images extract the same): the extraction
/// is compared with a copy of the tree that says so. The kernel mount compares all of it.
fn compare_extraction(tree: &Tree, dest: &Path) {
    let mut nodes: Vec<_> = tree
        .nodes
        .iter()
        .map(|n| {
            let mut n = n.clone();
            n.meta.xattrs.clear();
            if matches!(n.kind, NodeKind::File { .. }) {
                n.meta.mode &= !0o6000;
            }
            n
        })
        .collect();
    let mut seen = vec![false; nodes.len()];
    for d in 0..nodes.len() {
        let NodeKind::Dir { entries } = &nodes[d].kind else {
            continue;
        };
        let mut entries = entries.clone();
        for (_, id) in &mut entries {
            if std::mem::replace(&mut seen[*id as usize], true)
                && !matches!(nodes[*id as usize].kind, NodeKind::Dir { .. })
            {
                nodes.push(nodes[*id as usize].clone());
                seen.push(true);
                *id = (nodes.len() - 1) as u32;
            }
        }
        nodes[d].kind = NodeKind::Dir { entries };
    }
    let split = Tree {
        nodes,
        layer_files: tree.layer_files.clone(),
    };
    compare(&split, dest, "fsck.erofs --extract", erofs_time);
}

#[test]
fn every_node_kind_reads_back_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = everything();
    let o = opts();
    let t = Instant::now();
    let (image, r) = build(&tree, &o, tmp.path(), "all.erofs");
    eprintln!(
        "{} bytes in {:.2} s: {} inodes ({} compact), {} inline tails, {} meta + {} data blocks, {} shared xattrs, {} bytes of holes",
        r.bytes,
        t.elapsed().as_secs_f64(),
        r.inodes,
        r.compact_inodes,
        r.inline_tails,
        r.meta_blocks,
        r.data_blocks,
        r.shared_xattrs,
        r.hole_bytes
    );
    assert_eq!(r.compact_inodes, 3, "compact, compact-dir, compact-link");
    assert_eq!(r.shared_xattrs, 2, "the capability and the SELinux label");
    assert!(r.hole_bytes >= 80 * 4096, "zero runs left as holes");
    check_image(&tree, &image, &r);
    // The same bytes again; other identity, other bytes.
    let (again, r2) = build(&tree, &o, tmp.path(), "again.erofs");
    assert_eq!(r2.sha256, r.sha256);
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&image).unwrap()
    );
    let mut o3 = opts();
    o3.uuid[0] ^= 1;
    let r3 = write(&tree, &o3, &again).unwrap();
    assert_ne!(r3.sha256, r.sha256, "the uuid is in the image");
    // Written over a larger image with other contents: the same bytes (holes punched).
    std::fs::write(&again, vec![0xa5u8; r.bytes as usize + 100_000]).unwrap();
    let r4 = write(&tree, &o, &again).unwrap();
    assert_eq!(r4.sha256, r.sha256);
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&image).unwrap()
    );
    // Without the shared area: the same files, a larger metadata area.
    let mut o5 = opts();
    o5.share_xattrs = false;
    let (plain, r5) = build(&tree, &o5, tmp.path(), "unshared.erofs");
    assert_eq!(r5.shared_xattrs, 0);
    check_image(&tree, &plain, &r5);
}

/// The oracles catch a broken image: the kernel and fsck.erofs check the superblock's
/// checksum.
#[test]
fn a_corrupted_superblock_is_caught_by_the_oracles() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = T::new();
    t.file(0, "a", b"hello", meta(0o644, 0, 0, 1_600_000_000));
    let tree = t.tree();
    let (image, _) = build(&tree, &opts(), tmp.path(), "ok.erofs");
    let good = std::fs::read(&image).unwrap();
    let broken = |at: usize, bits: u8| {
        let mut bad = good.clone();
        bad[at] ^= bits;
        let path = tmp.path().join(format!("bad{at}.erofs"));
        std::fs::write(&path, &bad).unwrap();
        path
    };
    if is_root() {
        drop(Mount::image(&image, "erofs", "loop,ro"));
        // A byte of the volume name: unused, but checksummed.
        let bad = broken(1024 + 64, 0x40);
        let mp = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "erofs", "-o", "loop,ro"])
            .arg(&bad)
            .arg(mp.path())
            .status()
            .unwrap();
        if st.success() {
            let _ = Command::new("umount").arg(mp.path()).status();
            panic!("the kernel mounted an image with a wrong superblock checksum");
        }
    } else {
        crate::testkit::skip_line("the superblock checksum check: not root");
    }
    if have_erofs_utils() {
        fsck(&[], &image).unwrap();
        let bad = broken(1024 + 64, 0x40);
        let err = fsck(&[], &bad).unwrap_err();
        assert!(err.contains("chksum"), "{err}");
    } else {
        crate::testkit::skip_line("the fsck.erofs check: erofs-utils not installed");
    }
}

#[test]
fn a_file_over_4_gib_gets_an_extended_inode_and_holes() {
    if !is_root() {
        crate::testkit::skip_line("a_file_over_4_gib_gets_an_extended_inode_and_holes: not root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path().join("huge");
    let size = (4u64 << 30) + 3 * 4096 + 17;
    {
        let f = std::fs::File::create(&host).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"past 4 GiB", (4u64 << 30) + 5).unwrap();
        f.write_all_at(b"end", size - 3).unwrap();
    }
    let mut t = T::new();
    t.add(
        0,
        b"huge",
        NodeKind::File {
            size,
            content: Content::HostFile(host.clone()),
        },
        at_build(0o644, 0, 0),
    );
    let tree = t.tree();
    let (image, r) = build(&tree, &opts(), tmp.path(), "huge.erofs");
    assert_eq!(
        r.extended_inodes, 2,
        "the root (its time) and the huge file (its size)"
    );
    assert!(r.hole_bytes > size - (1 << 20));
    use std::os::unix::fs::MetadataExt;
    let on_disk = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(on_disk < 1 << 20, "the image takes {on_disk} bytes on disk");
    if have_erofs_utils() {
        fsck(&[], &image).unwrap();
    }
    let m = Mount::image(&image, "erofs", "loop,ro");
    let f = std::fs::File::open(m.path().join("huge")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    use std::os::unix::fs::FileExt;
    for (at, want) in [
        (0u64, b"start".to_vec()),
        ((4u64 << 30) + 5, b"past 4 GiB".to_vec()),
        (size - 3, b"end".to_vec()),
        (1 << 31, vec![0u8; 10]),
    ] {
        let mut buf = vec![0xffu8; want.len()];
        f.read_exact_at(&mut buf, at).unwrap();
        assert_eq!(buf, want, "at {at}");
    }
}

#[test]
fn unrepresentable_trees_are_errors_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("bad.erofs");
    let m = meta(0o644, 0, 0, 0);
    type Make = Box<dyn Fn(&mut T)>;
    let cases: Vec<(Make, &str)> = vec![
        (
            Box::new(|t: &mut T| {
                let d = t.dir(0, "etc", meta(0o755, 0, 0, 0));
                t.file(
                    d,
                    "odd",
                    b"",
                    with_x(meta(0o644, 0, 0, 0), vec![x("system.other", b"1")]),
                );
            }),
            "/etc/odd",
        ),
        (
            Box::new(|t: &mut T| {
                t.file(
                    0,
                    "huge-x",
                    b"",
                    with_x(meta(0o644, 0, 0, 0), vec![x("user.v", &vec![1u8; 70_000])]),
                );
            }),
            "/huge-x",
        ),
        (
            Box::new(|t: &mut T| {
                t.add(
                    0,
                    b"dev",
                    NodeKind::CharDevice {
                        major: 5000,
                        minor: 1,
                    },
                    meta(0o600, 0, 0, 0),
                );
            }),
            "/dev",
        ),
        (
            Box::new(|t: &mut T| {
                let d = t.dir(0, "d", meta(0o755, 0, 0, 0));
                t.file(d, &"n".repeat(256), b"", meta(0o644, 0, 0, 0));
            }),
            "/d/nnnn",
        ),
        (
            Box::new(|t: &mut T| {
                t.add(0, b"empty-link", symlink(b""), meta(0o777, 0, 0, 0));
            }),
            "/empty-link",
        ),
        (
            Box::new(|t: &mut T| {
                t.add(
                    0,
                    b"long-link",
                    symlink(&[b'a'; 4096]),
                    meta(0o777, 0, 0, 0),
                );
            }),
            "/long-link",
        ),
    ];
    for (make, path) in cases {
        let mut t = T::new();
        t.file(0, "ok", b"fine", m.clone());
        make(&mut t);
        let err = write(&t.tree(), &opts(), &image).unwrap_err();
        assert!(err.to_string().contains(path), "{err} should name {path}");
    }
    // A file that cannot be read: the error names it.
    let mut t = T::new();
    t.add(
        0,
        b"gone",
        NodeKind::File {
            size: 10,
            content: Content::HostFile(tmp.path().join("no-such-file")),
        },
        m.clone(),
    );
    let err = write(&t.tree(), &opts(), &image).unwrap_err();
    assert!(
        matches!(&err, ErofsError::Read { path, .. } if path == "/gone"),
        "{err}"
    );
}

/// Size and time against mkfs.erofs (uncompressed, per-file mtimes kept) on the same files
/// (our image extracted, so both read them from the page cache). A directory of real files
/// from this machine; FLEDGE_EROFS_BENCH_DIR picks another. Times mean something in a
/// release build only (`cargo test --release --lib erofs::tests::size_and -- --nocapture`).
#[test]
fn size_and_time_against_mkfs_erofs() {
    if !is_root() || !have_erofs_utils() {
        crate::testkit::skip_line("size_and_time_against_mkfs_erofs: needs root and erofs-utils");
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("FLEDGE_LOG"))
        .with_test_writer()
        .try_init();
    // FLEDGE_EROFS_BENCH_DIR picks another directory to measure.
    let bench = std::env::var_os("FLEDGE_EROFS_BENCH_DIR").map(PathBuf::from);
    let defaults = ["/usr/lib/python3.11", "/usr/share/perl5", "/usr/share/doc"];
    let Some(src) = bench
        .into_iter()
        .chain(defaults.into_iter().map(PathBuf::from))
        .find(|p| p.is_dir())
    else {
        crate::testkit::skip_line("size_and_time_against_mkfs_erofs: no sample directory");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let tree = host_tree(&src);
    let stats = tree.stats();
    let (ours, _) = build(&tree, &opts(), tmp.path(), "ours.erofs");
    let dest = tmp.path().join("x");
    fsck(&[format!("--extract={}", dest.display())], &ours).unwrap();
    compare_extraction(&tree, &dest);
    std::fs::remove_file(&ours).unwrap();
    // Both timed on the extracted files, in the page cache alike (ours hashes too).
    let tree = host_tree(&dest);
    let t = Instant::now();
    let (_, r) = build(&tree, &opts(), tmp.path(), "ours.erofs");
    let ours_s = t.elapsed().as_secs_f64();
    let theirs = tmp.path().join("theirs.erofs");
    let t = Instant::now();
    run(Command::new("mkfs.erofs")
        .args(["--quiet", "-x-1"])
        .arg(&theirs)
        .arg(&dest));
    let theirs_s = t.elapsed().as_secs_f64();
    let theirs_len = std::fs::metadata(&theirs).unwrap().len();
    let ratio = r.bytes as f64 / theirs_len as f64;
    eprintln!(
        "erofs on {} ({} files, {} MiB): fledge {} bytes in {ours_s:.2} s ({} compact inodes of {}), mkfs.erofs {theirs_len} bytes in {theirs_s:.2} s: size ratio {ratio:.4}, time ratio {:.2}",
        src.display(),
        stats.files,
        stats.file_bytes >> 20,
        r.bytes,
        r.compact_inodes,
        r.inodes,
        ours_s / theirs_s
    );
    assert!(ratio <= 1.02, "{ratio:.4} times mkfs.erofs' size");
}

/// Names `f{i:05}` in the root for node `id`, sorted once (`T::link` sorts at each one).
fn link_many(t: &mut T, id: u32, range: std::ops::Range<u32>) {
    let NodeKind::Dir { entries } = &mut t.nodes[0].kind else {
        unreachable!()
    };
    entries.extend(range.map(|i| (format!("f{i:05}").into_bytes().into(), id)));
    entries.sort();
}

/// Which inodes need the extended form, at each limit of the compact one.
#[test]
fn compact_or_extended_at_each_limit() {
    let file = |size: u64| NodeKind::File {
        size,
        content: Content::Bytes(Vec::new().into()),
    };
    let ns = |nsec: u32| {
        let mut m = at_build(0o644, 0, 0);
        m.mtime.nsec = nsec;
        m
    };
    let secs = |sec: i64| {
        let mut m = at_build(0o644, 0, 0);
        m.mtime.sec = sec;
        m
    };
    let cases: Vec<(&str, NodeKind, Meta, u32, bool)> = vec![
        ("plain", file(0), at_build(0o644, 0, 0), 1, false),
        ("uid 65535", file(0), at_build(0o644, 65_535, 0), 1, false),
        ("uid 65536", file(0), at_build(0o644, 65_536, 0), 1, true),
        ("gid 65535", file(0), at_build(0o644, 0, 65_535), 1, false),
        ("gid 65536", file(0), at_build(0o644, 0, 65_536), 1, true),
        ("nlink 65535", file(0), at_build(0o644, 0, 0), 65_535, false),
        ("nlink 65536", file(0), at_build(0o644, 0, 0), 65_536, true),
        (
            "4 GiB - 1",
            file(u32::MAX.into()),
            at_build(0o644, 0, 0),
            1,
            false,
        ),
        ("4 GiB", file(1 << 32), at_build(0o644, 0, 0), 1, true),
        ("1 ns", file(0), ns(1), 1, true),
        ("1 s later", file(0), secs(BUILD_TIME as i64 + 1), 1, true),
        ("before 1970", file(0), secs(-1), 1, true),
    ];
    for (what, kind, m, links, extended) in cases {
        let mut t = T::new();
        t.nodes[0].meta = at_build(0o755, 0, 0);
        let id = t.add(0, b"f00000", kind, m);
        link_many(&mut t, id, 1..links);
        let tree = t.tree();
        let plan = super::layout::plan(&tree, BUILD_TIME, true, None).unwrap();
        let p = &plan.inodes[plan.index[id as usize] as usize];
        assert_eq!((p.extended, p.nlink), (extended, links), "{what}");
        assert!(
            !plan.inodes[0].extended,
            "{what}: the root is at the build time"
        );
    }
}

/// The plan's invariants on the tree with everything: the root at nid 36, no two records
/// overlapping, every inline record (inode, xattrs, tail) inside one block, data blocks
/// contiguous after the metadata and shared xattr areas, in inode order.
#[test]
fn the_plan_keeps_records_apart_and_inline_tails_in_one_block() {
    let tree = everything();
    let plan = super::layout::plan(&tree, BUILD_TIME, true, None).unwrap();
    let bs = 4096u64;
    assert_eq!(plan.inodes[0].nid(), 36);
    let mut end = 1152u64;
    for &i in &plan.by_pos {
        let p = &plan.inodes[i as usize];
        let len = p.inode_len() + p.xattrs.len() as u64 + u64::from(p.tail);
        assert!(
            p.pos >= end,
            "record of node {} overlaps the one before",
            p.node
        );
        assert_eq!(p.pos % 32, 0);
        if p.tail > 0 {
            assert!(
                p.pos % bs + len <= bs,
                "node {}: the inline record crosses a block",
                p.node
            );
            assert_eq!(u64::from(p.tail), p.size % bs);
        }
        end = p.pos + len;
    }
    assert!(end <= plan.data_start * bs);
    let mut next = plan.data_start;
    for p in plan.inodes.iter().filter(|p| p.blocks > 0) {
        assert_eq!(u64::from(p.start), next, "node {}", p.node);
        next += p.blocks;
    }
    assert_eq!(next, plan.blocks);
}

/// 70,000 names of one file: an extended inode whose link count the kernel reports.
#[test]
fn more_than_65535_hard_links() {
    let mut t = T::new();
    let id = t.file(0, "f00000", b"linked", at_build(0o644, 0, 0));
    link_many(&mut t, id, 1..70_000);
    let tree = t.tree();
    let tmp = tempfile::tempdir().unwrap();
    let (image, r) = build(&tree, &opts(), tmp.path(), "links.erofs");
    assert_eq!(r.inodes, 2);
    if have_erofs_utils() {
        fsck(&[], &image).unwrap();
    }
    if !is_root() {
        crate::testkit::skip_line("the kernel's link count: not root");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let m = Mount::image(&image, "erofs", "loop,ro");
    for name in ["f00000", "f45678", "f69999"] {
        let md = std::fs::metadata(m.path().join(name)).unwrap();
        assert_eq!(md.nlink(), 70_000, "{name}");
    }
    assert!(!m.path().join("f70000").exists());
}

/// `everything()` plus what compression meets: incompressible files (all blocks stored as
/// is), highly compressible ones (a block of LZ4 holding up to 1 MiB), blocks of both kinds
/// in turn (stored blocks at unaligned starts), files whose last bytes, stored as is, would
/// cross a logical cluster, exact block multiples, and files over one compression unit.
fn everything_compressible() -> Tree {
    let bs = 4096usize;
    let mut t = T::new();
    let base = everything();
    t.nodes = base.nodes;
    let m = |mode| meta(mode, 0, 0, 1_600_000_000);
    let z = t.dir(0, "z", m(0o755));
    for (i, size) in [bs + 1, 2 * bs, 3 * bs - 1, 16 * bs, 100_000, (1 << 20) + 5]
        .into_iter()
        .enumerate()
    {
        t.file(
            z,
            &format!("noise-{size}"),
            &noise(size, i as u64),
            m(0o644),
        );
        t.file(z, &format!("same-{size}"), &vec![b'a'; size], m(0o644));
    }
    // Text then noise, in turns of 1.5 blocks: compressed extents end anywhere, so the
    // stored blocks after them start unaligned.
    let mut mixed = Vec::new();
    for i in 0..40u32 {
        mixed.extend(text(bs * 3 / 2, i));
        mixed.extend(noise(bs * 3 / 2 + i as usize, u64::from(i)));
    }
    t.file(z, "mixed", &mixed, m(0o644));
    // Text, then noise to the end from an unaligned start, of every tail length class.
    for (i, tail) in [1usize, 100, 2000, 4095, 4096, 4097, 6000]
        .into_iter()
        .enumerate()
    {
        let mut d = text(2 * bs + 1000, 70 + i as u32);
        d.extend(noise(tail, 70 + i as u64));
        t.file(z, &format!("noise-tail-{tail}"), &d, m(0o644));
    }
    // Over several 1 MiB units, the last one short; zeros of 5 MiB (one block per MiB).
    t.file(z, "units", &text(3 * (1 << 20) + 12_345, 99), m(0o644));
    t.file(z, "zeros-5m", &vec![0u8; 5 << 20], m(0o644));
    let mut hl = text(50_000, 5);
    hl.extend(noise(9000, 5));
    let id = t.file(z, "linked", &hl, m(0o644));
    t.link(z, b"linked-2", id);
    t.tree()
}

fn zopts(c: Compression) -> ErofsOptions {
    ErofsOptions {
        compression: c,
        ..opts()
    }
}

/// lz4 and lz4hc images of the hard trees read back the same through fsck.erofs (checked,
/// and extracted) and the kernel; the bytes do not depend on the thread count; files that
/// compress take fewer blocks, those that do not are stored as is.
#[test]
fn compressed_images_read_back_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = everything_compressible();
    let (_, plain) = build(&tree, &opts(), tmp.path(), "none.erofs");
    let mut sizes = Vec::new();
    for (name, c) in [
        ("lz4", Compression::Lz4),
        ("lz4hc-9", Compression::Lz4hc { level: 9 }),
        ("lz4hc-12", Compression::Lz4hc { level: 12 }),
        ("lz4hc-1", Compression::Lz4hc { level: 1 }),
    ] {
        let t = Instant::now();
        let mut o = zopts(c);
        o.threads = 2;
        let (image, r) = build(&tree, &o, tmp.path(), &format!("{name}.erofs"));
        eprintln!(
            "{name}: {} bytes ({} uncompressed) in {:.2} s: {} compressed files, {} compressed and {} stored blocks",
            r.bytes,
            plain.bytes,
            t.elapsed().as_secs_f64(),
            r.compressed_files,
            r.packed_blocks,
            r.raw_blocks
        );
        assert!(
            r.packed_blocks > 0 && r.raw_blocks > 0,
            "{name}: both kinds"
        );
        assert!(
            r.bytes < plain.bytes * 2 / 3,
            "{name}: {} bytes against {} uncompressed",
            r.bytes,
            plain.bytes
        );
        check_image(&tree, &image, &r);
        for threads in [1, 3] {
            let mut o2 = o.clone();
            o2.threads = threads;
            let (again, r2) = build(&tree, &o2, tmp.path(), "again.erofs");
            assert_eq!(r2.sha256, r.sha256, "{name} on {threads} threads");
            assert_eq!(
                std::fs::read(&again).unwrap(),
                std::fs::read(&image).unwrap()
            );
        }
        // Over a larger old image: the same bytes.
        std::fs::write(
            tmp.path().join("again.erofs"),
            vec![0x5au8; r.bytes as usize * 2],
        )
        .unwrap();
        let r3 = write(&tree, &o, &tmp.path().join("again.erofs")).unwrap();
        assert_eq!(r3.sha256, r.sha256, "{name} over an old image");
        sizes.push((name, r.bytes));
    }
    let size = |n: &str| sizes.iter().find(|(m, _)| *m == n).unwrap().1;
    assert!(size("lz4hc-12") <= size("lz4hc-9"));
    assert!(size("lz4hc-9") < size("lz4"), "{sizes:?}");
}

/// Extents fill their blocks, cover the input exactly, decompress to it, and the index
/// finds each from any logical cluster.
#[test]
fn extents_cover_the_input_and_the_index_points_at_them() {
    let bs = 4096usize;
    let mut data = text(5 * bs + 300, 1);
    data.extend(noise(3 * bs + 17, 2));
    data.extend(vec![0u8; 300_000]);
    data.extend(noise(bs - 5, 3));
    for mut c in [
        crate::sys::Lz4DestSize::fast(),
        crate::sys::Lz4DestSize::hc(9),
    ] {
        let (mut out, mut ext) = (Vec::new(), Vec::new());
        compress_unit(&mut c, &data, 0, &mut out, &mut ext);
        assert_eq!(out.len(), ext.len() * bs);
        let mut back = Vec::new();
        for (i, e) in ext.iter().enumerate() {
            assert_eq!(e.start, back.len() as u64, "extents are contiguous");
            assert_eq!(e.block as usize, i);
            let end = ext.get(i + 1).map_or(data.len() as u64, |n| n.start) as usize;
            let blk = &out[i * bs..(i + 1) * bs];
            if e.raw {
                assert!(end - back.len() <= bs);
                // A stored extent stays inside the logical clusters it may span.
                assert!(
                    e.start % bs as u64 == 0
                        || i + 1 < ext.len()
                        || (end - 1) / bs == e.start as usize / bs
                );
                back.extend_from_slice(&blk[..end - e.start as usize]);
            } else {
                let z = blk.iter().position(|&b| b != 0).unwrap();
                // It saves a block, or holds the last bytes, which stored would cross
                // into the next logical cluster.
                assert!(
                    end - (e.start as usize) > bs
                        || (i + 1 == ext.len() && (end - 1) / bs > e.start as usize / bs),
                    "extent {i} of {}",
                    ext.len()
                );
                back.extend(
                    lz4_flex::block::decompress(&blk[z..], end - e.start as usize).unwrap(),
                );
            }
        }
        assert_eq!(back, data);
        let index = full_index(data.len() as u64, &ext);
        assert_eq!(index.len(), data.len().div_ceil(bs) * 8);
        for j in 0..data.len().div_ceil(bs) {
            let e = &index[j * 8..j * 8 + 8];
            let kind = u16::from_le_bytes([e[0], e[1]]);
            let head = ext
                .iter()
                .rposition(|x| x.start <= (j * bs) as u64)
                .unwrap();
            if let Some(h) = ext.iter().position(|x| x.start / bs as u64 == j as u64) {
                assert_eq!(kind, if ext[h].raw { 0 } else { 1 });
                assert_eq!(
                    u16::from_le_bytes([e[2], e[3]]) as u64,
                    ext[h].start % bs as u64
                );
                assert_eq!(u32::from_le_bytes([e[4], e[5], e[6], e[7]]), ext[h].block);
            } else {
                assert_eq!(kind, 2, "lcluster {j}");
                let back = u16::from_le_bytes([e[4], e[5]]) as usize;
                assert_eq!(j - back, ext[head].start as usize / bs);
                let on = u16::from_le_bytes([e[6], e[7]]) as usize;
                let next = ext
                    .get(head + 1)
                    .map_or(data.len().div_ceil(bs), |n| n.start as usize / bs);
                assert_eq!(j + on, next);
            }
        }
        let _ = Extent {
            start: 0,
            raw: true,
            block: 0,
        };
    }
}

/// Small files that compression would not shrink stay flat (tail inline), those it
/// shrinks are compressed; files over the probe size are compressed whatever they hold.
#[test]
fn small_files_are_compressed_only_when_that_saves_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let m = meta(0o644, 0, 0, 1_600_000_000);
    let mut t = T::new();
    t.file(0, "noise", &noise(10_000, 1), m.clone());
    t.file(0, "text", &text(10_000, 1), m.clone());
    t.file(0, "big-noise", &noise(200_000, 2), m.clone());
    t.file(0, "one-block", &text(4096, 3), m);
    let tree = t.tree();
    for c in [Compression::Lz4, Compression::Lz4hc { level: 9 }] {
        let (image, r) = build(&tree, &zopts(c), tmp.path(), "small.erofs");
        assert_eq!(r.compressed_files, 2, "{c:?}: text and big-noise");
        assert!(r.raw_blocks >= 49, "{c:?}: big-noise stored as is");
        assert_eq!(r.inline_tails, 2, "{c:?}: the root and noise's tail");
        check_image(&tree, &image, &r);
    }
}
