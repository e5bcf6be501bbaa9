//! fledge's initramfs writer (`strategy = "initramfs"`): the merged [`Tree`] as a newc
//! ("070701") cpio archive, compressed on every core, hashed while it is written, and the
//! same bytes for the same tree and options.
//!
//! # The archive
//! - One newc archive: a 110-byte ASCII header per entry (13 fields of 8 hex digits: ino,
//!   mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
//!   namesize with its NUL, check 0), the name and its NUL padded to 4 bytes, the data padded
//!   to 4 bytes, and the `TRAILER!!!` entry.
//! - Entries depth first in name order, every directory before what it holds (the kernel's
//!   unpacker creates entries in archive order); the root is `.` (its mode, owner and mtime
//!   are applied to the rootfs), the others `bin/sh` (no leading `/`).
//! - Inode numbers are given in archive order from 1 (not the tree's node ids), so the bytes
//!   depend on the tree only.
//! - Hard links: every name of a group carries the same ino and the group's nlink; the data is
//!   on the last name, the earlier ones have size 0 (what GNU cpio writes and both it and the
//!   kernel's `init/initramfs.c` expect: the kernel links later names to the first one it saw
//!   with the same ino, major, minor and mode, and writes the data into it without truncating).
//! - Devices: `rdevmajor`/`rdevminor`; fifos and symlinks (target as data) as they are.
//! - mtimes: whole seconds (newc has no fraction), clamped to 0..2^32-1; the kernel applies
//!   them with `CONFIG_INITRAMFS_PRESERVE_MTIME` (directories' after their contents).
//! - Lost (newc has no field for them, and the kernel sets none): extended attributes
//!   (`security.capability` file capabilities among them, counted and warned about by the
//!   caller through [`InitramfsReport::lost_capabilities`]), sub-second mtimes, mtimes outside
//!   0..2^32-1, files of 4 GiB or more (an error: the size field is 32-bit).
//!
//! # Compression on every core, one stream
//! The archive is cut into chunks of [`CHUNK`] bytes (fixed offsets, so the output does not
//! depend on the number of cores). gzip: each chunk is a raw deflate run ending with a sync
//! flush (byte aligned, not final), the last one finished; the runs concatenated under one
//! gzip header and trailer (CRC-32 combined from the chunks' own) are one ordinary gzip
//! member, as `pigz -i` makes. One member, not one member per chunk: the kernel's unpacker
//! requires each compressed member to end at the end of a cpio archive ("junk at the end of
//! compressed archive"), and `cpio -i` stops at the first `TRAILER!!!`. The cost is that
//! matches do not reach across chunk boundaries (about 0.1% larger at 1 MiB chunks).
//! zstd: one frame with its checksum, compressed by libzstd's own workers (`nbWorkers` = the
//! cores; its output is the same for any number of workers from 1). Not one frame per chunk:
//! as with gzip members, the kernel wants each frame to end at the end of a cpio archive
//! (found by the vm-tests zstd case: "junk at the end of compressed archive").
//!
//! Header fields are written by hand: the `cpio` crate (0.4) has a newc writer but no hard
//! links with data on the last name, takes a `Read` per entry and writes mtimes from
//! `SystemTime`; the format is a dozen hex fields.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::tree::{NodeId, NodeKind, Tree, ROOT};

/// Uncompressed bytes per compressed chunk.
pub const CHUNK: usize = 1 << 20;

/// How the archive is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// gzip at this level (1 to 9).
    Gzip(u32),
    /// zstd at this level (1 to 22).
    Zstd(i32),
}

impl Compression {
    /// The extension of the archive after `.cpio`.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Gzip(_) => "gz",
            Compression::Zstd(_) => "zst",
        }
    }
}

/// Settings of an archive.
#[derive(Clone, Debug)]
pub struct InitramfsOptions {
    pub compression: Compression,
    /// Threads compressing (at least 1); the bytes do not depend on it.
    pub threads: usize,
}

/// What [`write`] produced.
#[derive(Clone, Debug, Default)]
pub struct InitramfsReport {
    /// Entries in the archive (the trailer not counted).
    pub entries: u64,
    /// Uncompressed archive bytes.
    pub cpio_bytes: u64,
    /// Bytes of the compressed file.
    pub bytes: u64,
    /// sha256 of the compressed file, lower-case hex.
    pub sha256: String,
    /// Paths whose extended attributes newc cannot hold.
    pub lost_xattrs: u64,
    /// Of those, the paths with `security.capability` (file capabilities), first ones by name.
    pub lost_capabilities: Vec<String>,
    /// Entries whose mtime lost its fraction or was clamped to 0..2^32-1.
    pub inexact_mtimes: u64,
}

/// Errors of the initramfs writer.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("{path}: a file of {size} bytes; newc cpio holds files below 4 GiB")]
    TooLarge { path: String, size: u64 },
    #[error("{path}: a path of {len} bytes; the kernel's initramfs unpacker takes at most 4095")]
    PathTooLong { path: String, len: usize },
    #[error("cannot read {path} from the layer data: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: changed size while it was read (expected {expected} bytes)")]
    Short { path: String, expected: u64 },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("compressing the archive: {0}")]
    Compress(String),
    #[error("interrupted")]
    Interrupted,
}

/// One newc header, its name (without NUL) and padding.
fn header(out: &mut Vec<u8>, h: &Header, name: &[u8]) {
    let fields = [
        h.ino,
        h.mode,
        h.uid,
        h.gid,
        h.nlink,
        h.mtime,
        h.filesize,
        0,
        0,
        h.rdevmajor,
        h.rdevminor,
        name.len() as u32 + 1,
        0,
    ];
    let start = out.len();
    out.extend_from_slice(b"070701");
    for f in fields {
        write!(out, "{f:08X}").expect("writing to a Vec");
    }
    out.extend_from_slice(name);
    out.push(0);
    pad4(out, start);
}

/// Zeros up to the next multiple of 4 bytes from `start` (headers start 4-aligned).
fn pad4(out: &mut Vec<u8>, start: usize) {
    while (out.len() - start) % 4 != 0 {
        out.push(0);
    }
}

#[derive(Default)]
struct Header {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

/// The archive's entries in order: (name as written, node), and for each hard-linked node the
/// index of its last name (which carries the data).
///
/// The names are one buffer, each entry holding where its name ends: a `Vec` per name would
/// cost twice the bytes of the paths again (about 40 MiB at a million files).
struct Listing {
    names: Vec<u8>,
    /// (end of the entry's name in `names`, node).
    entries: Vec<(usize, NodeId)>,
    last_name: HashMap<NodeId, usize>,
}

impl Listing {
    /// The entries in order: (name as written, node).
    fn iter(&self) -> impl Iterator<Item = (&[u8], NodeId)> + '_ {
        let mut start = 0;
        self.entries.iter().map(move |&(end, id)| {
            let name = &self.names[start..end];
            start = end;
            (name, id)
        })
    }
}

fn list(tree: &Tree) -> Result<Listing, InitramfsError> {
    let mut names = Vec::new();
    let mut entries = Vec::with_capacity(tree.nodes.len());
    let mut last_name = HashMap::new();
    let mut too_long = None;
    tree.walk(|path, id| {
        let name = if id == ROOT { &b"."[..] } else { &path[1..] };
        if name.len() > 4095 && too_long.is_none() {
            too_long = Some((String::from_utf8_lossy(path).into_owned(), name.len()));
        }
        if tree.node(id).nlink > 1 && matches!(tree.node(id).kind, NodeKind::File { .. }) {
            last_name.insert(id, entries.len());
        }
        names.extend_from_slice(name);
        entries.push((names.len(), id));
    });
    if let Some((path, len)) = too_long {
        return Err(InitramfsError::PathTooLong { path, len });
    }
    Ok(Listing {
        names,
        entries,
        last_name,
    })
}

/// The compressors' side: chunks in, compressed bytes (and the chunk's CRC-32 for gzip) out,
/// written in order and hashed by [`Sink`].
struct Sink<'a> {
    file: File,
    path: &'a Path,
    hash: Sha256,
    bytes: u64,
    crc: flate2::Crc,
}

impl Sink<'_> {
    fn put(&mut self, b: &[u8]) -> Result<(), InitramfsError> {
        self.file
            .write_all(b)
            .map_err(|source| InitramfsError::Write {
                path: self.path.to_path_buf(),
                source,
            })?;
        self.hash.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }
}

/// gzip header: no name, mtime 0, no extra flags, OS "unknown" (as `gzip -n` but for the OS
/// byte, which says nothing useful of a build).
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// One chunk as raw deflate ending with a sync flush (byte aligned, not final), or finished
/// when it is the `last`; with its CRC-32, for the member's trailer.
fn deflate_chunk(
    level: u32,
    data: &[u8],
    last: bool,
) -> Result<(Vec<u8>, flate2::Crc), InitramfsError> {
    use flate2::{Compress, FlushCompress, Status};
    let mut crc = flate2::Crc::new();
    crc.update(data);
    let mut z = Compress::new(flate2::Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() + data.len() / 16 + 1024);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let done = z.total_in() as usize;
        let st = z
            .compress_vec(&data[done..], &mut out, flush)
            .map_err(|e| InitramfsError::Compress(e.to_string()))?;
        let all_in = z.total_in() as usize == data.len();
        // Done when finished, or (sync flush) all input taken with room to spare.
        if (last && st == Status::StreamEnd) || (!last && all_in && out.len() < out.capacity()) {
            break;
        }
        out.reserve(64 * 1024);
    }
    Ok((out, crc))
}

/// zstd: the archive through one multithreaded encoder into the sink.
fn write_zstd(
    tree: &Tree,
    listing: &Listing,
    level: i32,
    threads: usize,
    sink: &mut Sink<'_>,
    report: &mut InitramfsReport,
) -> Result<(), InitramfsError> {
    let zerr = |e: std::io::Error| InitramfsError::Compress(e.to_string());
    let out = SinkWriter { sink, err: None };
    let mut enc = zstd::stream::write::Encoder::new(out, level).map_err(zerr)?;
    enc.include_checksum(true).map_err(zerr)?;
    enc.multithread(threads.max(1) as u32).map_err(zerr)?;
    // A failed write to the image file is reported as itself, not as the encoder's error.
    let produced = produce(tree, listing, report, |_, chunk, _| {
        enc.write_all(&chunk).map_err(zerr)
    });
    if let Err(e) = produced {
        return Err(enc.get_mut().err.take().unwrap_or(e));
    }
    let out = enc.finish().map_err(zerr)?;
    out.err.map_or(Ok(()), Err)
}

/// [`Sink`] as an `io::Write` for the zstd encoder.
struct SinkWriter<'s, 'p> {
    sink: &'s mut Sink<'p>,
    /// The first failed write, kept for the caller.
    err: Option<InitramfsError>,
}

impl Write for SinkWriter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Err(e) = self.sink.put(buf) {
            let msg = e.to_string();
            self.err.get_or_insert(e);
            return Err(std::io::Error::other(msg));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write `tree` as a compressed newc archive to `path` (created or truncated).
pub fn write(
    tree: &Tree,
    opts: &InitramfsOptions,
    path: &Path,
) -> Result<InitramfsReport, InitramfsError> {
    let listing = list(tree)?;
    let file = File::create(path).map_err(|source| InitramfsError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    let mut sink = Sink {
        file,
        path,
        hash: Sha256::new(),
        bytes: 0,
        crc: flate2::Crc::new(),
    };
    let comp = opts.compression;
    let threads = opts.threads.max(1);
    let mut report = InitramfsReport::default();
    let level = match comp {
        Compression::Zstd(level) => {
            write_zstd(tree, &listing, level, threads, &mut sink, &mut report)?;
            return finish(sink, report);
        }
        Compression::Gzip(level) => level,
    };
    sink.put(&GZIP_HEADER)?;

    // Chunks to the compressors (bounded: memory stays at a few chunks per thread).
    let (to_work, work) = mpsc::sync_channel::<(u64, Vec<u8>, bool)>(threads * 2);
    // Shared by the compressors only: when they all stop (the writer failed), the receiver
    // is gone and the producer's next send fails instead of blocking.
    let work = Arc::new(Mutex::new(work));
    std::thread::scope(|s| -> Result<(), InitramfsError> {
        let (to_sink, done) = mpsc::sync_channel::<(
            u64,
            Result<(Vec<u8>, flate2::Crc), InitramfsError>,
        )>(threads * 2);
        for _ in 0..threads {
            let work = Arc::clone(&work);
            let to_sink = to_sink.clone();
            s.spawn(move || loop {
                let next = work.lock().map(|r| r.recv());
                let Ok(Ok((seq, data, last))) = next else {
                    return;
                };
                if to_sink
                    .send((seq, deflate_chunk(level, &data, last)))
                    .is_err()
                {
                    return;
                }
            });
        }
        drop(to_sink);
        drop(work);
        // The writer: in order, hashed as written.
        let sink = &mut sink;
        let writer = s.spawn(move || -> Result<(), InitramfsError> {
            let mut pending = BTreeMap::new();
            let mut next = 0u64;
            for (seq, r) in done {
                pending.insert(seq, r);
                while let Some(r) = pending.remove(&next) {
                    let (bytes, crc) = r?;
                    sink.put(&bytes)?;
                    sink.crc.combine(&crc);
                    next += 1;
                }
            }
            Ok(())
        });

        let produced = produce(tree, &listing, &mut report, |seq, chunk, last| {
            to_work
                .send((seq, chunk, last))
                .map_err(|_| InitramfsError::Compress("a compressor stopped".into()))
        });
        drop(to_work);
        let written = writer
            .join()
            .map_err(|_| InitramfsError::Compress("the writer thread panicked".into()))?;
        // The writer's error (the reason a compressor stopped) comes first.
        written.and(produced)
    })?;

    let mut t = [0u8; 8];
    t[..4].copy_from_slice(&sink.crc.sum().to_le_bytes());
    t[4..].copy_from_slice(&(report.cpio_bytes as u32).to_le_bytes());
    sink.put(&t)?;
    finish(sink, report)
}

fn finish(sink: Sink<'_>, mut report: InitramfsReport) -> Result<InitramfsReport, InitramfsError> {
    report.bytes = sink.bytes;
    report.sha256 = hex::encode(sink.hash.finalize());
    Ok(report)
}

/// Make the archive's bytes, handing on each full chunk (`emit(seq, bytes, last)`).
fn produce(
    tree: &Tree,
    listing: &Listing,
    report: &mut InitramfsReport,
    mut emit: impl FnMut(u64, Vec<u8>, bool) -> Result<(), InitramfsError>,
) -> Result<(), InitramfsError> {
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + 8192);
    let mut seq = 0u64;
    let mut total = 0u64;
    // The inode number of each node, in order of first appearance (0: not seen yet).
    let mut inos: Vec<u32> = vec![0; tree.nodes.len()];
    let mut seen = 0u32;
    let mut flush =
        |buf: &mut Vec<u8>, total: &mut u64, last: bool| -> Result<(), InitramfsError> {
            while buf.len() >= CHUNK || (last && !buf.is_empty()) {
                let take = buf.len().min(CHUNK);
                let rest = buf.split_off(take);
                let chunk = std::mem::replace(buf, rest);
                *total += chunk.len() as u64;
                let is_last = last && buf.is_empty();
                emit(seq, chunk, is_last)?;
                seq += 1;
                if is_last {
                    break;
                }
            }
            Ok(())
        };
    let mut read_buf = vec![0u8; CHUNK];
    for (i, (name, id)) in listing.iter().enumerate() {
        if crate::interrupt::requested() {
            return Err(InitramfsError::Interrupted);
        }
        let node = tree.node(id);
        let ino = match inos[id as usize] {
            0 => {
                seen += 1;
                inos[id as usize] = seen;
                seen
            }
            ino => ino,
        };
        let m = &node.meta;
        if !m.xattrs.is_empty() {
            report.lost_xattrs += 1;
            if m.xattrs.iter().any(|(n, _)| &**n == b"security.capability")
                && report.lost_capabilities.len() < 16
            {
                report
                    .lost_capabilities
                    .push(format!("/{}", String::from_utf8_lossy(name)));
            }
        }
        let mtime = m.mtime.sec.clamp(0, i64::from(u32::MAX)) as u32;
        if m.mtime.nsec != 0 || i64::from(mtime) != m.mtime.sec {
            report.inexact_mtimes += 1;
        }
        let mut h = Header {
            ino,
            mode: node.st_mode(),
            uid: m.uid,
            gid: m.gid,
            nlink: node.nlink,
            mtime,
            ..Header::default()
        };
        let start = buf.len();
        match &node.kind {
            NodeKind::Dir { .. } | NodeKind::Fifo => header(&mut buf, &h, name),
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                h.rdevmajor = *major;
                h.rdevminor = *minor;
                header(&mut buf, &h, name);
            }
            NodeKind::Symlink { target } => {
                h.filesize = target.len() as u32;
                header(&mut buf, &h, name);
                buf.extend_from_slice(target);
                pad4(&mut buf, start);
            }
            NodeKind::File { size, .. } => {
                let carries = node.nlink <= 1 || listing.last_name.get(&id) == Some(&i);
                let size = if carries { *size } else { 0 };
                let path = || format!("/{}", String::from_utf8_lossy(name));
                h.filesize = u32::try_from(size)
                    .map_err(|_| InitramfsError::TooLarge { path: path(), size })?;
                header(&mut buf, &h, name);
                let mut off = 0u64;
                while off < size {
                    let want = (size - off).min(read_buf.len() as u64) as usize;
                    let n = tree
                        .read_at(id, off, &mut read_buf[..want])
                        .map_err(|source| InitramfsError::Read {
                            path: path(),
                            source,
                        })?;
                    if n == 0 {
                        return Err(InitramfsError::Short {
                            path: path(),
                            expected: size,
                        });
                    }
                    buf.extend_from_slice(&read_buf[..n]);
                    off += n as u64;
                    if buf.len() >= CHUNK {
                        flush(&mut buf, &mut total, false)?;
                    }
                }
                // Padding is counted from the header's start: the header and name are 4-byte
                // aligned, so the data's own length decides it.
                // Chunks are whole multiples of 4 bytes, so the buffer's length has the
                // archive offset's alignment.
                while buf.len() % 4 != 0 {
                    buf.push(0);
                }
            }
        }
        report.entries += 1;
        if buf.len() >= CHUNK {
            flush(&mut buf, &mut total, false)?;
        }
    }
    let trailer = Header {
        nlink: 1,
        ..Header::default()
    };
    header(&mut buf, &trailer, b"TRAILER!!!");
    flush(&mut buf, &mut total, true)?;
    report.cpio_bytes = total;
    Ok(())
}

pub mod busybox;
pub mod init;
#[cfg(test)]
mod tests;
