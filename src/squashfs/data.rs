//! File data: duplicate detection, tail packing into fragments, and the compression pool.
//!
//! The plan ([`plan`]) is made from sizes alone (and, for files whose size another file
//! shares, a sha256 of the contents): which files are written (the first of each set of
//! identical ones), how many blocks each has, and which fragment block and offset holds each
//! tail. Then [`write`] streams it: one reader thread reads the blocks in plan order into a
//! fixed set of buffers, `threads` workers compress them, and the calling thread writes the
//! results in plan order, whatever order they finish in. The bytes written are thus the same
//! for any thread count, and the buffers in circulation bound the memory used.
//!
//! With a [`BlockCache`], a worker first looks its block up by content and settings, and
//! compresses (and keeps the result) only on a miss: the bytes written are the same either
//! way. So that a changed file disturbs few fragment blocks, a fragment block is also closed
//! before the tail of an *anchor* file (one whose path hashes to 0 modulo
//! [`FRAGMENT_ANCHOR`]): a tail that grows or shrinks shifts the packing only up to the next
//! anchor, and every fragment block after it holds the same bytes as before (and is found in
//! the cache). The cost is one partly filled fragment block per anchor, a few more fragment
//! blocks in all.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use sha2::{Digest, Sha256};

use super::cache::{BlockCache, Entry};
use super::compress::{Codec, Compressor};
use super::tables::DATA_RAW;
use super::{Out, SquashError};
use crate::tree::{NodeId, Tree};

/// One regular file to write, in write order.
pub struct PlannedFile {
    pub node: NodeId,
    pub size: u64,
    /// Index (in the plan) of an earlier file with the same contents, whose data this one
    /// shares.
    pub dup_of: Option<usize>,
    /// Data blocks (not counting the tail in a fragment).
    pub blocks: u64,
    /// The fragment block and offset of the tail, when it is in one.
    pub tail: Option<(u32, u32)>,
}

pub struct Plan {
    pub files: Vec<PlannedFile>,
    pub fragments: u32,
}

/// Where a file's data went.
#[derive(Clone, Debug, Default)]
pub struct Placed {
    pub blocks_start: u64,
    /// Size word of each block (0: all zeros, not stored).
    pub blocks: Vec<u32>,
    /// Bytes in all-zero blocks.
    pub sparse: u64,
}

/// What [`write`] measured.
#[derive(Clone, Debug, Default)]
pub struct DataStats {
    pub blocks: u64,
    pub sparse_blocks: u64,
    pub raw_blocks: u64,
    /// Data and fragment blocks taken from the block cache.
    pub reused: u64,
    /// Data and fragment blocks compressed (not sparse, not in the cache).
    pub compressed: u64,
    /// Time the workers spent hashing blocks and reading and writing the cache, summed
    /// over workers.
    pub cache_time: std::time::Duration,
    /// Time the workers spent compressing, summed over workers.
    pub compress_time: std::time::Duration,
}

/// One file in this many (by the hash of its path) starts a new fragment block, so that a
/// change to one file's tail moves the tails of the files after it only up to the next
/// anchor. About 40 tails fill a block in a Debian image, so a run is a few blocks.
pub const FRAGMENT_ANCHOR: u32 = 128;

/// Whether the tail of the file at `path` starts a fragment block.
fn is_anchor(path: &str) -> bool {
    let h = Sha256::digest(path.as_bytes());
    u32::from_le_bytes([h[0], h[1], h[2], h[3]]) % FRAGMENT_ANCHOR == 0
}

/// sha256 of a file's contents, read in 1 MiB pieces.
fn content_hash(tree: &Tree, node: NodeId, size: u64) -> Result<[u8; 32], SquashError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; (1 << 20).min(size as usize)];
    let mut at = 0;
    while at < size {
        let n = ((size - at) as usize).min(buf.len());
        read(tree, node, at, &mut buf[..n])?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize().into())
}

fn read(tree: &Tree, node: NodeId, at: u64, buf: &mut [u8]) -> Result<(), SquashError> {
    tree.read_at(node, at, buf)
        .map_err(|e| SquashError::Read {
            path: tree.path_of(node),
            source: e,
        })
        .map(|_| ())
}

/// Plan the data of `files` (node and size, in write order).
pub fn plan(
    tree: &Tree,
    files: &[(NodeId, u64)],
    block_size: u32,
    dedup: bool,
    always_fragments: bool,
    threads: usize,
) -> Result<Plan, SquashError> {
    let bs = u64::from(block_size);
    let mut dup_of = vec![None; files.len()];
    if dedup {
        // Only files whose size another file shares can be duplicates: hash just those.
        let mut by_size: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, (_, size)) in files.iter().enumerate() {
            if *size > 0 {
                by_size.entry(*size).or_default().push(i);
            }
        }
        let mut cands: Vec<usize> = by_size
            .into_values()
            .filter(|g| g.len() > 1)
            .flatten()
            .collect();
        cands.sort_unstable();
        let hashes = hash_all(tree, files, &cands, threads)?;
        // Equal (size, hash) next to each other, each group in file order: the first of a
        // group is the original of the others. (A map keyed by (size, hash) would cost some
        // 100 bytes a file at a million files; this costs 4.)
        let mut order: Vec<u32> = (0..cands.len() as u32).collect();
        order.sort_by(|&a, &b| {
            let key = |k: u32| (files[cands[k as usize]].1, &hashes[k as usize]);
            key(a).cmp(&key(b))
        });
        for group in order.chunk_by(|&a, &b| {
            files[cands[a as usize]].1 == files[cands[b as usize]].1
                && hashes[a as usize] == hashes[b as usize]
        }) {
            let original = cands[group[0] as usize];
            for &k in &group[1..] {
                dup_of[cands[k as usize]] = Some(original);
            }
        }
    }
    let mut out = Vec::with_capacity(files.len());
    let mut frag: Option<(u32, u32)> = None; // current fragment index and fill
    let mut fragments = 0u32;
    for (i, (node, size)) in files.iter().enumerate() {
        let tail_len = if *size < bs {
            *size
        } else if always_fragments {
            size % bs
        } else {
            0
        };
        let (blocks, tail) = if dup_of[i].is_some() {
            (0, None) // taken from the original below
        } else if tail_len > 0 {
            let t = tail_len as u32;
            let (idx, fill) = match frag {
                Some((idx, fill))
                    if fill + t <= block_size && !(fill > 0 && is_anchor(&tree.path_of(*node))) =>
                {
                    (idx, fill)
                }
                _ => {
                    fragments += 1;
                    (fragments - 1, 0)
                }
            };
            frag = Some((idx, fill + t));
            (size / bs, Some((idx, fill)))
        } else {
            (size.div_ceil(bs), None)
        };
        out.push(PlannedFile {
            node: *node,
            size: *size,
            dup_of: dup_of[i],
            blocks,
            tail,
        });
    }
    for i in 0..out.len() {
        if let Some(o) = out[i].dup_of {
            out[i].blocks = out[o].blocks;
            out[i].tail = out[o].tail;
        }
    }
    Ok(Plan {
        files: out,
        fragments,
    })
}

/// Content hashes of `files[i]` for each `i` in `which`, on `threads` threads.
fn hash_all(
    tree: &Tree,
    files: &[(NodeId, u64)],
    which: &[usize],
    threads: usize,
) -> Result<Vec<[u8; 32]>, SquashError> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<[u8; 32]>>> = Mutex::new(vec![None; which.len()]);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Result<(), SquashError> {
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = which.get(k) else {
                            return Ok(());
                        };
                        super::check_interrupt()?;
                        let h = content_hash(tree, files[i].0, files[i].1)?;
                        lock(&results)[k] = Some(h);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| panicked("hashing file contents"))??;
        }
        Ok(())
    })?;
    let results = results.into_inner().map_err(|_| panicked("hashing"))?;
    Ok(results.into_iter().map(|h| h.unwrap_or_default()).collect())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn panicked(what: &str) -> SquashError {
    SquashError::Internal(format!("a thread {what} panicked"))
}

/// What a buffer holds.
#[derive(Clone, Copy)]
enum What {
    /// Block `block` of planned file `file`.
    Block { file: usize },
    /// A fragment block.
    Fragment,
}

struct Job {
    seq: u64,
    what: What,
    data: Vec<u8>,
}

enum Stored {
    /// All zeros: not written.
    Sparse,
    /// Written as is (`Job::data`).
    Raw,
    /// Written compressed.
    Packed(Vec<u8>),
}

struct Done {
    seq: u64,
    what: What,
    data: Vec<u8>,
    stored: Stored,
    /// Taken from the block cache.
    reused: bool,
}

/// What a worker measured.
#[derive(Default)]
struct WorkerTimes {
    cache: std::time::Duration,
    compress: std::time::Duration,
}

/// What [`write`] wrote.
pub struct Written {
    /// Where each planned file's data went (indexed like `plan.files`; duplicates share
    /// their original's).
    pub placed: Vec<Placed>,
    /// The fragment table: position and size word of each fragment block.
    pub frags: Vec<(u64, u32)>,
    pub stats: DataStats,
}

/// Stream the planned data to `out`, calling `progress` with the uncompressed bytes placed
/// so far (files stored once; duplicates add nothing).
pub fn write(
    tree: &Tree,
    plan: &Plan,
    codec: &Codec,
    cache: Option<&BlockCache>,
    threads: usize,
    out: &mut Out,
    progress: &dyn Fn(u64),
) -> Result<Written, SquashError> {
    let bs = codec.block_size as usize;
    let threads = threads.max(1);
    // Buffers in circulation: enough to keep every worker busy while the writer waits for
    // the oldest block.
    let buffers = threads * 4;
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..buffers {
        let _ = spare_tx.send(Vec::with_capacity(bs));
    }
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(threads);
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<std::io::Result<Done>>();

    let mut placed = vec![Placed::default(); plan.files.len()];
    let mut frags: Vec<(u64, u32)> = Vec::with_capacity(plan.fragments as usize);
    let mut stats = DataStats::default();

    std::thread::scope(|s| {
        let reader = s.spawn(move || read_jobs(tree, plan, bs, spare_rx, job_tx));
        let mut workers = Vec::new();
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let job_rx = &job_rx;
            let mut c = codec.start();
            workers.push(s.spawn(move || compress_jobs(&mut c, cache, job_rx, done_tx)));
        }
        drop(done_tx);

        let mut r = (|| -> Result<(), SquashError> {
            let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
            let mut next = 0u64;
            let mut placed_bytes = 0u64;
            for done in done_rx.iter() {
                let done = done.map_err(|source| SquashError::Compress { source })?;
                pending.insert(done.seq, done);
                while let Some(d) = pending.remove(&next) {
                    next += 1;
                    match (&d.stored, d.reused) {
                        (Stored::Sparse, _) => {}
                        (_, true) => stats.reused += 1,
                        (_, false) => stats.compressed += 1,
                    }
                    let len = d.data.len() as u32;
                    placed_bytes += u64::from(len);
                    progress(placed_bytes);
                    let at = out.pos();
                    let word = match &d.stored {
                        Stored::Sparse => 0,
                        Stored::Raw => {
                            out.bytes(&d.data)?;
                            stats.raw_blocks += 1;
                            len | DATA_RAW
                        }
                        Stored::Packed(z) => {
                            out.bytes(z)?;
                            z.len() as u32
                        }
                    };
                    match d.what {
                        What::Block { file } => {
                            let p = &mut placed[file];
                            if p.blocks.is_empty() {
                                p.blocks_start = at;
                            }
                            p.blocks.push(word);
                            stats.blocks += 1;
                            if word == 0 {
                                p.sparse += u64::from(len);
                                stats.sparse_blocks += 1;
                            }
                        }
                        What::Fragment => frags.push((at, word)),
                    }
                    let _ = spare_tx.send(d.data);
                }
            }
            Ok(())
        })();
        // Stop the reader and workers (if the writer failed) by closing their channels.
        drop(done_rx);
        drop(spare_tx);
        let read = reader.join().map_err(|_| panicked("reading file data"));
        for w in workers {
            match w.join() {
                Ok(t) => {
                    stats.cache_time += t.cache;
                    stats.compress_time += t.compress;
                }
                Err(_) if r.is_ok() => r = Err(panicked("compressing")),
                Err(_) => {}
            }
        }
        // The reader's error explains a writer that stopped early for want of results.
        read??;
        r
    })?;
    let expected: u64 = plan
        .files
        .iter()
        .filter(|f| f.dup_of.is_none())
        .map(|f| f.blocks)
        .sum::<u64>()
        + u64::from(plan.fragments);
    if stats.blocks + frags.len() as u64 != expected {
        return Err(SquashError::Internal(format!(
            "{} data and fragment blocks written, {expected} planned",
            stats.blocks + frags.len() as u64
        )));
    }
    for i in 0..placed.len() {
        if let Some(o) = plan.files[i].dup_of {
            placed[i] = placed[o].clone();
        }
    }
    Ok(Written {
        placed,
        frags,
        stats,
    })
}

/// The reader: every block in plan order, then each fragment block once its last tail is in.
fn read_jobs(
    tree: &Tree,
    plan: &Plan,
    bs: usize,
    spare: mpsc::Receiver<Vec<u8>>,
    jobs: mpsc::SyncSender<Job>,
) -> Result<(), SquashError> {
    let mut seq = 0u64;
    // A closed channel means the writer stopped; it reports why.
    let stopped = || SquashError::Internal("the writer stopped".into());
    let mut send = |what: What, data: Vec<u8>| -> Result<(), SquashError> {
        jobs.send(Job { seq, what, data }).map_err(|_| stopped())?;
        seq += 1;
        Ok(())
    };
    let mut frag: Option<(u32, Vec<u8>)> = None;
    for (i, f) in plan.files.iter().enumerate() {
        if f.dup_of.is_some() {
            continue;
        }
        super::check_interrupt()?;
        for b in 0..f.blocks {
            let at = b * bs as u64;
            let len = (f.size - at).min(bs as u64) as usize;
            let mut buf = spare.recv().map_err(|_| stopped())?;
            buf.resize(len, 0);
            read(tree, f.node, at, &mut buf)?;
            send(What::Block { file: i }, buf)?;
        }
        if let Some((idx, offset)) = f.tail {
            if frag.as_ref().is_some_and(|(cur, _)| *cur != idx) {
                if let Some((_, full)) = frag.take() {
                    send(What::Fragment, full)?;
                }
            }
            let (_, buf) = match &mut frag {
                Some(cur) => cur,
                None => {
                    let mut b = spare.recv().map_err(|_| stopped())?;
                    b.clear();
                    frag.insert((idx, b))
                }
            };
            debug_assert_eq!(buf.len(), offset as usize);
            let at = f.blocks * bs as u64;
            let len = (f.size - at) as usize;
            let start = buf.len();
            buf.resize(start + len, 0);
            read(tree, f.node, at, &mut buf[start..])?;
        }
    }
    if let Some((_, last)) = frag {
        send(What::Fragment, last)?;
    }
    Ok(())
}

/// A block's worth of zeros (the largest block size), to spot blocks not worth storing.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// A worker: compress jobs until the reader is done (looking each up in `cache` first).
fn compress_jobs(
    c: &mut Compressor,
    cache: Option<&BlockCache>,
    jobs: &Mutex<mpsc::Receiver<Job>>,
    done: mpsc::Sender<std::io::Result<Done>>,
) -> WorkerTimes {
    let mut times = WorkerTimes::default();
    loop {
        let job = match lock(jobs).recv() {
            Ok(j) => j,
            Err(_) => return times,
        };
        let zeros =
            matches!(job.what, What::Block { .. }) && job.data[..] == ZEROS[..job.data.len()];
        let mut reused = false;
        let stored = if zeros {
            Ok(Stored::Sparse)
        } else {
            let t = std::time::Instant::now();
            let key = cache.map(|k| (k, k.key(&job.data)));
            let hit = key.and_then(|(k, key)| k.get(&key, job.data.len()));
            times.cache += t.elapsed();
            match hit {
                Some(Entry::Raw) => {
                    reused = true;
                    Ok(Stored::Raw)
                }
                Some(Entry::Packed(z)) => {
                    reused = true;
                    Ok(Stored::Packed(z))
                }
                None => {
                    let t = std::time::Instant::now();
                    let z = c.compress(&job.data);
                    times.compress += t.elapsed();
                    let t = std::time::Instant::now();
                    if let (Ok(z), Some((k, key))) = (&z, key) {
                        k.put(&key, z.as_deref());
                    }
                    times.cache += t.elapsed();
                    z.map(|z| z.map_or(Stored::Raw, Stored::Packed))
                }
            }
        };
        let msg = stored.map(|stored| Done {
            seq: job.seq,
            what: job.what,
            data: job.data,
            stored,
            reused,
        });
        if done.send(msg).is_err() {
            return times;
        }
    }
}
