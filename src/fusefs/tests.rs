//! Tests of the FUSE view: unit tests of the pure helpers, and mount tests (skipped with a
//! `SKIP:` line when /dev/fuse cannot be used) that compare everything seen through the
//! kernel with the tree.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fs::{encode_rdev, DIR_SIZE};
use super::*;
use crate::tree::{Content, Meta, Node, NodeId, NodeKind, Timestamp, Xattr, ROOT};

/// Whether mount tests can run; prints the SKIP line when not.
fn fuse_usable(test: &str) -> bool {
    match check_dev_fuse() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIP: {test}: {e}");
            false
        }
    }
}

/// Builds a tree node by node; directory entries are sorted and nlinks computed at the end.
struct Builder {
    nodes: Vec<Node>,
}

impl Builder {
    fn new(meta: Meta) -> Self {
        Builder {
            nodes: vec![Node {
                kind: NodeKind::Dir { entries: vec![] },
                meta,
                nlink: 2,
                parent: ROOT,
            }],
        }
    }

    /// Add node `kind` under directory `parent` as `name`.
    fn add(&mut self, parent: NodeId, name: &[u8], kind: NodeKind, meta: Meta) -> NodeId {
        let id = self.nodes.len() as NodeId;
        self.nodes.push(Node {
            kind,
            meta,
            nlink: 1,
            parent,
        });
        self.link(parent, name, id);
        id
    }

    /// Add another entry for an existing node (a hard link).
    fn link(&mut self, parent: NodeId, name: &[u8], id: NodeId) {
        let NodeKind::Dir { entries } = &mut self.nodes[parent as usize].kind else {
            panic!("parent is not a directory");
        };
        entries.push((name.into(), id));
    }

    fn finish(mut self, layer_files: Vec<Arc<File>>) -> Tree {
        let mut links = vec![0u32; self.nodes.len()];
        let mut subdirs = vec![0u32; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            if let NodeKind::Dir { entries } = &node.kind {
                for (_, child) in entries {
                    links[*child as usize] += 1;
                    if matches!(self.nodes[*child as usize].kind, NodeKind::Dir { .. }) {
                        subdirs[i] += 1;
                    }
                }
            }
        }
        for (i, node) in self.nodes.iter_mut().enumerate() {
            match &mut node.kind {
                NodeKind::Dir { entries } => {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                    node.nlink = 2 + subdirs[i];
                }
                _ => node.nlink = links[i],
            }
        }
        Tree {
            nodes: self.nodes,
            layer_files,
        }
    }
}

fn meta(mode: u32, uid: u32, gid: u32, mtime: Timestamp) -> Meta {
    Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs: Default::default(),
    }
}

fn bytes_file(data: &[u8]) -> NodeKind {
    NodeKind::File {
        size: data.len() as u64,
        content: Content::Bytes(data.into()),
    }
}

/// A valid version-2 `security.capability` value (cap_net_bind_service, effective).
const CAPABILITY: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// A valid POSIX ACL xattr: user::rwx, user:70000:r--, group::r-x, mask::r-x, other::r-x.
const POSIX_ACL: [u8; 44] = [
    0x02, 0x00, 0x00, 0x00, // version 2
    0x01, 0x00, 0x07, 0x00, 0xff, 0xff, 0xff, 0xff, // ACL_USER_OBJ rwx
    0x02, 0x00, 0x04, 0x00, 0x70, 0x11, 0x01, 0x00, // ACL_USER 70000 r--
    0x04, 0x00, 0x05, 0x00, 0xff, 0xff, 0xff, 0xff, // ACL_GROUP_OBJ r-x
    0x10, 0x00, 0x05, 0x00, 0xff, 0xff, 0xff, 0xff, // ACL_MASK r-x
    0x20, 0x00, 0x05, 0x00, 0xff, 0xff, 0xff, 0xff, // ACL_OTHER r-x
];

const NEGATIVE: Timestamp = Timestamp::new(-86_400, 500_000_000);
const AFTER_2038: Timestamp = Timestamp::new(4_102_444_800, 123_456_789);
const LAYER_OFFSET: u64 = 1000;
const LAYER_FILE_SIZE: u64 = 70_001;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// The tree every mount test uses, its temp dir (layer and host files) and the expected
/// bytes of each regular file by path.
fn sample_tree() -> (Tree, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    // A "layer": unrelated bytes around the file's data at LAYER_OFFSET.
    let layer_path = dir.path().join("layer.tar");
    let mut layer = vec![0xeeu8; LAYER_OFFSET as usize];
    layer.extend(pattern(LAYER_FILE_SIZE as usize, 0x5a));
    layer.extend([0xddu8; 777]);
    std::fs::write(&layer_path, &layer).unwrap();
    let host_path = dir.path().join("host.bin");
    std::fs::write(&host_path, pattern(9_000, 0x33)).unwrap();

    let mut root_meta = meta(0o755, 0, 0, Timestamp::new(1_700_000_000, 1));
    root_meta.xattrs = vec![(
        b"user.root".as_slice().into(),
        b"r\x00\xff".as_slice().into(),
    )]
    .into();
    let mut b = Builder::new(root_meta);

    let mut m = meta(0o644, 70_000, 3_000_000, NEGATIVE);
    let xattrs: Vec<Xattr> = vec![
        (
            b"security.capability".as_slice().into(),
            CAPABILITY.as_slice().into(),
        ),
        (
            b"user.bin".as_slice().into(),
            b"\x00\xff\x00\x7f".as_slice().into(),
        ),
        (b"user.empty".as_slice().into(), b"".as_slice().into()),
    ];
    m.xattrs = xattrs.into();
    b.add(ROOT, b"bytes", bytes_file(b"hello, world\n"), m);
    let mut m = meta(0o4755, 0, 0, AFTER_2038);
    m.xattrs = vec![(
        b"system.posix_acl_access".as_slice().into(),
        POSIX_ACL.as_slice().into(),
    )]
    .into();
    b.add(
        ROOT,
        b"layer",
        NodeKind::File {
            size: LAYER_FILE_SIZE,
            content: Content::Layer {
                layer: 0,
                offset: LAYER_OFFSET,
            },
        },
        m,
    );
    b.add(
        ROOT,
        b"host",
        NodeKind::File {
            size: 9_000,
            content: Content::HostFile(host_path),
        },
        meta(0o2711, 1, 2, Timestamp::new(0, 999_999_999)),
    );
    let hard = b.add(
        ROOT,
        b"hard1",
        bytes_file(b"linked"),
        meta(0o640, 5, 6, NEGATIVE),
    );
    b.link(ROOT, b"hard2", hard);
    b.add(
        ROOT,
        b"link",
        NodeKind::Symlink {
            target: b"../t\xffarget dir/x".as_slice().into(),
        },
        meta(0o777, 70_000, 3_000_000, AFTER_2038),
    );
    b.add(
        ROOT,
        b"chr",
        NodeKind::CharDevice {
            major: 259,
            minor: 300_000,
        },
        meta(0o620, 0, 5, NEGATIVE),
    );
    b.add(
        ROOT,
        b"blk",
        NodeKind::BlockDevice { major: 8, minor: 1 },
        meta(0o660, 0, 6, AFTER_2038),
    );
    b.add(ROOT, b"fifo", NodeKind::Fifo, meta(0o600, 42, 43, NEGATIVE));
    let sticky = b.add(
        ROOT,
        b"sticky",
        NodeKind::Dir { entries: vec![] },
        meta(0o1777, 0, 0, AFTER_2038),
    );
    b.add(
        sticky,
        b"inner",
        bytes_file(b""),
        meta(0o000, 9, 9, NEGATIVE),
    );
    let sub = b.add(
        sticky,
        b"sub",
        NodeKind::Dir { entries: vec![] },
        meta(0o2750, 7, 8, NEGATIVE),
    );
    b.add(
        sub,
        b"deep",
        bytes_file(b"deep\n"),
        meta(0o444, 0, 0, NEGATIVE),
    );
    for (i, name) in [
        b"a b".as_slice(),
        b"new\nline",
        b"back\\slash",
        b"-dash",
        b"\xff\xfenot utf8",
    ]
    .iter()
    .enumerate()
    {
        b.add(
            ROOT,
            name,
            bytes_file(&pattern(i * 3 + 1, i as u8)),
            meta(0o644, 0, 0, NEGATIVE),
        );
    }
    let layer_file = Arc::new(File::open(&layer_path).unwrap());
    (b.finish(vec![layer_file]), dir)
}

/// The full contents of regular file `id` according to the tree.
fn tree_bytes(tree: &Tree, id: NodeId) -> Vec<u8> {
    let mut buf = vec![0u8; tree.node(id).size() as usize];
    let n = tree.read_at(id, 0, &mut buf).unwrap();
    assert_eq!(n, buf.len());
    buf
}

fn os(path: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(path))
}

/// The mounted path of tree path `path` (absolute, raw bytes).
fn under(mountpoint: &Path, path: &[u8]) -> PathBuf {
    let rel = path.strip_prefix(b"/").unwrap_or(path);
    if rel.is_empty() {
        mountpoint.to_path_buf()
    } else {
        mountpoint.join(os(rel))
    }
}

/// Compare every entry seen through the mount with the tree.
fn check_view(tree: &Tree, mountpoint: &Path) {
    let mut seen = 0;
    tree.walk(|path, id| {
        seen += 1;
        let node = tree.node(id);
        let p = under(mountpoint, path);
        let what = String::from_utf8_lossy(path).into_owned();
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (size, kind) = match &node.kind {
            NodeKind::Dir { .. } => (DIR_SIZE, libc::S_IFDIR),
            k => (node.size(), k.file_type_bits()),
        };
        assert_eq!(md.ino(), u64::from(id) + 1, "{what}: ino");
        assert_eq!(md.mode(), kind | (node.meta.mode & 0o7777), "{what}: mode");
        assert_eq!(md.mode(), node.st_mode(), "{what}: st_mode");
        assert_eq!(md.nlink(), u64::from(node.nlink), "{what}: nlink");
        assert_eq!(md.uid(), node.meta.uid, "{what}: uid");
        assert_eq!(md.gid(), node.meta.gid, "{what}: gid");
        assert_eq!(md.size(), size, "{what}: size");
        assert_eq!(md.blocks(), size.div_ceil(512), "{what}: blocks");
        assert_eq!(md.blksize(), 4096, "{what}: blksize");
        match node.kind {
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                assert_eq!(libc::major(md.rdev()), major, "{what}: major");
                assert_eq!(libc::minor(md.rdev()), minor, "{what}: minor");
                assert_eq!(md.rdev(), node.rdev(), "{what}: rdev");
            }
            _ => assert_eq!(md.rdev(), 0, "{what}: rdev"),
        }
        let t = node.meta.mtime;
        for (label, sec, nsec) in [
            ("mtime", md.mtime(), md.mtime_nsec()),
            ("atime", md.atime(), md.atime_nsec()),
            ("ctime", md.ctime(), md.ctime_nsec()),
        ] {
            assert_eq!((sec, nsec), (t.sec, i64::from(t.nsec)), "{what}: {label}");
        }
        match &node.kind {
            NodeKind::File { .. } => {
                let want = tree_bytes(tree, id);
                assert_eq!(std::fs::read(&p).unwrap(), want, "{what}: contents");
                check_odd_reads(&p, &want, &what);
            }
            NodeKind::Symlink { target } => {
                let got = std::fs::read_link(&p).unwrap();
                assert_eq!(
                    got.as_os_str().as_bytes(),
                    target.as_ref(),
                    "{what}: target"
                );
            }
            NodeKind::Dir { entries } => {
                let mut names: Vec<Vec<u8>> = std::fs::read_dir(&p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                    .collect();
                names.sort();
                let want: Vec<Vec<u8>> = entries.iter().map(|(n, _)| n.to_vec()).collect();
                assert_eq!(names, want, "{what}: entries");
                let parent = std::fs::metadata(p.join("..")).unwrap();
                if id != ROOT {
                    assert_eq!(parent.ino(), u64::from(node.parent) + 1, "{what}: ..");
                }
            }
            _ => {}
        }
        if matches!(node.kind, NodeKind::File { .. } | NodeKind::Dir { .. }) {
            check_xattrs(&p, &node.meta.xattrs, &what);
        }
    });
    assert_eq!(seen, tree.stats().entries + 1);
}

/// Reads at odd offsets and across the end of the file.
fn check_odd_reads(path: &Path, want: &[u8], what: &str) {
    let f = File::open(path).unwrap();
    let len = want.len() as u64;
    let offsets = [
        0,
        1,
        3,
        4095,
        4096,
        4097,
        65_535,
        len.saturating_sub(1),
        len,
        len + 100,
    ];
    for off in offsets {
        for size in [1usize, 7, 5000, 200_000] {
            let mut buf = vec![0u8; size];
            let mut got = 0;
            loop {
                let n = f.read_at(&mut buf[got..], off + got as u64).unwrap();
                if n == 0 {
                    break;
                }
                got += n;
                if got == size {
                    break;
                }
            }
            let start = (off.min(len)) as usize;
            let end = ((off + size as u64).min(len)) as usize;
            assert_eq!(&buf[..got], &want[start..end], "{what}: read {size}@{off}");
        }
    }
}

fn check_xattrs(path: &Path, xattrs: &[Xattr], what: &str) {
    let mut names: Vec<Vec<u8>> = xattr::list(path)
        .unwrap()
        .map(|n| n.as_bytes().to_vec())
        .collect();
    names.sort();
    let want: Vec<Vec<u8>> = xattrs.iter().map(|(n, _)| n.to_vec()).collect();
    assert_eq!(names, want, "{what}: xattr names");
    for (name, value) in xattrs {
        let got = xattr::get(path, OsStr::from_bytes(name)).unwrap();
        assert_eq!(got.as_deref(), Some(value.as_ref()), "{what}: xattr value");
    }
    assert_eq!(
        xattr::get(path, "user.missing").unwrap(),
        None,
        "{what}: missing xattr"
    );
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn encode_rdev_matches_new_encode_dev() {
    // (major, minor, expected fuse_attr.rdev)
    let cases: &[(u32, u32, u32)] = &[
        (0, 0, 0),
        (8, 1, 0x801),
        (1, 3, 0x103),
        (
            259,
            300_000,
            (300_000 & 0xff) | (259 << 8) | ((300_000 & 0xfff00) << 12),
        ),
        (4095, 0xf_ffff, 0xffff_ffff),
    ];
    for &(major, minor, want) in cases {
        let dev = libc::makedev(major, minor);
        assert_eq!(encode_rdev(dev), want, "({major},{minor})");
        // Within range this is glibc's makedev truncated to 32 bits.
        assert_eq!(u64::from(encode_rdev(dev)), dev, "({major},{minor})");
    }
}

#[test]
fn options_map_to_mount_config() {
    let opts = MountOptions {
        allow_other: false,
        fsname: "img,x".to_string(),
        threads: 3,
    };
    let c = session_config(&opts);
    assert_eq!(c.acl, SessionACL::Owner);
    assert_eq!(c.n_threads, Some(3));
    assert!(c.mount_options.contains(&MountOption::RO));
    assert!(c.mount_options.contains(&MountOption::NoSuid));
    assert!(c.mount_options.contains(&MountOption::NoDev));
    assert!(c
        .mount_options
        .contains(&MountOption::FSName("img_x".to_string())));
    assert!(c
        .mount_options
        .contains(&MountOption::CUSTOM("subtype=fledge".to_string())));
    assert!(!c.mount_options.contains(&MountOption::DefaultPermissions));

    let c = session_config(&MountOptions {
        allow_other: true,
        fsname: String::new(),
        threads: 0,
    });
    assert_eq!(c.acl, SessionACL::All);
    assert!(c.mount_options.contains(&MountOption::DefaultPermissions));
    assert!(c
        .mount_options
        .contains(&MountOption::FSName("fledge".to_string())));
    assert_eq!(c.n_threads, Some(default_threads()));
    assert!(default_threads() >= 2);
}

#[test]
fn dev_fuse_errors_carry_a_remedy() {
    let cases = [
        (
            std::io::ErrorKind::PermissionDenied,
            "permission denied opening /dev/fuse",
            "chmod 0666 /dev/fuse",
        ),
        (
            std::io::ErrorKind::NotFound,
            "/dev/fuse does not exist",
            "modprobe fuse",
        ),
    ];
    for (kind, reason, hint) in cases {
        let e = dev_fuse_error(&std::io::Error::from(kind));
        assert_eq!(e.to_string(), reason);
        assert!(e.hint().unwrap().contains(hint), "{:?}", e.hint());
    }
}

#[test]
fn one_line_joins_helper_output() {
    let e = one_line(std::io::Error::other("fusermount3: bad\nsecond line\n"));
    assert_eq!(e.to_string(), "fusermount3: bad; second line");
    let e = one_line(std::io::Error::other("single"));
    assert_eq!(e.to_string(), "single");
}

#[test]
fn bad_mountpoints_are_named() {
    let (tree, dir) = sample_tree();
    let tree = Arc::new(tree);
    let missing = dir.path().join("nope");
    match MountedView::mount(tree.clone(), &missing, &MountOptions::default()) {
        Err(e @ FuseError::MountpointMissing { .. }) => {
            assert!(e.to_string().contains("nope"), "{e}")
        }
        other => panic!("expected MountpointMissing, got {other:?}"),
    }
    let file = dir.path().join("layer.tar");
    match serve_foreground(tree, &file, &MountOptions::default(), || {}) {
        Err(e @ FuseError::MountpointNotDir { .. }) => {
            assert!(e.to_string().contains("layer.tar"), "{e}")
        }
        other => panic!("expected MountpointNotDir, got {other:?}"),
    }
}

#[test]
fn mounted_view_is_exact_and_read_only() {
    if !fuse_usable("mounted_view_is_exact_and_read_only") {
        return;
    }
    let (tree, _data) = sample_tree();
    let tree = Arc::new(tree);
    let mnt = tempfile::tempdir().unwrap();
    let view = MountedView::mount(tree.clone(), mnt.path(), &MountOptions::default()).unwrap();
    let mp = view.mountpoint().to_path_buf();
    assert!(mountinfo::is_mounted(&mp));
    let entry = mountinfo::entries()
        .into_iter()
        .find(|e| e.mount_point == mp)
        .unwrap();
    assert_eq!(entry.fstype, "fuse.fledge");

    check_view(&tree, &mp);

    // The hard-link pair is one inode.
    let h1 = std::fs::metadata(mp.join("hard1")).unwrap();
    let h2 = std::fs::metadata(mp.join("hard2")).unwrap();
    assert_eq!((h1.ino(), h1.nlink()), (h2.ino(), 2));

    // statfs reports the tree's totals.
    let st = nix::sys::statvfs::statvfs(&mp).unwrap();
    let stats = tree.stats();
    assert_eq!(st.files(), stats.inodes);
    assert_eq!(
        st.blocks(),
        (stats.file_bytes + stats.symlink_bytes).div_ceil(4096)
    );
    assert_eq!((st.blocks_free(), st.files_free()), (0, 0));
    assert_eq!(st.name_max(), 255);
    assert!(st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    assert!(st.flags().contains(nix::sys::statvfs::FsFlags::ST_NOSUID));

    // Nothing can be changed.
    let erofs = libc::EROFS;
    let open_rw = std::fs::OpenOptions::new()
        .write(true)
        .open(mp.join("bytes"));
    assert_eq!(errno(open_rw.unwrap_err()), erofs);
    assert_eq!(errno(File::create(mp.join("new")).unwrap_err()), erofs);
    assert_eq!(errno(std::fs::create_dir(mp.join("d")).unwrap_err()), erofs);
    assert_eq!(
        errno(std::fs::remove_file(mp.join("bytes")).unwrap_err()),
        erofs
    );
    assert_eq!(
        errno(std::fs::rename(mp.join("bytes"), mp.join("b2")).unwrap_err()),
        erofs
    );
    assert_eq!(
        errno(xattr::set(mp.join("bytes"), "user.x", b"1").unwrap_err()),
        erofs
    );
    let access = |p: &str, how| nix::unistd::access(&mp.join(p), how);
    assert_eq!(
        access("bytes", nix::unistd::AccessFlags::W_OK),
        Err(nix::errno::Errno::EROFS)
    );
    assert_eq!(
        access("inner", nix::unistd::AccessFlags::F_OK),
        Err(nix::errno::Errno::ENOENT)
    );
    access("sticky/inner", nix::unistd::AccessFlags::R_OK).unwrap();
    assert_eq!(
        errno(std::fs::metadata(mp.join("missing")).unwrap_err()),
        libc::ENOENT
    );

    view.unmount().unwrap();
    assert!(!mountinfo::is_mounted(&mp), "still mounted after unmount()");
}

#[test]
fn drop_unmounts() {
    if !fuse_usable("drop_unmounts") {
        return;
    }
    let (tree, _data) = sample_tree();
    let mnt = tempfile::tempdir().unwrap();
    let opts = MountOptions {
        threads: 1,
        ..MountOptions::default()
    };
    let view = MountedView::mount(Arc::new(tree), mnt.path(), &opts).unwrap();
    let mp = view.mountpoint().to_path_buf();
    assert_eq!(std::fs::read(mp.join("bytes")).unwrap(), b"hello, world\n");
    drop(view);
    assert!(!mountinfo::is_mounted(&mp), "still mounted after drop");
}

#[test]
fn busy_view_still_unmounts() {
    if !fuse_usable("busy_view_still_unmounts") {
        return;
    }
    let (tree, _data) = sample_tree();
    let mnt = tempfile::tempdir().unwrap();
    let view = MountedView::mount(Arc::new(tree), mnt.path(), &MountOptions::default()).unwrap();
    let mp = view.mountpoint().to_path_buf();
    let open = File::open(mp.join("layer")).unwrap();
    let started = Instant::now();
    let result = view.unmount();
    assert!(
        !mountinfo::is_mounted(&mp),
        "still mounted after a busy unmount"
    );
    // With the fuse control filesystem the connection is aborted and this is Ok; without it the
    // lazily detached view outlives the timeout and the error says so.
    eprintln!(
        "busy unmount: {:?} after {:?}",
        result.as_ref().err().map(|e| e.to_string()),
        started.elapsed()
    );
    let fusectl = std::fs::read_dir("/sys/fs/fuse/connections")
        .map(|d| d.count() > 0)
        .unwrap_or(false);
    match result {
        Ok(()) => assert!(
            fusectl,
            "a busy view cannot end without the fuse control fs"
        ),
        Err(e) => {
            assert!(!fusectl, "{e}");
            assert!(e.to_string().contains("still in use"), "{e}");
        }
    }
    drop(open);
}

#[test]
fn lists_a_100k_entry_directory() {
    if !fuse_usable("lists_a_100k_entry_directory") {
        return;
    }
    const N: u32 = 100_000;
    let mut b = Builder::new(meta(0o755, 0, 0, Timestamp::default()));
    let big = b.add(
        ROOT,
        b"big",
        NodeKind::Dir { entries: vec![] },
        meta(0o755, 0, 0, Timestamp::default()),
    );
    for i in 0..N {
        b.add(
            big,
            format!("file-{i:06}").as_bytes(),
            bytes_file(b""),
            meta(0o644, 0, 0, Timestamp::default()),
        );
    }
    let tree = Arc::new(b.finish(vec![]));
    let mnt = tempfile::tempdir().unwrap();
    let view = MountedView::mount(tree, mnt.path(), &MountOptions::default()).unwrap();
    let dir = view.mountpoint().join("big");

    let started = Instant::now();
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    eprintln!("read_dir of {N} entries: {:?}", started.elapsed());
    assert_eq!(names.len(), N as usize);
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), N as usize, "duplicate names in the listing");

    let started = Instant::now();
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let md = entry.unwrap().metadata().unwrap();
        assert!(md.is_file());
        count += 1;
    }
    eprintln!("read_dir + stat of {N} entries: {:?}", started.elapsed());
    assert_eq!(count, N);
    view.unmount().unwrap();
}

#[test]
fn allow_other_adds_default_permissions() {
    if !fuse_usable("allow_other_adds_default_permissions") {
        return;
    }
    let (tree, _data) = sample_tree();
    let mnt = tempfile::tempdir().unwrap();
    let opts = MountOptions {
        allow_other: true,
        fsname: "img:latest".to_string(),
        threads: 2,
    };
    match MountedView::mount(Arc::new(tree), mnt.path(), &opts) {
        Ok(view) => {
            let mp = view.mountpoint().to_path_buf();
            let entry = mountinfo::entries()
                .into_iter()
                .find(|e| e.mount_point == mp)
                .unwrap();
            let options: Vec<&str> = entry.super_options.split(',').collect();
            assert!(options.contains(&"allow_other"), "{options:?}");
            assert!(options.contains(&"default_permissions"), "{options:?}");
            assert_eq!(std::fs::read(mp.join("bytes")).unwrap(), b"hello, world\n");
            view.unmount().unwrap();
        }
        // Unprivileged without `user_allow_other` in /etc/fuse.conf: a clear one-line error.
        Err(e) => {
            let text = e.to_string();
            eprintln!("allow_other mount refused: {text}");
            assert!(!nix::unistd::geteuid().is_root(), "{text}");
            assert!(text.contains("user_allow_other"), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }
}

/// Unmount `mountpoint` the way a user would from outside.
fn external_unmount(mountpoint: &Path) {
    let (cmd, args): (&str, &[&str]) = if nix::unistd::geteuid().is_root() {
        ("umount", &[])
    } else {
        ("fusermount3", &["-u"])
    };
    let status = std::process::Command::new(cmd)
        .args(args)
        .arg(mountpoint)
        .status()
        .unwrap();
    assert!(status.success(), "{cmd} {} failed", mountpoint.display());
}

/// Run serve_foreground on a thread; return its join handle once it is ready.
fn serve_in_background(
    tree: Arc<Tree>,
    mountpoint: PathBuf,
) -> std::sync::mpsc::Receiver<Result<(), FuseError>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = serve_foreground(tree, &mountpoint, &MountOptions::default(), || {
            ready_tx.send(()).unwrap();
        });
        let _ = done_tx.send(result);
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("serve_foreground never became ready");
    done_rx
}

#[test]
fn serve_foreground_ends_on_external_unmount_and_on_sigterm() {
    if !fuse_usable("serve_foreground_ends_on_external_unmount_and_on_sigterm") {
        return;
    }
    let (tree, _data) = sample_tree();
    let tree = Arc::new(tree);
    let mnt = tempfile::tempdir().unwrap();
    let mp = mnt.path().canonicalize().unwrap();

    // 1. Unmounted from outside.
    let done = serve_in_background(tree.clone(), mp.clone());
    assert_eq!(std::fs::read(mp.join("hard2")).unwrap(), b"linked");
    external_unmount(&mp);
    done.recv_timeout(Duration::from_secs(30))
        .expect("serve_foreground did not return after an external unmount")
        .unwrap();
    assert!(!mountinfo::is_mounted(&mp));

    // 2. SIGTERM: the handler installed by serve_foreground unmounts and it returns Ok.
    let done = serve_in_background(tree, mp.clone());
    assert_eq!(std::fs::read(mp.join("hard1")).unwrap(), b"linked");
    nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    done.recv_timeout(Duration::from_secs(30))
        .expect("serve_foreground did not return after SIGTERM")
        .unwrap();
    assert!(!mountinfo::is_mounted(&mp));
}

/// Read throughput of a 256 MiB layer-backed file with 1 and with several serving threads.
/// Run with `cargo test --release --lib fusefs::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; prints numbers"]
fn throughput_256mib() {
    if !fuse_usable("throughput_256mib") {
        return;
    }
    const SIZE: u64 = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let layer_path = dir.path().join("layer");
    {
        let mut f = File::create(&layer_path).unwrap();
        let chunk = pattern(1 << 20, 7);
        f.write_all(&[0u8; 512]).unwrap();
        for _ in 0..(SIZE >> 20) {
            f.write_all(&chunk).unwrap();
        }
    }
    let mut b = Builder::new(meta(0o755, 0, 0, Timestamp::default()));
    b.add(
        ROOT,
        b"big",
        NodeKind::File {
            size: SIZE,
            content: Content::Layer {
                layer: 0,
                offset: 512,
            },
        },
        meta(0o644, 0, 0, Timestamp::default()),
    );
    let tree = Arc::new(b.finish(vec![Arc::new(File::open(&layer_path).unwrap())]));
    // Warm the host page cache so the numbers measure the FUSE path.
    std::fs::read(&layer_path).unwrap();
    for threads in [1, default_threads().max(4)] {
        for readers in [1u64, 4] {
            let mnt = tempfile::tempdir().unwrap();
            let opts = MountOptions {
                threads,
                ..MountOptions::default()
            };
            let view = MountedView::mount(tree.clone(), mnt.path(), &opts).unwrap();
            let path = view.mountpoint().join("big");
            let started = Instant::now();
            std::thread::scope(|s| {
                for r in 0..readers {
                    let path = &path;
                    s.spawn(move || {
                        let f = File::open(path).unwrap();
                        let part = SIZE / readers;
                        let mut buf = vec![0u8; 1 << 20];
                        let mut off = r * part;
                        while off < (r + 1) * part {
                            let n = f.read_at(&mut buf, off).unwrap();
                            assert!(n > 0);
                            off += n as u64;
                        }
                    });
                }
            });
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "threads={threads} readers={readers}: {:.0} MiB/s",
                256.0 / secs
            );
            view.unmount().unwrap();
        }
    }
}
