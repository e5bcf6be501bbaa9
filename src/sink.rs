//! The image stream the native writers (ext4, EROFS) fill front to back: buffered `pwrite`s,
//! a second thread hashing the image in file order, long runs of zeros left as holes, and
//! the same stream either written raw, surveyed (where its data lies, nothing written or
//! read), or written as qcow2 through [`qcow2::Mapper`] from the layout that survey gave.
//! Images of [`DIRECT_MIN`] and more go to the disk with `O_DIRECT` ([`Direct`]): a third
//! thread writes them in large aligned batches, past the page cache.
//!
//! A writer describes its image once, as a function of a [`Sink`] that it calls with bytes,
//! zeros and file contents in image order; [`stream`] runs that function for the target it
//! is given. A qcow2 image is two runs of the same function: a survey for the allocation
//! map, then the write.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::digest::{Piece, PieceHasher};
use crate::qcow2;
use crate::sys::{AlignedBuf, DirectFile, DIRECT_ALIGN};

/// Errors of the image stream, for the writers to wrap in their own.
#[derive(Debug, Error)]
pub enum SinkError {
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {} back to hash it: {source}", path.display())]
    ReadBack {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("the image's hashing thread stopped")]
    HasherStopped,
    #[error("the image's writing thread stopped")]
    WriterStopped,
    #[error("bytes at {pos} of the image are outside the data clusters its qcow2 layout planned")]
    Unmapped { pos: u64 },
}

/// What a stream produces.
pub enum Target<'a> {
    /// The image itself. `dense`: write zeros instead of leaving holes (the file holds old
    /// contents that could not be punched out).
    Raw { dense: bool },
    /// Nothing written, hashed or read: only where the data lies.
    Survey,
    /// A qcow2 file laid out from an earlier survey of the same stream.
    Qcow2(&'a qcow2::Layout),
}

enum Mode<'a> {
    Raw,
    Survey(Vec<(u64, u64)>),
    Qcow2(qcow2::Mapper<'a>),
}

/// What [`stream`] returns beside the body's result.
#[derive(Debug, Default)]
pub struct Streamed {
    /// sha256 (hex) of the file written; `None` for a survey.
    pub sha256: Option<String>,
    /// A survey's data ranges `[start, end)` in image order, merged; empty otherwise.
    pub extents: Vec<(u64, u64)>,
    /// Bytes of zeros left as holes.
    pub holes: u64,
    /// Written with `O_DIRECT` (see [`DIRECT_MIN`]).
    pub direct: bool,
}

/// Bytes gathered before each `pwrite`: one piece for the hashing thread
/// ([`crate::digest::PIECE`], which says why it is small).
pub const CHUNK: usize = crate::digest::PIECE;
/// Runs of zeros at least this long become holes (shorter ones are written).
const HOLE_MIN: u64 = 64 * 1024;

/// The writers' side of the stream.
pub struct Sink<'a> {
    mode: Mode<'a>,
    file: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    /// Image offset of `buf[0]`.
    pos: u64,
    /// Zeros after `buf`, not yet written or left as a hole.
    zeros: u64,
    tx: Option<mpsc::SyncSender<Piece>>,
    spare: mpsc::Receiver<Vec<u8>>,
    holes: u64,
    dense: bool,
    /// File content bytes read so far, for `progress`.
    content: u64,
    progress: &'a dyn Fn(u64),
    /// Time spent waiting for the hashing thread.
    waited: Duration,
    stop: &'a (dyn Fn() -> bool + Sync),
    /// Where the data goes when the image is written with `O_DIRECT`.
    direct: Option<Direct>,
}

/// Run `body` over a [`Sink`] that writes `file` (at `path`, for messages) as `target` says.
/// `progress` is told the file content bytes read so far; `stop` is polled at every write.
/// A qcow2 file starts with its tables; the rest of its last cluster is hashed at the end.
pub fn stream<E: From<SinkError>>(
    file: &File,
    path: &Path,
    target: Target<'_>,
    progress: &dyn Fn(u64),
    stop: &(dyn Fn() -> bool + Sync),
    body: impl FnOnce(&mut Sink<'_>) -> Result<(), E>,
) -> Result<Streamed, E> {
    stream_direct_from(file, path, target, progress, stop, DIRECT_MIN, body)
}

/// [`stream`], with `O_DIRECT` from images of `direct_min` bytes (tests use 0).
fn stream_direct_from<E: From<SinkError>>(
    file: &File,
    path: &Path,
    target: Target<'_>,
    progress: &dyn Fn(u64),
    stop: &(dyn Fn() -> bool + Sync),
    direct_min: u64,
    body: impl FnOnce(&mut Sink<'_>) -> Result<(), E>,
) -> Result<Streamed, E> {
    let (tx, rx) = mpsc::sync_channel::<Piece>(crate::digest::QUEUE);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    let (mode, dense, hashed) = match &target {
        Target::Raw { dense } => (Mode::Raw, *dense, true),
        Target::Survey => (Mode::Survey(Vec::new()), false, false),
        Target::Qcow2(q) => (Mode::Qcow2(qcow2::Mapper::new(q)), false, true),
    };
    // Writing a multi-GB image through the page cache costs a copy of every byte into
    // freshly allocated cache pages (here, on a VM whose free memory goes back to the host,
    // 1.2-4 ms of system time per MiB instead of 0.25 ms), evicts the layer cache the next
    // build reads, and still waits for the disk at the final flush.
    let direct_file = match target {
        Target::Survey => None,
        _ if file.metadata().map_or(0, |m| m.len()) < direct_min => None,
        _ => match DirectFile::open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(
                    "{}: no direct I/O ({e}), writing through the page cache",
                    path.display()
                );
                None
            }
        },
    };
    let (batch_tx, batch_rx) = mpsc::sync_channel::<Batch>(1);
    let (done_tx, done_rx) = mpsc::channel::<AlignedBuf>();
    std::thread::scope(|s| {
        let direct = direct_file.is_some();
        let writer = direct_file
            .map(|direct| s.spawn(move || write_batches(file, direct, batch_rx, done_tx)));
        let hasher = hashed.then(|| {
            s.spawn(move || {
                let mut h = PieceHasher::new();
                let mut busy = Duration::ZERO;
                for piece in rx {
                    let t = Instant::now();
                    if let Some(buf) = h.update(piece) {
                        let _ = back_tx.send(buf);
                    }
                    busy += t.elapsed();
                }
                tracing::debug!(target: "fledge::timing", "hashing busy for {:.1} ms", busy.as_secs_f64() * 1e3);
                h.finish()
            })
        });
        let mut sink = Sink {
            mode,
            file,
            path,
            buf: Vec::with_capacity(CHUNK),
            pos: 0,
            zeros: 0,
            tx: hashed.then_some(tx),
            spare: back_rx,
            holes: 0,
            dense,
            content: 0,
            progress,
            waited: Duration::ZERO,
            stop,
            direct: writer.is_some().then(|| Direct {
                buf: AlignedBuf::new(DIRECT_BATCH),
                at: 0,
                len: 0,
                made: 1,
                tx: batch_tx,
                done: done_rx,
            }),
        };
        let r = match &target {
            Target::Qcow2(q) => {
                let meta = q.metadata();
                file.write_all_at(&meta, 0)
                    .map_err(|source| SinkError::Write {
                        path: path.to_path_buf(),
                        source,
                    })
                    .and_then(|()| sink.send(Piece::Data(meta)))
                    .map_err(E::from)
            }
            _ => Ok(()),
        };
        let r = r.and_then(|()| body(&mut sink));
        let r = r.and_then(|()| sink.finish().map_err(E::from));
        if hashed {
            tracing::debug!(target: "fledge::timing", "writer waited {:.1} ms for the hasher", sink.waited.as_secs_f64() * 1e3);
        }
        let holes = sink.holes;
        let extents = match std::mem::replace(&mut sink.mode, Mode::Raw) {
            Mode::Survey(ext) => ext,
            _ => Vec::new(),
        };
        drop(sink);
        // The direct writer's own error is the cause when the stream stopped because it did.
        if let Some(w) = writer {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    return Err(E::from(SinkError::Write {
                        path: path.to_path_buf(),
                        source,
                    }))
                }
                Err(_) => return Err(E::from(SinkError::WriterStopped)),
            }
        }
        let sha256 = match hasher {
            Some(h) => Some(h.join().map_err(|_| E::from(SinkError::HasherStopped))?),
            None => None,
        };
        if direct {
            tracing::debug!(target: "fledge::timing", "image written with O_DIRECT");
        }
        r.map(|()| Streamed {
            sha256,
            extents,
            holes,
            direct,
        })
    })
}

/// Run `body` twice over `file`: a survey of where its data lies, then the qcow2 file laid
/// out from it (a virtual disk of `virtual_size` bytes; `file` is sized for it). Returns the
/// layout with what the second run streamed.
pub fn stream_qcow2<E: From<SinkError>>(
    file: &File,
    path: &Path,
    virtual_size: u64,
    progress: &dyn Fn(u64),
    stop: &(dyn Fn() -> bool + Sync),
    body: impl Fn(&mut Sink<'_>) -> Result<(), E>,
) -> Result<(qcow2::Layout, Streamed), E> {
    let survey = stream(file, path, Target::Survey, &|_| {}, stop, &body)?;
    let layout = qcow2::Layout::new(virtual_size, &survey.extents);
    file.set_len(layout.file_len())
        .map_err(|source| SinkError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    let streamed = stream(file, path, Target::Qcow2(&layout), progress, stop, &body)?;
    Ok((layout, streamed))
}

impl Sink<'_> {
    /// Image offset of the next byte.
    pub fn at(&self) -> u64 {
        self.pos + self.buf.len() as u64 + self.zeros
    }

    /// Is this a survey (contents are not read, only where they go)?
    pub fn surveying(&self) -> bool {
        matches!(self.mode, Mode::Survey(_))
    }

    /// `data`, next in the image.
    pub fn bytes(&mut self, mut data: &[u8]) -> Result<(), SinkError> {
        self.settle()?;
        while !data.is_empty() {
            let n = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == CHUNK {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// `n` zero bytes next in the image: a hole when they add up to a long run.
    pub fn zeros(&mut self, n: u64) {
        self.zeros += n;
    }

    /// Zeros up to the next multiple of `align`.
    pub fn pad(&mut self, align: u64) {
        let at = self.at();
        self.zeros(at.next_multiple_of(align) - at);
    }

    /// `len` bytes of file contents, read by `read(offset, buf)` (offsets from 0 to `len`,
    /// in order) straight into the write buffer. With `zero_blocks`, blocks of that size
    /// that are all zeros become holes (the contents start block-aligned in the image). A
    /// survey reads nothing.
    pub fn contents<E: From<SinkError>>(
        &mut self,
        len: u64,
        zero_blocks: Option<usize>,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut done = 0u64;
        while done < len {
            // Zeros pending from the last chunk's trailing zero blocks (or from before the
            // contents) come before the bytes read next. Where zero blocks are looked for,
            // those bytes are sorted after them (so a zero run across chunks stays one run,
            // one hole); elsewhere the zeros are settled first.
            if zero_blocks.is_none() || self.surveying() {
                self.settle()?;
            }
            let pending = self.zeros > 0;
            let at = self.buf.len();
            let n = ((CHUNK - at) as u64).min(len - done) as usize;
            self.buf.resize(at + n, 0);
            if !self.surveying() {
                read(done, &mut self.buf[at..at + n])?;
                self.content += n as u64;
                if let Some(bs) = zero_blocks {
                    self.holes_for_zero_blocks(at, bs, pending)?;
                }
            }
            done += n as u64;
            if self.buf.len() == CHUNK {
                self.flush()?;
            }
        }
        if !self.surveying() {
            (self.progress)(self.content);
        }
        Ok(())
    }

    /// The blocks of `bs` bytes in `buf[from..]` that are all zeros become pending zeros, the
    /// others follow them in order. Rare in images, so the common case only checks; with
    /// zeros `pending` (to come before `buf[from..]`) the bytes are always sorted in after
    /// them.
    fn holes_for_zero_blocks(
        &mut self,
        from: usize,
        bs: usize,
        pending: bool,
    ) -> Result<(), SinkError> {
        if !pending && !self.buf[from..].chunks(bs).any(is_zero) {
            return Ok(());
        }
        let read = self.buf.split_off(from);
        for b in read.chunks(bs) {
            if is_zero(b) {
                self.zeros(b.len() as u64);
            } else {
                self.bytes(b)?;
            }
        }
        Ok(())
    }

    /// Bytes `from..to` of the image that are already in `src` at those offsets (written
    /// there earlier, as the EROFS writer does with compressed data): hashed as they are
    /// when `src` is the raw file this stream writes, else copied into the stream.
    pub fn existing(&mut self, src: &File, from: u64, to: u64) -> Result<(), SinkError> {
        self.settle()?;
        self.flush()?;
        if self.at() != from {
            return Err(SinkError::Unmapped { pos: from });
        }
        let own = matches!(self.mode, Mode::Raw) && same_file(src, self.file);
        let mut at = from;
        while at < to {
            if (self.stop)() {
                return Err(SinkError::Interrupted);
            }
            let n = ((to - at) as usize).min(CHUNK);
            if self.surveying() {
                self.buf.resize(n, 0);
                self.flush()?;
                at += n as u64;
                continue;
            }
            let mut buf = self
                .spare
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
            buf.resize(n, 0);
            src.read_exact_at(&mut buf, at)
                .map_err(|source| SinkError::ReadBack {
                    path: self.path.to_path_buf(),
                    source,
                })?;
            if own {
                self.pos += n as u64;
                self.send(Piece::Data(buf))?;
            } else {
                self.buf = buf;
                self.flush()?;
            }
            at += n as u64;
        }
        Ok(())
    }

    /// Write out the pending zeros: a hole when long, else bytes.
    fn settle(&mut self) -> Result<(), SinkError> {
        let n = std::mem::take(&mut self.zeros);
        if n == 0 {
            return Ok(());
        }
        if n >= HOLE_MIN && !self.dense {
            self.flush()?;
            let at = self.pos;
            self.pos += n;
            let hashed = match &mut self.mode {
                Mode::Raw => {
                    self.holes += n;
                    n
                }
                Mode::Survey(_) => 0,
                // Zeros inside allocated clusters are in the file (as holes) and hashed.
                Mode::Qcow2(m) => m.allocated_in(at, n),
            };
            return match hashed {
                0 => Ok(()),
                n => self.send(Piece::Zeros(n)),
            };
        }
        let mut left = n;
        while left > 0 {
            let k = ((CHUNK - self.buf.len()) as u64).min(left) as usize;
            self.buf.resize(self.buf.len() + k, 0);
            left -= k as u64;
            if self.buf.len() == CHUNK {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if (self.stop)() {
            return Err(SinkError::Interrupted);
        }
        let len = self.buf.len() as u64;
        let at = match &mut self.mode {
            Mode::Survey(ext) => {
                match ext.last_mut() {
                    Some(last) if last.1 == self.pos => last.1 += len,
                    _ => ext.push((self.pos, self.pos + len)),
                }
                self.pos += len;
                self.buf.clear();
                return Ok(());
            }
            Mode::Raw => self.pos,
            Mode::Qcow2(m) => m
                .data_at(self.pos, len)
                .ok_or(SinkError::Unmapped { pos: self.pos })?,
        };
        match &mut self.direct {
            Some(d) => d.write(self.file, &self.buf, at),
            None => self.file.write_all_at(&self.buf, at),
        }
        .map_err(|source| SinkError::Write {
            path: self.path.to_path_buf(),
            source,
        })?;
        self.pos += len;
        let next = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        let full = std::mem::replace(&mut self.buf, next);
        self.buf.clear();
        self.send(Piece::Data(full))
    }

    fn send(&mut self, p: Piece) -> Result<(), SinkError> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let t = Instant::now();
        let r = tx.send(p);
        self.waited += t.elapsed();
        r.map_err(|_| SinkError::HasherStopped)
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        self.settle()?;
        self.flush()?;
        if let Some(d) = &mut self.direct {
            d.submit().map_err(|source| SinkError::Write {
                path: self.path.to_path_buf(),
                source,
            })?;
        }
        // The rest of the last cluster, when the disk ends inside an allocated one.
        let pad = match &mut self.mode {
            Mode::Qcow2(m) => m.tail_padding(),
            _ => 0,
        };
        match pad {
            0 => Ok(()),
            pad => self.send(Piece::Zeros(pad)),
        }
    }
}

/// Images at least this large are written with `O_DIRECT` (smaller ones are done before
/// the page cache's first writeback would matter, and tests read them back at once).
pub const DIRECT_MIN: u64 = 64 << 20;
/// Bytes per direct write: one request this large keeps this machine's disk at its
/// sequential rate (`dd oflag=direct`: 1.3 GB/s with 1 MiB, 1.5 GB/s with 4 MiB writes).
const DIRECT_BATCH: usize = 4 << 20;
/// Batches in use at most: one filling, one queued, one being written.
const DIRECT_BATCHES: usize = 3;

/// A batch for the direct writer: its image offset, buffer and length.
type Batch = (u64, AlignedBuf, usize);

/// The stream's side of direct writing: whole aligned blocks gather in a batch that the
/// writing thread ([`write_batches`]) writes in one request; the bytes of a partial block
/// (where data starts or ends off a block boundary) are written through the page cache
/// right away. A block is so written one way only, so the two never overlap.
struct Direct {
    buf: AlignedBuf,
    /// Image offset of `buf[0]`.
    at: u64,
    /// Bytes gathered in `buf`.
    len: usize,
    /// Batches allocated so far.
    made: usize,
    tx: mpsc::SyncSender<Batch>,
    done: mpsc::Receiver<AlignedBuf>,
}

impl Direct {
    /// `data` at `at` in `file`.
    fn write(&mut self, file: &File, data: &[u8], at: u64) -> std::io::Result<()> {
        let align = DIRECT_ALIGN as u64;
        let end = at + data.len() as u64;
        let first = at.next_multiple_of(align).min(end);
        let last = (end / align * align).max(first);
        if first > at {
            file.write_all_at(&data[..(first - at) as usize], at)?;
        }
        let mut pos = first;
        let mut mid = &data[(first - at) as usize..(last - at) as usize];
        while !mid.is_empty() {
            if self.len > 0 && self.at + self.len as u64 != pos {
                self.submit()?;
            }
            if self.len == 0 {
                self.at = pos;
            }
            let n = (self.buf.len() - self.len).min(mid.len());
            self.buf.as_bytes_mut()[self.len..self.len + n].copy_from_slice(&mid[..n]);
            self.len += n;
            pos += n as u64;
            mid = &mid[n..];
            if self.len == self.buf.len() {
                self.submit()?;
            }
        }
        if end > last {
            file.write_all_at(&data[(last - at) as usize..], last)?;
        }
        Ok(())
    }

    /// Hand the gathered batch to the writing thread and start an empty one.
    fn submit(&mut self) -> std::io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let stopped = || std::io::Error::other("the image's writing thread stopped");
        let next = if self.made < DIRECT_BATCHES {
            self.made += 1;
            AlignedBuf::new(DIRECT_BATCH)
        } else {
            // Blocks until a batch is written: memory stays at DIRECT_BATCHES batches.
            self.done.recv().map_err(|_| stopped())?
        };
        let full = std::mem::replace(&mut self.buf, next);
        self.tx
            .send((self.at, full, self.len))
            .map_err(|_| stopped())?;
        self.len = 0;
        Ok(())
    }
}

/// The direct writer's thread: each batch written with one `pwrite` on `direct` (the image
/// opened with `O_DIRECT`), its buffer handed back. Where the filesystem refuses a direct
/// write (`EINVAL`), that batch and the rest go through `file`, the page cache. Stops at
/// the first error, which the stream then reports.
fn write_batches(
    file: &File,
    mut direct: DirectFile,
    batches: mpsc::Receiver<Batch>,
    done: mpsc::Sender<AlignedBuf>,
) -> std::io::Result<()> {
    for (at, buf, len) in batches {
        direct.write_batch(file, &buf.as_bytes()[..len], at)?;
        // The stream may be done already; then the buffer is simply dropped.
        let _ = done.send(buf);
    }
    Ok(())
}

/// Are `a` and `b` the same open file (device and inode)?
fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Are all bytes of `b` zero?
pub fn is_zero(b: &[u8]) -> bool {
    let (words, rest) = b.split_at(b.len() / 8 * 8);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && rest.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> bool {
        false
    }

    /// `body` streamed as the raw image `f` (at `path`), never stopped.
    fn raw_stream(
        f: &File,
        path: &Path,
        body: impl FnOnce(&mut Sink<'_>) -> Result<(), SinkError>,
    ) -> Result<Streamed, SinkError> {
        stream(f, path, Target::Raw { dense: false }, &|_| {}, &never, body)
    }

    /// One image description: bytes, short and long zero runs, contents with zero blocks.
    fn describe(s: &mut Sink<'_>) -> Result<(), SinkError> {
        s.bytes(b"head")?;
        s.zeros(100);
        s.bytes(&[1u8; 5000])?;
        s.zeros(3 * CHUNK as u64);
        s.pad(4096);
        let mut file = vec![7u8; 4096 * 40];
        file[4096 * 3..4096 * 20].fill(0);
        s.contents::<SinkError>(file.len() as u64, Some(4096), |off, b| {
            b.copy_from_slice(&file[off as usize..off as usize + b.len()]);
            Ok(())
        })?;
        s.zeros(1 << 20);
        Ok(())
    }

    fn expected() -> Vec<u8> {
        let mut v = b"head".to_vec();
        v.resize(104, 0);
        v.extend_from_slice(&[1u8; 5000]);
        v.resize(v.len() + 3 * CHUNK, 0);
        v.resize(v.len().next_multiple_of(4096), 0);
        let mut file = vec![7u8; 4096 * 40];
        file[4096 * 3..4096 * 20].fill(0);
        v.extend_from_slice(&file);
        v.resize(v.len() + (1 << 20), 0);
        v
    }

    /// Direct writes give the same file and hash as buffered ones: data starting and ending
    /// off block boundaries, holes, short zero runs, and contents longer than a batch.
    #[test]
    fn direct_and_buffered_streams_agree() {
        fn body(s: &mut Sink<'_>) -> Result<(), SinkError> {
            describe(s)?;
            s.bytes(&[3u8; 777])?;
            let big: Vec<u8> = (0..DIRECT_BATCH + 12345).map(|i| (i % 251) as u8).collect();
            s.contents::<SinkError>(big.len() as u64, None, |off, b| {
                b.copy_from_slice(&big[off as usize..off as usize + b.len()]);
                Ok(())
            })?;
            s.zeros(200_000);
            s.bytes(b"tail")?;
            s.zeros(10);
            Ok(())
        }
        let d = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for (name, direct_min) in [("buffered", u64::MAX), ("direct", 0)] {
            let path = d.path().join(name);
            let f = File::create(&path).unwrap();
            let len = expected().len() + 777 + DIRECT_BATCH + 12345 + 200_000 + 4 + 10;
            f.set_len(len as u64).unwrap();
            let target = Target::Raw { dense: false };
            let r =
                stream_direct_from(&f, &path, target, &|_| {}, &never, direct_min, body).unwrap();
            if name == "direct" && !r.direct {
                eprintln!(
                    "SKIP direct_and_buffered_streams_agree: no O_DIRECT in {}",
                    d.path().display()
                );
                return;
            }
            assert_eq!(r.direct, name == "direct");
            files.push((std::fs::read(&path).unwrap(), r.sha256.unwrap(), r.holes));
        }
        let (buffered, direct) = (&files[0], &files[1]);
        assert!(buffered.0 == direct.0, "the files differ");
        assert_eq!(buffered.1, direct.1);
        assert_eq!(buffered.1, crate::testkit::sha256_hex(&direct.0));
        assert_eq!(buffered.2, direct.2);
        assert!(direct.0.len() > DIRECT_BATCH);
    }

    #[test]
    fn raw_survey_and_qcow2_streams_agree() {
        let d = tempfile::tempdir().unwrap();
        let want = expected();
        let want_sha = crate::testkit::sha256_hex(&want);

        let raw = d.path().join("raw");
        let f = File::create(&raw).unwrap();
        f.set_len(want.len() as u64).unwrap();
        let r = raw_stream(&f, &raw, describe).unwrap();
        assert_eq!(std::fs::read(&raw).unwrap(), want);
        assert_eq!(r.sha256.as_deref(), Some(want_sha.as_str()));
        // The long runs are holes: 3 chunks with the padding after them (5104 bytes came
        // before, so 3088 to the next 4 KiB), the 17 zero blocks, the last MiB.
        assert_eq!(r.holes, 3 * CHUNK as u64 + 3088 + 17 * 4096 + (1 << 20));
        let survey =
            stream::<SinkError>(&f, &raw, Target::Survey, &|_| {}, &never, describe).unwrap();
        assert!(survey.sha256.is_none());
        assert_eq!(survey.extents.first(), Some(&(0, 5104)));
        for &(s, e) in &survey.extents {
            assert!(s < e && e <= want.len() as u64);
        }

        let q = qcow2::Layout::new(want.len() as u64, &survey.extents);
        let qpath = d.path().join("q.qcow2");
        let qf = File::create(&qpath).unwrap();
        qf.set_len(q.file_len()).unwrap();
        let r =
            stream::<SinkError>(&qf, &qpath, Target::Qcow2(&q), &|_| {}, &never, describe).unwrap();
        let bytes = std::fs::read(&qpath).unwrap();
        assert_eq!(r.sha256, Some(crate::testkit::sha256_hex(&bytes)));
        // Every data byte sits where the layout maps it.
        let mut m = qcow2::Mapper::new(&q);
        for &(s, e) in &survey.extents {
            let host = m.data_at(s, e - s).unwrap() as usize;
            assert_eq!(
                &bytes[host..host + (e - s) as usize],
                &want[s as usize..e as usize]
            );
        }
    }

    /// Zero blocks wherever the contents cross a write-buffer boundary, after prefixes that
    /// leave the buffer at different fills: the bytes must land exactly where they belong.
    #[test]
    fn zero_blocks_at_buffer_boundaries() {
        let d = tempfile::tempdir().unwrap();
        let bs = 4096usize;
        for prefix in [0usize, 1, 4096, 100_000, CHUNK - 4096, CHUNK - 1] {
            for zero_run in [1usize, 16, 17, 70] {
                let mut file = vec![0u8; 3 * CHUNK + 5000];
                for (i, b) in file.iter_mut().enumerate() {
                    *b = (i % 251) as u8 | 1;
                }
                // Zero runs ending at and starting after each buffer boundary the contents
                // can meet, whatever the prefix.
                let start = prefix.next_multiple_of(bs);
                for k in 1..=3 {
                    let boundary = (k * CHUNK).saturating_sub(start) / bs * bs;
                    for at in [boundary.saturating_sub(zero_run * bs), boundary] {
                        let end = (at + zero_run * bs).min(file.len());
                        file[at..end].fill(0);
                    }
                }
                let mut want = vec![9u8; prefix];
                want.resize(start, 0);
                want.extend_from_slice(&file);
                let path = d.path().join("img");
                let f = File::create(&path).unwrap();
                f.set_len(want.len() as u64).unwrap();
                raw_stream(&f, &path, |s| {
                    s.bytes(&vec![9u8; prefix])?;
                    s.pad(bs as u64);
                    s.contents::<SinkError>(file.len() as u64, Some(bs), |off, b| {
                        b.copy_from_slice(&file[off as usize..off as usize + b.len()]);
                        Ok(())
                    })
                })
                .unwrap();
                assert!(
                    std::fs::read(&path).unwrap() == want,
                    "prefix {prefix}, zero runs of {zero_run} blocks"
                );
            }
        }
    }

    /// A zero run inside contents that crosses several write chunks is one hole, whatever
    /// the chunk boundaries: none of it is written as bytes.
    #[test]
    fn a_long_zero_run_in_contents_is_one_hole() {
        let d = tempfile::tempdir().unwrap();
        let bs = 4096usize;
        for prefix in [0usize, 4096, CHUNK / 2 + 4096, CHUNK - 4096] {
            let run = 5 * CHUNK + 3 * bs;
            let mut file = vec![3u8; bs];
            file.resize(bs + run, 0);
            file.extend_from_slice(&[4u8; 4096]);
            let mut want = vec![9u8; prefix];
            want.extend_from_slice(&file);
            let path = d.path().join("img");
            let f = File::create(&path).unwrap();
            f.set_len(want.len() as u64).unwrap();
            let r = raw_stream(&f, &path, |s| {
                s.bytes(&vec![9u8; prefix])?;
                s.contents::<SinkError>(file.len() as u64, Some(bs), |off, b| {
                    b.copy_from_slice(&file[off as usize..off as usize + b.len()]);
                    Ok(())
                })
            })
            .unwrap();
            assert_eq!(r.holes, run as u64, "prefix {prefix}");
            assert!(std::fs::read(&path).unwrap() == want, "prefix {prefix}");
            assert_eq!(r.sha256, Some(crate::testkit::sha256_hex(&want)));
        }
    }

    #[test]
    fn existing_bytes_are_hashed_or_copied() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("img");
        let f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(8192).unwrap();
        f.write_all_at(&[9u8; 4096], 4096).unwrap();
        let r = raw_stream(&f, &path, |s| {
            s.bytes(&[5u8; 4096])?;
            s.existing(&f, 4096, 8192)
        })
        .unwrap();
        let mut want = vec![5u8; 4096];
        want.extend_from_slice(&[9u8; 4096]);
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(r.sha256, Some(crate::testkit::sha256_hex(&want)));

        // Copied from another file into a second one.
        let copy = d.path().join("copy");
        let c = File::create(&copy).unwrap();
        c.set_len(8192).unwrap();
        let r = raw_stream(&c, &copy, |s| {
            s.bytes(&[5u8; 4096])?;
            s.existing(&f, 4096, 8192)
        })
        .unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), want);
        assert_eq!(r.sha256, Some(crate::testkit::sha256_hex(&want)));
        // `existing` only continues the stream where it is.
        let e = raw_stream(&c, &copy, |s| s.existing(&f, 4096, 8192)).unwrap_err();
        assert!(matches!(e, SinkError::Unmapped { pos: 4096 }));
    }

    #[test]
    fn interrupted_and_dense() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("img");
        let f = File::create(&path).unwrap();
        let e = stream::<SinkError>(
            &f,
            &path,
            Target::Raw { dense: false },
            &|_| {},
            &|| true,
            |s| s.bytes(&[1u8; 10]),
        )
        .unwrap_err();
        assert!(matches!(e, SinkError::Interrupted));
        // Dense: long zero runs are written, not left as holes.
        let r = stream::<SinkError>(
            &f,
            &path,
            Target::Raw { dense: true },
            &|_| {},
            &never,
            |s| {
                s.zeros(1 << 20);
                s.bytes(b"x")
            },
        )
        .unwrap();
        assert_eq!(r.holes, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), (1 << 20) + 1);
    }
}
