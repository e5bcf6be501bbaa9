//! The merged image tree: a frozen, read-only index of every entry of an image.
//!
//! A [`Tree`] is what the merge produces and what every consumer (the FUSE view, the
//! formatters, the size estimate) reads. It holds metadata only; file contents stay where they
//! came from (an uncompressed layer tar read by offset, a host file, or a small in-memory
//! buffer), so memory grows with the number of entries, not with the bytes of the files.
//!
//! Node ids are dense indexes into [`Tree::nodes`]; the root is [`ROOT`]. A regular file that
//! is reachable through several directory entries (a hard-link group) is one node whose
//! `nlink` counts those entries.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Index of a node in [`Tree::nodes`].
pub type NodeId = u32;

/// The root directory's id.
pub const ROOT: NodeId = 0;

/// A point in time with nanosecond precision; seconds may be negative (before 1970) or far
/// beyond 2038.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

impl Timestamp {
    pub const fn new(sec: i64, nsec: u32) -> Self {
        Timestamp { sec, nsec }
    }

    /// As a `SystemTime`, saturating at the representable range.
    pub fn to_system_time(self) -> std::time::SystemTime {
        use std::time::{Duration, UNIX_EPOCH};
        if self.sec >= 0 {
            UNIX_EPOCH
                .checked_add(Duration::new(self.sec as u64, self.nsec))
                .unwrap_or(UNIX_EPOCH)
        } else {
            // sec is negative and nsec is a positive fraction on top of it.
            let back = Duration::new(self.sec.unsigned_abs(), 0);
            UNIX_EPOCH
                .checked_sub(back)
                .and_then(|t| t.checked_add(Duration::new(0, self.nsec)))
                .unwrap_or(UNIX_EPOCH)
        }
    }
}

/// An extended attribute: raw name (e.g. `security.capability`) and binary value.
pub type Xattr = (Box<[u8]>, Box<[u8]>);

/// The extended attributes of a node, sorted by name, names unique. Nearly every node has
/// none, so an empty list is one null pointer (a `Vec` would cost three words per node).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
// The box is the point: one pointer in every node, the list's three words only for the few
// nodes that have attributes.
#[allow(clippy::box_collection)]
pub struct Xattrs(Option<Box<Vec<Xattr>>>);

impl Xattrs {
    /// Remove every attribute.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

impl std::ops::Deref for Xattrs {
    type Target = [Xattr];
    fn deref(&self) -> &[Xattr] {
        self.0.as_deref().map_or(&[], |v| v.as_slice())
    }
}

impl From<Vec<Xattr>> for Xattrs {
    fn from(v: Vec<Xattr>) -> Self {
        Xattrs((!v.is_empty()).then(|| Box::new(v)))
    }
}

impl FromIterator<Xattr> for Xattrs {
    fn from_iter<I: IntoIterator<Item = Xattr>>(iter: I) -> Self {
        iter.into_iter().collect::<Vec<_>>().into()
    }
}

impl<'a> IntoIterator for &'a Xattrs {
    type Item = &'a Xattr;
    type IntoIter = std::slice::Iter<'a, Xattr>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Metadata every node has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`); never the type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    /// Sorted by name, names unique.
    pub xattrs: Xattrs,
}

/// Where a regular file's bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// `size` bytes at `offset` in the uncompressed layer file `Tree::layer_files[layer]`.
    Layer { layer: u32, offset: u64 },
    /// Bytes held in memory (small injected files such as `/etc/fsify-entrypoint`).
    Bytes(Arc<[u8]>),
    /// A file on the host, read from offset 0 (injected files such as the agent binary).
    HostFile(PathBuf),
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// Children sorted by name (bytewise), names unique, without `.` and `..`.
    Dir {
        entries: Vec<(Box<[u8]>, NodeId)>,
    },
    File {
        size: u64,
        content: Content,
    },
    Symlink {
        target: Box<[u8]>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

impl NodeKind {
    /// The `S_IFMT` bits for this kind.
    pub fn file_type_bits(&self) -> u32 {
        match self {
            NodeKind::Dir { .. } => libc::S_IFDIR,
            NodeKind::File { .. } => libc::S_IFREG,
            NodeKind::Symlink { .. } => libc::S_IFLNK,
            NodeKind::CharDevice { .. } => libc::S_IFCHR,
            NodeKind::BlockDevice { .. } => libc::S_IFBLK,
            NodeKind::Fifo => libc::S_IFIFO,
        }
    }
}

/// One inode of the merged image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub meta: Meta,
    /// Directory entries that reach this node; for directories `2 + number of subdirectories`.
    pub nlink: u32,
    /// The directory holding this node (for a hard-link group, the first one); the root is its
    /// own parent.
    pub parent: NodeId,
}

impl Node {
    /// Size as `stat` reports it: file bytes, symlink target length, 0 otherwise
    /// (directories report 0 here; viewers may choose their own directory size).
    pub fn size(&self) -> u64 {
        match &self.kind {
            NodeKind::File { size, .. } => *size,
            NodeKind::Symlink { target } => target.len() as u64,
            _ => 0,
        }
    }

    /// Full `st_mode`: type bits plus permission bits.
    pub fn st_mode(&self) -> u32 {
        self.kind.file_type_bits() | (self.meta.mode & 0o7777)
    }

    /// Device number as `makedev(major, minor)` for device nodes, else 0.
    pub fn rdev(&self) -> u64 {
        match self.kind {
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                libc::makedev(major, minor)
            }
            _ => 0,
        }
    }
}

/// Totals over a tree, used for sizing images and for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TreeStats {
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    pub devices: u64,
    pub fifos: u64,
    /// Number of nodes (inodes), hard-link groups counted once.
    pub inodes: u64,
    /// Sum of regular file sizes, hard-link groups counted once.
    pub file_bytes: u64,
    /// Sum of symlink target lengths.
    pub symlink_bytes: u64,
    /// Number of directory entries (names), excluding the root.
    pub entries: u64,
    /// Sum of the byte lengths of all entry names.
    pub name_bytes: u64,
    /// Sum of xattr name+value lengths over all nodes.
    pub xattr_bytes: u64,
}

/// The frozen merged image.
#[derive(Debug)]
pub struct Tree {
    pub nodes: Vec<Node>,
    /// Uncompressed layer files that [`Content::Layer`] refers to, by index.
    pub layer_files: Vec<Arc<File>>,
}

impl Tree {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    pub fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id as usize)
    }

    /// The child `name` of directory `dir`, by binary search.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.get(dir)?.kind {
            NodeKind::Dir { entries } => entries
                .binary_search_by(|(n, _)| n.as_ref().cmp(name))
                .ok()
                .map(|i| entries[i].1),
            _ => None,
        }
    }

    /// Resolve an absolute or root-relative path without following symlinks.
    pub fn resolve(&self, path: &Path) -> Option<NodeId> {
        use std::os::unix::ffi::OsStrExt;
        let mut cur = ROOT;
        for comp in path.components() {
            match comp {
                std::path::Component::RootDir | std::path::Component::CurDir => {}
                std::path::Component::Normal(n) => cur = self.lookup(cur, n.as_bytes())?,
                _ => return None,
            }
        }
        Some(cur)
    }

    /// Read up to `buf.len()` bytes of regular file `id` at `offset`; returns bytes read
    /// (0 at or past the end).
    pub fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let node = self.node(id);
        let NodeKind::File { size, content } = &node.kind else {
            return Err(std::io::Error::from_raw_os_error(libc::EISDIR));
        };
        if offset >= *size {
            return Ok(0);
        }
        let want = ((*size - offset).min(buf.len() as u64)) as usize;
        let buf = &mut buf[..want];
        match content {
            Content::Bytes(bytes) => {
                let start = offset as usize;
                buf.copy_from_slice(&bytes[start..start + want]);
                Ok(want)
            }
            Content::Layer {
                layer,
                offset: base,
            } => {
                let file = &self.layer_files[*layer as usize];
                read_full_at(file, buf, base + offset)
            }
            Content::HostFile(path) => {
                let file = File::open(path)?;
                read_full_at(&file, buf, offset)
            }
        }
    }

    /// The path of `id` (through its first parent), for messages.
    pub fn path_of(&self, id: NodeId) -> String {
        let mut parts = Vec::new();
        let mut cur = id;
        while cur != ROOT {
            let parent = self.node(cur).parent;
            if let NodeKind::Dir { entries } = &self.node(parent).kind {
                if let Some((name, _)) = entries.iter().find(|(_, c)| *c == cur) {
                    parts.push(String::from_utf8_lossy(name).into_owned());
                }
            }
            if parent == cur {
                break;
            }
            cur = parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    /// Walk every directory entry depth-first in name order, calling `f(path, id)`; the root
    /// is visited first with the path `/`. Paths are absolute, raw bytes.
    pub fn walk(&self, mut f: impl FnMut(&[u8], NodeId)) {
        let mut path: Vec<u8> = b"/".to_vec();
        f(&path, ROOT);
        self.walk_dir(ROOT, &mut path, &mut f);
    }

    fn walk_dir(&self, dir: NodeId, path: &mut Vec<u8>, f: &mut impl FnMut(&[u8], NodeId)) {
        let NodeKind::Dir { entries } = &self.node(dir).kind else {
            return;
        };
        let base = path.len();
        for (name, child) in entries {
            if path.len() > 1 {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            f(path, *child);
            self.walk_dir(*child, path, f);
            path.truncate(base);
        }
    }

    /// Totals over the whole tree.
    pub fn stats(&self) -> TreeStats {
        let mut s = TreeStats {
            inodes: self.nodes.len() as u64,
            ..TreeStats::default()
        };
        for node in &self.nodes {
            s.xattr_bytes += node
                .meta
                .xattrs
                .iter()
                .map(|(n, v)| (n.len() + v.len()) as u64)
                .sum::<u64>();
            match &node.kind {
                NodeKind::Dir { entries } => {
                    s.dirs += 1;
                    s.entries += entries.len() as u64;
                    s.name_bytes += entries.iter().map(|(n, _)| n.len() as u64).sum::<u64>();
                }
                NodeKind::File { size, .. } => {
                    s.files += 1;
                    s.file_bytes += size;
                }
                NodeKind::Symlink { target } => {
                    s.symlinks += 1;
                    s.symlink_bytes += target.len() as u64;
                }
                NodeKind::CharDevice { .. } | NodeKind::BlockDevice { .. } => s.devices += 1,
                NodeKind::Fifo => s.fifos += 1,
            }
        }
        s
    }
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "layer data ends before the file does",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(entries: Vec<(&str, NodeId)>, parent: NodeId) -> Node {
        Node {
            kind: NodeKind::Dir {
                entries: entries
                    .into_iter()
                    .map(|(n, id)| (n.as_bytes().into(), id))
                    .collect(),
            },
            meta: Meta {
                mode: 0o755,
                ..Meta::default()
            },
            nlink: 2,
            parent,
        }
    }

    fn bytes_file(data: &[u8], parent: NodeId) -> Node {
        Node {
            kind: NodeKind::File {
                size: data.len() as u64,
                content: Content::Bytes(data.into()),
            },
            meta: Meta {
                mode: 0o644,
                ..Meta::default()
            },
            nlink: 1,
            parent,
        }
    }

    #[test]
    fn lookup_resolve_read_walk() {
        let tree = Tree {
            nodes: vec![
                dir(vec![("a", 1), ("etc", 2)], ROOT),
                bytes_file(b"hello", ROOT),
                dir(vec![("x", 1)], ROOT),
            ],
            layer_files: vec![],
        };
        assert_eq!(tree.lookup(ROOT, b"etc"), Some(2));
        assert_eq!(tree.lookup(ROOT, b"nope"), None);
        assert_eq!(tree.resolve(Path::new("/etc/x")), Some(1));
        let mut buf = [0u8; 10];
        assert_eq!(tree.read_at(1, 1, &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"ello");
        assert_eq!(tree.read_at(1, 5, &mut buf).unwrap(), 0);
        let mut seen = vec![];
        tree.walk(|p, id| seen.push((String::from_utf8(p.to_vec()).unwrap(), id)));
        assert_eq!(
            seen,
            vec![
                ("/".to_string(), 0),
                ("/a".to_string(), 1),
                ("/etc".to_string(), 2),
                ("/etc/x".to_string(), 1)
            ]
        );
        let s = tree.stats();
        assert_eq!((s.dirs, s.files, s.file_bytes, s.entries), (2, 1, 5, 3));
    }

    #[test]
    fn xattrs_are_a_sorted_list_or_nothing() {
        let x = |n: &str, v: &str| -> Xattr { (n.as_bytes().into(), v.as_bytes().into()) };
        let cases: Vec<(Vec<Xattr>, usize)> = vec![
            (vec![], 0),
            (vec![x("user.a", "1")], 1),
            (vec![x("security.capability", ""), x("user.a", "1")], 2),
        ];
        for (list, len) in cases {
            let xs: Xattrs = list.clone().into();
            assert_eq!(xs.len(), len);
            assert_eq!(&xs[..], &list[..]);
            assert_eq!((&xs).into_iter().cloned().collect::<Vec<_>>(), list);
            assert_eq!(list.iter().cloned().collect::<Xattrs>(), xs);
            // An empty list is the default, whichever way it was made.
            assert_eq!(xs == Xattrs::default(), len == 0);
            let mut cleared = xs.clone();
            cleared.clear();
            assert_eq!(cleared, Xattrs::default());
        }
    }

    #[test]
    fn nodes_stay_small() {
        // A million-file image holds a million of these: every word counts (see
        // ARCHITECTURE.md, "Memory").
        assert!(std::mem::size_of::<Xattrs>() <= 8);
        assert!(std::mem::size_of::<Meta>() <= 40);
        assert!(std::mem::size_of::<Node>() <= 80);
    }

    #[test]
    fn timestamps_before_1970_and_after_2038() {
        use std::time::{Duration, UNIX_EPOCH};
        let t = Timestamp::new(-86_400, 500_000_000).to_system_time();
        assert_eq!(
            UNIX_EPOCH.duration_since(t).unwrap(),
            Duration::new(86_399, 500_000_000)
        );
        let t = Timestamp::new(4_102_444_800, 0).to_system_time();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            4_102_444_800
        );
    }
}
