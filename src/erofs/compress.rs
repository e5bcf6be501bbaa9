//! LZ4 and LZ4HC file data (`z_erofs`): every regular file the plan marks compressed is cut
//! into extents, each filling exactly one 4 KiB physical cluster (liblz4's "compress as
//! much as fits" mode), and indexed per 4 KiB logical cluster by a full index.
//!
//! Files are split into units of [`UNIT`] bytes (each unit's extents end at its end, so a
//! unit compresses independently of the others); `threads` workers compress units, and the
//! calling thread writes the results in unit order whatever order they finish in, giving
//! each physical cluster the next block. The bytes are thus the same for any thread count
//! or timing, and the units in flight (a few per worker) bound the memory used. (The
//! squashfs writer's pipeline has a reader thread, fragments and fixed-size blocks of its
//! own; what both share is this ordering idea, not code that fits both.)
//!
//! An extent is stored compressed when that saves space: when more than a block of input
//! fits in its block. Otherwise it is one block stored as is (a `PLAIN` logical cluster),
//! as mkfs.erofs does, so incompressible data costs only its index (8 bytes a block).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use super::format::{self, Layout, BLOCK};
use super::layout::Plan;
use super::{read, ErofsError};
use crate::sys::Lz4DestSize;
use crate::tree::{NodeId, NodeKind, Tree};

/// Input bytes of one work unit, and so the most one extent holds (a block of LZ4 holds at
/// most about 1 MiB of zeros; 256 logical clusters stay far below the 2048 a full index's
/// back distance may count).
pub const UNIT: usize = 1 << 20;

/// Which compressor: liblz4's fast mode, or LZ4HC at a level (1 to 12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Lz4,
    Lz4hc(u32),
}

impl Codec {
    fn start(self) -> Lz4DestSize {
        match self {
            Codec::Lz4 => Lz4DestSize::fast(),
            Codec::Lz4hc(level) => Lz4DestSize::hc(level),
        }
    }
}

/// One extent: its first byte in the file, whether stored as is, its physical block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub raw: bool,
    pub block: u32,
}

/// What a compressed inode's record needs: its blocks and its full index.
#[derive(Clone, Debug, Default)]
pub struct Compressed {
    pub blocks: u32,
    pub index: Vec<u8>,
}

/// What [`write`] did.
pub struct Written {
    /// By inode index (`None`: not compressed).
    pub inodes: Vec<Option<Compressed>>,
    /// The block after the last one written.
    pub end: u64,
    pub raw_blocks: u64,
    pub packed_blocks: u64,
}

struct Unit {
    inode: usize,
    at: u64,
    len: usize,
    last: bool,
}

/// Compress `data` (the file's bytes from `base`; `last`: up to its end) into whole blocks
/// appended to `out`, one extent per block (`block` relative to the unit's first).
pub fn compress_unit(
    c: &mut Lz4DestSize,
    data: &[u8],
    base: u64,
    out: &mut Vec<u8>,
    extents: &mut Vec<Extent>,
) {
    let mut z = vec![0u8; BLOCK];
    let mut pos = 0usize;
    while pos < data.len() {
        let rest = &data[pos..];
        let start = base + pos as u64;
        let ofs = (start % BLOCK as u64) as usize;
        let (took, wrote) = c.compress(rest, &mut z);
        // The file's last bytes, stored as is, would cross into another logical cluster
        // from an unaligned start: the kernel takes such a plain extent to be longer than
        // its block (corrupt). They are compressed if they fit, else split at the boundary.
        let spans = rest.len() <= BLOCK && ofs + rest.len() > BLOCK;
        let block = (out.len() / BLOCK) as u32;
        if took > BLOCK || (spans && took == rest.len()) {
            // Zero padding first, the LZ4 data ending at the block's end (0padding).
            out.resize(out.len() + BLOCK - wrote, 0);
            out.extend_from_slice(&z[..wrote]);
            extents.push(Extent {
                start,
                raw: false,
                block,
            });
            pos += took;
        } else {
            let n = if spans {
                BLOCK - ofs
            } else {
                rest.len().min(BLOCK)
            };
            out.extend_from_slice(&rest[..n]);
            out.resize(out.len() + BLOCK - n, 0);
            extents.push(Extent {
                start,
                raw: true,
                block,
            });
            pos += n;
        }
    }
}

/// The full index of a file of `size` bytes made of `extents` (in order, the first at 0):
/// one entry per logical cluster, a head where an extent starts, else the distances back
/// to the head and on to the next one (or past the end).
pub fn full_index(size: u64, extents: &[Extent]) -> Vec<u8> {
    let bs = BLOCK as u64;
    let n = size.div_ceil(bs);
    let mut out = Vec::with_capacity(8 * n as usize);
    let mut e = 0usize; // the extent whose head is at or before lcluster j
    for j in 0..n {
        while e + 1 < extents.len() && extents[e + 1].start / bs <= j {
            e += 1;
        }
        let x = extents[e];
        if x.start / bs == j {
            let kind = if x.raw {
                format::LCLUSTER_PLAIN
            } else {
                format::LCLUSTER_HEAD
            };
            format::zindex_entry(&mut out, kind, (x.start % bs) as u16, x.block);
        } else {
            let next = extents.get(e + 1).map_or(n, |y| y.start / bs);
            let back = (j - x.start / bs) as u32;
            let on = (next - j) as u32;
            format::zindex_entry(&mut out, format::LCLUSTER_NONHEAD, 0, back | (on << 16));
        }
    }
    out
}

/// Files up to this size are compressed once before the plan ([`probe`]), to keep flat
/// those that compression would not make smaller; larger ones are always compressed (the
/// most an incompressible one loses is its tail's block).
pub const PROBE_MAX: u64 = 128 * 1024;

/// Which regular files of more than a block and at most [`PROBE_MAX`] bytes stay flat
/// (by node id): those that compressed (blocks and index) would take no fewer bytes than
/// flat (whole blocks and the tail inline, when it leaves room for an inode and some
/// xattrs), as mkfs.erofs keeps uncompressed the files compression does not shrink. The
/// result does not depend on the thread count.
pub fn probe(tree: &Tree, codec: Codec, threads: usize) -> Result<Vec<bool>, ErofsError> {
    let bs = BLOCK as u64;
    let files: Vec<(NodeId, u64)> = (0..tree.nodes.len() as NodeId)
        .filter_map(|id| {
            let n = tree.node(id);
            let size = n.size();
            (matches!(n.kind, NodeKind::File { .. }) && size > bs && size <= PROBE_MAX)
                .then_some((id, size))
        })
        .collect();
    let flat = Mutex::new(vec![false; tree.nodes.len()]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Result<(), ErofsError> {
                    let mut c = codec.start();
                    let (mut input, mut out, mut ext) = (Vec::new(), Vec::new(), Vec::new());
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(&(id, size)) = files.get(i) else {
                            return Ok(());
                        };
                        super::check_interrupt()?;
                        input.resize(size as usize, 0);
                        read(tree, id, 0, &mut input)?;
                        out.clear();
                        ext.clear();
                        compress_unit(&mut c, &input, 0, &mut out, &mut ext);
                        // Bytes each way: the blocks and the index, or the blocks and
                        // the inline tail (a whole block when it would not fit inline).
                        let tail = size % bs;
                        let flat_bytes = size / bs * bs + if tail > bs - 256 { bs } else { tail };
                        let z_bytes = ext.len() as u64 * bs + 24 + 8 * size.div_ceil(bs);
                        if z_bytes >= flat_bytes {
                            lock(&flat)[id as usize] = true;
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| ErofsError::Internal("a compressing thread panicked".into()))??;
        }
        Ok::<(), ErofsError>(())
    })?;
    Ok(flat.into_inner().unwrap_or_else(|p| p.into_inner()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Compress every planned compressed file into `file` from block `first`, on `threads`
/// workers, in plan order.
pub fn write(
    tree: &Tree,
    plan: &Plan,
    codec: Codec,
    threads: usize,
    file: &File,
    path: &Path,
    first: u64,
) -> Result<Written, ErofsError> {
    let mut units = Vec::new();
    for (i, p) in plan.inodes.iter().enumerate() {
        if p.layout != Layout::CompressedFull {
            continue;
        }
        let mut at = 0u64;
        while at < p.size {
            let len = (p.size - at).min(UNIT as u64) as usize;
            units.push(Unit {
                inode: i,
                at,
                len,
                last: at + len as u64 == p.size,
            });
            at += len as u64;
        }
    }
    let threads = threads.max(1);
    let window = threads * 4;
    let next = AtomicUsize::new(0);
    let sunk = (Mutex::new(0usize), Condvar::new());
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(usize, Result<(Vec<u8>, Vec<Extent>), ErofsError>)>();

    let mut extents: Vec<Vec<Extent>> = vec![Vec::new(); plan.inodes.len()];
    let mut block = first;
    let mut raw_blocks = 0u64;
    let mut packed_blocks = 0u64;
    let mut buf: Vec<u8> = Vec::with_capacity(super::CHUNK);
    let mut buf_at = first * BLOCK as u64;
    let werr = |source| ErofsError::Write {
        path: path.to_path_buf(),
        source,
    };

    std::thread::scope(|s| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (units, next, sunk, stop) = (&units, &next, &sunk, &stop);
            s.spawn(move || {
                let mut c = codec.start();
                let mut input = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= units.len() {
                        return;
                    }
                    {
                        let mut g = lock(&sunk.0);
                        while !stop.load(Ordering::SeqCst) && i >= *g + window {
                            g = sunk.1.wait(g).unwrap_or_else(|p| p.into_inner());
                        }
                    }
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let u = &units[i];
                    let r = super::check_interrupt().and_then(|()| {
                        input.resize(u.len, 0);
                        read(tree, plan.inodes[u.inode].node, u.at, &mut input)?;
                        let mut out = Vec::with_capacity(u.len.min(UNIT) / 2 + BLOCK);
                        let mut ext = Vec::new();
                        compress_unit(&mut c, &input, u.at, &mut out, &mut ext);
                        debug_assert!(u.last || (u.at + u.len as u64) % BLOCK as u64 == 0);
                        Ok((out, ext))
                    });
                    let failed = r.is_err();
                    if tx.send((i, r)).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let r = (|| -> Result<(), ErofsError> {
            let mut pending = BTreeMap::new();
            let mut want = 0usize;
            for (i, r) in rx.iter() {
                pending.insert(i, r);
                while let Some(r) = pending.remove(&want) {
                    let (out, ext) = r?;
                    let u = &units[want];
                    for x in ext {
                        if x.raw {
                            raw_blocks += 1;
                        } else {
                            packed_blocks += 1;
                        }
                        let b = u32::try_from(block + u64::from(x.block))
                            .map_err(|_| ErofsError::TooLarge)?;
                        extents[u.inode].push(Extent { block: b, ..x });
                    }
                    block += (out.len() / BLOCK) as u64;
                    buf.extend_from_slice(&out);
                    if buf.len() >= super::CHUNK {
                        file.write_all_at(&buf, buf_at).map_err(werr)?;
                        buf_at += buf.len() as u64;
                        buf.clear();
                    }
                    want += 1;
                    *lock(&sunk.0) = want;
                    sunk.1.notify_all();
                }
            }
            file.write_all_at(&buf, buf_at).map_err(werr)?;
            if want != units.len() {
                return Err(ErofsError::Internal(format!(
                    "{want} of {} compression units written",
                    units.len()
                )));
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        {
            let _g = lock(&sunk.0);
            sunk.1.notify_all();
        }
        r
    })?;
    if block > u64::from(u32::MAX) {
        return Err(ErofsError::TooLarge);
    }
    let inodes = plan
        .inodes
        .iter()
        .zip(&extents)
        .map(|(p, ext)| {
            (p.layout == Layout::CompressedFull).then(|| Compressed {
                blocks: ext.len() as u32,
                index: full_index(p.size, ext),
            })
        })
        .collect();
    Ok(Written {
        inodes,
        end: block,
        raw_blocks,
        packed_blocks,
    })
}
