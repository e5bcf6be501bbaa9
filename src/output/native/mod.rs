//! The native ext4 backend: writes the ext4 image directly from the merged tree, in block
//! order, and hashes it as it goes. No loop device, no mount, no FUSE, no external tool: it
//! runs anywhere, as any user, and the image's sha256 comes for free with the write.
//!
//! [`layout`] decides every block up front (inode numbers in depth-first name order,
//! metadata packed at the start as `flex_bg` allows, directories, then file data in inode
//! order, contiguous). [`format`] encodes the structures with their `metadata_csum`
//! checksums. [`build`] then streams the image: metadata from memory, file contents from the
//! layer cache, free space as holes. A second thread hashes each chunk while the next is read.
//!
//! With `image_format = "qcow2"` the same stream goes into a qcow2 file instead
//! ([`crate::qcow2`]): a first pass over the layout, reading nothing, records which byte
//! ranges the stream writes as data and which it leaves as holes; from that map the qcow2
//! tables are computed, written and hashed first, and the second pass writes each data
//! chunk at its packed place in the file. One read of the contents, one write, one hash, in
//! file order.
//!
//! The result is an ordinary ext4 filesystem (the features of a default `mkfs.ext4` on
//! Debian 12 without `resize_inode`), fsck-clean, with a clean empty journal.

pub mod csum;
mod format;
mod htree;
mod layout;
#[cfg(test)]
mod tests;
mod xattr;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use super::job::{Identity, Job, Writer, Written};
use super::size::SizePlan;
use super::{BuildError, BuildReport, Piece, PieceHasher};
use crate::config::ImageFormat;
use crate::qcow2;
use crate::tree::Tree;
use format::BLOCK;
use layout::{Fill, Layout};

/// Errors of the native ext4 writer.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("{path}: {source}")]
    Xattr {
        path: String,
        #[source]
        source: xattr::XattrError,
    },
    #[error("directory inode {ino}: {source}")]
    Directory {
        ino: u32,
        #[source]
        source: htree::HtreeError,
    },
    #[error("{path} is a symlink with an empty target, which ext4 cannot hold")]
    EmptySymlink { path: String },
    #[error("{path} has {links} hard links; ext4 allows at most 65000")]
    TooManyLinks { path: String, links: u32 },
    #[error("inode {ino} needs more than 1360 extents")]
    Fragmented { ino: u32 },
    /// Internal: the trial size was too small (retried with a larger one).
    #[error("the planned filesystem is too small for the tree")]
    Full,
    /// Internal: the trial size leaves `blocks` too few free (retried with a larger one).
    #[error("the planned filesystem is {blocks} blocks short of the free space asked for")]
    Short { blocks: u64 },
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
}

/// fledge's own ext4 writer: the image laid out from the tree, written once in block order
/// and hashed as it is written.
pub struct NativeExt4Writer;

impl Writer for NativeExt4Writer {
    fn write(
        &self,
        job: &Job<'_>,
        sw: &mut crate::timing::Stopwatch,
    ) -> Result<Written, BuildError> {
        build(
            job.tree,
            job.plan,
            job.image,
            job.identity,
            job.settings.image_format,
            sw,
            job.progress,
        )
    }
}

/// Write `tree` as an ext4 image to `image` (replacing its contents), raw or as qcow2,
/// and hash it.
pub fn build(
    tree: &Tree,
    plan: &SizePlan,
    image: &Path,
    identity: &Identity,
    format: ImageFormat,
    sw: &mut crate::timing::Stopwatch,
    progress: &dyn Fn(u64),
) -> Result<Written, BuildError> {
    let layout = layout::plan(
        tree,
        plan.inodes,
        plan.buffer_bytes,
        identity.uuid,
        identity.hash_seed,
        identity.epoch,
    )?;
    sw.mark("ext4 layout planned");
    let werr = |e| {
        BuildError::Native(NativeError::Write {
            path: image.to_path_buf(),
            source: e,
        })
    };
    let file = File::options().write(true).open(image).map_err(werr)?;
    let len = layout.geo.blocks * BLOCK as u64;
    let sha256 = match format {
        ImageFormat::Raw => {
            // Only ever grown or cut here, never truncated to zero first: ext4
            // (auto_da_alloc) flushes a file that was truncated to zero and rewritten when
            // it is closed.
            file.set_len(len).map_err(werr)?;
            let sum = emit(tree, &layout, &file, image, progress, None)?;
            sw.mark("image written and hashed");
            sum
        }
        ImageFormat::Qcow2 => {
            let extents = survey(tree, &layout, &file, image)?;
            let q = qcow2::Layout::new(len, &extents);
            sw.mark("qcow2 layout planned");
            file.set_len(q.file_len()).map_err(werr)?;
            let sum = emit(tree, &layout, &file, image, progress, Some(&q))?;
            sw.mark("qcow2 image written and hashed");
            sum
        }
    };
    let free = layout.counts.free_blocks;
    let info = super::e2fsprogs::SuperInfo {
        block_count: layout.geo.blocks,
        free_blocks: free,
        reserved_blocks: 0,
        block_size: BLOCK as u64,
    };
    let stats = tree.stats();
    Ok(Written {
        report: BuildReport {
            entries: stats.inodes,
            bytes: stats.file_bytes,
            free_bytes: Some(info.user_free_bytes()),
            resizes: 0,
            blocks: None,
        },
        sha256: Some(sha256),
        format,
    })
}

/// Where [`Out`]'s stream goes.
enum Mode<'a> {
    /// A raw image: image offset = file offset.
    Raw,
    /// A dry run: records the byte ranges written as data (merged), writes and hashes
    /// nothing, reads no file contents.
    Survey(Vec<(u64, u64)>),
    /// A qcow2 image laid out from the survey: data goes to its packed place, and the zeros
    /// that fall in allocated clusters are hashed (they are in the file, as holes).
    Qcow2(qcow2::Mapper<'a>),
}

/// The image writer: buffers consecutive bytes, writes them with `pwrite`, passes them to
/// the hashing thread, and turns long zero runs into holes.
struct Out<'a> {
    mode: Mode<'a>,
    file: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    /// Image offset of `buf[0]`.
    pos: u64,
    tx: mpsc::SyncSender<Piece>,
    spare: mpsc::Receiver<Vec<u8>>,
    written: u64,
    progress: &'a dyn Fn(u64),
    /// Time spent waiting for the hashing thread.
    waited: std::time::Duration,
}

const CHUNK: usize = 1 << 18;

impl Out<'_> {
    fn flush(&mut self) -> Result<(), BuildError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        super::check_interrupt()?;
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
                .ok_or_else(|| BuildError::Unexpected {
                    what: "writing the qcow2 image".into(),
                    detail: format!("bytes at {} were not in the surveyed data ranges", self.pos),
                })?,
        };
        self.file
            .write_all_at(&self.buf, at)
            .map_err(|e| NativeError::Write {
                path: self.path.to_path_buf(),
                source: e,
            })?;
        self.pos += self.buf.len() as u64;
        let next = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        let full = std::mem::replace(&mut self.buf, next);
        self.buf.clear();
        self.send(Piece::Data(full))?;
        (self.progress)(self.written);
        Ok(())
    }

    fn send(&mut self, p: Piece) -> Result<(), BuildError> {
        let t = std::time::Instant::now();
        let r = self.tx.send(p);
        self.waited += t.elapsed();
        r.map_err(|_| BuildError::Unexpected {
            what: "hashing the image".into(),
            detail: "the hashing thread stopped".into(),
        })
    }

    fn bytes(&mut self, mut data: &[u8]) -> Result<(), BuildError> {
        while !data.is_empty() {
            let room = CHUNK - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == CHUNK {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// `n` zero bytes: a hole when long, else written.
    fn zeros(&mut self, n: u64) -> Result<(), BuildError> {
        if n < 64 * 1024 {
            let end = self.buf.len() + n as usize;
            if end <= CHUNK {
                self.buf.resize(end, 0);
                if self.buf.len() == CHUNK {
                    self.flush()?;
                }
                return Ok(());
            }
        }
        self.flush()?;
        let at = self.pos;
        self.pos += n;
        let hashed = match &mut self.mode {
            Mode::Raw => n,
            Mode::Survey(_) => 0,
            Mode::Qcow2(m) => m.allocated_in(at, n),
        };
        if hashed == 0 {
            return Ok(());
        }
        self.send(Piece::Zeros(hashed))
    }

    /// `len` bytes of `node`'s contents from `offset`, read straight into the buffer.
    fn file(
        &mut self,
        tree: &Tree,
        node: crate::tree::NodeId,
        mut offset: u64,
        mut len: u64,
    ) -> Result<(), BuildError> {
        while len > 0 {
            let at = self.buf.len();
            let n = ((CHUNK - at) as u64).min(len) as usize;
            self.buf.resize(at + n, 0);
            if matches!(self.mode, Mode::Survey(_)) {
                // Only where the bytes go matters in a survey, not what they are.
                offset += n as u64;
                len -= n as u64;
                if self.buf.len() == CHUNK {
                    self.flush()?;
                }
                continue;
            }
            // Tree::read_at fills the whole range or fails (data ending early is an error).
            tree.read_at(node, offset, &mut self.buf[at..at + n])
                .map_err(|e| match &tree.node(node).kind {
                    // A mapped host file that changed or vanished since it was planned.
                    crate::tree::NodeKind::File {
                        content: crate::tree::Content::HostFile(host),
                        ..
                    } => BuildError::HostFile {
                        path: host.clone(),
                        source: e,
                    },
                    _ => BuildError::Native(NativeError::Read {
                        path: layout::path_of(tree, node),
                        source: e,
                    }),
                })?;
            self.written += n as u64;
            offset += n as u64;
            len -= n as u64;
            if self.buf.len() == CHUNK {
                self.flush()?;
            }
        }
        Ok(())
    }
}

/// The byte ranges the image stream writes as data (the rest are holes), without reading
/// any file contents: the allocation map of the qcow2 image.
fn survey(
    tree: &Tree,
    l: &Layout,
    file: &File,
    path: &Path,
) -> Result<Vec<(u64, u64)>, BuildError> {
    let (tx, _rx) = mpsc::sync_channel::<Piece>(1);
    let (_back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    let mut out = Out {
        mode: Mode::Survey(Vec::new()),
        file,
        path,
        buf: Vec::with_capacity(CHUNK),
        pos: 0,
        tx,
        spare: back_rx,
        written: 0,
        progress: &|_| {},
        waited: std::time::Duration::ZERO,
    };
    write_runs(tree, l, &mut out)?;
    out.flush()?;
    match out.mode {
        Mode::Survey(ext) => Ok(ext),
        _ => unreachable!("the survey's mode does not change"),
    }
}

/// Stream the image in block order, raw or (with its layout) into a qcow2 file; returns its
/// sha256 (hex).
fn emit(
    tree: &Tree,
    l: &Layout,
    file: &File,
    path: &Path,
    progress: &dyn Fn(u64),
    qcow: Option<&qcow2::Layout>,
) -> Result<String, BuildError> {
    let (tx, rx) = mpsc::sync_channel::<Piece>(8);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let hasher = s.spawn(move || {
            let mut h = PieceHasher::new();
            let mut busy = std::time::Duration::ZERO;
            for piece in rx {
                let t = std::time::Instant::now();
                if let Some(buf) = h.update(piece) {
                    let _ = back_tx.send(buf);
                }
                busy += t.elapsed();
            }
            tracing::debug!(target: "fledge::timing", "hashing busy for {:.1} ms", busy.as_secs_f64() * 1e3);
            h.finish()
        });
        let mode = match qcow {
            None => Mode::Raw,
            Some(q) => Mode::Qcow2(qcow2::Mapper::new(q)),
        };
        let mut out = Out {
            mode,
            file,
            path,
            buf: Vec::with_capacity(CHUNK),
            pos: 0,
            tx,
            spare: back_rx,
            written: 0,
            progress,
            waited: std::time::Duration::ZERO,
        };
        // A qcow2 file starts with its tables, computed from the survey.
        let r = match qcow {
            None => Ok(()),
            Some(q) => {
                let meta = q.metadata();
                file.write_all_at(&meta, 0)
                    .map_err(|e| {
                        BuildError::Native(NativeError::Write {
                            path: path.to_path_buf(),
                            source: e,
                        })
                    })
                    .and_then(|()| out.send(Piece::Data(meta)))
            }
        };
        let r = r.and_then(|()| write_runs(tree, l, &mut out));
        let r = r.and_then(|()| out.flush());
        // The rest of the last cluster, when the disk ends inside an allocated one.
        let pad = match &mut out.mode {
            Mode::Qcow2(m) => m.tail_padding(),
            _ => 0,
        };
        let r = r.and_then(|()| match pad {
            0 => Ok(()),
            pad => out.send(Piece::Zeros(pad)),
        });
        tracing::debug!(target: "fledge::timing", "writer waited {:.1} ms for the hasher", out.waited.as_secs_f64() * 1e3);
        drop(out);
        let sum = hasher.join().map_err(|_| BuildError::Unexpected {
            what: "hashing the image".into(),
            detail: "the hashing thread panicked".into(),
        })?;
        r.map(|()| sum)
    })
}

fn write_runs(tree: &Tree, l: &Layout, out: &mut Out) -> Result<(), BuildError> {
    let bs = BLOCK as u64;
    let mut at = 0u64; // next block to write
    let gdt = {
        let mut g = Vec::with_capacity(l.geo.gdt_blocks as usize * BLOCK);
        for (i, d) in l.groups.iter().enumerate() {
            g.extend_from_slice(&format::group_desc(&l.geo, i as u32, d));
        }
        g.resize(l.geo.gdt_blocks as usize * BLOCK, 0);
        g
    };
    let ipg = l.geo.inodes_per_group as usize;
    for run in &l.runs {
        if run.start > at {
            out.zeros((run.start - at) * bs)?;
        }
        let bytes = run.blocks * bs;
        match &run.fill {
            Fill::Super { group } => {
                let sb = format::superblock(&l.geo, &l.counts, *group as u16);
                let mut b = vec![0u8; BLOCK];
                let off = if *group == 0 { 1024 } else { 0 };
                b[off..off + 1024].copy_from_slice(&sb);
                out.bytes(&b)?;
                out.bytes(&gdt)?;
            }
            Fill::BlockBitmap { group } => out.bytes(&l.block_bitmaps[*group as usize])?,
            Fill::InodeBitmap { group } => out.bytes(&l.inode_bitmaps[*group as usize])?,
            Fill::InodeTable { group } => {
                let first = *group as usize * ipg;
                let inode = |j: usize| l.inode((first + j + 1) as u32);
                let used = (0..ipg)
                    .rposition(|j| inode(j).is_some())
                    .map_or(0, |j| j + 1);
                for j in 0..used {
                    match inode(j) {
                        Some(f) => out.bytes(&format::inode(&l.geo, (first + j + 1) as u32, f))?,
                        None => out.zeros(format::INODE_SIZE as u64)?,
                    }
                }
                out.zeros(bytes - (used * format::INODE_SIZE) as u64)?;
            }
            Fill::Bytes(b) => {
                out.bytes(b)?;
                out.zeros(bytes - b.len() as u64)?;
            }
            Fill::File { node, offset, len } => {
                out.file(tree, *node, *offset, *len)?;
                out.zeros(bytes - len)?;
            }
        }
        at = run.start + run.blocks;
    }
    if l.geo.blocks > at {
        out.zeros((l.geo.blocks - at) * bs)?;
    }
    Ok(())
}
