//! fledge's own EROFS writer: a read-only root filesystem image, uncompressed or LZ4/LZ4HC
//! compressed, written straight from the merged [`Tree`], with no root, no FUSE and no
//! external tool, and giving the same bytes for the same tree and options (for any thread
//! count). Uncompressed images are hashed while they are written; compressed ones hash
//! their compressed data from the page cache after it (see below).
//!
//! # How an image is written
//! 1. Plan everything from the tree's metadata ([`layout::plan`]): check what EROFS cannot
//!    hold (names, xattr namespaces, device numbers, symlinks) before any data is read;
//!    number the inodes depth first by name (the root first); choose each inode's form,
//!    build its xattr body, place it in the metadata area (so its nid is known), decide
//!    whether its tail is packed inline, and give its data blocks their addresses.
//! 2. Stream the image in offset order ([`write`]): block 0 (the checksummed superblock and
//!    the first inodes), the rest of the metadata area, the shared xattr area, then the
//!    data area. A second thread hashes each chunk (sha256 from the first byte) while the
//!    next one is made, as the native ext4 writer does; runs of zero blocks are left as
//!    holes in the image file.
//!
//! # Layout
//! - Block 0: the superblock at 1024 (128 bytes, crc32c checksum over the block from 1024,
//!   `EROFS_FEATURE_COMPAT_SB_CHKSUM`), then the metadata area begins (`meta_blkaddr` 0):
//!   the root inode is at byte 1152, nid 36.
//! - Metadata area: every inode, 32-byte aligned, followed by its inline xattr body and,
//!   for `FLAT_INLINE` inodes, its tail (the last partial block of a file, a directory, or
//!   a whole symlink target). The tail is inline whenever inode, xattrs and tail fit in one
//!   block, and that record never crosses a block boundary (the kernel requires it of the
//!   tail). Records are placed in depth-first name order, each into the block with the
//!   least room that still holds it, else a new one, so later small records fill the gaps
//!   that large tails leave (the image is then as small as mkfs.erofs' own).
//! - The shared xattr area (`xattr_blkaddr`), when some attribute is shared: each
//!   (name, value) pair carried by two or more inodes (identical `security.capability` or
//!   SELinux labels) once, referred to by a 4-byte id; an inode holds up to 255 such ids.
//! - Data area: the whole blocks of each inode, in inode order, contiguous per inode
//!   (`FLAT_PLAIN`/`FLAT_INLINE` `startblk`); a tail that is not inline is zero-padded to a
//!   block. Directories are blocks of sorted dirents (`.` and `..` included, names up to
//!   255 bytes), each block holding whole entries, so the kernel's binary search works on
//!   directories of any size.
//!
//! Measured (release build, files in the page cache, tests' `size_and_time_against_mkfs_erofs`):
//! on /usr/share (44k files, 544 MiB) and /usr/lib/x86_64-linux-gnu (2.4k files, 1 GB) the
//! image has exactly as many blocks as `mkfs.erofs` 1.5 makes of the same files, and is
//! written and hashed in 0.5 s and 0.9 s where `mkfs.erofs` takes 2.2 s and 3.0 s (without
//! hashing): about 1.1 GB/s, near what sha256 does on one core, the likely bound (as in
//! the native ext4 writer).
//!
//! # Format choices and limits
//! - Inodes: compact (32 bytes) unless the inode needs the extended form (64 bytes): uid or
//!   gid above 65535, more than 65535 links, a size above 4 GiB, or an mtime other than the
//!   build time. A compact inode has no time of its own on kernels before 6.15 and
//!   erofs-utils 1.5 (it takes the superblock's build time, whole seconds); newer ones add
//!   the compact inode's 32-bit `i_mtime` to the superblock's epoch, which fledge leaves 0,
//!   so both read the same. Extended inodes keep the full signed 64-bit seconds (before
//!   1970, after 2106) and nanoseconds.
//! - Sparse files: zeros are stored as data (the `FLAT` layouts have no holes); the image
//!   file itself is sparse there, and the hash covers them as zeros. Chunk-based files with
//!   null chunks would need to know the zero blocks before the layout is made (a read of
//!   all data first) and are left for later.
//! - Xattrs: the `user.`, `trusted.`, `security.` prefixes and
//!   `system.posix_acl_access`/`_default` by their name indexes; any other namespace is an
//!   error naming the path (the kernel would neither list nor find it). Values up to 64 KiB.
//! - Sockets: EROFS has them (`EROFS_FT_SOCK`), but [`Tree`] holds none.
//! - Block addresses are 32-bit (16 TiB images); the 48-bit layout is not used.
//! - Compression ([`compress`]): `lz4` (liblz4's fast mode) or `lz4hc` (levels 1-12) for
//!   every regular file over one block; smaller files stay flat (inline, they take no data
//!   block; compressed, they would take one). Each such file is a `COMPRESSED_FULL` inode:
//!   after its xattrs, the map header and a full index (8 bytes per 4 KiB logical cluster,
//!   its size known from the file size, so the plan still needs no data), and its data is
//!   one-block physical clusters, each holding as much input as LZ4 fits in 4096 bytes,
//!   right-aligned after zero padding (`ZERO_PADDING`, the only incompat feature: Linux
//!   5.3+), or one block stored as is when compression saves nothing. Not used: big
//!   physical clusters, compact indexes, tail packing into the inode, fragments,
//!   deduplication (all in Debian 12's 6.1; the image is about 0.3% larger than
//!   mkfs.erofs' for the Debian test image, see the README). The compressed data comes after
//!   everything planned and is written first (the index holds its block addresses); then
//!   block 0, the metadata and the flat data are written and hashed as usual, and the
//!   compressed data is hashed from the page cache. The kernel takes a stored (plain)
//!   extent longer than its block as corruption, which an unaligned one reaching the end
//!   of the file across a logical cluster would be: such a last piece is compressed if it
//!   fits, else split at the cluster boundary.
//!
//! # Why not composefs-rs' writer
//! The `composefs` crate (0.9, on crates.io; read in its source) has an EROFS writer, but
//! for composefs images: regular files are either small inline data held in memory or
//! references to an external content-addressed store (a null chunk plus overlay redirect
//! xattrs), so it cannot write file data blocks at all; it builds the whole image in
//! memory in two passes from a tree type of its own that we would have to fill by copying
//! ours, writes a composefs header in block 0, and needs Rust 1.88 (fledge builds with
//! 1.85). It does handle hard links, devices, xattrs (shared too) and inline tails. The
//! format is small and well specified, so fledge writes it itself, like its ext4 and
//! squashfs.

mod compress;
mod format;
mod layout;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::sink::{Sink, SinkError, Target};
use crate::tree::{NodeId, NodeKind, Tree};
use format::BLOCK;
use layout::{Plan, Planned};

/// Compression of an EROFS image's file data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Plain blocks (`FLAT_PLAIN`/`FLAT_INLINE`): what the kernel reads fastest.
    #[default]
    None,
    /// liblz4's fast mode: about as quick to write as to copy, read at memory speed.
    Lz4,
    /// LZ4HC at a level from 1 to 12 (liblz4's; 9 its default): smaller, slower to write,
    /// read as fast as lz4.
    Lz4hc { level: u32 },
}

impl Compression {
    fn codec(self) -> Option<compress::Codec> {
        match self {
            Compression::None => None,
            Compression::Lz4 => Some(compress::Codec::Lz4),
            Compression::Lz4hc { level } => Some(compress::Codec::Lz4hc(level.clamp(1, 12))),
        }
    }
}

/// Settings of an EROFS image.
#[derive(Clone, Debug)]
pub struct ErofsOptions {
    pub compression: Compression,
    /// The superblock's build time (seconds since 1970), the time of every compact inode.
    pub build_time: u64,
    pub uuid: [u8; 16],
    /// Store xattrs that several inodes carry once, in the shared area.
    pub share_xattrs: bool,
    /// Compressing threads; 0 for one per core.
    pub threads: usize,
    /// Write the image as a qcow2 file (the same EROFS image inside it).
    pub qcow2: bool,
}

impl Default for ErofsOptions {
    fn default() -> Self {
        ErofsOptions {
            compression: Compression::None,
            build_time: 0,
            uuid: [0; 16],
            share_xattrs: true,
            threads: 0,
            qcow2: false,
        }
    }
}

/// What [`write`] produced.
#[derive(Clone, Debug)]
pub struct ErofsReport {
    /// Length of the image file (a multiple of 4 KiB when raw).
    pub bytes: u64,
    /// sha256 of the image file, lower-case hex.
    pub sha256: String,
    pub inodes: u64,
    pub compact_inodes: u64,
    pub extended_inodes: u64,
    /// Inodes whose tail (or all of whose data) is stored inline.
    pub inline_tails: u64,
    /// Blocks of the metadata area (with block 0) and of the shared xattr area.
    pub meta_blocks: u64,
    pub data_blocks: u64,
    /// Distinct (name, value) pairs in the shared xattr area.
    pub shared_xattrs: u32,
    /// Bytes of zeros left as holes in the image file (free space of blocks included).
    pub hole_bytes: u64,
    /// LZ4-compressed files, and their physical clusters: compressed, and stored as is
    /// (where compression saved nothing).
    pub compressed_files: u64,
    pub packed_blocks: u64,
    pub raw_blocks: u64,
}

/// Errors of the EROFS writer.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("{path}: a name of {len} bytes; EROFS names hold 1 to 255")]
    Name { path: String, len: usize },
    #[error("{path}: extended attribute {name:?} is not in the user., trusted., security. or system.posix_acl_* namespaces, the only ones EROFS stores")]
    Xattr { path: String, name: String },
    #[error("{path}: extended attribute {name:?} of {len} bytes is too large for EROFS (names of 255 bytes after the prefix, values of 65535, 256 KiB in all)")]
    XattrSize {
        path: String,
        name: String,
        len: usize,
    },
    #[error(
        "{path}: device {major}:{minor} does not fit EROFS' 12-bit major and 20-bit minor numbers"
    )]
    Device {
        path: String,
        major: u32,
        minor: u32,
    },
    #[error("{path}: a symlink target of {len} bytes; it must hold 1 to 4095")]
    Symlink { path: String, len: usize },
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
    #[error("the EROFS image would exceed 16 TiB, the most 32-bit block addresses reach")]
    TooLarge,
    #[error("interrupted")]
    Interrupted,
    #[error("EROFS writer: {0}")]
    Internal(String),
}

fn check_interrupt() -> Result<(), ErofsError> {
    if crate::interrupt::requested() {
        Err(ErofsError::Interrupted)
    } else {
        Ok(())
    }
}

/// Bytes read from the layer data at a time.
const CHUNK: usize = crate::sink::CHUNK;

impl From<SinkError> for ErofsError {
    fn from(e: SinkError) -> ErofsError {
        match e {
            SinkError::Interrupted => ErofsError::Interrupted,
            SinkError::Write { path, source } | SinkError::ReadBack { path, source } => {
                ErofsError::Write { path, source }
            }
            e => ErofsError::Internal(e.to_string()),
        }
    }
}

fn read(tree: &Tree, id: NodeId, at: u64, buf: &mut [u8]) -> Result<(), ErofsError> {
    tree.read_at(id, at, buf)
        .map_err(|source| ErofsError::Read {
            path: tree.path_of(id),
            source,
        })
        .map(|_| ())
}

/// Write `tree` as an EROFS image to `out` (created, or overwritten), hashing it as it goes.
pub fn write(tree: &Tree, opts: &ErofsOptions, out: &Path) -> Result<ErofsReport, ErofsError> {
    let mut sw = crate::timing::Stopwatch::start();
    let codec = opts.compression.codec();
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let flat = match codec {
        Some(c) => {
            let flat = compress::probe(tree, c, threads)?;
            sw.mark("erofs: small files probed");
            flat
        }
        None => Vec::new(),
    };
    let compressed = |id: NodeId| !flat.get(id as usize).copied().unwrap_or(false);
    let plan = layout::plan(
        tree,
        opts.build_time,
        opts.share_xattrs,
        codec.map(|_| &compressed as &dyn Fn(NodeId) -> bool),
    )?;
    sw.mark("erofs: tree checked, image planned");
    check_interrupt()?;

    let werr = |source| ErofsError::Write {
        path: out.to_path_buf(),
        source,
    };
    // Never truncated to zero and rewritten (ext4's auto_da_alloc would flush it on close):
    // old contents are punched out, so the holes left below read as zeros.
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(out)
        .map_err(werr)?;
    let old = file.metadata().map_err(werr)?.len();
    // Compressed data follows everything planned: it is written first (the metadata holds
    // its block addresses), then the planned part, which is hashed as it is written, then
    // the compressed part is hashed from the page cache. A qcow2 image keeps the compressed
    // data in a temporary file beside it until the qcow2 stream copies it in.
    let front = plan.blocks * BLOCK as u64;
    let ztmp = match (codec, opts.qcow2) {
        (Some(_), true) => {
            Some(tempfile::tempfile_in(out.parent().unwrap_or(Path::new("."))).map_err(werr)?)
        }
        _ => None,
    };
    let zfile = ztmp.as_ref().unwrap_or(&file);
    let z = match codec {
        None => None,
        Some(c) => {
            let z = compress::write(tree, &plan, c, threads, zfile, out, plan.blocks)?;
            sw.mark("erofs: file data compressed and written");
            Some(z)
        }
    };
    let end = z.as_ref().map_or(plan.blocks, |z| z.end);
    let len = end * BLOCK as u64;
    // Old contents are punched out, so the holes left below read as zeros; where that
    // fails, a raw image is written densely and a qcow2 one cut to nothing first.
    let punched = old == 0
        || nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            if opts.qcow2 { old } else { old.min(front) } as i64,
        )
        .is_ok();
    let zi = z.as_ref().map(|z| z.inodes.as_slice());
    let body = |w: &mut Sink<'_>| -> Result<(), ErofsError> {
        emit(tree, opts, &plan, zi, end, w)?;
        if end > plan.blocks {
            w.existing(zfile, front, len)?;
        }
        Ok(())
    };
    let stop = &crate::interrupt::requested;
    let (file_len, streamed) = if opts.qcow2 {
        if !punched {
            file.set_len(0).map_err(werr)?;
        }
        let (q, s) = crate::sink::stream_qcow2(&file, out, len, &|_| {}, stop, body)?;
        (q.file_len(), s)
    } else {
        file.set_len(len).map_err(werr)?;
        let target = Target::Raw { dense: !punched };
        (
            len,
            crate::sink::stream(&file, out, target, &|_| {}, stop, body)?,
        )
    };
    let holes = streamed.holes;
    let sha256 = streamed
        .sha256
        .ok_or_else(|| ErofsError::Internal("the image was not hashed".into()))?;
    sw.mark("erofs: image written and hashed");

    let compact = plan.inodes.iter().filter(|p| !p.extended).count() as u64;
    Ok(ErofsReport {
        bytes: file_len,
        sha256,
        inodes: plan.inodes.len() as u64,
        compact_inodes: compact,
        extended_inodes: plan.inodes.len() as u64 - compact,
        inline_tails: plan.inodes.iter().filter(|p| p.tail > 0).count() as u64,
        meta_blocks: plan.data_start,
        data_blocks: plan.blocks - plan.data_start,
        shared_xattrs: plan.shared_xattrs,
        hole_bytes: holes,
        compressed_files: plan
            .inodes
            .iter()
            .filter(|p| p.layout == format::Layout::CompressedFull)
            .count() as u64,
        packed_blocks: z.as_ref().map_or(0, |z| z.packed_blocks),
        raw_blocks: z.as_ref().map_or(0, |z| z.raw_blocks),
    })
}

/// Everything planned, in offset order (compressed data, from `plan.blocks` to `end`, is
/// already written; `z` holds what its inodes' records need).
fn emit(
    tree: &Tree,
    opts: &ErofsOptions,
    plan: &Plan,
    z: Option<&[Option<compress::Compressed>]>,
    end: u64,
    w: &mut Sink<'_>,
) -> Result<(), ErofsError> {
    let sb = format::Super {
        root_nid: plan.inodes[0].nid() as u16,
        inodes: plan.inodes.len() as u64,
        epoch: opts.build_time,
        blocks: end as u32,
        meta_blkaddr: 0,
        xattr_blkaddr: plan.xattr_blkaddr,
        uuid: opts.uuid,
        lz4: z.is_some_and(|z| z.iter().any(Option::is_some)),
    };
    let zof = |p: &Planned| z.and_then(|z| z[plan.index[p.node as usize] as usize].as_ref());
    // Block 0 is checksummed with the inodes it holds: those are made first.
    let head = (format::SUPER_OFFSET + format::SUPER_SIZE) as u64;
    let mut first = Vec::new();
    let mut rec = Vec::with_capacity(BLOCK);
    let mut rest = plan
        .by_pos
        .iter()
        .map(|&i| &plan.inodes[i as usize])
        .peekable();
    while let Some(p) = rest.next_if(|p| p.pos < BLOCK as u64) {
        record(tree, plan, p, zof(p), &mut rec)?;
        first.resize((p.pos - head) as usize, 0);
        first.extend_from_slice(&rec);
    }
    let block0 = format::first_block(&sb, &first);
    w.bytes(&block0)?;
    w.bytes(
        first
            .get(block0.len() - head as usize..)
            .unwrap_or_default(),
    )?;
    for p in rest {
        check_interrupt()?;
        record(tree, plan, p, zof(p), &mut rec)?;
        let at = w.at();
        w.zeros(p.pos - at);
        w.bytes(&rec)?;
    }
    w.pad(BLOCK as u64);
    if !plan.shared.is_empty() {
        expect_at(w, u64::from(plan.xattr_blkaddr))?;
        w.bytes(&plan.shared)?;
        w.pad(BLOCK as u64);
    }
    expect_at(w, plan.data_start)?;
    let mut buf = Vec::new();
    for p in plan.inodes.iter().filter(|p| p.blocks > 0) {
        check_interrupt()?;
        expect_at(w, u64::from(p.start))?;
        let node = tree.node(p.node);
        match &node.kind {
            NodeKind::Dir { .. } => {
                let list = listing_of(tree, plan, p.node);
                let (ends, _) = format::dir_blocks(list.iter().map(|d| d.name.len()));
                let mut from = 0;
                for &end in &ends[..p.blocks as usize] {
                    buf.clear();
                    format::dir_block(&mut buf, &list[from..end]);
                    w.bytes(&buf)?;
                    w.pad(BLOCK as u64);
                    from = end;
                }
            }
            NodeKind::File { .. } => {
                let len = p.size - u64::from(p.tail);
                w.contents(len, Some(BLOCK), |at, b| read(tree, p.node, at, b))?;
                w.pad(BLOCK as u64);
            }
            NodeKind::Symlink { target } => {
                w.bytes(target)?;
                w.pad(BLOCK as u64);
            }
            _ => {
                return Err(ErofsError::Internal(
                    "data blocks for a special file".into(),
                ))
            }
        }
    }
    let at = w.at();
    w.zeros(plan.blocks * BLOCK as u64 - at);
    Ok(())
}

fn expect_at(w: &Sink<'_>, block: u64) -> Result<(), ErofsError> {
    if w.at() == block * BLOCK as u64 {
        Ok(())
    } else {
        Err(ErofsError::Internal(format!(
            "at byte {} where block {block} was planned",
            w.at()
        )))
    }
}

/// A directory's entries with their nids and types.
fn listing_of<'t>(tree: &'t Tree, plan: &Plan, dir: NodeId) -> Vec<format::Dirent<'t>> {
    layout::listing(tree, dir)
        .into_iter()
        .map(|(name, id)| {
            let p = &plan.inodes[plan.index[id as usize] as usize];
            format::Dirent {
                name,
                nid: p.nid(),
                file_type: format::file_type(tree.node(id).st_mode()),
            }
        })
        .collect()
}

/// One inode's bytes in the metadata area: the inode, its xattrs, its inline tail.
fn record(
    tree: &Tree,
    plan: &Plan,
    p: &Planned,
    z: Option<&compress::Compressed>,
    rec: &mut Vec<u8>,
) -> Result<(), ErofsError> {
    let node = tree.node(p.node);
    let m = &node.meta;
    let u = match &node.kind {
        NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
            format::encode_dev(*major, *minor).unwrap_or(0)
        }
        NodeKind::Fifo => 0,
        // Compressed: the blocks it takes (what stat reports).
        _ if p.layout == format::Layout::CompressedFull => z.map_or(0, |z| z.blocks),
        _ => p.start,
    };
    rec.clear();
    format::inode(
        rec,
        &format::Inode {
            extended: p.extended,
            layout: p.layout,
            xattr_bytes: p.xattrs.len(),
            st_mode: node.st_mode(),
            nlink: p.nlink,
            size: p.size,
            u,
            ino: plan.index[p.node as usize] + 1,
            uid: m.uid,
            gid: m.gid,
            mtime: m.mtime.sec,
            mtime_nsec: m.mtime.nsec,
        },
    );
    rec.extend_from_slice(&p.xattrs);
    if p.layout == format::Layout::CompressedFull {
        let z = z.ok_or_else(|| ErofsError::Internal("a compressed inode without data".into()))?;
        format::zmap_header(rec, p.pos);
        rec.extend_from_slice(&z.index);
    }
    if p.tail > 0 {
        let tail = p.tail as usize;
        match &node.kind {
            NodeKind::Dir { .. } => {
                let list = listing_of(tree, plan, p.node);
                let (ends, _) = format::dir_blocks(list.iter().map(|d| d.name.len()));
                let from = if ends.len() > 1 {
                    ends[ends.len() - 2]
                } else {
                    0
                };
                let before = rec.len();
                format::dir_block(rec, &list[from..]);
                debug_assert_eq!(rec.len() - before, tail);
            }
            NodeKind::File { .. } => {
                let at = rec.len();
                rec.resize(at + tail, 0);
                read(tree, p.node, p.size - tail as u64, &mut rec[at..])?;
            }
            NodeKind::Symlink { target } => rec.extend_from_slice(target),
            _ => {}
        }
    }
    Ok(())
}
