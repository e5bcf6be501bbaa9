//! qcow2 output: a disk image in QEMU's qcow2 format (version 3), holding only the clusters
//! of the raw image that hold data, written once from front to back and hashed as written.
//!
//! Written by hand: the qcow2 crates on crates.io (`qcow2`, `qcow2-core`, `qcow`) only read
//! images, and `qcow2-rs` is an async (tokio) block-device library that allocates as a
//! guest writes; none lays out a compact image from a known allocation map in one pass. The
//! subset written here is small: a version 3 header with no extensions, 64 KiB clusters,
//! 16-bit refcounts (refcount order 4), no backing file, snapshots, compression or
//! encryption.
//!
//! # Layout, and why
//!
//! The file's sha256 goes into the manifest, and it is computed while the file is written,
//! in file order. SHA-256 cannot be told a prefix afterwards, so whatever comes first in the
//! file must be known before the first data byte is hashed. The allocation map (which guest
//! clusters hold data) is known before any data is copied: the raw image's data extents
//! (`SEEK_DATA`/`SEEK_HOLE`) say it. From the map and the virtual size alone, every table
//! is computed up front, and the file is written strictly sequentially:
//!
//! ```text
//! cluster 0           header (104 bytes, end-of-extensions marker, zeros)
//! L1 table            one entry per 512 MiB of the virtual disk
//! refcount table      one entry per refcount block
//! refcount blocks     refcount 1 for every cluster of the file (there are no others)
//! L2 tables           one per 512 MiB span that holds any data, in guest order
//! data clusters       the allocated guest clusters, in guest order, packed
//! ```
//!
//! A guest cluster outside the map is unallocated (its L2 entry is 0), which reads as zeros
//! since there is no backing file: free space costs nothing. Every cluster of the file is
//! referenced exactly once, so every L1 and L2 entry carries the COPIED flag and
//! `qemu-img check` finds neither leaks nor refcount errors. The same map and bytes give the
//! same file, so a reproducible raw build gives a reproducible qcow2.
//!
//! The file is no larger than the raw image's data rounded out to whole clusters, plus the
//! tables: a data extent that starts or ends inside a cluster allocates that whole cluster.
//! The zeros that rounding adds are left as holes in the file (it is sized up front and
//! only data is written), so the blocks it occupies on the host are the raw image's
//! allocated blocks plus the tables.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use thiserror::Error;

use crate::digest::{Piece, PieceHasher};

/// log2 of the cluster size (64 KiB, QEMU's default).
pub const CLUSTER_BITS: u32 = 16;
/// The cluster size.
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Entries of one L2 table (8 bytes each): one table maps 512 MiB.
const L2_ENTRIES: u64 = CLUSTER / 8;
/// Refcount entries per refcount block (16 bits each: refcount order 4).
const REFCOUNT_ORDER: u32 = 4;
const RB_ENTRIES: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
/// The header's length (the version 3 fields, no optional ones).
const HEADER_LEN: usize = 104;
/// L1/L2 entry flag: the cluster's refcount is exactly 1.
const COPIED: u64 = 1 << 63;

/// Errors of the qcow2 writer.
#[derive(Debug, Error)]
pub enum Qcow2Error {
    #[error("cannot read {} (converting it to qcow2): {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
}

/// Where everything goes in a qcow2 file, computed from the virtual size and the allocated
/// guest clusters before anything is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The virtual disk's size in bytes (the raw image's length).
    pub virtual_size: u64,
    /// Allocated guest clusters as sorted, disjoint, non-adjacent runs `[start, end)`.
    runs: Vec<(u64, u64)>,
    l1_entries: u64,
    l1_clusters: u64,
    rt_clusters: u64,
    rb_count: u64,
    /// The L1 indexes that get an L2 table, ascending.
    l2_tables: Vec<u64>,
    /// Allocated guest clusters in all.
    data_clusters: u64,
}

impl Layout {
    /// The layout for a virtual disk of `virtual_size` bytes whose data lies in `extents`
    /// (byte ranges `[start, end)`, sorted; they are rounded out to whole clusters).
    pub fn new(virtual_size: u64, extents: &[(u64, u64)]) -> Layout {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let clusters_total = virtual_size.div_ceil(CLUSTER);
        for &(s, e) in extents {
            let e = e.min(virtual_size);
            if e <= s {
                continue;
            }
            let (cs, ce) = (s / CLUSTER, e.div_ceil(CLUSTER).min(clusters_total));
            match runs.last_mut() {
                Some(last) if cs <= last.1 => last.1 = last.1.max(ce),
                _ => runs.push((cs, ce)),
            }
        }
        let data_clusters: u64 = runs.iter().map(|(s, e)| e - s).sum();
        let mut l2_tables: Vec<u64> = Vec::new();
        for &(s, e) in &runs {
            for t in s / L2_ENTRIES..=(e - 1) / L2_ENTRIES {
                if l2_tables.last() != Some(&t) {
                    l2_tables.push(t);
                }
            }
        }
        let l1_entries = clusters_total.div_ceil(L2_ENTRIES);
        let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
        // The refcount blocks cover the whole file, themselves included: iterate to the
        // fixed point (it moves at most once or twice).
        let fixed = 1 + l1_clusters + l2_tables.len() as u64 + data_clusters;
        let (mut rb_count, mut rt_clusters) = (1u64, 1u64);
        loop {
            let total = fixed + rt_clusters + rb_count;
            let rb = total.div_ceil(RB_ENTRIES);
            let rt = (rb * 8).div_ceil(CLUSTER);
            if (rb, rt) == (rb_count, rt_clusters) {
                break;
            }
            (rb_count, rt_clusters) = (rb, rt);
        }
        Layout {
            virtual_size,
            runs,
            l1_entries,
            l1_clusters,
            rt_clusters,
            rb_count,
            l2_tables,
            data_clusters,
        }
    }

    fn l1_offset(&self) -> u64 {
        CLUSTER
    }
    fn rt_offset(&self) -> u64 {
        self.l1_offset() + self.l1_clusters * CLUSTER
    }
    fn rb_offset(&self) -> u64 {
        self.rt_offset() + self.rt_clusters * CLUSTER
    }
    fn l2_offset(&self) -> u64 {
        self.rb_offset() + self.rb_count * CLUSTER
    }
    /// Where the data clusters start: everything before is [`Layout::metadata`].
    pub fn data_offset(&self) -> u64 {
        self.l2_offset() + self.l2_tables.len() as u64 * CLUSTER
    }
    /// Clusters of the file.
    fn host_clusters(&self) -> u64 {
        self.data_offset() / CLUSTER + self.data_clusters
    }
    /// The file's length.
    pub fn file_len(&self) -> u64 {
        self.host_clusters() * CLUSTER
    }
    /// Bytes of tables (header, L1, refcounts, L2): the file's length less its data.
    pub fn table_bytes(&self) -> u64 {
        self.data_offset()
    }
    /// Allocated guest clusters as runs `[start, end)` of cluster numbers.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// The file's first [`Layout::data_offset`] bytes: header and tables.
    pub fn metadata(&self) -> Vec<u8> {
        let mut m = vec![0u8; self.data_offset() as usize];
        let put32 = |m: &mut [u8], at: u64, v: u32| {
            m[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes())
        };
        let put64 = |m: &mut [u8], at: u64, v: u64| {
            m[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes())
        };
        // Header (all big-endian). Unset fields (backing file, encryption, snapshots,
        // feature bits) stay zero; so does the end-of-extensions marker at HEADER_LEN.
        m[0..4].copy_from_slice(b"QFI\xfb");
        put32(&mut m, 4, 3); // version
        put32(&mut m, 20, CLUSTER_BITS);
        put64(&mut m, 24, self.virtual_size);
        put32(&mut m, 36, self.l1_entries as u32);
        put64(&mut m, 40, self.l1_offset());
        put64(&mut m, 48, self.rt_offset());
        put32(&mut m, 56, self.rt_clusters as u32);
        put32(&mut m, 96, REFCOUNT_ORDER);
        put32(&mut m, 100, HEADER_LEN as u32);
        // L1: the L2 tables, in order.
        for (i, &t) in self.l2_tables.iter().enumerate() {
            let l2 = self.l2_offset() + i as u64 * CLUSTER;
            put64(&mut m, self.l1_offset() + t * 8, l2 | COPIED);
        }
        // Refcount table and blocks: every cluster of the file once.
        for b in 0..self.rb_count {
            put64(
                &mut m,
                self.rt_offset() + b * 8,
                self.rb_offset() + b * CLUSTER,
            );
        }
        for c in 0..self.host_clusters() {
            let at = self.rb_offset() + c * 2;
            m[at as usize..at as usize + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        // L2: each allocated guest cluster to its packed data cluster.
        let mut host = self.data_offset();
        let mut table = 0usize; // index into l2_tables
        for &(s, e) in &self.runs {
            for g in s..e {
                let t = g / L2_ENTRIES;
                while self.l2_tables[table] != t {
                    table += 1;
                }
                let entry = self.l2_offset() + table as u64 * CLUSTER + (g % L2_ENTRIES) * 8;
                put64(&mut m, entry, host | COPIED);
                host += CLUSTER;
            }
        }
        m
    }
}

/// Guest offsets to file offsets for a writer that streams a raw image in guest order into
/// a qcow2 [`Layout`] (the native ext4 writer): where a data range goes, and how many bytes
/// of a zero range lie in allocated clusters (and so are part of the file, and hashed).
/// Offsets only grow between calls; each call starts looking at the run the last one ended
/// in.
pub struct Mapper<'a> {
    layout: &'a Layout,
    /// The file offset of each run's first cluster.
    run_host: Vec<u64>,
    cursor: usize,
}

impl<'a> Mapper<'a> {
    pub fn new(layout: &'a Layout) -> Mapper<'a> {
        let mut host = layout.data_offset();
        let run_host = layout
            .runs
            .iter()
            .map(|(s, e)| {
                let h = host;
                host += (e - s) * CLUSTER;
                h
            })
            .collect();
        Mapper {
            layout,
            run_host,
            cursor: 0,
        }
    }

    /// The file offset of the data range `[pos, pos + n)`, which must lie in one run of
    /// allocated clusters; `None` when it does not (the map and the data disagree).
    pub fn data_at(&mut self, pos: u64, n: u64) -> Option<u64> {
        let runs = &self.layout.runs;
        while self.cursor < runs.len() && runs[self.cursor].1 * CLUSTER <= pos {
            self.cursor += 1;
        }
        let (s, e) = *runs.get(self.cursor)?;
        (pos >= s * CLUSTER && pos + n <= e * CLUSTER)
            .then(|| self.run_host[self.cursor] + pos - s * CLUSTER)
    }

    /// How many bytes of `[pos, pos + n)` lie in allocated clusters.
    pub fn allocated_in(&mut self, pos: u64, n: u64) -> u64 {
        let runs = &self.layout.runs;
        let end = pos + n;
        while self.cursor < runs.len() && runs[self.cursor].1 * CLUSTER <= pos {
            self.cursor += 1;
        }
        let mut total = 0;
        let mut i = self.cursor;
        while let Some(&(s, e)) = runs.get(i) {
            let (a, b) = (s * CLUSTER, e * CLUSTER);
            if a >= end {
                break;
            }
            total += b.min(end) - a.max(pos);
            if b > end {
                break;
            }
            i += 1;
        }
        total
    }

    /// Zeros the file holds past the virtual disk's end: the rest of its last cluster, when
    /// that cluster is allocated.
    pub fn tail_padding(&mut self) -> u64 {
        let v = self.layout.virtual_size;
        let end = v.div_ceil(CLUSTER) * CLUSTER;
        self.allocated_in(v, end - v)
    }
}

/// The data extents of `f`'s first `len` bytes (`SEEK_DATA`/`SEEK_HOLE`; a filesystem
/// without them reports everything as data).
pub fn data_extents(f: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let data = match lseek(f, pos as i64, Whence::SeekData) {
            Ok(o) => o as u64,
            Err(nix::Error::ENXIO) => break,
            Err(nix::Error::EINVAL) => pos,
            Err(e) => return Err(e.into()),
        };
        if data >= len {
            break;
        }
        let hole = match lseek(f, data as i64, Whence::SeekHole) {
            Ok(o) => (o as u64).clamp(data + 1, len),
            Err(_) => len,
        };
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

/// What [`convert`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    /// sha256 of the qcow2 file (hex), hashed as it was written.
    pub sha256: String,
    pub layout: Layout,
}

/// Write `raw` (a raw disk image, possibly sparse) as the qcow2 image `out` (created or
/// replaced), reading only its data extents once. `stop` is polled between chunks.
pub fn convert(
    raw: &Path,
    out: &Path,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Converted, Qcow2Error> {
    let rerr = |source| Qcow2Error::Read {
        path: raw.to_path_buf(),
        source,
    };
    let werr = |source| Qcow2Error::Write {
        path: out.to_path_buf(),
        source,
    };
    let src = File::open(raw).map_err(rerr)?;
    let len = src.metadata().map_err(rerr)?.len();
    let extents = data_extents(&src, len).map_err(rerr)?;
    let layout = Layout::new(len, &extents);
    let dst = File::create(out).map_err(werr)?;
    dst.set_len(layout.file_len()).map_err(werr)?;
    let meta = layout.metadata();
    dst.write_all_at(&meta, 0).map_err(werr)?;
    let sha256 = hash_clusters(raw, &src, &layout, &extents, stop, |host, buf| {
        dst.write_all_at(buf, host).map_err(werr)
    })?;
    Ok(Converted { sha256, layout })
}

/// The sha256 of the qcow2 file `layout` describes for the raw image `src` (at `path`, for
/// messages) with data `extents`: its tables, then every allocated cluster's bytes read
/// from `src`, the holes inside them hashed as zeros. Each chunk of data read is also
/// handed to `put` with its offset in the qcow2 file.
fn hash_clusters(
    path: &Path,
    src: &File,
    layout: &Layout,
    extents: &[(u64, u64)],
    stop: &(dyn Fn() -> bool + Sync),
    mut put: impl FnMut(u64, &[u8]) -> Result<(), Qcow2Error>,
) -> Result<String, Qcow2Error> {
    let rerr = |source| Qcow2Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = layout.virtual_size;
    const CHUNK: u64 = crate::digest::PIECE as u64;
    let (tx, rx) = mpsc::sync_channel::<Piece>(crate::digest::QUEUE);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let hasher = s.spawn(move || {
            let mut h = PieceHasher::new();
            for piece in rx {
                if let Some(buf) = h.update(piece) {
                    let _ = back_tx.send(buf);
                }
            }
            h.finish()
        });
        let r = (|| {
            let _ = tx.send(Piece::Data(layout.metadata()));
            let mut host = layout.data_offset();
            let mut next = 0usize; // the first extent not read yet
            for &(cs, ce) in layout.runs() {
                let (start, end) = (cs * CLUSTER, ce * CLUSTER);
                let mut at = start;
                // The extents in this run are read; the holes between them (inside its
                // clusters, and past the disk's end in its last one) are hashed as zeros
                // without being read (and stay holes in a new file).
                while let Some(&(s, e)) = extents.get(next) {
                    if s >= end {
                        break;
                    }
                    let (s, e) = (s.max(at), e.min(len));
                    if s > at {
                        host += s - at;
                        let _ = tx.send(Piece::Zeros(s - at));
                        at = s;
                    }
                    while at < e {
                        if stop() {
                            return Err(Qcow2Error::Interrupted);
                        }
                        let n = (e - at).min(CHUNK) as usize;
                        let mut buf = back_rx.try_recv().unwrap_or_default();
                        buf.resize(n, 0);
                        src.read_exact_at(&mut buf, at).map_err(rerr)?;
                        put(host, &buf)?;
                        at += n as u64;
                        host += n as u64;
                        let _ = tx.send(Piece::Data(buf));
                    }
                    next += 1;
                }
                if end > at {
                    host += end - at;
                    let _ = tx.send(Piece::Zeros(end - at));
                }
            }
            debug_assert_eq!(host, layout.file_len());
            Ok(())
        })();
        drop(tx);
        let sum = hasher.join().map_err(|_| Qcow2Error::Read {
            path: path.to_path_buf(),
            source: std::io::Error::other("the hashing thread panicked"),
        });
        r.and(sum)
    })
}

/// Turn the raw image at `path` into the qcow2 image [`convert`] would write, in place and
/// without copying its data: the runs of unallocated clusters are cut out of the file
/// (`FALLOC_FL_COLLAPSE_RANGE`, last first), room for the tables is made at its start
/// (`FALLOC_FL_INSERT_RANGE`), and the tables are written there; the result is hashed
/// first, from the raw file. The host filesystem moves extents instead of bytes (ext4 and
/// xfs can; btrfs and tmpfs cannot). `Ok(None)` when it cannot, with the file untouched: the
/// first change is the probe, and it either happens whole or not at all. Both calls flush
/// the file's dirty pages and drop them from the page cache (the final flush has nothing
/// left to do then).
pub fn convert_in_place(
    path: &Path,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Option<Converted>, Qcow2Error> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let werr = |source| Qcow2Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let f = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(werr)?;
    let len = f.metadata().map_err(werr)?.len();
    let extents = data_extents(&f, len).map_err(|source| Qcow2Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let layout = Layout::new(len, &extents);
    if layout.runs.is_empty() {
        return Ok(None);
    }
    // The unallocated runs of clusters between the allocated ones, last first; what
    // follows the last allocated cluster is cut by the final length.
    let mut gaps: Vec<(u64, u64)> = layout.runs.windows(2).map(|w| (w[0].1, w[1].0)).collect();
    if let Some(&(s, _)) = layout.runs.first() {
        if s > 0 {
            gaps.insert(0, (0, s));
        }
    }
    if !moves_extents(path.parent().unwrap_or(Path::new("."))) {
        return Ok(None);
    }
    // Hashed before anything moves: the raw image is still in the page cache (moving
    // extents writes it back and drops it from there), and the qcow2 file will hold exactly
    // these bytes.
    let sha256 = hash_clusters(path, &f, &layout, &extents, stop, |_, _| Ok(()))?;
    let mut probed = false;
    let mut step = |flags: FallocateFlags, at: u64, n: u64| -> Result<bool, Qcow2Error> {
        if stop() {
            return Err(Qcow2Error::Interrupted);
        }
        match fallocate(&f, flags, at as i64, n as i64) {
            Ok(()) => {
                probed = true;
                Ok(true)
            }
            Err(e) if !probed => {
                tracing::debug!(
                    "{}: converting to qcow2 in place: {e}; copying instead",
                    path.display()
                );
                Ok(false)
            }
            Err(e) => Err(werr(e.into())),
        }
    };
    for &(s, e) in gaps.iter().rev() {
        if !step(
            FallocateFlags::FALLOC_FL_COLLAPSE_RANGE,
            s * CLUSTER,
            (e - s) * CLUSTER,
        )? {
            return Ok(None);
        }
    }
    // The packed clusters, the last one whole: what followed them (free space at the end
    // of the disk) is cut, a partial last cluster grows by a hole.
    f.set_len(layout.data_clusters * CLUSTER).map_err(werr)?;
    if !step(
        FallocateFlags::FALLOC_FL_INSERT_RANGE,
        0,
        layout.data_offset(),
    )? {
        return Ok(None);
    }
    f.set_len(layout.file_len()).map_err(werr)?;
    f.write_all_at(&layout.metadata(), 0).map_err(werr)?;
    Ok(Some(Converted { sha256, layout }))
}

/// Whether the filesystem holding `dir` moves extents (insert and collapse ranges of whole
/// clusters), tried on a small temporary file there, so that a host that cannot is known
/// before any work is done for it.
fn moves_extents(dir: &Path) -> bool {
    use nix::fcntl::{fallocate, FallocateFlags};
    let Ok(f) = tempfile::tempfile_in(dir) else {
        return false;
    };
    let c = CLUSTER as i64;
    f.write_all_at(&[1u8; 2 * CLUSTER as usize], 0).is_ok()
        && fallocate(&f, FallocateFlags::FALLOC_FL_INSERT_RANGE, 0, c).is_ok()
        && fallocate(&f, FallocateFlags::FALLOC_FL_COLLAPSE_RANGE, 0, c).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    fn qemu_img() -> bool {
        Command::new("qemu-img").arg("--version").output().is_ok()
    }

    /// Write a raw sparse file of `size` bytes with `fills` (offset, len, byte) written.
    fn raw_file(path: &Path, size: u64, fills: &[(u64, u64, u8)]) {
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        for &(off, n, b) in fills {
            f.write_all_at(&vec![b; n as usize], off).unwrap();
        }
    }

    #[test]
    fn layout_counts_tables() {
        // 5 GiB virtual, one cluster of data at 4.5 GiB: one L2 table, one data cluster.
        let l = Layout::new(5 << 30, &[(4608 * MIB, 4608 * MIB + 10)]);
        assert_eq!(l.l1_entries, 10);
        assert_eq!(l.l2_tables, vec![9]);
        assert_eq!(l.data_clusters, 1);
        // header, L1, refcount table, one refcount block, one L2, one data cluster.
        assert_eq!(l.file_len(), 6 * CLUSTER);
        // Extents are rounded out to clusters and merged when they touch a cluster.
        let l = Layout::new(
            MIB,
            &[
                (10, 20),
                (CLUSTER - 1, CLUSTER + 1),
                (3 * CLUSTER, 4 * CLUSTER),
            ],
        );
        assert_eq!(l.runs(), &[(0, 2), (3, 4)]);
        // Nothing allocated: no L2 table at all.
        let l = Layout::new(MIB, &[]);
        assert!(l.l2_tables.is_empty());
        assert_eq!(l.file_len(), 4 * CLUSTER);
    }

    /// Every pattern, read back by QEMU: `check` clean, `compare` identical to the raw bytes,
    /// the hash is the file's, and the file holds no more than its data clusters and tables.
    #[test]
    fn qemu_reads_back_every_pattern() {
        if !qemu_img() {
            eprintln!("SKIP: qemu-img not installed (apt install qemu-utils)");
            return;
        }
        let c = CLUSTER;
        // Sizes are whole 512-byte sectors, as every filesystem image is: QEMU's block
        // layer counts sectors, so it would compare a ragged tail against padding.
        /// (offset, length, byte) runs written into the raw file.
        type Fills<'a> = &'a [(u64, u64, u8)];
        let cases: &[(&str, u64, Fills)] = &[
            ("empty", 8 * MIB, &[]),
            ("all allocated", 4 * MIB, &[(0, 4 * MIB, 0xa5)]),
            (
                "sparse",
                64 * MIB,
                &[(0, 4096, 1), (3 * c + 7, 100, 2), (40 * MIB, 2 * MIB, 3)],
            ),
            (
                "not a multiple of the cluster",
                3 * c + 4096 + 512,
                &[(0, 10, 1), (3 * c + 4000, 100, 9)],
            ),
            ("tail only", 10 * MIB + 1536, &[(10 * MIB + 1000, 536, 7)]),
            ("zeros written", 2 * MIB, &[(c, 3 * c, 0)]),
            (
                "> 4 GiB, few clusters",
                (6 << 30) + 12800,
                &[(0, 1, 1), (4 << 30, c, 2), ((6 << 30) + 12000, 345, 3)],
            ),
            (
                "two L2 spans",
                2 << 30,
                &[(512 * MIB - 10, 20, 4), (1536 * MIB, 1, 5)],
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (name, size, fills) in cases {
            let raw = dir.path().join("raw.img");
            let q = dir.path().join("out.qcow2");
            raw_file(&raw, *size, fills);
            let conv = convert(&raw, &q, &|| false).unwrap();
            let bytes = std::fs::read(&q).unwrap();
            assert_eq!(bytes.len() as u64, conv.layout.file_len(), "{name}");
            assert_eq!(
                conv.sha256,
                crate::testkit::sha256_hex(&bytes),
                "{name}: the hash is the file's"
            );
            crate::testkit::assert_qcow2_clean(&q, name);
            crate::testkit::assert_qcow2_equals_raw(&q, &raw, name);
            let back = dir.path().join("back.raw");
            crate::testkit::qcow2_to_raw(&q, &back, name);
            assert_eq!(std::fs::metadata(&back).unwrap().len(), *size, "{name}");
            // No larger than the data rounded out to clusters, plus the tables.
            let f = File::open(&raw).unwrap();
            let rounded: u64 = Layout::new(*size, &data_extents(&f, *size).unwrap())
                .runs()
                .iter()
                .map(|(s, e)| (e - s) * CLUSTER)
                .sum();
            assert_eq!(
                conv.layout.file_len(),
                rounded + conv.layout.table_bytes(),
                "{name}"
            );
            // Reproducible.
            let again = dir.path().join("again.qcow2");
            assert_eq!(
                convert(&raw, &again, &|| false).unwrap().sha256,
                conv.sha256,
                "{name}"
            );
            // In place: the same file, byte for byte, where the host filesystem can move
            // extents (ext4 and xfs); else the raw file is left as it was.
            let before = std::fs::read(&raw).unwrap();
            match convert_in_place(&raw, &|| false).unwrap() {
                Some(c) => {
                    assert_eq!(c.sha256, conv.sha256, "{name}: in place");
                    assert_eq!(std::fs::read(&raw).unwrap(), bytes, "{name}: in place");
                    let (a, b) = (File::open(&raw).unwrap(), File::open(&q).unwrap());
                    let alloc = |f: &File| -> u64 {
                        let n = f.metadata().unwrap().len();
                        data_extents(f, n).unwrap().iter().map(|(s, e)| e - s).sum()
                    };
                    assert!(
                        alloc(&a) <= alloc(&b),
                        "{name}: in place holds no more data"
                    );
                }
                None => {
                    eprintln!("{name}: this filesystem cannot convert in place");
                    assert_eq!(std::fs::read(&raw).unwrap(), before, "{name}: untouched");
                }
            }
        }
    }

    /// On a filesystem that cannot move extents (tmpfs), the raw file is left as it was and
    /// the caller copies instead.
    #[test]
    fn in_place_declines_where_extents_cannot_move() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("SKIP: no /dev/shm");
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        assert!(!moves_extents(dir.path()));
        let raw = dir.path().join("raw.img");
        raw_file(&raw, 4 * MIB, &[(0, 4096, 1), (2 * MIB, 4096, 2)]);
        let before = std::fs::read(&raw).unwrap();
        assert!(convert_in_place(&raw, &|| false).unwrap().is_none());
        assert_eq!(std::fs::read(&raw).unwrap(), before);
        // Where the tests run (ext4 or xfs under /tmp in CI) it can.
        let here = tempfile::tempdir().unwrap();
        eprintln!(
            "moves extents under {}: {}",
            here.path().display(),
            moves_extents(here.path())
        );
    }

    #[test]
    fn a_stop_request_interrupts() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw.img");
        raw_file(&raw, 4 * MIB, &[(0, 4 * MIB, 1)]);
        let e = convert(&raw, &dir.path().join("q"), &|| true).unwrap_err();
        assert!(matches!(e, Qcow2Error::Interrupted), "{e}");
    }
}
