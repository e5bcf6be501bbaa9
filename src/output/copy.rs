//! Copy a merged [`Tree`] into a directory (the kernel backend's mounted filesystem), exactly:
//! types, contents, ownership, modes with setuid/setgid/sticky, xattrs, device numbers,
//! symlink targets, hard-link groups and nanosecond mtimes.
//!
//! Regular files are copied with `copy_file_range(2)` straight from the uncompressed layer
//! file, so the bytes never pass through user space (nor through FUSE). Metadata is applied in
//! the order that keeps it intact: owner first (chown clears setuid bits and file
//! capabilities), then xattrs, then mode, then times (directories last, deepest first, after
//! their children stopped changing them).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use crate::tree::{Content, Meta, NodeId, NodeKind, Tree, ROOT};

use super::BuildError;

/// Counts of what was copied.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyStats {
    pub entries: u64,
    pub bytes: u64,
    pub hardlinks: u64,
}

/// Copy `tree` into the existing, empty directory `dest` (its root takes the tree root's
/// metadata). `interrupted` is polled between entries.
pub fn copy_tree(
    tree: &Tree,
    dest: &Path,
    interrupted: &dyn Fn() -> bool,
    progress: &dyn Fn(u64),
) -> Result<CopyStats, BuildError> {
    let mut c = Copier {
        tree,
        stats: CopyStats::default(),
        linked: HashMap::new(),
        dirs: Vec::new(),
        interrupted,
        progress,
        same_fs_copy: std::cell::Cell::new(true),
        creds: Creds::current(),
    };
    c.dirs.push((dest.to_path_buf(), ROOT));
    let root = open_dir(AT_FDCWD, dest.as_os_str(), dest)?;
    c.copy_dir(ROOT, dest, root.as_fd())?;
    // Directory metadata last, deepest first, so creating children does not disturb it.
    let dirs = std::mem::take(&mut c.dirs);
    for (path, id) in dirs.iter().rev() {
        let meta = &tree.node(*id).meta;
        apply_path_meta(path, meta, true)?;
    }
    Ok(c.stats)
}

struct Copier<'a> {
    tree: &'a Tree,
    stats: CopyStats,
    /// First path created for every node with nlink > 1 (hard-link groups).
    linked: HashMap<NodeId, PathBuf>,
    /// Directories created, in creation (pre-)order.
    dirs: Vec<(PathBuf, NodeId)>,
    interrupted: &'a dyn Fn() -> bool,
    progress: &'a dyn Fn(u64),
    /// Whether copy_file_range may work (false once it said EXDEV: the layer cache and the
    /// image are on different filesystems, and asking again for every file is wasted).
    same_fs_copy: std::cell::Cell<bool>,
    creds: Creds,
}

/// What a file created by this process gets without being asked: owner, group, and the
/// permission bits the umask removes.
#[derive(Clone, Copy, Debug)]
struct Creds {
    uid: u32,
    gid: u32,
    umask: u32,
}

impl Creds {
    fn current() -> Creds {
        // New files take the filesystem ids (equal to the effective ones unless changed with
        // setfsuid, which fledge never does). The directories they go into are created by
        // this copy without a setgid bit (modes come last), so no group is inherited.
        Creds {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            umask: std::fs::read_to_string("/proc/self/status")
                .ok()
                .as_deref()
                .and_then(parse_umask)
                // Unknown: assume every bit is removed, so the mode is always set.
                .unwrap_or(0o777),
        }
    }
}

/// The `Umask:` field of /proc/self/status.
fn parse_umask(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
}

impl Copier<'_> {
    /// Create the children of `dir` inside the directory `dir_fd` (at `dir_path`). Every
    /// call works relative to the directory's descriptor: a path would be walked from the
    /// root again for each of the three or four calls an entry needs.
    fn copy_dir(
        &mut self,
        dir: NodeId,
        dir_path: &Path,
        dir_fd: BorrowedFd<'_>,
    ) -> Result<(), BuildError> {
        let NodeKind::Dir { entries } = &self.tree.node(dir).kind else {
            return Ok(());
        };
        for (name, child) in entries {
            if (self.interrupted)() {
                return Err(BuildError::Interrupted);
            }
            let name = OsStr::from_bytes(name);
            let path = dir_path.join(name);
            self.copy_entry(*child, dir_fd, name, &path)?;
            self.stats.entries += 1;
            if self.stats.entries % 1024 == 0 {
                (self.progress)(self.stats.bytes);
            }
        }
        Ok(())
    }

    /// Create entry `name` (node `id`) in the directory `dir` (at the parent of `path`,
    /// which names it in errors).
    fn copy_entry(
        &mut self,
        id: NodeId,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
    ) -> Result<(), BuildError> {
        let node = self.tree.node(id);
        let nix_io = |e: nix::Error| BuildError::Copy {
            path: path.to_path_buf(),
            source: std::io::Error::from(e),
        };
        if !matches!(node.kind, NodeKind::Dir { .. }) && node.nlink > 1 {
            if let Some(first) = self.linked.get(&id) {
                nix::unistd::linkat(AT_FDCWD, first.as_path(), dir, name, AtFlags::empty())
                    .map_err(nix_io)?;
                self.stats.hardlinks += 1;
                return Ok(());
            }
            self.linked.insert(id, path.to_path_buf());
        }
        match &node.kind {
            NodeKind::Dir { .. } => {
                nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700))
                    .map_err(nix_io)?;
                self.dirs.push((path.to_path_buf(), id));
                let fd = open_dir(dir, name, path)?;
                self.copy_dir(id, path, fd.as_fd())?;
            }
            NodeKind::File { size, content } => {
                // A new file already has our owner, and its final mode when the umask keeps
                // every bit: then the chown and chmod are skipped (two inode updates fewer
                // per file, which counts with many small files).
                let m = &node.meta;
                let owner_ok = m.uid == self.creds.uid && m.gid == self.creds.gid;
                let mode_ok = owner_ok && m.mode & 0o7777 == m.mode & 0o777 & !self.creds.umask;
                let fd = nix::fcntl::openat(
                    dir,
                    name,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(if mode_ok { m.mode & 0o777 } else { 0o600 }),
                )
                .map_err(nix_io)?;
                let file = File::from(fd);
                self.copy_content(id, *size, content, &file, path)?;
                apply_fd_meta(&file, m, !owner_ok, !mode_ok).map_err(nix_io)?;
                self.stats.bytes += size;
            }
            NodeKind::Symlink { target } => {
                nix::unistd::symlinkat(OsStr::from_bytes(target), dir, name).map_err(nix_io)?;
                apply_meta_at(dir, name, path, &node.meta, false)?;
            }
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                let kind = if matches!(node.kind, NodeKind::CharDevice { .. }) {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                let dev = nix::sys::stat::makedev(u64::from(*major), u64::from(*minor));
                nix::sys::stat::mknodat(dir, name, kind, Mode::from_bits_truncate(0o600), dev)
                    .map_err(nix_io)?;
                apply_meta_at(dir, name, path, &node.meta, true)?;
            }
            NodeKind::Fifo => {
                nix::unistd::mkfifoat(dir, name, Mode::from_bits_truncate(0o600))
                    .map_err(nix_io)?;
                apply_meta_at(dir, name, path, &node.meta, true)?;
            }
        }
        Ok(())
    }

    fn copy_content(
        &self,
        id: NodeId,
        size: u64,
        content: &Content,
        out: &File,
        path: &Path,
    ) -> Result<(), BuildError> {
        let io = |e: std::io::Error| BuildError::Copy {
            path: path.to_path_buf(),
            source: e,
        };
        match content {
            Content::Layer { layer, offset } => {
                let src = &self.tree.layer_files[*layer as usize];
                copy_range(src, *offset, out, size, &self.same_fs_copy).map_err(io)
            }
            Content::HostFile(host) => {
                let src = File::open(host).map_err(|e| BuildError::HostFile {
                    path: host.clone(),
                    source: e,
                })?;
                // A host file that shrank since it was planned must not yield a short file.
                copy_range(&src, 0, out, size, &self.same_fs_copy).map_err(|e| {
                    BuildError::HostFile {
                        path: host.clone(),
                        source: e,
                    }
                })
            }
            Content::Bytes(_) => {
                let mut buf = vec![0u8; size as usize];
                let n = self.tree.read_at(id, 0, &mut buf).map_err(io)?;
                std::io::Write::write_all(&mut &*out, &buf[..n]).map_err(io)
            }
        }
    }
}

/// Copy `len` bytes from `src` at `offset` to the current position of `out`, in the kernel:
/// copy_file_range on one filesystem (which may share extents), else sendfile (which works
/// between filesystems), else through a buffer. `same_fs` remembers an EXDEV answer.
fn copy_range(
    src: &File,
    offset: u64,
    out: &File,
    len: u64,
    same_fs: &std::cell::Cell<bool>,
) -> std::io::Result<()> {
    let mut off_in = offset as i64;
    let mut left = len;
    while left > 0 && same_fs.get() {
        let chunk = left.min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(src.as_fd(), Some(&mut off_in), out.as_fd(), None, chunk)
        {
            Ok(0) => return Err(short_source()),
            Ok(n) => left -= n as u64,
            Err(nix::Error::EINTR) => {}
            Err(nix::Error::EXDEV | nix::Error::ENOSYS | nix::Error::EOPNOTSUPP) => {
                same_fs.set(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        match nix::sys::sendfile::sendfile64(out.as_fd(), src.as_fd(), Some(&mut off_in), chunk) {
            Ok(0) => return Err(short_source()),
            Ok(n) => left -= n as u64,
            Err(nix::Error::EINTR | nix::Error::EAGAIN) => {}
            Err(nix::Error::EINVAL | nix::Error::ENOSYS) => {
                return copy_buffered(src, off_in as u64, out, left);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn short_source() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "source data ends before the file does",
    )
}

fn copy_buffered(src: &File, mut offset: u64, out: &File, mut left: u64) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (1 << 20).min(left as usize)];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = src.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source data ends before the file does",
            ));
        }
        (&*out).write_all(&buf[..n])?;
        offset += n as u64;
        left -= n as u64;
    }
    Ok(())
}

fn timespec(meta: &Meta) -> TimeSpec {
    TimeSpec::new(meta.mtime.sec, i64::from(meta.mtime.nsec))
}

/// Owner (if `chown`), xattrs, mode (if `chmod`), times on an open regular file.
fn apply_fd_meta(file: &File, meta: &Meta, chown: bool, chmod: bool) -> nix::Result<()> {
    use xattr::FileExt;
    if chown {
        nix::unistd::fchown(
            file.as_fd(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )?;
    }
    for (name, value) in &meta.xattrs {
        file.set_xattr(OsStr::from_bytes(name), value)
            .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    }
    if chmod {
        nix::sys::stat::fchmod(file.as_fd(), Mode::from_bits_truncate(meta.mode & 0o7777))?;
    }
    let t = timespec(meta);
    nix::sys::stat::futimens(file.as_fd(), &t, &t)
}

/// Open the directory `name` in `dir` (no symlink followed) for the `*at` calls.
fn open_dir<P: ?Sized + nix::NixPath>(
    dir: BorrowedFd<'_>,
    name: &P,
    path: &Path,
) -> Result<OwnedFd, BuildError> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| BuildError::Copy {
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    })
}

/// Owner, xattrs, mode (unless a symlink), times of entry `name` in `dir` (at `path`),
/// without following symlinks.
fn apply_meta_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    path: &Path,
    meta: &Meta,
    set_mode: bool,
) -> Result<(), BuildError> {
    let err = |e: std::io::Error| BuildError::Copy {
        path: path.to_path_buf(),
        source: e,
    };
    let nerr = |e: nix::Error| err(std::io::Error::from(e));
    nix::unistd::fchownat(
        dir,
        name,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(nerr)?;
    // There is no xattr call relative to a directory before Linux 6.13: these (rare, on
    // symlinks and special files) go by path.
    for (name, value) in &meta.xattrs {
        xattr::set(path, OsStr::from_bytes(name), value).map_err(err)?;
    }
    if set_mode {
        // Only for special files and directories, never symlinks: nothing to follow.
        nix::sys::stat::fchmodat(
            dir,
            name,
            Mode::from_bits_truncate(meta.mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(nerr)?;
    }
    let t = timespec(meta);
    nix::sys::stat::utimensat(dir, name, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(nerr)
}

/// Owner, xattrs, mode (unless a symlink), times, by path without following symlinks.
fn apply_path_meta(path: &Path, meta: &Meta, set_mode: bool) -> Result<(), BuildError> {
    apply_meta_at(AT_FDCWD, path.as_os_str(), path, meta, set_mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn umask_from_proc_status() {
        let cases = [
            ("Name:\tfledge\nUmask:\t0022\nState:\tR\n", Some(0o022)),
            ("Umask:\t0077\n", Some(0o077)),
            ("Umask:\t0000\n", Some(0)),
            ("Name:\tfledge\n", None),
            ("Umask:\tzz\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_umask(text), want, "{text:?}");
        }
        // This kernel reports it (Linux >= 4.7): the "unknown" fallback is not in use.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(Creds::current().umask, parse_umask(&status).unwrap());
    }
}
