//! The native writer against e2fsprogs and the kernel: synthetic trees with every kind of
//! node and the awkward cases (multi-block directories, hard links, every symlink length
//! class, device numbers in both encodings, attributes in the inode, in a block and as
//! ACLs, timestamps before 1970 and after 2038, large ids, files needing an extent tree).
//! Each image must pass `e2fsck -fn`; as root it is also mounted and read back.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use super::build;
use crate::output::size::{SizePlan, MIB};
use crate::output::{BuildError, Identity};
use crate::testkit::{sha256_hex, Mount};
use crate::tree::{Content, Meta, Node, NodeId, NodeKind, Timestamp, Tree, Xattr};

fn have(tool: &str) -> bool {
    Command::new(tool).arg("-V").output().is_ok()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A tree under construction: nodes pushed in any order, directory entries kept sorted.
struct T {
    nodes: Vec<Node>,
}

impl T {
    fn new() -> T {
        T {
            nodes: vec![Node {
                kind: NodeKind::Dir {
                    entries: Vec::new(),
                },
                meta: meta(0o755, 1_600_000_000, 0),
                nlink: 2,
                parent: 0,
            }],
        }
    }

    fn add(&mut self, dir: NodeId, name: &str, kind: NodeKind, m: Meta) -> NodeId {
        let id = self.nodes.len() as NodeId;
        self.nodes.push(Node {
            kind,
            meta: m,
            nlink: 1,
            parent: dir,
        });
        self.link(dir, name, id);
        id
    }

    fn link(&mut self, dir: NodeId, name: &str, id: NodeId) {
        let NodeKind::Dir { entries } = &mut self.nodes[dir as usize].kind else {
            panic!("not a directory");
        };
        entries.push((name.as_bytes().into(), id));
        entries.sort();
    }

    fn file(&mut self, dir: NodeId, name: &str, data: &[u8], m: Meta) -> NodeId {
        self.add(
            dir,
            name,
            NodeKind::File {
                size: data.len() as u64,
                content: Content::Bytes(data.into()),
            },
            m,
        )
    }

    fn tree(self) -> Tree {
        Tree {
            nodes: self.nodes,
            layer_files: Vec::new(),
        }
    }
}

fn meta(mode: u32, sec: i64, nsec: u32) -> Meta {
    Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime: Timestamp::new(sec, nsec),
        xattrs: Default::default(),
    }
}

fn x(name: &str, value: &[u8]) -> Xattr {
    (name.as_bytes().into(), value.into())
}

/// Run the native writer on `tree` into `image`, with `buffer` bytes of free space.
fn try_build(tree: &Tree, image: &Path, buffer: u64) -> Result<super::Written, BuildError> {
    File::create(image).unwrap();
    let plan = SizePlan {
        content_bytes: 0,
        buffer_bytes: buffer,
        image_bytes: 0,
        inodes: tree.nodes.len() as u64 + 1024,
    };
    let mut sw = crate::timing::Stopwatch::start();
    build(
        tree,
        &plan,
        image,
        &Identity::random(),
        crate::config::ImageFormat::Raw,
        &mut sw,
        &|_| {},
    )
}

fn write_image(tree: &Tree, dir: &Path, buffer: u64) -> (std::path::PathBuf, String) {
    let image = dir.join("native.img");
    let w = try_build(tree, &image, buffer).unwrap();
    (
        image,
        w.sha256.expect("the native writer hashes as it writes"),
    )
}

fn fsck(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_kind_of_node_survives_fsck_and_the_kernel() {
    if !have("e2fsck") {
        crate::testkit::skip_line(
            "every_kind_of_node_survives_fsck_and_the_kernel: e2fsck not installed",
        );
        return;
    }
    let mut t = T::new();
    let sizes = [0usize, 1, 4095, 4096, 4097, 100_000];
    for s in sizes {
        let data: Vec<u8> = (0..s).map(|i| (i * 7 % 251) as u8).collect();
        t.file(
            0,
            &format!("size-{s}"),
            &data,
            meta(0o644, 1_600_000_000, 0),
        );
    }
    // A directory spanning many blocks, with long and short names.
    let big = t.add(
        0,
        "big",
        NodeKind::Dir {
            entries: Vec::new(),
        },
        meta(0o755, 1_600_000_000, 0),
    );
    for i in 0..3000 {
        let name = if i % 10 == 0 {
            format!("{i:05}-{}", "n".repeat(200))
        } else {
            format!("f{i}")
        };
        t.file(big, &name, name.as_bytes(), meta(0o600, 1_600_000_000, 0));
    }
    // Hard links: one inode, three names in two directories.
    let hl = t.file(0, "hard-a", b"linked", meta(0o640, 1_600_000_000, 0));
    t.link(0, "hard-b", hl);
    t.link(big, "hard-c", hl);
    t.nodes[hl as usize].nlink = 3;
    // Symlinks: fast (< 60 bytes) and slow.
    for len in [1usize, 59, 60, 61, 4000] {
        let target = "t".repeat(len);
        t.add(
            0,
            &format!("sym-{len}"),
            NodeKind::Symlink {
                target: target.as_bytes().into(),
            },
            meta(0o777, 1_600_000_000, 0),
        );
    }
    t.add(
        0,
        "chr",
        NodeKind::CharDevice { major: 1, minor: 3 },
        meta(0o666, 1_600_000_000, 0),
    );
    t.add(
        0,
        "blk-wide",
        NodeKind::BlockDevice {
            major: 259,
            minor: 70_000,
        },
        meta(0o660, 1_600_000_000, 0),
    );
    t.add(0, "fifo", NodeKind::Fifo, meta(0o600, 1_600_000_000, 0));
    // Ownership, special bits and timestamps.
    let mut m = meta(0o4755, -1_000, 5);
    m.uid = 100_000;
    m.gid = 200_000;
    t.file(0, "old-setuid", b"x", m);
    t.file(
        0,
        "future",
        b"y",
        meta(0o644, (1i64 << 32) + 5, 999_999_999),
    );
    // Attributes: small (in the inode), large (in a block), and an ACL.
    let mut m = meta(0o755, 1_600_000_000, 0);
    m.xattrs = vec![
        x(
            "security.capability",
            &[
                1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ),
        x("user.small", b"v"),
    ]
    .into();
    t.file(0, "xattr-small", b"c", m);
    let mut m = meta(0o644, 1_600_000_000, 0);
    m.xattrs = vec![
        x("user.one", &[b'a'; 1000]),
        x("user.two", &[b'b'; 2000]),
        x("trusted.three", b"3"),
    ]
    .into();
    t.file(0, "xattr-block", b"d", m);
    let acl = super::xattr::posix_acl_xattr(&[
        (1, 6, u32::MAX),
        (2, 4, 1000),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ]);
    let mut m = meta(0o640, 1_600_000_000, 0);
    m.xattrs = vec![x("system.posix_acl_access", &acl)].into();
    t.file(0, "acl", b"e", m);
    let tree = t.tree();

    let dir = tempfile::tempdir().unwrap();
    let (image, sum) = write_image(&tree, dir.path(), 8 * MIB);
    fsck(&image);
    assert_eq!(sum, sha256_hex(&std::fs::read(&image).unwrap()));

    if !is_root() {
        crate::testkit::skip_line(
            "every_kind_of_node_survives_fsck_and_the_kernel (mount part): needs root",
        );
        return;
    }
    let m = Mount::image(&image, "ext4", "loop,ro");
    for s in sizes {
        let data: Vec<u8> = (0..s).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(
            std::fs::read(m.p(&format!("size-{s}"))).unwrap(),
            data,
            "size-{s}"
        );
    }
    let names = std::fs::read_dir(m.p("big")).unwrap().count();
    assert_eq!(names, 3001);
    let long = format!("00010-{}", "n".repeat(200));
    assert_eq!(
        std::fs::read(m.p("big").join(&long)).unwrap(),
        long.as_bytes()
    );
    assert_eq!(std::fs::read(m.p("big/f2999")).unwrap(), b"f2999");
    let a = std::fs::metadata(m.p("hard-a")).unwrap();
    let c = std::fs::metadata(m.p("big/hard-c")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (c.ino(), 3));
    for len in [1usize, 59, 60, 61, 4000] {
        let target = std::fs::read_link(m.p(&format!("sym-{len}"))).unwrap();
        assert_eq!(target.as_os_str().len(), len);
    }
    let chr = std::fs::symlink_metadata(m.p("chr")).unwrap();
    assert!(chr.file_type().is_char_device());
    assert_eq!(chr.rdev(), libc::makedev(1, 3));
    let blk = std::fs::symlink_metadata(m.p("blk-wide")).unwrap();
    assert!(blk.file_type().is_block_device());
    assert_eq!(blk.rdev(), libc::makedev(259, 70_000));
    assert!(std::fs::symlink_metadata(m.p("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let old = std::fs::metadata(m.p("old-setuid")).unwrap();
    assert_eq!(
        (old.mode() & 0o7777, old.uid(), old.gid()),
        (0o4755, 100_000, 200_000)
    );
    assert_eq!((old.mtime(), old.mtime_nsec()), (-1_000, 5));
    let fut = std::fs::metadata(m.p("future")).unwrap();
    assert_eq!(
        (fut.mtime(), fut.mtime_nsec()),
        ((1i64 << 32) + 5, 999_999_999)
    );
    let cap = xattr::get(m.p("xattr-small"), "security.capability")
        .unwrap()
        .unwrap();
    assert_eq!(cap.len(), 20);
    assert_eq!(
        xattr::get(m.p("xattr-small"), "user.small")
            .unwrap()
            .unwrap(),
        b"v"
    );
    assert_eq!(
        xattr::get(m.p("xattr-block"), "user.two").unwrap().unwrap(),
        vec![b'b'; 2000]
    );
    assert_eq!(
        xattr::get(m.p("xattr-block"), "trusted.three")
            .unwrap()
            .unwrap(),
        b"3"
    );
    assert_eq!(
        xattr::get(m.p("acl"), "system.posix_acl_access")
            .unwrap()
            .unwrap(),
        acl
    );
}

#[test]
fn a_file_longer_than_four_extents_gets_an_extent_tree() {
    if !have("e2fsck") {
        crate::testkit::skip_line(
            "a_file_longer_than_four_extents_gets_an_extent_tree: e2fsck not installed",
        );
        return;
    }
    // 600 MiB is five maximal extents: the inode then points at a leaf block. The source is
    // a sparse host file; only a few marker bytes are not zero.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.src");
    let len: u64 = 600 * MIB + 12_345;
    {
        let mut f = File::create(&src).unwrap();
        f.set_len(len).unwrap();
        use std::os::unix::fs::FileExt;
        for at in [0, 128 * MIB, 300 * MIB + 7, len - 5] {
            f.write_all_at(b"mark!", at).unwrap();
        }
        f.flush().unwrap();
    }
    let mut t = T::new();
    t.add(
        0,
        "big",
        NodeKind::File {
            size: len,
            content: Content::HostFile(src.clone()),
        },
        meta(0o644, 1_600_000_000, 0),
    );
    let tree = t.tree();
    let (image, _) = write_image(&tree, dir.path(), MIB);
    fsck(&image);
    let out = Command::new("debugfs")
        .args(["-R", "stat /big"])
        .arg(&image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(ETB0)"), "no extent tree block:\n{text}");
    if !is_root() {
        crate::testkit::skip_line(
            "a_file_longer_than_four_extents_gets_an_extent_tree (mount part): needs root",
        );
        return;
    }
    let m = Mount::image(&image, "ext4", "loop,ro");
    use std::os::unix::fs::FileExt;
    let f = File::open(m.p("big")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), len);
    for at in [0, 128 * MIB, 300 * MIB + 7, len - 5] {
        let mut b = [0u8; 5];
        f.read_exact_at(&mut b, at).unwrap();
        assert_eq!(&b, b"mark!", "at {at}");
    }
}

#[test]
fn what_ext4_cannot_hold_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let attempt = |tree: &Tree| match try_build(tree, &dir.path().join("refused.img"), MIB) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    // An empty symlink target.
    let mut t = T::new();
    let d = t.add(
        0,
        "d",
        NodeKind::Dir {
            entries: Vec::new(),
        },
        meta(0o755, 0, 0),
    );
    t.add(
        d,
        "empty",
        NodeKind::Symlink {
            target: Vec::new().into(),
        },
        meta(0o777, 0, 0),
    );
    let msg = attempt(&t.tree());
    assert!(
        msg.contains("/d/empty") && msg.contains("empty target"),
        "{msg}"
    );
    // 65001 names for one file.
    let mut t = T::new();
    let f = t.file(0, "f", b"x", meta(0o644, 0, 0));
    for i in 0..65_000 {
        t.link(0, &format!("l{i}"), f);
    }
    let msg = attempt(&t.tree());
    assert!(msg.contains("65001 hard links"), "{msg}");
    // More attribute bytes than one block holds.
    let mut t = T::new();
    let mut m = meta(0o644, 0, 0);
    m.xattrs = vec![x("user.big", &[7; 5000])].into();
    t.file(0, "fat", b"x", m);
    let msg = attempt(&t.tree());
    assert!(msg.contains("/fat") && msg.contains("user.big"), "{msg}");
}

#[test]
fn free_space_lands_in_the_accepted_window() {
    use crate::output::size::slack;
    let mut t = T::new();
    for i in 0..500 {
        t.file(0, &format!("f{i}"), &vec![1u8; i * 97], meta(0o644, 0, 0));
    }
    let tree = t.tree();
    for buffer_mib in [0u64, 1, 7, 100, 1000, 5000] {
        let buffer = buffer_mib * MIB;
        let l = super::layout::plan(&tree, 2000, buffer, [3; 16], [4; 16], 0).unwrap();
        let info = crate::output::e2fsprogs::SuperInfo {
            block_count: l.geo.blocks,
            free_blocks: l.counts.free_blocks,
            reserved_blocks: 0,
            block_size: 4096,
        };
        let free = info.user_free_bytes();
        assert!(
            free >= buffer && free <= buffer + slack(buffer),
            "buffer {buffer_mib} MiB: {} KiB free",
            free / 1024
        );
    }
}

/// The native writer's qcow2 stream: the same filesystem as its raw image (`qemu-img
/// compare`), a clean qcow2 (`qemu-img check`), the hash of the file, the raw image's data
/// (rounded to clusters) plus tables in size, and reproducible.
#[test]
fn qcow2_output_is_the_raw_image() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("SKIP: qemu-img not installed (apt install qemu-utils)");
        return;
    }
    use crate::config::ImageFormat;
    let mut t = T::new();
    let d = t.add(
        0,
        "dir",
        NodeKind::Dir {
            entries: Vec::new(),
        },
        meta(0o755, 1_600_000_000, 0),
    );
    t.file(0, "small", b"hello", meta(0o644, 1_600_000_000, 0));
    // A file with a zero run long enough to be a hole in the middle, ending off a cluster.
    let mut big = vec![7u8; 300_000];
    big.extend(std::iter::repeat_n(0u8, 200_000));
    big.extend(vec![9u8; 70_001]);
    t.file(d, "big", &big, meta(0o600, 1_600_000_000, 0));
    for i in 0..200 {
        t.file(
            d,
            &format!("f{i:03}"),
            &[i as u8; 5000],
            meta(0o644, 1_600_000_000, 0),
        );
    }
    let tree = t.tree();
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::derived(1_700_000_000, &[b"qcow2 test"]);
    let build_as = |name: &str, f: ImageFormat| {
        let image = dir.path().join(name);
        File::create(&image).unwrap();
        let plan = SizePlan {
            content_bytes: 0,
            buffer_bytes: 8 * MIB,
            image_bytes: 0,
            inodes: tree.nodes.len() as u64 + 1024,
        };
        let mut sw = crate::timing::Stopwatch::start();
        let w = build(&tree, &plan, &image, &id, f, &mut sw, &|_| {}).unwrap();
        assert_eq!(w.format, f);
        (image, w.sha256.unwrap())
    };
    let (raw, _) = build_as("raw.img", ImageFormat::Raw);
    let (q, sum) = build_as("img.qcow2", ImageFormat::Qcow2);
    let bytes = std::fs::read(&q).unwrap();
    assert_eq!(sum, sha256_hex(&bytes), "hashed as written");
    crate::testkit::assert_qcow2_clean(&q, "native qcow2");
    crate::testkit::assert_qcow2_equals_raw(&q, &raw, "native qcow2");
    // No larger than the raw image's data, rounded out to clusters, plus the tables.
    let f = File::open(&raw).unwrap();
    let len = f.metadata().unwrap().len();
    let layout = crate::qcow2::Layout::new(len, &crate::qcow2::data_extents(&f, len).unwrap());
    assert!(
        bytes.len() as u64 <= layout.file_len(),
        "{} > {}",
        bytes.len(),
        layout.file_len()
    );
    // On the host: the raw image's blocks plus the tables.
    let blocks = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    assert!(blocks(&q) <= blocks(&raw) + layout.table_bytes());
    // And it is a converted raw image's twin, byte for byte.
    let conv = crate::qcow2::convert(&raw, &dir.path().join("conv.qcow2"), &|| false).unwrap();
    assert_eq!(conv.sha256, sum);
    let (_, again) = build_as("again.qcow2", ImageFormat::Qcow2);
    assert_eq!(again, sum, "reproducible");
}
