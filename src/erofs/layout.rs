//! The plan of an image, made from the tree's metadata alone before any byte is written:
//! which inodes there are and in which order, each inode's form, xattrs and data layout, its
//! place in the metadata area (so its nid), and the blocks of its data.

use std::collections::HashMap;

use super::format::{
    self, Layout, BLOCK, COMPACT_SIZE, EXTENDED_SIZE, NAME_MAX, SLOT, SUPER_OFFSET, SUPER_SIZE,
};
use super::ErofsError;
use crate::tree::{NodeId, NodeKind, Tree, ROOT};

/// One inode of the image, in metadata order.
pub struct Planned {
    pub node: NodeId,
    pub nlink: u32,
    pub extended: bool,
    pub layout: Layout,
    /// The inline xattr body (header, shared ids, inline entries); empty for none.
    pub xattrs: Vec<u8>,
    /// `i_size`: file bytes, symlink target length, directory bytes.
    pub size: u64,
    /// Bytes of data stored inline after the inode and its xattrs.
    pub tail: u32,
    /// Blocks of data in the data area, from `start`.
    pub blocks: u64,
    pub start: u32,
    /// Byte offset of the inode in the image (the metadata area starts at block 0).
    pub pos: u64,
}

impl Planned {
    pub fn nid(&self) -> u64 {
        self.pos / SLOT
    }

    /// Bytes of the inode itself (compact or extended).
    #[cfg(test)]
    pub fn inode_len(&self) -> u64 {
        if self.extended {
            EXTENDED_SIZE as u64
        } else {
            COMPACT_SIZE as u64
        }
    }
}

pub struct Plan {
    /// Inodes in metadata order: depth first, by name; the root first.
    pub inodes: Vec<Planned>,
    /// Indexes in `inodes` in the order of their places in the metadata area.
    pub by_pos: Vec<u32>,
    /// Index in `inodes` of each node (`u32::MAX`: unreachable).
    pub index: Vec<u32>,
    /// The shared xattr area: its first block and its bytes (0 blocks: none).
    pub xattr_blkaddr: u32,
    pub shared: Vec<u8>,
    /// First block of the data area, and the image's length in blocks.
    pub data_start: u64,
    pub blocks: u64,
    pub shared_xattrs: u32,
}

/// The metadata area being filled: each inode's record (inode, xattrs, inline tail) goes
/// whole into the block with the least room that holds it (so later small records fill the
/// gaps that a tail too large for the rest of a block leaves), or into a new block.
struct MetaSpace {
    /// (free bytes, block) of every block with room for a record left.
    open: std::collections::BTreeSet<(u64, u64)>,
    /// Blocks used so far (from block 0).
    blocks: u64,
}

impl MetaSpace {
    fn new() -> MetaSpace {
        let first = (BLOCK - SUPER_OFFSET - SUPER_SIZE) as u64;
        MetaSpace {
            open: [(first, 0)].into(),
            blocks: 1,
        }
    }

    /// The byte offset for a record of `len` bytes (32-byte aligned, like every inode).
    fn place(&mut self, len: u64) -> u64 {
        let bs = BLOCK as u64;
        let need = len.next_multiple_of(SLOT);
        if need <= bs {
            if let Some(&(free, block)) = self.open.range((need, 0)..).next() {
                self.open.remove(&(free, block));
                if free - need >= SLOT {
                    self.open.insert((free - need, block));
                }
                return block * bs + bs - free;
            }
        }
        // A new block, or several for a record larger than one (huge xattrs, no tail).
        let block = self.blocks;
        let span = need.div_ceil(bs);
        self.blocks += span;
        let free = span * bs - need;
        if free >= SLOT {
            self.open.insert((free, block + span - 1));
        }
        block * bs
    }
}

/// A directory's listing as stored: sorted by name with `.` and `..` in their places.
pub fn listing<'t>(tree: &'t Tree, dir: NodeId) -> Vec<(&'t [u8], NodeId)> {
    let node = tree.node(dir);
    let NodeKind::Dir { entries } = &node.kind else {
        return Vec::new();
    };
    let parent = if dir == ROOT { ROOT } else { node.parent };
    let dot = entries.partition_point(|(n, _)| n.as_ref() < b".".as_slice());
    let dotdot = entries.partition_point(|(n, _)| n.as_ref() < b"..".as_slice());
    let mut out = Vec::with_capacity(entries.len() + 2);
    let name = |(n, id): &'t (Box<[u8]>, NodeId)| (n.as_ref(), *id);
    out.extend(entries[..dot].iter().map(name));
    out.push((b".".as_slice(), dir));
    out.extend(entries[dot..dotdot].iter().map(name));
    out.push((b"..".as_slice(), parent));
    out.extend(entries[dotdot..].iter().map(name));
    out
}

fn dir_path(tree: &Tree, dir: NodeId, name: &[u8]) -> String {
    let base = if dir == ROOT {
        String::new()
    } else {
        tree.path_of(dir)
    };
    format!("{base}/{}", String::from_utf8_lossy(name))
}

/// Inode order (depth first, by name, each node once) and the directory entries naming
/// each node (for directories, 2 + subdirectories).
fn number(tree: &Tree) -> (Vec<NodeId>, Vec<u32>) {
    let mut order = Vec::new();
    let mut seen = vec![false; tree.nodes.len()];
    let mut links = vec![0u32; tree.nodes.len()];
    tree.walk(|_, id| {
        let i = id as usize;
        if !seen[i] {
            seen[i] = true;
            order.push(id);
        }
        links[i] = links[i].saturating_add(1);
    });
    for &id in &order {
        if let NodeKind::Dir { entries } = &tree.node(id).kind {
            let subdirs = entries
                .iter()
                .filter(|(_, c)| matches!(tree.node(*c).kind, NodeKind::Dir { .. }))
                .count();
            links[id as usize] = 2u32.saturating_add(subdirs as u32);
        }
    }
    (order, links)
}

/// Check one node for what EROFS cannot hold.
fn check(tree: &Tree, id: NodeId) -> Result<(), ErofsError> {
    let node = tree.node(id);
    for (name, value) in &node.meta.xattrs {
        let Some((_, suffix)) = format::xattr_prefix(name) else {
            return Err(ErofsError::Xattr {
                path: tree.path_of(id),
                name: String::from_utf8_lossy(name).into_owned(),
            });
        };
        if suffix.len() > 255 || value.len() > usize::from(u16::MAX) {
            return Err(ErofsError::XattrSize {
                path: tree.path_of(id),
                name: String::from_utf8_lossy(name).into_owned(),
                len: value.len(),
            });
        }
    }
    match &node.kind {
        NodeKind::Dir { entries } => {
            for (name, _) in entries {
                if name.is_empty() || name.len() > NAME_MAX {
                    return Err(ErofsError::Name {
                        path: dir_path(tree, id, name),
                        len: name.len(),
                    });
                }
            }
        }
        NodeKind::Symlink { target } if target.is_empty() || target.len() >= BLOCK => {
            return Err(ErofsError::Symlink {
                path: tree.path_of(id),
                len: target.len(),
            })
        }
        NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor }
            if format::encode_dev(*major, *minor).is_none() =>
        {
            return Err(ErofsError::Device {
                path: tree.path_of(id),
                major: *major,
                minor: *minor,
            })
        }
        _ => {}
    }
    Ok(())
}

/// Shared xattr ids by (name, value).
type SharedIds<'t> = HashMap<(&'t [u8], &'t [u8]), u32>;

/// The shared xattr area: every (name, value) pair that at least two inodes carry, in
/// order of first use, each entry in one block. Returns the area and each pair's id
/// (its offset in 4-byte units).
fn share_xattrs<'t>(tree: &'t Tree, order: &[NodeId]) -> (Vec<u8>, SharedIds<'t>) {
    let mut count: HashMap<(&[u8], &[u8]), u32> = HashMap::new();
    for &id in order {
        for (n, v) in &tree.node(id).meta.xattrs {
            *count.entry((n.as_ref(), v.as_ref())).or_default() += 1;
        }
    }
    let mut area = Vec::new();
    let mut ids = HashMap::new();
    for &id in order {
        for (n, v) in &tree.node(id).meta.xattrs {
            let key = (n.as_ref(), v.as_ref());
            if count[&key] < 2 || ids.contains_key(&key) {
                continue;
            }
            let Some((index, suffix)) = format::xattr_prefix(n) else {
                continue; // checked before: not reached
            };
            let size = format::xattr_entry_size(suffix.len(), v.len());
            let off = area.len() % BLOCK;
            if off + size > BLOCK && size <= BLOCK {
                area.resize(area.len() + BLOCK - off, 0);
            }
            ids.insert(key, (area.len() / 4) as u32);
            format::xattr_entry(&mut area, index, suffix, v);
        }
    }
    (area, ids)
}

/// The inline xattr body of a node: the shared ids first (at most 255), then the rest.
fn xattr_body(tree: &Tree, id: NodeId, shared: &SharedIds) -> Result<Vec<u8>, ErofsError> {
    let xs = &tree.node(id).meta.xattrs;
    if xs.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::new();
    let mut inline = Vec::new();
    for (n, v) in xs {
        match shared.get(&(n.as_ref(), v.as_ref())) {
            Some(&sid) if ids.len() < 255 => ids.push(sid),
            _ => {
                if let Some((index, suffix)) = format::xattr_prefix(n) {
                    format::xattr_entry(&mut inline, index, suffix, v);
                }
            }
        }
    }
    let mut body = Vec::with_capacity(format::XATTR_HEADER + 4 * ids.len() + inline.len());
    format::xattr_header(&mut body, &ids);
    body.extend_from_slice(&inline);
    if (body.len() - format::XATTR_HEADER) / 4 + 1 > usize::from(u16::MAX) {
        return Err(ErofsError::XattrSize {
            path: tree.path_of(id),
            name: "(all)".into(),
            len: body.len(),
        });
    }
    Ok(body)
}

/// Plan the image of `tree` with compact inodes taking the time `epoch` (seconds, 0 ns).
///
/// With `compress`, every regular file of more than one block for which it says yes is
/// LZ4-compressed: its record holds the full index (its size known from the file size
/// alone), and its data, placed only when compressed, follows everything planned here
/// (`blocks` 0 in the plan). Files of one block or less stay flat: inline they take no
/// data block, and compressed they could not take fewer than one.
pub fn plan(
    tree: &Tree,
    epoch: u64,
    share: bool,
    compress: Option<&dyn Fn(NodeId) -> bool>,
) -> Result<Plan, ErofsError> {
    let (order, links) = number(tree);
    for &id in &order {
        check(tree, id)?;
    }
    let (shared, shared_ids) = if share {
        share_xattrs(tree, &order)
    } else {
        (Vec::new(), HashMap::new())
    };
    let bs = BLOCK as u64;
    let mut index = vec![u32::MAX; tree.nodes.len()];
    let mut inodes = Vec::with_capacity(order.len());
    // The metadata area starts at block 0: the first inode (the root) right after the
    // superblock, so its nid is small (the superblock holds it in 16 bits).
    let mut meta = MetaSpace::new();
    for (i, &id) in order.iter().enumerate() {
        super::check_interrupt()?;
        index[id as usize] = i as u32;
        let node = tree.node(id);
        let m = &node.meta;
        let nlink = links[id as usize];
        let size = match &node.kind {
            NodeKind::Dir { .. } => {
                format::dir_blocks(listing(tree, id).iter().map(|(n, _)| n.len())).1
            }
            _ => node.size(),
        };
        let extended = m.uid > 0xffff
            || m.gid > 0xffff
            || nlink > 0xffff
            || size > u64::from(u32::MAX)
            || m.mtime.sec < 0
            || m.mtime.sec as u64 != epoch
            || m.mtime.nsec != 0;
        let xattrs = xattr_body(tree, id, &shared_ids)?;
        let base = (if extended {
            EXTENDED_SIZE
        } else {
            COMPACT_SIZE
        } + xattrs.len()) as u64;
        let has_data = matches!(
            node.kind,
            NodeKind::Dir { .. } | NodeKind::File { .. } | NodeKind::Symlink { .. }
        );
        if size > bs
            && matches!(node.kind, NodeKind::File { .. })
            && compress.is_some_and(|c| c(id))
        {
            let pos = meta.place(base + format::zindex_size(base, size.div_ceil(bs)));
            inodes.push(Planned {
                node: id,
                nlink,
                extended,
                layout: Layout::CompressedFull,
                xattrs,
                size,
                tail: 0,
                blocks: 0,
                start: format::NULL_BLOCK,
                pos,
            });
            continue;
        }
        let t = if has_data { size % bs } else { 0 };
        // The tail is inline whenever inode, xattrs and tail fit in one block.
        let inline = t > 0 && base + t <= bs;
        let pos = meta.place(base + if inline { t } else { 0 });
        let blocks = if inline { size / bs } else { size.div_ceil(bs) };
        inodes.push(Planned {
            node: id,
            nlink,
            extended,
            layout: if inline {
                Layout::FlatInline
            } else {
                Layout::FlatPlain
            },
            xattrs,
            size,
            tail: if inline { t as u32 } else { 0 },
            blocks,
            start: format::NULL_BLOCK,
            pos,
        });
    }
    let mut by_pos: Vec<u32> = (0..inodes.len() as u32).collect();
    by_pos.sort_by_key(|&i| inodes[i as usize].pos);
    let mut next = meta.blocks;
    let xattr_blkaddr = if shared.is_empty() { 0 } else { next };
    next += (shared.len() as u64).div_ceil(bs);
    let data_start = next;
    for p in &mut inodes {
        if p.blocks > 0 {
            p.start = u32::try_from(next).map_err(|_| ErofsError::TooLarge)?;
            next += p.blocks;
        }
    }
    if next > u64::from(u32::MAX) || inodes[0].nid() > u64::from(u16::MAX) {
        return Err(ErofsError::TooLarge);
    }
    let shared_xattrs = shared_ids.len() as u32;
    Ok(Plan {
        inodes,
        by_pos,
        index,
        xattr_blkaddr: xattr_blkaddr as u32,
        shared,
        data_start,
        blocks: next,
        shared_xattrs,
    })
}
