//! Tree oracle comparer: snapshot every observable property of a directory tree
//! (without following symlinks) and report the differences between two snapshots
//! as readable lines.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// File type of a snapshot entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Dir => "directory",
            Kind::File => "regular file",
            Kind::Symlink => "symlink",
            Kind::CharDev => "char device",
            Kind::BlockDev => "block device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }
}

/// Hard-link membership of a regular file with more than one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkGroup {
    /// Smallest (bytewise) path of the group within the snapshot.
    pub canonical: Vec<u8>,
    /// st_nlink as reported by the file system.
    pub nlink: u64,
}

/// Every compared property of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Size for regular files and symlinks only.
    pub size: Option<u64>,
    /// Lower-case hex sha256 of the content of a regular file.
    pub sha256: Option<String>,
    /// Symlink target bytes.
    pub target: Option<Vec<u8>>,
    /// (major, minor) of char and block devices.
    pub rdev: Option<(u64, u64)>,
    /// All extended attributes, name -> binary value.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    /// Set for regular files whose st_nlink > 1.
    pub link: Option<LinkGroup>,
}

/// A whole tree: absolute-style paths ("/" is the root) as raw bytes -> entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub entries: BTreeMap<Vec<u8>, Entry>,
}

impl Snapshot {
    /// Entry for a path given as "/a/b" (string convenience for tests).
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path.as_bytes())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Options for [`diff`].
#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// Paths ("/etc/x") ignored together with their whole subtree.
    pub ignore_paths: Vec<Vec<u8>>,
    /// Do not compare mtimes of directories (including the root).
    pub ignore_dir_mtime: bool,
    /// Do not compare the mtime of the root directory.
    pub ignore_root_mtime: bool,
}

impl DiffOptions {
    /// Builder helper: ignore `path` and everything below it.
    pub fn ignore(mut self, path: &str) -> Self {
        self.ignore_paths.push(path.as_bytes().to_vec());
        self
    }

    fn ignored(&self, path: &[u8]) -> bool {
        self.ignore_paths.iter().any(|p| {
            let p = trim_trailing_slash(p);
            if p.is_empty() {
                // "/" ignores everything
                return true;
            }
            path == p || (path.starts_with(p) && path.get(p.len()) == Some(&b'/'))
        })
    }
}

fn trim_trailing_slash(p: &[u8]) -> &[u8] {
    let mut p = p;
    while let Some((b'/', rest)) = p.split_last() {
        p = rest;
    }
    p
}

/// Snapshot the tree below `root` (which itself becomes "/"). Symlinks are never
/// followed; names are kept as raw bytes.
pub fn snapshot(root: &Path) -> io::Result<Snapshot> {
    let mut snap = Snapshot::default();
    let mut inodes: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    let meta = fs::symlink_metadata(root)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("snapshot root {} is not a directory", root.display()),
        ));
    }
    visit(root, b"/".to_vec(), meta, &mut snap, &mut inodes)?;
    for paths in inodes.into_values() {
        let canonical = paths.iter().min().cloned().unwrap_or_default();
        for p in paths {
            if let Some(e) = snap.entries.get_mut(&p) {
                if let Some(link) = e.link.as_mut() {
                    link.canonical = canonical.clone();
                }
            }
        }
    }
    Ok(snap)
}

fn with_context(err: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

fn visit(
    fs_path: &Path,
    rel: Vec<u8>,
    meta: fs::Metadata,
    snap: &mut Snapshot,
    inodes: &mut HashMap<(u64, u64), Vec<Vec<u8>>>,
) -> io::Result<()> {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_char_device() {
        Kind::CharDev
    } else if ft.is_block_device() {
        Kind::BlockDev
    } else if ft.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    };
    let mut entry = Entry {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: None,
        sha256: None,
        target: None,
        rdev: None,
        xattrs: read_xattrs(fs_path)?,
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
        link: None,
    };
    match kind {
        Kind::File => {
            entry.size = Some(meta.size());
            entry.sha256 = Some(hash_file(fs_path)?);
            if meta.nlink() > 1 {
                inodes
                    .entry((meta.dev(), meta.ino()))
                    .or_default()
                    .push(rel.clone());
                entry.link = Some(LinkGroup {
                    canonical: Vec::new(),
                    nlink: meta.nlink(),
                });
            }
        }
        Kind::Symlink => {
            entry.size = Some(meta.size());
            let target =
                fs::read_link(fs_path).map_err(|e| with_context(e, "readlink", fs_path))?;
            entry.target = Some(target.as_os_str().as_bytes().to_vec());
        }
        Kind::CharDev | Kind::BlockDev => {
            let rdev = meta.rdev();
            entry.rdev = Some((nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)));
        }
        Kind::Dir | Kind::Fifo | Kind::Socket => {}
    }
    snap.entries.insert(rel.clone(), entry);

    if kind == Kind::Dir {
        let mut children = Vec::new();
        for de in fs::read_dir(fs_path).map_err(|e| with_context(e, "readdir", fs_path))? {
            let de = de.map_err(|e| with_context(e, "readdir", fs_path))?;
            children.push(de.file_name());
        }
        children.sort();
        for name in children {
            let child_fs = fs_path.join(&name);
            let child_meta =
                fs::symlink_metadata(&child_fs).map_err(|e| with_context(e, "lstat", &child_fs))?;
            let mut child_rel = rel.clone();
            if child_rel != b"/" {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(name.as_bytes());
            visit(&child_fs, child_rel, child_meta, snap, inodes)?;
        }
    }
    Ok(())
}

fn is_unsupported(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::Unsupported
        || matches!(
            err.raw_os_error(),
            Some(libc::ENOTSUP) | Some(libc::ENOSYS) | Some(libc::ENODATA)
        )
}

fn read_xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if is_unsupported(&e) => return Ok(out),
        Err(e) => return Err(with_context(e, "listxattr", path)),
    };
    for name in names {
        match xattr::get(path, &name) {
            Ok(value) => {
                out.insert(name.as_bytes().to_vec(), value.unwrap_or_default());
            }
            // vanished between list and get, or not readable on this fs
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(with_context(e, "getxattr", path)),
        }
    }
    Ok(out)
}

fn hash_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path).map_err(|e| with_context(e, "open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| with_context(e, "read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Render raw bytes readably: valid UTF-8 is kept, control characters, backslashes
/// and invalid bytes are escaped (`\n`, `\t`, `\\`, `\xNN`).
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

fn hex_or_none(v: Option<&Vec<u8>>) -> String {
    match v {
        Some(v) => format!("0x{}", hex::encode(v)),
        None => "none".to_string(),
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "none".to_string(),
    }
}

fn link_str(l: &Option<LinkGroup>) -> String {
    match l {
        Some(l) => format!("linked to {} (nlink {})", escape(&l.canonical), l.nlink),
        None => "not hard-linked".to_string(),
    }
}

/// Every difference between `expected` and `actual`, one readable line each,
/// formatted "PATH: PROPERTY EXPECTED != ACTUAL", "missing: PATH" or "extra: PATH".
pub fn diff(expected: &Snapshot, actual: &Snapshot, opts: &DiffOptions) -> Vec<String> {
    let mut out = Vec::new();
    let mut all: Vec<&Vec<u8>> = expected
        .entries
        .keys()
        .chain(actual.entries.keys())
        .collect();
    all.sort();
    all.dedup();
    for path in all {
        if opts.ignored(path) {
            continue;
        }
        let p = escape(path);
        let (e, a) = match (expected.entries.get(path), actual.entries.get(path)) {
            (Some(e), Some(a)) => (e, a),
            (Some(_), None) => {
                out.push(format!("missing: {p}"));
                continue;
            }
            (None, Some(_)) => {
                out.push(format!("extra: {p}"));
                continue;
            }
            (None, None) => continue,
        };
        if e.kind != a.kind {
            out.push(format!("{p}: type {} != {}", e.kind.name(), a.kind.name()));
            continue;
        }
        if e.mode != a.mode {
            out.push(format!("{p}: mode {:04o} != {:04o}", e.mode, a.mode));
        }
        if e.uid != a.uid {
            out.push(format!("{p}: uid {} != {}", e.uid, a.uid));
        }
        if e.gid != a.gid {
            out.push(format!("{p}: gid {} != {}", e.gid, a.gid));
        }
        if e.size != a.size {
            out.push(format!("{p}: size {} != {}", opt(&e.size), opt(&a.size)));
        }
        if e.sha256 != a.sha256 {
            out.push(format!(
                "{p}: sha256 {} != {}",
                opt(&e.sha256),
                opt(&a.sha256)
            ));
        }
        if e.target != a.target {
            let t = |t: &Option<Vec<u8>>| t.as_deref().map_or("none".to_string(), escape);
            out.push(format!(
                "{p}: symlink target {} != {}",
                t(&e.target),
                t(&a.target)
            ));
        }
        if e.rdev != a.rdev {
            let d =
                |d: &Option<(u64, u64)>| d.map_or("none".to_string(), |(a, b)| format!("{a},{b}"));
            out.push(format!("{p}: device {} != {}", d(&e.rdev), d(&a.rdev)));
        }
        if e.xattrs != a.xattrs {
            let mut names: Vec<&Vec<u8>> = e.xattrs.keys().chain(a.xattrs.keys()).collect();
            names.sort();
            names.dedup();
            for name in names {
                let (ev, av) = (e.xattrs.get(name), a.xattrs.get(name));
                if ev != av {
                    out.push(format!(
                        "{p}: xattr {} {} != {}",
                        escape(name),
                        hex_or_none(ev),
                        hex_or_none(av)
                    ));
                }
            }
        }
        let is_root = path.as_slice() == b"/";
        let skip_mtime =
            (opts.ignore_dir_mtime && e.kind == Kind::Dir) || (opts.ignore_root_mtime && is_root);
        if !skip_mtime && (e.mtime_sec, e.mtime_nsec) != (a.mtime_sec, a.mtime_nsec) {
            out.push(format!(
                "{p}: mtime {}.{:09} != {}.{:09}",
                e.mtime_sec, e.mtime_nsec, a.mtime_sec, a.mtime_nsec
            ));
        }
        if e.link != a.link {
            out.push(format!(
                "{p}: hard link {} != {}",
                link_str(&e.link),
                link_str(&a.link)
            ));
        }
    }
    out
}

/// Join diff lines for an assertion message, showing at most `cap` of them.
pub fn report(lines: &[String], cap: usize) -> String {
    let mut s = String::new();
    for l in lines.iter().take(cap) {
        s.push_str(l);
        s.push('\n');
    }
    if lines.len() > cap {
        let _ = writeln!(s, "... and {} more differences", lines.len() - cap);
    }
    s
}
