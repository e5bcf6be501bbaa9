//! fledge's own squashfs 4.0 writer: a read-only root filesystem image written straight from
//! the merged [`Tree`], with no root, no FUSE and no external tool, compressing on every core
//! and giving the same bytes for the same tree and options.
//!
//! # How an image is written
//! 1. Check everything that could make the tree unrepresentable (names, xattr namespaces,
//!    device numbers, symlinks, the number of distinct ids) before any heavy work.
//! 2. Plan the file data ([`data::plan`]): files in depth-first name order, each identical
//!    set of contents written once (mksquashfs' duplicate detection; candidates are the
//!    files whose size another file shares, compared by sha256), files smaller than a block
//!    packed into fragment blocks (tails of larger files too with `always_fragments`; a
//!    fragment block also ends before the tail of an anchor file, one in 128 by path hash,
//!    so that a changed file shifts the packing of the files after it only up to the next
//!    anchor).
//! 3. Stream the data ([`data::write`]): a reader thread, `threads` compressing workers, and
//!    the writer keeping plan order. Blocks of zeros are not stored (size word 0). With a
//!    block cache ([`cache`], `SquashOptions::block_cache`), each worker looks its block up
//!    by content and settings first and compresses only on a miss, so a warm rebuild
//!    compresses only the blocks whose bytes changed and writes the same image.
//! 4. Write the inode and directory tables in one pass ([`tables`]): each directory's
//!    children's inodes are written together, after the subdirectories' own contents, so
//!    every reference points at a metadata block already laid out. Inode numbers follow that
//!    order (the root is the last). Directory listings are sorted by name, split in runs at
//!    each metadata block, and indexed when they span several blocks, so a lookup in a
//!    directory of any size decompresses one block.
//! 5. Fragment, id and xattr tables; the superblock last, at offset 0; padding to 4 KiB.
//! 6. Hash the image (sha256).
//!
//! # Format choices and limits
//! - Times: squashfs holds one mtime per inode, in whole seconds, unsigned 32-bit. The
//!   nanoseconds are dropped; times before 1970 are written as 0 and times after 2106 as
//!   `u32::MAX`.
//! - Xattrs: squashfs stores only the `user.`, `trusted.` and `security.` namespaces
//!   (`security.capability` included); any other (such as `system.posix_acl_access`) is an
//!   error naming the path. Values are stored in line (identical sets of attributes share one
//!   table entry; values are not shared out of line).
//! - No export (NFS) table: the kernel needs it only to export the filesystem over NFS.
//! - Sockets: squashfs has inode types for them, but [`Tree`] holds none.
//! - The image is hashed after it is written, from the page cache, not while it is
//!   written as the native ext4 writer does: the superblock at offset 0 holds the
//!   positions of tables that follow all the compressed data, so the first bytes of the
//!   image are known only at the end, and sha256 must see them first. Hashing in the same
//!   pass would mean holding the whole compressed image back. The re-read is a small cost
//!   next to the compression (sha256 runs at well over 1 GB/s with SHA-NI).
//!
//! # Why not the `backhand` crate
//! backhand (0.25, read in its source) writes squashfs from a path-keyed tree of its own
//! that we would have to fill by copying ours, and its writer lacks what a root filesystem
//! needs: no hard links (one inode per path), no xattrs in its node headers (so no
//! `security.capability`), no sparse blocks, duplicate detection keyed on the hash of a
//! file's first block only, and compression on the calling thread alone. Device nodes,
//! fifos, sockets and the uid/gid table it does have. The format is small and well
//! specified, so fledge writes it itself, like its ext4.

pub mod cache;
mod compress;
mod data;
mod tables;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use compress::Codec;
pub use compress::{valid_dict_size, Compression};
use tables::{Body, Common, Entry, Listing, MetaWriter, NONE32, NONE64};

use crate::tree::{NodeId, NodeKind, Tree, ROOT};

/// Settings of a squashfs image.
#[derive(Clone, Debug)]
pub struct SquashOptions {
    pub compression: Compression,
    /// The compressor's level (xz preset 0..=9, zstd 1..=22, gzip 1..=9; none for lz4);
    /// `None` for mksquashfs' defaults (6, 15, 9).
    pub compression_level: Option<u32>,
    /// xz only: the LZMA2 dictionary size in bytes, as mksquashfs' `-Xdict-size` (a power
    /// of two or 1.5 times one, at least 8 KiB, at most the block size); `None` for the block
    /// size. See [`SquashOptions::xz_dict_percent`].
    pub xz_dict_size: Option<u32>,
    /// Data block size: a power of two from 4 KiB to 1 MiB.
    pub block_size: u32,
    /// Compressing threads; 0 for one per core.
    pub threads: usize,
    /// Store identical file contents once.
    pub dedup: bool,
    /// Pack the tails of files larger than a block into fragments too (mksquashfs'
    /// `-always-use-fragments`); files smaller than a block always are.
    pub always_fragments: bool,
    /// The superblock's modification time (seconds since 1970).
    pub mkfs_time: u32,
    /// The cache directory whose block cache ([`cache`]) to read compressed blocks from and
    /// add them to; `None` compresses every block and keeps nothing.
    pub block_cache: Option<PathBuf>,
    /// Hash the finished image (off when it is converted, to qcow2, and hashed then).
    pub hash: bool,
}

impl Default for SquashOptions {
    fn default() -> Self {
        SquashOptions {
            compression: Compression::Xz,
            compression_level: None,
            xz_dict_size: None,
            block_size: 128 * 1024,
            threads: 0,
            dedup: true,
            always_fragments: false,
            mkfs_time: 0,
            block_cache: None,
            hash: true,
        }
    }
}

impl SquashOptions {
    /// Set the xz dictionary as a percentage of the block size (`-Xdict-size 50%`).
    pub fn xz_dict_percent(&mut self, percent: u32) {
        self.xz_dict_size = Some((u64::from(self.block_size) * u64::from(percent) / 100) as u32);
    }

    fn codec(&self) -> Result<Codec, SquashError> {
        let bad = |what: String| Err(SquashError::Option(what));
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(4096..=1 << 20).contains(&bs) {
            return bad(format!(
                "block size {bs} is not a power of two from 4096 to 1048576"
            ));
        }
        let kind = self.compression;
        let level = match (kind.levels(), self.compression_level) {
            (None, None) => 0,
            (None, Some(_)) => return bad(format!("{} has no compression levels", kind.name())),
            (Some((default, _)), None) => default,
            (Some((_, range)), Some(l)) if range.contains(&l) => l,
            (Some((_, range)), Some(l)) => {
                return bad(format!(
                    "{} level {l} is outside {}..={}",
                    kind.name(),
                    range.start(),
                    range.end()
                ))
            }
        };
        let dict_size = match (kind, self.xz_dict_size) {
            (Compression::Xz, None) => bs,
            (Compression::Xz, Some(d)) if valid_dict_size(d) && d <= bs => d,
            (Compression::Xz, Some(d)) => {
                return bad(format!(
                    "xz dictionary size {d} is not 2^n or 2^n + 2^(n-1) from 8192 to the block size {bs}"
                ))
            }
            (_, Some(_)) => {
                return bad(format!(
                    "a dictionary size is an xz setting, not a {} one",
                    kind.name()
                ))
            }
            (_, None) => 0,
        };
        Ok(Codec {
            kind,
            level,
            dict_size,
            block_size: bs,
        })
    }
}

/// What [`write`] produced.
#[derive(Clone, Debug)]
pub struct SquashReport {
    /// Length of the image file (a multiple of 4 KiB).
    pub bytes: u64,
    /// Bytes of the filesystem proper (the superblock's `bytes_used`), before the padding.
    pub bytes_used: u64,
    /// sha256 of the image file, lower-case hex; `None` when [`SquashOptions::hash`] is off.
    pub sha256: Option<String>,
    pub inodes: u32,
    pub fragments: u32,
    /// Data blocks referenced by inodes written (duplicates not counted).
    pub data_blocks: u64,
    /// Of those, blocks of zeros, not stored.
    pub sparse_blocks: u64,
    /// Of those, blocks stored uncompressed (compression did not shrink them).
    pub raw_blocks: u64,
    /// Files whose contents were already in the image.
    pub duplicates: u64,
    /// Data and fragment blocks taken from the block cache (not compressed).
    pub reused_blocks: u64,
    /// Data and fragment blocks compressed (not sparse, not found in the block cache).
    pub compressed_blocks: u64,
    pub ids: u16,
}

/// Errors of the squashfs writer.
#[derive(Debug, thiserror::Error)]
pub enum SquashError {
    #[error("invalid squashfs settings: {0}")]
    Option(String),
    #[error("{path}: a name of {len} bytes; squashfs names hold 1 to 256")]
    Name { path: String, len: usize },
    #[error("{path}: extended attribute {name:?} is not in the user., trusted. or security. namespace, the only ones squashfs stores")]
    Xattr { path: String, name: String },
    #[error("{path}: extended attributes of {len} bytes; squashfs holds at most 65535 for a name and 4 GiB for a set")]
    XattrSize { path: String, len: usize },
    #[error("{path}: device {major}:{minor} does not fit squashfs' 12-bit major and 20-bit minor numbers")]
    Device {
        path: String,
        major: u32,
        minor: u32,
    },
    #[error("{path}: a symlink target of {len} bytes; it must hold 1 to 4095")]
    Symlink { path: String, len: usize },
    #[error("{count} distinct user and group ids; squashfs holds at most 65535")]
    TooManyIds { count: usize },
    #[error("cannot read {path} from the layer data: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("compression failed: {source}")]
    Compress {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot hash {}: {source}", path.display())]
    Hash {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the squashfs image's {what} exceeds the format's limits")]
    TooLarge { what: &'static str },
    #[error("interrupted")]
    Interrupted,
    #[error("squashfs writer: {0}")]
    Internal(String),
}

fn check_interrupt() -> Result<(), SquashError> {
    if crate::interrupt::requested() {
        Err(SquashError::Interrupted)
    } else {
        Ok(())
    }
}

/// Buffered positional writes to the image file.
pub struct Out<'a> {
    file: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    /// Image offset of `buf[0]`.
    at: u64,
}

const CHUNK: usize = 1 << 20;

impl Out<'_> {
    /// Image offset of the next byte.
    pub fn pos(&self) -> u64 {
        self.at + self.buf.len() as u64
    }

    pub fn bytes(&mut self, b: &[u8]) -> Result<(), SquashError> {
        if self.buf.len() + b.len() > CHUNK {
            self.flush()?;
        }
        if b.len() >= CHUNK {
            self.write_at(b, self.at)?;
            self.at += b.len() as u64;
        } else {
            self.buf.extend_from_slice(b);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SquashError> {
        let buf = std::mem::take(&mut self.buf);
        self.write_at(&buf, self.at)?;
        self.at += buf.len() as u64;
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }

    fn write_at(&self, b: &[u8], at: u64) -> Result<(), SquashError> {
        self.file
            .write_all_at(b, at)
            .map_err(|source| SquashError::Write {
                path: self.path.to_path_buf(),
                source,
            })
    }
}

/// The inodes of the tree and the order they are written in.
struct Numbering {
    /// Inode number of each node (0: unreachable).
    ino: Vec<u32>,
    /// Directories in the order their listings are written: each after its subdirectories.
    dirs: Vec<NodeId>,
    /// Directory entries naming each node (for directories, 2 + subdirectories).
    links: Vec<u32>,
    /// Regular files in depth-first name order, each once.
    files: Vec<NodeId>,
    count: u32,
}

fn entries(tree: &Tree, dir: NodeId) -> &[(Box<[u8]>, NodeId)] {
    match &tree.node(dir).kind {
        NodeKind::Dir { entries } => entries,
        _ => &[],
    }
}

fn number(tree: &Tree) -> Numbering {
    let n = tree.nodes.len();
    let mut links = vec![0u32; n];
    let mut seen = vec![false; n];
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    // Post-order over directories; regular files collected in pre-order (depth first, by
    // name), the order their data is written in.
    let mut stack: Vec<(NodeId, usize)> = vec![(ROOT, 0)];
    seen[ROOT as usize] = true;
    links[ROOT as usize] = 2;
    while let Some(top) = stack.last_mut() {
        let (dir, i) = *top;
        let list = entries(tree, dir);
        if i == list.len() {
            dirs.push(dir);
            stack.pop();
            continue;
        }
        top.1 += 1;
        let child = list[i].1;
        let c = child as usize;
        match tree.node(child).kind {
            NodeKind::Dir { .. } => {
                links[dir as usize] += 1;
                if !seen[c] {
                    seen[c] = true;
                    links[c] += 2;
                    stack.push((child, 0));
                }
            }
            ref k => {
                links[c] += 1;
                if !seen[c] {
                    seen[c] = true;
                    if matches!(k, NodeKind::File { .. }) {
                        files.push(child);
                    }
                }
            }
        }
    }
    let mut ino = vec![0u32; n];
    let mut next = 1u32;
    for &d in &dirs {
        for (_, c) in entries(tree, d) {
            if ino[*c as usize] == 0 && *c != ROOT {
                ino[*c as usize] = next;
                next += 1;
            }
        }
    }
    ino[ROOT as usize] = next;
    Numbering {
        ino,
        dirs,
        links,
        files,
        count: next,
    }
}

/// Everything that could make the tree unrepresentable, checked before any data is read.
/// Returns the sorted id table.
fn check(tree: &Tree, num: &Numbering) -> Result<Vec<u32>, SquashError> {
    let mut ids = BTreeSet::new();
    for (i, node) in tree.nodes.iter().enumerate() {
        if num.ino[i] == 0 {
            continue;
        }
        let id = i as NodeId;
        ids.insert(node.meta.uid);
        ids.insert(node.meta.gid);
        let mut xlen = 0usize;
        for (name, value) in &node.meta.xattrs {
            if tables::xattr_prefix(name).is_none() {
                return Err(SquashError::Xattr {
                    path: tree.path_of(id),
                    name: String::from_utf8_lossy(name).into_owned(),
                });
            }
            xlen += 8 + name.len() + value.len();
            if name.len() > usize::from(u16::MAX) || xlen > u32::MAX as usize {
                return Err(SquashError::XattrSize {
                    path: tree.path_of(id),
                    len: xlen,
                });
            }
        }
        match &node.kind {
            NodeKind::Dir { entries } => {
                for (name, _) in entries {
                    if name.is_empty() || name.len() > 256 {
                        let dir = if id == ROOT {
                            String::new()
                        } else {
                            tree.path_of(id)
                        };
                        return Err(SquashError::Name {
                            path: format!("{dir}/{}", String::from_utf8_lossy(name)),
                            len: name.len(),
                        });
                    }
                }
            }
            NodeKind::Symlink { target } if target.is_empty() || target.len() > 4095 => {
                return Err(SquashError::Symlink {
                    path: tree.path_of(id),
                    len: target.len(),
                })
            }
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor }
                if tables::encode_dev(*major, *minor).is_none() =>
            {
                return Err(SquashError::Device {
                    path: tree.path_of(id),
                    major: *major,
                    minor: *minor,
                })
            }
            _ => {}
        }
    }
    if ids.len() > usize::from(u16::MAX) {
        return Err(SquashError::TooManyIds { count: ids.len() });
    }
    Ok(ids.into_iter().collect())
}

/// Write `tree` as a squashfs image to `out` (created, or overwritten), and hash it.
pub fn write(tree: &Tree, opts: &SquashOptions, out: &Path) -> Result<SquashReport, SquashError> {
    write_with_progress(tree, opts, out, &|_| {})
}

/// [`write`], calling `progress` with the file bytes compressed and placed so far while the
/// data is written (the longest part of a squashfs build).
pub fn write_with_progress(
    tree: &Tree,
    opts: &SquashOptions,
    out: &Path,
    progress: &dyn Fn(u64),
) -> Result<SquashReport, SquashError> {
    let mut sw = crate::timing::Stopwatch::start();
    let codec = opts.codec()?;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let cache = opts
        .block_cache
        .as_deref()
        .map(|d| cache::BlockCache::new(d, &codec));
    let num = number(tree);
    let ids = check(tree, &num)?;
    let sizes: Vec<(NodeId, u64)> = num
        .files
        .iter()
        .map(|&f| (f, tree.node(f).size()))
        .collect();
    let plan = data::plan(
        tree,
        &sizes,
        codec.block_size,
        opts.dedup,
        opts.always_fragments,
        threads,
    )?;
    sw.mark("squashfs: tree checked, data planned");
    check_interrupt()?;

    let werr = |source| SquashError::Write {
        path: out.to_path_buf(),
        source,
    };
    // Never truncated to zero and rewritten (ext4's auto_da_alloc would flush it on close):
    // written over, then cut to length.
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(out)
        .map_err(werr)?;
    let comp_opts = codec.options();
    let mut head = Vec::new();
    if let Some(o) = &comp_opts {
        // Compressor options: one uncompressed metadata block right after the superblock.
        tables::put16(&mut head, o.len() as u16 | 0x8000);
        head.extend_from_slice(o);
    }
    let data_start = (tables::SUPER_SIZE + head.len()) as u64;
    let mut w = Out {
        file: &file,
        path: out,
        buf: Vec::with_capacity(CHUNK),
        at: data_start,
    };
    let data::Written {
        placed,
        frags,
        stats,
    } = data::write(
        tree,
        &plan,
        &codec,
        cache.as_ref(),
        threads,
        &mut w,
        progress,
    )?;
    tracing::debug!(
        target: "fledge::timing",
        "squashfs: {} blocks reused, {} compressed; worker time {:.1} ms compressing, \
         {:.1} ms hashing and in the block cache",
        stats.reused,
        stats.compressed,
        stats.compress_time.as_secs_f64() * 1e3,
        stats.cache_time.as_secs_f64() * 1e3
    );
    sw.mark("squashfs: data compressed and written");
    check_interrupt()?;

    // Inode and directory tables.
    let mut c = codec.start();
    let cerr = |source| SquashError::Compress { source };
    let plan_of: HashMap<NodeId, usize> = plan
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.node, i))
        .collect();
    let id_of = |id: u32| ids.binary_search(&id).unwrap_or(0) as u16;
    let mut inodes = MetaWriter::default();
    let mut dirt = MetaWriter::default();
    let mut xattrs = tables::XattrTable::default();
    let mut refs: Vec<Option<(u32, u16)>> = vec![None; tree.nodes.len()];
    let mut kinds = vec![0u16; tree.nodes.len()];
    let mut listings: HashMap<NodeId, Listing> = HashMap::new();
    let mut buf = Vec::with_capacity(256);
    let mut list: Vec<Entry> = Vec::new();
    let mut put_inode = |id: NodeId,
                         inodes: &mut MetaWriter,
                         listings: &mut HashMap<NodeId, Listing>,
                         c: &mut compress::Compressor|
     -> Result<(u32, u16, u16), SquashError> {
        let node = tree.node(id);
        let m = &node.meta;
        let common = Common {
            perm: (m.mode & 0o7777) as u16,
            uid: id_of(m.uid),
            gid: id_of(m.gid),
            mtime: m.mtime.sec.clamp(0, i64::from(u32::MAX)) as u32,
            ino: num.ino[id as usize],
        };
        let xattr = if m.xattrs.is_empty() {
            NONE32
        } else {
            xattrs.add(c, &m.xattrs).map_err(cerr)?
        };
        let nlink = num.links[id as usize];
        let empty = Listing::default();
        let placed_empty = data::Placed::default();
        let body = match &node.kind {
            NodeKind::Dir { .. } => Body::Dir {
                listing: listings.get(&id).unwrap_or(&empty),
                nlink,
                parent: if id == ROOT {
                    num.count + 1
                } else {
                    num.ino[node.parent as usize]
                },
                xattr,
            },
            NodeKind::File { size, .. } => {
                let (p, tail) = match plan_of.get(&id) {
                    Some(&i) => (&placed[i], plan.files[i].tail),
                    None => (&placed_empty, None),
                };
                let (frag, frag_offset) = tail.unwrap_or((NONE32, 0));
                Body::File {
                    blocks_start: if p.blocks.is_empty() {
                        0
                    } else {
                        p.blocks_start
                    },
                    size: *size,
                    // Never all of the file: the kernel counts st_blocks as size - sparse - 1.
                    sparse: p.sparse.min(size.saturating_sub(1)),
                    nlink,
                    frag,
                    frag_offset,
                    xattr,
                    blocks: &p.blocks,
                }
            }
            NodeKind::Symlink { target } => Body::Symlink {
                nlink,
                target,
                xattr,
            },
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                Body::Device {
                    block: matches!(node.kind, NodeKind::BlockDevice { .. }),
                    nlink,
                    rdev: tables::encode_dev(*major, *minor).unwrap_or(0),
                    xattr,
                }
            }
            NodeKind::Fifo => Body::Fifo { nlink, xattr },
        };
        buf.clear();
        tables::inode(&mut buf, &common, &body);
        let kind = match u16::from_le_bytes([buf[0], buf[1]]) {
            k if k > 7 => k - 7,
            k => k,
        };
        let (block, offset) = inodes.pos();
        let block = u32::try_from(block).map_err(|_| SquashError::TooLarge {
            what: "inode table",
        })?;
        inodes.push(c, &buf).map_err(cerr)?;
        listings.remove(&id);
        Ok((block, offset, kind))
    };
    for &d in &num.dirs {
        check_interrupt()?;
        for (_, child) in entries(tree, d) {
            let ch = *child as usize;
            if refs[ch].is_none() {
                let (b, o, k) = put_inode(*child, &mut inodes, &mut listings, &mut c)?;
                refs[ch] = Some((b, o));
                kinds[ch] = k;
            }
        }
        list.clear();
        for (name, child) in entries(tree, d) {
            let (block, offset) = refs[*child as usize].unwrap_or((0, 0));
            list.push(Entry {
                name,
                block,
                offset,
                ino: num.ino[*child as usize],
                kind: kinds[*child as usize],
            });
        }
        let l = tables::listing(&mut dirt, &mut c, &list).map_err(cerr)?;
        if u32::try_from(dirt.pos().0).is_err() {
            return Err(SquashError::TooLarge {
                what: "directory table",
            });
        }
        listings.insert(d, l);
    }
    let (rb, ro, _) = put_inode(ROOT, &mut inodes, &mut listings, &mut c)?;
    let root_ref = (u64::from(rb) << 16) | u64::from(ro);

    // The tables, in the order the kernel checks them.
    let (inode_bytes, _) = inodes.finish(&mut c).map_err(cerr)?;
    let (dir_bytes, _) = dirt.finish(&mut c).map_err(cerr)?;
    let inode_table = w.pos();
    w.bytes(&inode_bytes)?;
    let dir_table = w.pos();
    w.bytes(&dir_bytes)?;
    let frag_table = if frags.is_empty() {
        NONE64
    } else {
        let mut e = Vec::with_capacity(frags.len() * 16);
        for (at, word) in &frags {
            tables::put64(&mut e, *at);
            tables::put32(&mut e, *word);
            tables::put32(&mut e, 0);
        }
        let (bytes, list) = tables::lookup_table(&mut c, w.pos(), &e).map_err(cerr)?;
        w.bytes(&bytes)?;
        list
    };
    let id_table = {
        let mut e = Vec::with_capacity(ids.len() * 4);
        for id in &ids {
            tables::put32(&mut e, *id);
        }
        let (bytes, list) = tables::lookup_table(&mut c, w.pos(), &e).map_err(cerr)?;
        w.bytes(&bytes)?;
        list
    };
    let has_xattrs = !xattrs.is_empty();
    let xattr_table = if has_xattrs {
        let (bytes, head) = xattrs.finish(&mut c, w.pos()).map_err(cerr)?;
        w.bytes(&bytes)?;
        head
    } else {
        NONE64
    };
    let bytes_used = w.pos();
    let padded = bytes_used.div_ceil(4096) * 4096;
    w.bytes(&vec![0u8; (padded - bytes_used) as usize])?;
    w.flush()?;

    let mut flags = 0;
    if opts.dedup {
        flags |= tables::F_DUPLICATES;
    }
    if opts.always_fragments {
        flags |= tables::F_ALWAYS_FRAGMENTS;
    }
    if !has_xattrs {
        flags |= tables::F_NO_XATTRS;
    }
    if comp_opts.is_some() {
        flags |= tables::F_COMP_OPTS;
    }
    let sb = tables::superblock(&tables::Super {
        inodes: num.count,
        mkfs_time: opts.mkfs_time,
        block_size: codec.block_size,
        fragments: frags.len() as u32,
        compression: codec.kind.id(),
        flags,
        ids: ids.len() as u16,
        root: root_ref,
        bytes_used,
        id_table,
        xattr_table,
        inode_table,
        dir_table,
        frag_table,
        export_table: NONE64,
    });
    head.splice(0..0, sb);
    w.write_at(&head, 0)?;
    file.set_len(padded).map_err(werr)?;
    drop(file);
    sw.mark("squashfs: tables written");
    check_interrupt()?;
    let sha256 = if opts.hash {
        let sum = crate::digest::sha256_file(out, &crate::interrupt::requested).map_err(|e| {
            if crate::interrupt::requested() {
                SquashError::Interrupted
            } else {
                SquashError::Hash {
                    path: out.to_path_buf(),
                    source: e,
                }
            }
        })?;
        sw.mark("squashfs: image hashed");
        Some(sum)
    } else {
        None
    };
    Ok(SquashReport {
        bytes: padded,
        bytes_used,
        sha256,
        inodes: num.count,
        fragments: frags.len() as u32,
        data_blocks: stats.blocks,
        sparse_blocks: stats.sparse_blocks,
        raw_blocks: stats.raw_blocks,
        duplicates: plan.files.iter().filter(|f| f.dup_of.is_some()).count() as u64,
        reused_blocks: stats.reused,
        compressed_blocks: stats.compressed,
        ids: ids.len() as u16,
    })
}
