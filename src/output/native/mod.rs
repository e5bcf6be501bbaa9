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
use std::path::{Path, PathBuf};

use super::job::{Identity, Job, Writer, Written};
use super::size::SizePlan;
use super::{BuildError, BuildReport};
use crate::config::ImageFormat;
use crate::sink::{self, Sink, SinkError, Target};
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
    #[error(transparent)]
    Sink(SinkError),
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
            let target = Target::Raw { dense: false };
            let stop = &crate::interrupt::requested;
            let sum = sink::stream(&file, image, target, progress, stop, |out| {
                write_runs(tree, &layout, out)
            })?
            .sha256;
            sw.mark("image written and hashed");
            sum
        }
        ImageFormat::Qcow2 => {
            let (_, streamed) = sink::stream_qcow2(
                &file,
                image,
                len,
                progress,
                &crate::interrupt::requested,
                |out| write_runs(tree, &layout, out),
            )?;
            sw.mark("qcow2 image written and hashed");
            streamed.sha256
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
        sha256,
        format,
    })
}

impl From<SinkError> for BuildError {
    fn from(e: SinkError) -> BuildError {
        match e {
            SinkError::Interrupted => BuildError::Interrupted,
            e => BuildError::Native(NativeError::Sink(e)),
        }
    }
}

/// `len` bytes of `node`'s contents from `offset`, read straight into the stream.
fn file_contents(
    out: &mut Sink<'_>,
    tree: &Tree,
    node: crate::tree::NodeId,
    offset: u64,
    len: u64,
) -> Result<(), BuildError> {
    // Tree::read_at fills the whole range or fails (data ending early is an error).
    out.contents(len, None, |at, buf| {
        tree.read_at(node, offset + at, buf)
            .map(|_| ())
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
            })
    })
}

fn write_runs(tree: &Tree, l: &Layout, out: &mut Sink<'_>) -> Result<(), BuildError> {
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
    // The metadata runs and the file data runs, both in block order, merged.
    let mut meta = l.runs.iter().peekable();
    let mut files = l.file_runs(tree).peekable();
    let mut file_run;
    loop {
        let run = match (meta.peek(), files.peek()) {
            (None, None) => break,
            (Some(m), Some(f)) if f.start < m.start => {
                file_run = files.next();
                file_run.as_ref()
            }
            (Some(_), _) => meta.next(),
            (None, Some(_)) => {
                file_run = files.next();
                file_run.as_ref()
            }
        };
        let Some(run) = run else { break };
        if run.start > at {
            out.zeros((run.start - at) * bs);
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
                let ino = |j: usize| (first + j + 1) as u32;
                let used = (0..ipg)
                    .rposition(|j| l.in_use(ino(j)))
                    .map_or(0, |j| j + 1);
                for j in 0..used {
                    match l.inode(tree, ino(j))? {
                        Some(f) => out.bytes(&format::inode(&l.geo, ino(j), &f))?,
                        None => out.zeros(format::INODE_SIZE as u64),
                    }
                }
                out.zeros(bytes - (used * format::INODE_SIZE) as u64);
            }
            Fill::Bytes(b) => {
                out.bytes(b)?;
                out.zeros(bytes - b.len() as u64);
            }
            Fill::Dir { index, skip } => {
                let b = l.dir_blocks(tree, *index)?;
                let from = (*skip * bs) as usize;
                out.bytes(&b[from..from + bytes as usize])?;
            }
            Fill::File { node, offset, len } => {
                file_contents(out, tree, *node, *offset, *len)?;
                out.zeros(bytes - len);
            }
        }
        at = run.start + run.blocks;
    }
    if l.geo.blocks > at {
        out.zeros((l.geo.blocks - at) * bs);
    }
    Ok(())
}
