//! The [`fuser::Filesystem`] implementation: a read-only, stateless view of a [`Tree`].
//!
//! Inode numbers are `NodeId + 1` (the root is 1), generations are 0. Every reply carries long
//! TTLs because the tree never changes while it is served. Directory offsets are stable
//! indexes: 0 is `.`, 1 is `..`, `2 + i` is the i-th entry of the (sorted) directory, so a
//! listing resumes in O(1) from any offset.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::tree::{Content, Node, NodeId, NodeKind, Tree, TreeStats};

/// How long the kernel may cache entries and attributes: the tree is immutable.
pub(crate) const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Size reported for directories (the tree has no on-disk directory size).
pub(crate) const DIR_SIZE: u64 = 4096;

/// Block size reported by `stat` and `statfs`.
pub(crate) const BLOCK_SIZE: u32 = 4096;

/// Longest name `statfs` advertises.
const NAME_MAX: u32 = 255;

/// Background requests (readahead, async reads) the kernel may keep in flight.
const MAX_BACKGROUND: u16 = 64;

const GENERATION: Generation = Generation(0);

/// Capabilities requested from the kernel when it offers them.
const WANTED_CAPABILITIES: InitFlags = InitFlags::FUSE_ASYNC_READ
    .union(InitFlags::FUSE_DO_READDIRPLUS)
    .union(InitFlags::FUSE_READDIRPLUS_AUTO)
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    .union(InitFlags::FUSE_CACHE_SYMLINKS)
    .union(InitFlags::FUSE_EXPORT_SUPPORT)
    .union(InitFlags::FUSE_MAX_PAGES);

thread_local! {
    /// Per session-thread read buffer, reused across requests (no allocation per read).
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The FUSE filesystem serving one [`Tree`].
#[derive(Debug)]
pub(crate) struct TreeFs {
    tree: Arc<Tree>,
    /// Totals for `statfs`, computed once (a walk over every node).
    stats: TreeStats,
}

impl TreeFs {
    pub(crate) fn new(tree: Arc<Tree>) -> Self {
        let stats = tree.stats();
        TreeFs { tree, stats }
    }

    /// The node behind a FUSE inode number, if it exists.
    fn node(&self, ino: INodeNo) -> Option<(NodeId, &Node)> {
        let id = NodeId::try_from(ino.0.checked_sub(1)?).ok()?;
        Some((id, self.tree.get(id)?))
    }

    fn node_or_err(&self, ino: INodeNo) -> Result<(NodeId, &Node), Errno> {
        self.node(ino).ok_or(Errno::ENOENT)
    }

    /// List directory `ino` from `offset` (`.` and `..` first): `add(next_offset, name, id,
    /// node)` for each entry until it reports the reply buffer full. Shared by readdir and
    /// readdirplus, which differ only in what they add.
    fn list_dir(
        &self,
        ino: INodeNo,
        offset: u64,
        mut add: impl FnMut(u64, &[u8], NodeId, &Node) -> bool,
    ) -> Result<(), Errno> {
        let (dir, node) = self.node_or_err(ino)?;
        let NodeKind::Dir { entries } = &node.kind else {
            return Err(Errno::ENOTDIR);
        };
        let mut index = offset;
        while let Some((name, id)) = self.dir_entry(dir, node, entries, index) {
            let child = self.tree.get(id).ok_or(Errno::EIO)?;
            index += 1;
            if add(index, name, id, child) {
                break;
            }
        }
        Ok(())
    }

    /// Attributes of node `id` exactly as the tree records them.
    pub(crate) fn attr(&self, id: NodeId, node: &Node) -> FileAttr {
        let size = match node.kind {
            NodeKind::Dir { .. } => DIR_SIZE,
            _ => node.size(),
        };
        let time = node.meta.mtime.to_system_time();
        FileAttr {
            ino: ino_of(id),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind: file_type(&node.kind),
            perm: (node.meta.mode & 0o7777) as u16,
            nlink: node.nlink,
            uid: node.meta.uid,
            gid: node.meta.gid,
            rdev: encode_rdev(node.rdev()),
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    /// The child `name` of directory `parent`, handling `.` and `..` too.
    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<Option<NodeId>, Errno> {
        let (pid, pnode) = self.node_or_err(parent)?;
        if !matches!(pnode.kind, NodeKind::Dir { .. }) {
            return Err(Errno::ENOTDIR);
        }
        Ok(match name.as_bytes() {
            b"." => Some(pid),
            b".." => Some(pnode.parent),
            name => self.tree.lookup(pid, name),
        })
    }

    /// The directory entry at listing index `index` (0 `.`, 1 `..`, then the entries).
    fn dir_entry<'a>(
        &'a self,
        dir: NodeId,
        node: &'a Node,
        entries: &'a [(Box<[u8]>, NodeId)],
        index: u64,
    ) -> Option<(&'a [u8], NodeId)> {
        match index {
            0 => Some((b".".as_slice(), dir)),
            1 => Some((b"..".as_slice(), node.parent)),
            i => {
                let k = usize::try_from(i - 2).ok()?;
                entries.get(k).map(|(name, id)| (name.as_ref(), *id))
            }
        }
    }

    /// Check that `Tree::read_at` can serve node `node` without tripping over an inconsistent
    /// tree (a buffer shorter than the size, a missing layer, an offset overflow).
    fn check_readable(&self, node: &Node) -> Result<(), Errno> {
        let NodeKind::File { size, content } = &node.kind else {
            return Err(match node.kind {
                NodeKind::Dir { .. } => Errno::EISDIR,
                _ => Errno::EINVAL,
            });
        };
        let ok = match content {
            Content::Bytes(bytes) => bytes.len() as u64 >= *size,
            Content::Layer { layer, offset } => {
                (*layer as usize) < self.tree.layer_files.len()
                    && offset.checked_add(*size).is_some()
            }
            Content::HostFile(_) => true,
        };
        if ok {
            Ok(())
        } else {
            tracing::error!(size, "inconsistent content reference in the tree");
            Err(Errno::EIO)
        }
    }
}

/// The attributes sent with a negative (node id 0) lookup reply; the kernel ignores them.
fn negative_attr() -> FileAttr {
    let epoch = std::time::UNIX_EPOCH;
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: epoch,
        mtime: epoch,
        ctime: epoch,
        crtime: epoch,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// FUSE inode number of node `id`.
pub(crate) fn ino_of(id: NodeId) -> INodeNo {
    INodeNo(u64::from(id) + 1)
}

pub(crate) fn file_type(kind: &NodeKind) -> FileType {
    match kind {
        NodeKind::Dir { .. } => FileType::Directory,
        NodeKind::File { .. } => FileType::RegularFile,
        NodeKind::Symlink { .. } => FileType::Symlink,
        NodeKind::CharDevice { .. } => FileType::CharDevice,
        NodeKind::BlockDevice { .. } => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

/// Encode a `dev_t` (glibc `makedev` layout) as the 32-bit `fuse_attr.rdev`, which the kernel
/// decodes with `new_decode_dev`: minor bits 0..8 and 20..32, major bits 8..20. Majors above
/// 4095 and minors above 2^20-1 cannot be represented by FUSE and are truncated.
pub(crate) fn encode_rdev(dev: u64) -> u32 {
    let major = libc::major(dev);
    let minor = libc::minor(dev);
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & 0xf_ff00) << 12)
}

/// The errno to reply for an I/O error from the content source.
fn errno_of(err: &io::Error) -> Errno {
    match err.raw_os_error() {
        Some(code) if code > 0 => Errno::from_i32(code),
        _ => Errno::EIO,
    }
}

/// Reply to a getxattr/listxattr request for `value` with the requested buffer `size`.
fn reply_xattr_value(reply: ReplyXattr, size: u32, value: &[u8]) {
    let Ok(len) = u32::try_from(value.len()) else {
        reply.error(Errno::E2BIG);
        return;
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for TreeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Ask for the largest readahead the kernel allows: it reports its maximum on error.
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let wanted = WANTED_CAPABILITIES & config.capabilities();
        if let Err(unsupported) = config.add_capabilities(wanted) {
            tracing::debug!(?unsupported, "kernel refused fuse capabilities");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name) {
            Ok(Some(id)) => match self.tree.get(id) {
                Some(node) => reply.entry(&TTL, &self.attr(id, node), GENERATION),
                None => reply.error(Errno::EIO),
            },
            Ok(None) => {
                // Node id 0 with a timeout caches the negative entry: the name will never appear.
                reply.entry(&TTL, &negative_attr(), GENERATION);
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node_or_err(ino) {
            Ok((id, node)) => reply.attr(&TTL, &self.attr(id, node)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node_or_err(ino) {
            Ok((_, node)) => match &node.kind {
                NodeKind::Symlink { target } => reply.data(target),
                _ => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            reply.error(Errno::EROFS);
            return;
        }
        match self.node_or_err(ino) {
            Ok((_, node)) if matches!(node.kind, NodeKind::Dir { .. }) => {
                reply.error(Errno::EISDIR)
            }
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (id, node) = match self.node_or_err(ino) {
            Ok(found) => found,
            Err(e) => return reply.error(e),
        };
        if let Err(e) = self.check_readable(node) {
            return reply.error(e);
        }
        let want = node.size().saturating_sub(offset).min(u64::from(size)) as usize;
        if want == 0 {
            return reply.data(&[]);
        }
        READ_BUF.with(|cell| {
            let Ok(mut buf) = cell.try_borrow_mut() else {
                return reply.error(Errno::EIO);
            };
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match self.tree.read_at(id, offset, &mut buf[..want]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => {
                    tracing::error!(ino = ino.0, offset, error = %e, "fuse read failed");
                    reply.error(errno_of(&e))
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        match self.node_or_err(ino) {
            Ok((_, node)) if matches!(node.kind, NodeKind::Dir { .. }) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.list_dir(ino, offset, |next, name, id, child| {
            reply.add(
                ino_of(id),
                next,
                file_type(&child.kind),
                OsStr::from_bytes(name),
            )
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let listed = self.list_dir(ino, offset, |next, name, id, child| {
            reply.add(
                ino_of(id),
                next,
                OsStr::from_bytes(name),
                &TTL,
                &self.attr(id, child),
                GENERATION,
            )
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let stats = &self.stats;
        let bytes = stats.file_bytes.saturating_add(stats.symlink_bytes);
        let blocks = bytes.div_ceil(u64::from(BLOCK_SIZE));
        reply.statfs(
            blocks,
            0,
            0,
            stats.inodes,
            0,
            BLOCK_SIZE,
            NAME_MAX,
            BLOCK_SIZE,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let node = match self.node_or_err(ino) {
            Ok((_, node)) => node,
            Err(e) => return reply.error(e),
        };
        let xattrs = &node.meta.xattrs;
        match xattrs.binary_search_by(|(n, _)| n.as_ref().cmp(name.as_bytes())) {
            Ok(i) => reply_xattr_value(reply, size, &xattrs[i].1),
            Err(_) => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let node = match self.node_or_err(ino) {
            Ok((_, node)) => node,
            Err(e) => return reply.error(e),
        };
        let mut list = Vec::new();
        for (name, _) in &node.meta.xattrs {
            list.extend_from_slice(name);
            list.push(0);
        }
        reply_xattr_value(reply, size, &list);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if self.node(ino).is_none() {
            reply.error(Errno::ENOENT);
        } else if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    // Everything that would change the tree fails with EROFS.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}
