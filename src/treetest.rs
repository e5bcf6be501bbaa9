//! Test support shared by the image writers' tests (squashfs, EROFS): a builder for
//! synthetic trees, sample contents, and the read-back check that compares an extracted or
//! mounted image with the tree entry by entry (type, mode, uid, gid, mtime, size, content
//! sha256, symlink target, device numbers, xattrs, link counts, hard-link inode sharing).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use sha2::Digest;

use crate::tree::{Content, Meta, Node, NodeId, NodeKind, Timestamp, Tree, Xattr, ROOT};

pub(crate) fn have(tool: &str) -> bool {
    Command::new(tool).arg("-help").output().is_ok()
}

pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub(crate) fn sha(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// A tree under construction: directory entries kept sorted.
pub(crate) struct T {
    pub(crate) nodes: Vec<Node>,
}

pub(crate) fn meta(mode: u32, uid: u32, gid: u32, sec: i64) -> Meta {
    Meta {
        mode,
        uid,
        gid,
        mtime: Timestamp::new(sec, 123_456_789),
        xattrs: Default::default(),
    }
}

pub(crate) fn x(name: &str, value: &[u8]) -> Xattr {
    (name.as_bytes().into(), value.into())
}

pub(crate) fn with_x(mut m: Meta, mut xs: Vec<Xattr>) -> Meta {
    xs.sort();
    m.xattrs = xs.into();
    m
}

impl T {
    pub(crate) fn new() -> T {
        T {
            nodes: vec![Node {
                kind: NodeKind::Dir {
                    entries: Vec::new(),
                },
                meta: meta(0o755, 0, 0, 1_600_000_000),
                nlink: 2,
                parent: ROOT,
            }],
        }
    }

    pub(crate) fn add(&mut self, dir: NodeId, name: &[u8], kind: NodeKind, m: Meta) -> NodeId {
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

    pub(crate) fn link(&mut self, dir: NodeId, name: &[u8], id: NodeId) {
        let NodeKind::Dir { entries } = &mut self.nodes[dir as usize].kind else {
            panic!("not a directory");
        };
        entries.push((name.into(), id));
        entries.sort();
    }

    pub(crate) fn dir(&mut self, parent: NodeId, name: &str, m: Meta) -> NodeId {
        self.add(
            parent,
            name.as_bytes(),
            NodeKind::Dir {
                entries: Vec::new(),
            },
            m,
        )
    }

    pub(crate) fn file(&mut self, dir: NodeId, name: &str, data: &[u8], m: Meta) -> NodeId {
        self.add(
            dir,
            name.as_bytes(),
            NodeKind::File {
                size: data.len() as u64,
                content: Content::Bytes(data.into()),
            },
            m,
        )
    }

    pub(crate) fn tree(self) -> Tree {
        Tree {
            nodes: self.nodes,
            layer_files: Vec::new(),
        }
    }
}

/// Bytes that compress somewhat, like real files: words from a small vocabulary, seeded.
pub(crate) fn text(len: usize, seed: u32) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "root", "squash", "fledge", "inode", "block", "tail", "kernel", "layer", "xz", "zstd",
        "/usr/lib", "\n",
    ];
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        out.extend_from_slice(WORDS[(s % 12) as usize].as_bytes());
        out.push(b' ');
        if s % 7 == 0 {
            out.push((s >> 8) as u8);
        }
    }
    out.truncate(len);
    out
}

/// Bytes that do not compress at all (xorshift output), seeded.
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A version 2 `security.capability` value granting `cap_net_bind_service` (bit 10).
pub(crate) fn capability() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // revision 2, effective
    v.extend_from_slice(&(1u32 << 10).to_le_bytes()); // permitted, low word
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable, low word
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// One entry of an image as an oracle sees it (or as the tree says it should be).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rec {
    pub(crate) kind: char,
    pub(crate) perm: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: (i64, u32),
    pub(crate) size: u64,
    pub(crate) sha: Option<String>,
    pub(crate) target: Option<Vec<u8>>,
    pub(crate) rdev: Option<(u32, u32)>,
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) nlink: u64,
}

/// Expected entries, by path relative to the root ("" is the root), and the node of each.
pub(crate) fn expected(
    tree: &Tree,
    time: fn(Timestamp) -> (i64, u32),
) -> (BTreeMap<Vec<u8>, Rec>, HashMap<Vec<u8>, NodeId>) {
    let mut names: HashMap<NodeId, u64> = HashMap::new();
    tree.walk(|_, id| *names.entry(id).or_default() += 1);
    let mut out = BTreeMap::new();
    let mut nodes = HashMap::new();
    tree.walk(|path, id| {
        let node = tree.node(id);
        let rel = path[1..].to_vec();
        let (kind, size, sha_, target, rdev) = match &node.kind {
            NodeKind::Dir { entries } => {
                let _ = entries;
                ('d', 0, None, None, None)
            }
            NodeKind::File { size, .. } => {
                let mut data = vec![0u8; *size as usize];
                tree.read_at(id, 0, &mut data).unwrap();
                ('-', *size, Some(sha(&data)), None, None)
            }
            NodeKind::Symlink { target } => {
                ('l', target.len() as u64, None, Some(target.to_vec()), None)
            }
            NodeKind::CharDevice { major, minor } => ('c', 0, None, None, Some((*major, *minor))),
            NodeKind::BlockDevice { major, minor } => ('b', 0, None, None, Some((*major, *minor))),
            NodeKind::Fifo => ('p', 0, None, None, None),
        };
        let nlink = match &node.kind {
            NodeKind::Dir { entries } => {
                2 + entries
                    .iter()
                    .filter(|(_, c)| matches!(tree.node(*c).kind, NodeKind::Dir { .. }))
                    .count() as u64
            }
            _ => names[&id],
        };
        let mut xattrs: Vec<_> = node
            .meta
            .xattrs
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        xattrs.sort();
        out.insert(
            rel.clone(),
            Rec {
                kind,
                perm: node.meta.mode & 0o7777,
                uid: node.meta.uid,
                gid: node.meta.gid,
                mtime: time(node.meta.mtime),
                size,
                sha: sha_,
                target,
                rdev,
                xattrs,
                nlink,
            },
        );
        nodes.insert(rel, id);
    });
    (out, nodes)
}

/// Entries of a directory tree on the host (an extraction or a mount), read back with
/// `lstat`, `readlink`, `llistxattr`; and each path's inode number.
pub(crate) fn actual(root: &Path) -> (BTreeMap<Vec<u8>, Rec>, HashMap<Vec<u8>, u64>) {
    let mut out = BTreeMap::new();
    let mut inos = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), Vec::new())];
    while let Some((p, rel)) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let (kind, size, sha_, target, rdev) = if ft.is_dir() {
            let mut kids: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            kids.sort();
            for k in kids {
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(k.as_bytes());
                stack.push((p.join(&k), r));
            }
            ('d', 0, None, None, None)
        } else if ft.is_file() {
            let data = std::fs::read(&p).unwrap();
            ('-', md.len(), Some(sha(&data)), None, None)
        } else if ft.is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            (
                'l',
                md.len(),
                None,
                Some(t.as_os_str().as_bytes().to_vec()),
                None,
            )
        } else {
            let dev = (libc::major(md.rdev()), libc::minor(md.rdev()));
            if ft.is_char_device() {
                ('c', 0, None, None, Some(dev))
            } else if ft.is_block_device() {
                ('b', 0, None, None, Some(dev))
            } else if ft.is_fifo() {
                ('p', 0, None, None, None)
            } else {
                panic!("unexpected file type at {}", p.display())
            }
        };
        let mut xattrs = Vec::new();
        // A squashfs without an xattr table answers "not supported": no attributes.
        let names = match xattr::list(&p) {
            Ok(n) => n.collect(),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Vec::new(),
            Err(e) => panic!("listxattr {}: {e}", p.display()),
        };
        for name in names {
            let v = xattr::get(&p, &name).unwrap().unwrap_or_default();
            xattrs.push((name.as_bytes().to_vec(), v));
        }
        xattrs.sort();
        inos.insert(rel.clone(), md.ino());
        out.insert(
            rel,
            Rec {
                kind,
                perm: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: (md.mtime(), md.mtime_nsec() as u32),
                size,
                sha: sha_,
                target,
                rdev,
                xattrs,
                nlink: md.nlink(),
            },
        );
    }
    (out, inos)
}

/// Compare an image read back at `root` with the tree: every entry and field, then
/// hard-link inode sharing. `what` names the oracle in failures.
pub(crate) fn compare(tree: &Tree, root: &Path, what: &str, time: fn(Timestamp) -> (i64, u32)) {
    let (want, nodes) = expected(tree, time);
    let (got, inos) = actual(root);
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .take(10)
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .take(10)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: missing {missing:?}, unexpected {extra:?}"
    );
    let mut bad = Vec::new();
    for (path, w) in &want {
        let g = &got[path];
        if w != g {
            bad.push(format!(
                "{}:\n  want {w:?}\n  got  {g:?}",
                String::from_utf8_lossy(path)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} entries differ, first ones:\n{}",
        bad.len(),
        bad.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
    // One inode per node: names of the same node share it, different nodes do not.
    let mut ino_of: HashMap<NodeId, u64> = HashMap::new();
    let mut node_of: HashMap<u64, NodeId> = HashMap::new();
    for (path, id) in &nodes {
        let ino = inos[path];
        assert_eq!(
            *ino_of.entry(*id).or_insert(ino),
            ino,
            "{what}: {} does not share its inode with its other names",
            String::from_utf8_lossy(path)
        );
        assert_eq!(
            *node_of.entry(ino).or_insert(*id),
            *id,
            "{what}: {} shares inode {ino} with another file",
            String::from_utf8_lossy(path)
        );
    }
}

pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tree of the files under a host directory (regular files read from the host).
pub(crate) fn host_tree(root: &Path) -> Tree {
    let mut t = T::new();
    let md = std::fs::symlink_metadata(root).unwrap();
    t.nodes[0].meta = meta(md.mode() & 0o7777, md.uid(), md.gid(), md.mtime());
    let mut stack = vec![(root.to_path_buf(), ROOT)];
    while let Some((dir, id)) = stack.pop() {
        let mut kids: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        kids.sort();
        for p in kids {
            let md = std::fs::symlink_metadata(&p).unwrap();
            let name = p.file_name().unwrap().as_bytes();
            let m = meta(md.mode() & 0o7777, md.uid(), md.gid(), md.mtime());
            let ft = md.file_type();
            if ft.is_dir() {
                let d = t.add(
                    id,
                    name,
                    NodeKind::Dir {
                        entries: Vec::new(),
                    },
                    m,
                );
                stack.push((p, d));
            } else if ft.is_file() {
                t.add(
                    id,
                    name,
                    NodeKind::File {
                        size: md.len(),
                        content: Content::HostFile(p.clone()),
                    },
                    m,
                );
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                t.add(
                    id,
                    name,
                    NodeKind::Symlink {
                        target: target.as_os_str().as_bytes().into(),
                    },
                    m,
                );
            }
        }
    }
    t.tree()
}
