//! Image sizing: what the merged tree occupies on each filesystem type, measured from the
//! tree itself (not `du` of an unpacked copy), plus filesystem overhead and the free-space
//! buffer.
//!
//! The estimate only has to land near the target: every backend then measures the real free
//! space of the finished filesystem and corrects the size (see `calibrate` in the backends),
//! so the final free space is at least the buffer and at most the buffer plus
//! [`slack`].

use crate::config::FsType;
use crate::tree::{NodeKind, Tree};

pub const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// mkfs.xfs (xfsprogs >= 5.19) refuses to make filesystems smaller than 300 MiB.
pub const XFS_MIN_BYTES: u64 = 300 * MIB;
/// mkfs.btrfs with the default profiles needs about this much.
pub const BTRFS_MIN_BYTES: u64 = 128 * MIB;

/// The size plan for one build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizePlan {
    /// Bytes the tree's contents and metadata need on this filesystem type.
    pub content_bytes: u64,
    /// Free space the finished filesystem must have (the configured buffer).
    pub buffer_bytes: u64,
    /// Initial image file size; 0 for the read-only types, whose writers size the image
    /// themselves (it has no free space to plan).
    pub image_bytes: u64,
    /// Inodes to create (ext4), with room for the buffer to be used.
    pub inodes: u64,
}

impl SizePlan {
    /// The free space to aim for: the buffer plus a small margin, inside the accepted window.
    pub fn target_free(&self) -> u64 {
        self.buffer_bytes + (slack(self.buffer_bytes) / 4).min(8 * MIB)
    }

    /// Bytes the output filesystem must have free for the build: the written part of a sparse
    /// image (contents and metadata, not the free buffer), or all of a preallocated one; for
    /// a read-only type (no initial size) the content estimate, an upper bound of what its
    /// writer produces.
    pub fn space_needed(&self, preallocate: bool) -> u64 {
        if self.image_bytes == 0 {
            self.content_bytes
        } else if preallocate {
            self.image_bytes
        } else {
            self.image_bytes.saturating_sub(self.buffer_bytes)
        }
    }

    /// The largest accepted free space.
    pub fn max_free(&self) -> u64 {
        self.buffer_bytes + slack(self.buffer_bytes)
    }
}

/// How much more free space than the buffer is acceptable: 10% of the buffer plus 16 MiB.
pub fn slack(buffer: u64) -> u64 {
    buffer / 10 + 16 * MIB
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Bytes of a directory's entries in an ext4-style linear directory block.
fn dir_entry_bytes(entries: &[(Box<[u8]>, u32)]) -> u64 {
    entries
        .iter()
        .map(|(n, _)| 8 + round_up(n.len() as u64, 4))
        .sum::<u64>()
        + 24 // "." and ".."
}

/// What the tree needs on `fs`, excluding fixed filesystem overhead.
pub fn content_bytes(tree: &Tree, fs: FsType) -> u64 {
    let mut total = 0u64;
    for node in &tree.nodes {
        let xattr_len: u64 = node
            .meta
            .xattrs
            .iter()
            .map(|(n, v)| 16 + round_up(n.len() as u64, 4) + round_up(v.len() as u64, 4))
            .sum();
        total += match (&node.kind, fs) {
            (NodeKind::File { size, .. }, FsType::Btrfs) if *size <= 2048 => {
                // Inlined into (DUP) metadata.
                2 * (round_up(*size, 8) + 160)
            }
            (NodeKind::File { size, .. }, _) => round_up(*size, BLOCK),
            (NodeKind::Dir { entries }, FsType::Ext4) => {
                // Directory blocks are rarely full; htree adds index blocks.
                let bytes = dir_entry_bytes(entries) * 4 / 3;
                round_up(bytes.max(1), BLOCK) + if bytes > BLOCK { BLOCK } else { 0 }
            }
            (NodeKind::Dir { entries }, FsType::Xfs) => {
                let bytes = dir_entry_bytes(entries) * 3 / 2;
                if bytes <= 300 {
                    0
                } else {
                    round_up(bytes, BLOCK)
                }
            }
            (NodeKind::Dir { entries }, FsType::Btrfs) => {
                // DIR_ITEM + DIR_INDEX per entry, DUP metadata.
                2 * entries
                    .iter()
                    .map(|(n, _)| 2 * (30 + 25 + n.len() as u64))
                    .sum::<u64>()
            }
            (NodeKind::Symlink { target }, FsType::Ext4) if target.len() >= 60 => BLOCK,
            (NodeKind::Symlink { target }, FsType::Xfs) if target.len() > 150 => BLOCK,
            (NodeKind::Symlink { target }, FsType::Btrfs) => 2 * (target.len() as u64 + 50),
            _ => 0,
        };
        // Xattrs that do not fit inside the inode take a block (ext4, xfs) or metadata items.
        total += match fs {
            FsType::Ext4 if xattr_len > 96 => BLOCK,
            FsType::Xfs if xattr_len > 200 => BLOCK,
            FsType::Btrfs => 2 * xattr_len,
            FsType::Squashfs | FsType::Erofs => xattr_len,
            _ => 0,
        };
        // Per-inode metadata (and, read-only types, the directory entries and symlink
        // targets, stored beside the inodes; uncompressed, so an upper bound for squashfs).
        total += match (fs, &node.kind) {
            (FsType::Squashfs | FsType::Erofs, NodeKind::Dir { entries }) => {
                64 + entries
                    .iter()
                    .map(|(n, _)| 12 + n.len() as u64)
                    .sum::<u64>()
            }
            (FsType::Squashfs | FsType::Erofs, NodeKind::Symlink { target }) => {
                64 + target.len() as u64
            }
            (FsType::Squashfs | FsType::Erofs, _) => 64,
            _ => 0,
        };
        total += match fs {
            FsType::Squashfs | FsType::Erofs => 0, // above
            // A 110-byte header, the name and padding per entry.
            FsType::Initramfs => 128,
            FsType::Ext4 => 0, // the inode table is part of the fixed overhead below
            FsType::Xfs => 512,
            FsType::Btrfs => 2 * 200,
        };
    }
    total
}

/// ext4's default journal size for a filesystem of `blocks` 4 KiB blocks (mke2fs's table).
pub fn ext4_journal_bytes(bytes: u64) -> u64 {
    let blocks = bytes / BLOCK;
    let jblocks = match blocks {
        b if b < 2048 => 0,
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    };
    jblocks * BLOCK
}

/// The size plan for `tree` on `fs` with `buffer_bytes` of free space.
pub fn plan(tree: &Tree, fs: FsType, buffer_bytes: u64) -> SizePlan {
    let content = content_bytes(tree, fs);
    if fs.is_exactly_sized() {
        // No free space and no initial size: the writer lays the image out exactly.
        return SizePlan {
            content_bytes: content,
            buffer_bytes: 0,
            image_bytes: 0,
            inodes: tree.nodes.len() as u64,
        };
    }
    let nodes = tree.nodes.len() as u64;
    // Room for files created in the buffer: one inode per 16 KiB of it, at least 1024.
    let inodes = nodes + (buffer_bytes / (16 * 1024)).max(1024);
    let target_free = buffer_bytes + (slack(buffer_bytes) / 4).min(8 * MIB);
    let base = content + target_free;
    let image = match fs {
        FsType::Ext4 => {
            // Inode tables, bitmaps and group descriptors (~1%), ext4's reserved clusters
            // (2%, at most 16 MiB), and the journal, which depends on the size itself.
            let mut s = base + inodes * 256 + base / 50;
            for _ in 0..3 {
                let resv = (s / 50).min(16 * MIB);
                s = base + inodes * 256 + s / 100 + resv + ext4_journal_bytes(s) + 2 * MIB;
            }
            s
        }
        FsType::Xfs => {
            // Log, AG headers, free-space btrees and per-AG reservations. xfs cannot shrink,
            // so this errs low: the kernel backend grows the result to the target with
            // xfs_growfs.
            let s = base + 56 * MIB + base / 50;
            s.max(XFS_MIN_BYTES)
        }
        FsType::Btrfs => {
            // System and metadata chunks (DUP), global reserve, chunk rounding.
            let s = base + content / 20 + 64 * MIB;
            s.max(BTRFS_MIN_BYTES)
        }
        // Returned above; the content is all they need.
        FsType::Squashfs | FsType::Erofs | FsType::Initramfs => content,
    };
    SizePlan {
        content_bytes: content,
        buffer_bytes,
        image_bytes: round_up(image, MIB),
        inodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_window() {
        assert_eq!(slack(100 * MIB), 10 * MIB + 16 * MIB);
        assert_eq!(slack(0), 16 * MIB);
    }

    #[test]
    fn journal_table() {
        assert_eq!(ext4_journal_bytes(4 * MIB), 0);
        assert_eq!(ext4_journal_bytes(100 * MIB), 4 * MIB);
        assert_eq!(ext4_journal_bytes(500 * MIB), 16 * MIB);
        assert_eq!(ext4_journal_bytes(1500 * MIB), 32 * MIB);
    }
}
