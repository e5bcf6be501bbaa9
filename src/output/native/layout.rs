//! Where everything goes: inode numbers, the filesystem size, and every block of the image,
//! decided up front from the merged tree so the image can then be written in one pass, in
//! block order.

use std::sync::Arc;

use super::format::{
    self, Extent, Geometry, InodeFields, BLOCK, BLOCKS_PER_GROUP, DESC_SIZE, EXT4_EXTENTS_FL,
    EXT4_INDEX_FL, FIRST_INO, INODE_SIZE, JOURNAL_INO, LEAF_EXTENTS, LOST_FOUND_INO,
    MAX_EXTENT_LEN, ROOT_INO,
};
use super::{htree, xattr, NativeError};
use crate::tree::{NodeId, NodeKind, Tree, ROOT};

const B: u64 = BLOCK as u64;

/// What fills a run of blocks.
#[derive(Clone, Debug)]
pub enum Fill {
    /// Encoded metadata (symlink, attribute or extent blocks, journal superblock).
    Bytes(Arc<[u8]>),
    /// Blocks of a directory (inode index `index`, see [`Layout::node_at`]) from its block
    /// `skip`: encoded when written, not held (at a million files in directories of a
    /// hundred, holding them would take 40 MiB).
    Dir {
        index: u32,
        skip: u64,
    },
    /// The contents of a regular file: `len` bytes from logical byte `offset`.
    File {
        node: NodeId,
        offset: u64,
        len: u64,
    },
    /// Superblock (copy in `group`) and group descriptors.
    Super {
        group: u64,
    },
    BlockBitmap {
        group: u64,
    },
    InodeBitmap {
        group: u64,
    },
    InodeTable {
        group: u64,
    },
}

/// One allocated run: `blocks` blocks from `start`, filled by `fill`.
#[derive(Clone, Debug)]
pub struct Run {
    pub start: u64,
    pub blocks: u64,
    pub fill: Fill,
}

/// The complete plan of the image.
///
/// Nothing per inode is kept that the tree already says: the inode fields are encoded from
/// the tree node and its placement when the inode table is written ([`Layout::inode`]),
/// and the runs of file data are not listed but kept as one extent list in inode order
/// ([`Layout::file_runs`]). At a million files that is 20 bytes a file instead of some 300.
pub struct Layout {
    pub geo: Geometry,
    /// Everything but file data, sorted by start block.
    pub runs: Vec<Run>,
    num: Numbering,
    /// The runs of each inode's own blocks (directory or symlink blocks, or file data) as
    /// `(start, blocks)`: those of inode index `i` (see [`Layout::node_at`]) are
    /// `extents[first[i]..first[i + 1]]`.
    first: Vec<u32>,
    extents: Vec<(u64, u64)>,
    /// The attribute block of inode index `i`, sorted by `i` (as the lists below).
    xattr_at: Vec<(u32, u64)>,
    leaves: Vec<(u32, Vec<u64>)>,
    /// Hash-indexed directories.
    indexed: Vec<u32>,
    /// The journal's inode.
    journal: InodeFields,
    pub groups: Vec<format::GroupDesc>,
    pub block_bitmaps: Vec<Vec<u8>>,
    pub inode_bitmaps: Vec<Vec<u8>>,
    pub counts: format::SuperCounts,
}

/// Look up inode index `i` in a sorted sparse list.
fn sparse<T>(list: &[(u32, T)], i: u32) -> Option<&T> {
    list.binary_search_by_key(&i, |(k, _)| *k)
        .ok()
        .map(|at| &list[at].1)
}

impl Layout {
    /// The tree node of inode index `i`: 0 is the root (inode 2), `i >= 1` is inode
    /// `FIRST_INO + i - 1`.
    fn node_at(&self, i: usize) -> NodeId {
        node_at(&self.num, i)
    }

    /// The runs of inode index `i`'s blocks.
    fn runs_of(&self, i: usize) -> &[(u64, u64)] {
        &self.extents[self.first[i] as usize..self.first[i + 1] as usize]
    }

    /// The runs of file contents ([`Fill::File`]), in block order.
    pub fn file_runs<'a>(&'a self, tree: &'a Tree) -> impl Iterator<Item = Run> + 'a {
        (0..self.first.len() - 1).flat_map(move |i| {
            let node = self.node_at(i);
            let size = match &tree.node(node).kind {
                NodeKind::File { size, .. } => *size,
                _ => 0,
            };
            let runs = if size > 0 { self.runs_of(i) } else { &[] };
            let mut off = 0u64;
            runs.iter().map(move |&(start, blocks)| {
                let fill = Fill::File {
                    node,
                    offset: off,
                    len: (blocks * B).min(size - off),
                };
                off += blocks * B;
                Run {
                    start,
                    blocks,
                    fill,
                }
            })
        })
    }

    /// The blocks of the directory at inode index `index` (see [`Fill::Dir`]).
    pub fn dir_blocks(&self, tree: &Tree, index: u32) -> Result<Vec<u8>, NativeError> {
        Ok(encode_dir(tree, &self.num, &self.geo, index as usize)?.0)
    }

    /// Whether inode `ino` is in use (the reserved inodes count as used only for the journal).
    pub fn in_use(&self, ino: u32) -> bool {
        ino == JOURNAL_INO
            || ino == ROOT_INO
            || (ino >= FIRST_INO && ((ino - FIRST_INO) as usize) < self.num.order.len())
    }

    /// The fields of inode `ino`, if it is in use (reserved inodes other than the journal
    /// stay zero), encoded from the tree node and where its blocks went.
    pub fn inode(&self, tree: &Tree, ino: u32) -> Result<Option<InodeFields>, NativeError> {
        if ino == JOURNAL_INO {
            return Ok(Some(self.journal.clone()));
        }
        let i = match ino {
            ROOT_INO => 0,
            _ if ino >= FIRST_INO && ((ino - FIRST_INO) as usize) < self.num.order.len() => {
                (ino - FIRST_INO) as usize + 1
            }
            _ => return Ok(None),
        };
        let id = self.node_at(i);
        let (mut f, _) = base_fields(tree, &self.num, id)?;
        let r = self.runs_of(i);
        let leaves = sparse(&self.leaves, i as u32).map_or(&[][..], |v| v.as_slice());
        let xattr_at = sparse(&self.xattr_at, i as u32).copied().unwrap_or(0);
        match &tree.node(id).kind {
            NodeKind::Dir { .. } => {
                f.size = r.iter().map(|(_, l)| l).sum::<u64>() * B;
                if self.indexed.binary_search(&(i as u32)).is_ok() {
                    f.flags |= EXT4_INDEX_FL;
                }
            }
            NodeKind::Symlink { target } if target.len() >= 60 => f.flags |= EXT4_EXTENTS_FL,
            _ => {}
        }
        let mut sectors = (r.iter().map(|(_, l)| l).sum::<u64>() + leaves.len() as u64) * 8;
        if !r.is_empty() || f.flags & EXT4_EXTENTS_FL != 0 {
            f.block = format::extent_root(&extents_of(r), leaves);
        }
        f.xattr_block = xattr_at;
        if xattr_at != 0 {
            sectors += 8;
        }
        f.sectors = sectors;
        Ok(Some(f))
    }
}

fn node_at(num: &Numbering, i: usize) -> NodeId {
    if i == 0 {
        ROOT
    } else {
        num.order[i - 1]
    }
}

fn extents_of(runs: &[(u64, u64)]) -> Vec<Extent> {
    let mut logical = 0u32;
    runs.iter()
        .map(|&(s, l)| {
            let e = Extent {
                logical,
                start: s,
                len: l as u32,
            };
            logical += l as u32;
            e
        })
        .collect()
}

/// Allocates blocks upward from a cursor, around the superblock backups.
struct Alloc {
    cursor: u64,
    total: u64,
    /// Sorted, disjoint reserved ranges (superblock and descriptor copies).
    reserved: Vec<(u64, u64)>,
}

impl Alloc {
    /// `n` contiguous blocks, skipping reserved ranges.
    fn contiguous(&mut self, n: u64) -> Result<u64, NativeError> {
        loop {
            let end = self.cursor + n;
            match self
                .reserved
                .iter()
                .find(|(s, e)| *s < end && *e > self.cursor)
            {
                Some(&(_, e)) => self.cursor = e,
                None => break,
            }
        }
        if self.cursor + n > self.total {
            return Err(NativeError::Full);
        }
        let s = self.cursor;
        self.cursor += n;
        Ok(s)
    }

    /// `n` blocks as few runs as possible (split at reserved ranges and at the largest extent).
    fn runs(&mut self, mut n: u64) -> Result<Vec<(u64, u64)>, NativeError> {
        let mut out = Vec::new();
        while n > 0 {
            // Skip into free space, then take up to the next reserved range.
            while let Some(&(_, e)) = self
                .reserved
                .iter()
                .find(|(s, e)| *s <= self.cursor && *e > self.cursor)
            {
                self.cursor = e;
            }
            let limit = self
                .reserved
                .iter()
                .map(|(s, _)| *s)
                .find(|s| *s > self.cursor)
                .unwrap_or(self.total);
            let take = n.min(limit - self.cursor).min(MAX_EXTENT_LEN);
            if take == 0 || self.cursor + take > self.total {
                return Err(NativeError::Full);
            }
            match out.last_mut() {
                Some((s, l)) if *s + *l == self.cursor && *l + take <= MAX_EXTENT_LEN => *l += take,
                _ => out.push((self.cursor, take)),
            }
            self.cursor += take;
            n -= take;
        }
        Ok(out)
    }
}

/// The tree's inodes: numbers, link counts, parent directories.
#[derive(Default)]
pub struct Numbering {
    /// Inode number of each tree node (0 = unreachable).
    pub ino: Vec<u32>,
    /// Tree node of each inode number from FIRST_INO (index ino - FIRST_INO). The image's
    /// /lost+found, if the tree has one, is the first (inode 11, where e2fsck looks).
    pub order: Vec<NodeId>,
    pub links: Vec<u32>,
    pub parent_ino: Vec<u32>,
}

pub fn number(tree: &Tree) -> Numbering {
    let n = tree.nodes.len();
    let mut ino = vec![0u32; n];
    let mut links = vec![0u32; n];
    let mut parent_ino = vec![0u32; n];
    ino[ROOT as usize] = ROOT_INO;
    let lost_found = tree
        .lookup(ROOT, b"lost+found")
        .filter(|id| matches!(tree.node(*id).kind, NodeKind::Dir { .. }));
    let mut order: Vec<NodeId> = Vec::with_capacity(n);
    let mut next = FIRST_INO;
    if let Some(id) = lost_found {
        ino[id as usize] = LOST_FOUND_INO;
        order.push(id);
        next += 1;
    }
    // Depth first, in name order: the order the kernel backend's copy creates them in.
    let mut stack = vec![ROOT];
    while let Some(dir) = stack.pop() {
        let NodeKind::Dir { entries } = &tree.node(dir).kind else {
            continue;
        };
        let mut subdirs = Vec::new();
        for (_, child) in entries {
            let c = *child as usize;
            links[c] += 1;
            if ino[c] == 0 {
                ino[c] = next;
                next += 1;
                order.push(*child);
            }
            if let NodeKind::Dir { .. } = tree.node(*child).kind {
                parent_ino[c] = ino[dir as usize];
                subdirs.push(*child);
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    parent_ino[ROOT as usize] = ROOT_INO;
    Numbering {
        ino,
        order,
        links,
        parent_ino,
    }
}

fn mode_of(kind_bits: u32, perm: u32) -> u16 {
    (kind_bits | (perm & 0o7777)) as u16
}

fn dir_links(subdirs: u32) -> u16 {
    let l = 2 + subdirs;
    if l >= 65000 {
        1
    } else {
        l as u16
    }
}

/// The fields of node `id`'s inode that do not depend on block placement, and its
/// attribute block (without its checksum) when its attributes do not fit the inode.
fn base_fields(
    tree: &Tree,
    num: &Numbering,
    id: NodeId,
) -> Result<(InodeFields, Option<Vec<u8>>), NativeError> {
    let node = tree.node(id);
    let m = &node.meta;
    let placed = xattr::place(&m.xattrs).map_err(|e| NativeError::Xattr {
        path: path_of(tree, id),
        source: e,
    })?;
    let links = num.links[id as usize];
    if links > 65_000 && !matches!(node.kind, NodeKind::Dir { .. }) {
        return Err(NativeError::TooManyLinks {
            path: path_of(tree, id),
            links,
        });
    }
    let mut f = InodeFields {
        mode: mode_of(node.kind.file_type_bits(), m.mode),
        uid: m.uid,
        gid: m.gid,
        time: (m.mtime.sec, m.mtime.nsec),
        links: links as u16,
        inline_xattrs: placed.inline,
        ..InodeFields::default()
    };
    match &node.kind {
        NodeKind::Dir { entries } => {
            let subdirs = entries
                .iter()
                .filter(|(_, c)| matches!(tree.node(*c).kind, NodeKind::Dir { .. }))
                .count() as u32;
            f.links = dir_links(subdirs);
            f.flags |= EXT4_EXTENTS_FL;
        }
        NodeKind::File { size, .. } => {
            f.size = *size;
            f.flags |= EXT4_EXTENTS_FL;
        }
        NodeKind::Symlink { target } => {
            if target.is_empty() {
                // Linux cannot create one, and e2fsck calls it invalid.
                return Err(NativeError::EmptySymlink {
                    path: path_of(tree, id),
                });
            }
            f.size = target.len() as u64;
            if target.len() < 60 {
                f.block[..target.len()].copy_from_slice(target);
            }
        }
        NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
            f.block = format::device_block(*major, *minor);
        }
        NodeKind::Fifo => {}
    }
    Ok((f, placed.block))
}

/// What the inodes need placed, decided before the geometry: every inode is checked, the
/// blocks of long symlinks and attribute blocks are encoded, those of directories counted
/// (file data is only counted; it stays in the tree's sources).
struct Pending {
    /// `(inode index, blocks)` of directories and long symlinks, by inode index.
    meta: Vec<(u32, MetaBlocks)>,
    /// `(inode index, attribute block)`, by inode index.
    xattr: Vec<(u32, Vec<u8>)>,
    /// Hash-indexed directories, by inode index.
    indexed: Vec<u32>,
    /// Blocks of all of it and of the file data.
    blocks: u64,
}

/// The blocks of a directory or long symlink.
enum MetaBlocks {
    /// A directory of this many blocks ([`encode_dir`] gives them).
    Dir(u64),
    Bytes(Arc<[u8]>),
}

impl MetaBlocks {
    fn blocks(&self) -> u64 {
        match self {
            MetaBlocks::Dir(n) => *n,
            MetaBlocks::Bytes(b) => b.len() as u64 / B,
        }
    }
}

/// The blocks of the directory at inode index `i`, and whether they are hash-indexed (only
/// the seeds of `geo` matter).
fn encode_dir(
    tree: &Tree,
    num: &Numbering,
    geo: &Geometry,
    i: usize,
) -> Result<(Vec<u8>, bool), NativeError> {
    let id = node_at(num, i);
    let ino = ino_at(i);
    let NodeKind::Dir { entries } = &tree.node(id).kind else {
        return Ok((Vec::new(), false));
    };
    let entries: Vec<(&[u8], u32, u8)> = entries
        .iter()
        .map(|(name, c)| {
            let child = tree.node(*c);
            (
                name.as_ref(),
                num.ino[*c as usize],
                format::dirent_type(child.st_mode() as u16),
            )
        })
        .collect();
    let parent = num.parent_ino[id as usize];
    let min = if ino == LOST_FOUND_INO { 4 } else { 1 };
    dir_blocks(geo, ino, parent, &entries, min)
}

fn pending_inodes(tree: &Tree, num: &Numbering, geo: &Geometry) -> Result<Pending, NativeError> {
    let mut p = Pending {
        meta: Vec::new(),
        xattr: Vec::new(),
        indexed: Vec::new(),
        blocks: 0,
    };
    for index in 0..=num.order.len() {
        let id = node_at(num, index);
        let (_, xblock) = base_fields(tree, num, id)?;
        let i = index as u32;
        match &tree.node(id).kind {
            NodeKind::Dir { .. } => {
                let (blocks, indexed) = encode_dir(tree, num, geo, index)?;
                if indexed {
                    p.indexed.push(i);
                }
                let n = blocks.len() as u64 / B;
                p.blocks += n;
                p.meta.push((i, MetaBlocks::Dir(n)));
            }
            NodeKind::File { size, .. } => p.blocks += size.div_ceil(B),
            NodeKind::Symlink { target } if target.len() >= 60 => {
                let mut b = vec![0u8; target.len().div_ceil(BLOCK) * BLOCK];
                b[..target.len()].copy_from_slice(target);
                p.blocks += b.len() as u64 / B;
                p.meta.push((i, MetaBlocks::Bytes(b.into())));
            }
            _ => {}
        }
        if let Some(xb) = xblock {
            p.blocks += 1;
            p.xattr.push((i, xb));
        }
    }
    Ok(p)
}

/// A directory's blocks and whether they are hash-indexed.
fn dir_blocks(
    geo: &Geometry,
    ino: u32,
    parent: u32,
    entries: &[(&[u8], u32, u8)],
    min_blocks: usize,
) -> Result<(Vec<u8>, bool), NativeError> {
    // Like the kernel: a directory that outgrows one block gets a hash index. (lost+found
    // keeps mke2fs's four linear blocks.)
    if ino == LOST_FOUND_INO || format::linear_dir_blocks(entries) <= 1 {
        return Ok((
            format::linear_dir(geo, ino, parent, entries, min_blocks),
            false,
        ));
    }
    let dx: Vec<htree::DirEntry> = entries
        .iter()
        .map(|&(name, ino, file_type)| htree::DirEntry {
            name,
            ino,
            file_type,
        })
        .collect();
    let blocks = htree::indexed_dir_blocks(
        &dx,
        ino,
        parent,
        htree::HashVersion::HalfMd4,
        &geo.hash_seed_words(),
        true,
        Some(super::csum::inode_seed(geo.fs_seed, ino, 0)),
    )
    .map_err(|e| NativeError::Directory { ino, source: e })?;
    Ok((blocks, true))
}

/// The tree path of `id`, for messages.
pub fn path_of(tree: &Tree, id: NodeId) -> String {
    tree.path_of(id)
}

/// Blocks the groups' fixed metadata takes for a filesystem of `total` blocks.
fn fixed_overhead(total: u64, ipg: u32) -> u64 {
    let groups = total.div_ceil(BLOCKS_PER_GROUP);
    let gdt = (groups * DESC_SIZE as u64).div_ceil(B);
    let backups = (0..groups).filter(|g| format::has_super(*g)).count() as u64;
    backups * (1 + gdt) + groups * (2 + (ipg as u64 * INODE_SIZE as u64).div_ceil(B))
}

fn journal_blocks(total: u64) -> u64 {
    super::super::size::ext4_journal_bytes(total * B) / B
}

/// Inodes per group for `inodes` over `groups`: whole inode-table blocks.
fn inodes_per_group(inodes: u64, groups: u64) -> u32 {
    let per = inodes.div_ceil(groups).max(16);
    (per.div_ceil(16) * 16).min(BLOCKS_PER_GROUP) as u32
}

/// Plan the whole image: `want_inodes` inodes at least, and at least `free_bytes` free to an
/// unprivileged user once mounted.
pub fn plan(
    tree: &Tree,
    want_inodes: u64,
    free_bytes: u64,
    uuid: [u8; 16],
    hash_seed: [u8; 16],
    time: i64,
) -> Result<Layout, NativeError> {
    let num = number(tree);
    let used_inodes = FIRST_INO as u64 + num.order.len() as u64;
    let want_inodes = want_inodes.max(used_inodes + 16);
    let fs_seed = super::csum::fs_seed(&uuid);
    // Placeholder geometry for the encodings that need only the seeds.
    let mut geo = Geometry {
        blocks: 0,
        groups: 0,
        inodes_per_group: 0,
        gdt_blocks: 0,
        uuid,
        hash_seed,
        time,
        fs_seed,
    };
    let pending = pending_inodes(tree, &num, &geo)?;
    // Blocks that do not depend on the geometry.
    let content = pending.blocks;
    let free_blocks = free_bytes.div_ceil(B);
    // The size is the fixed point of total = content + group metadata(total) +
    // journal(total) + free + ext4's reserve(total). Every term grows with total, so start
    // from the content alone and raise until the need is met.
    let need = |total: u64| {
        let groups = total
            .div_ceil(BLOCKS_PER_GROUP)
            .max(want_inodes.div_ceil(BLOCKS_PER_GROUP));
        let ipg = inodes_per_group(want_inodes, groups);
        let resv = super::super::e2fsprogs::kernel_reserve_blocks(total);
        // + 64: extent tree leaves, and rounding to whole MiB.
        (content + fixed_overhead(total, ipg) + journal_blocks(total) + free_blocks + resv + 64)
            .div_ceil(256)
            * 256
    };
    let mut total = (content + free_blocks).max(2048).div_ceil(256) * 256;
    while need(total) > total {
        total = need(total);
    }
    // Keep the last group large enough to be worth its metadata.
    let tail = total % BLOCKS_PER_GROUP;
    if tail != 0 && tail < 1024 {
        total += 1024 - tail;
    }
    // Placing is exact; should the estimate fall short (extents split around superblock
    // copies need leaf blocks), grow and place again.
    for _ in 0..16 {
        match place(
            tree,
            &num,
            &pending,
            &mut geo,
            total,
            want_inodes,
            free_blocks,
        ) {
            Ok(mut l) => {
                l.num = num;
                return Ok(l);
            }
            Err(NativeError::Short { blocks }) => {
                total = (geo.blocks + blocks).div_ceil(256) * 256;
            }
            Err(NativeError::Full) => total = (total + total / 16).div_ceil(256) * 256,
            Err(e) => return Err(e),
        }
    }
    Err(NativeError::Full)
}

/// Place everything in a filesystem of `total` blocks.
fn place(
    tree: &Tree,
    num: &Numbering,
    pending: &Pending,
    geo: &mut Geometry,
    total: u64,
    want_inodes: u64,
    need_free: u64,
) -> Result<Layout, NativeError> {
    let groups = total
        .div_ceil(BLOCKS_PER_GROUP)
        .max(want_inodes.div_ceil(BLOCKS_PER_GROUP));
    let total = total.max((groups - 1) * BLOCKS_PER_GROUP + 1024);
    let ipg = inodes_per_group(want_inodes, groups);
    geo.blocks = total;
    geo.groups = groups;
    geo.inodes_per_group = ipg;
    geo.gdt_blocks = (groups * DESC_SIZE as u64).div_ceil(B);
    if (geo.inodes() as u64) < FIRST_INO as u64 + num.order.len() as u64 {
        return Err(NativeError::Full);
    }
    let mut runs = Vec::new();
    let mut reserved = Vec::new();
    for g in 0..groups {
        if format::has_super(g) {
            let s = g * BLOCKS_PER_GROUP;
            reserved.push((s, s + 1 + geo.gdt_blocks));
            runs.push(Run {
                start: s,
                blocks: 1 + geo.gdt_blocks,
                fill: Fill::Super { group: g },
            });
        }
    }
    let mut alloc = Alloc {
        cursor: 0,
        total,
        reserved,
    };
    let mut descs = vec![format::GroupDesc::default(); groups as usize];
    for (g, d) in descs.iter_mut().enumerate() {
        d.block_bitmap = alloc.contiguous(1)?;
        runs.push(Run {
            start: d.block_bitmap,
            blocks: 1,
            fill: Fill::BlockBitmap { group: g as u64 },
        });
    }
    for (g, d) in descs.iter_mut().enumerate() {
        d.inode_bitmap = alloc.contiguous(1)?;
        runs.push(Run {
            start: d.inode_bitmap,
            blocks: 1,
            fill: Fill::InodeBitmap { group: g as u64 },
        });
    }
    let itb = geo.itable_blocks();
    for (g, d) in descs.iter_mut().enumerate() {
        d.inode_table = alloc.contiguous(itb)?;
        runs.push(Run {
            start: d.inode_table,
            blocks: itb,
            fill: Fill::InodeTable { group: g as u64 },
        });
    }

    // Journal.
    let jblocks = journal_blocks(total);
    let jruns = alloc.runs(jblocks)?;
    let jext = extents_of(&jruns);
    let mut jleaves = Vec::new();
    let jsb: Arc<[u8]> = format::journal_superblock(geo, jblocks as u32).into();
    runs.push(Run {
        start: jruns[0].0,
        blocks: 1,
        fill: Fill::Bytes(jsb),
    });
    if jext.len() > 4 {
        for chunk in jext.chunks(LEAF_EXTENTS) {
            let leaf = alloc.contiguous(1)?;
            runs.push(Run {
                start: leaf,
                blocks: 1,
                fill: Fill::Bytes(format::extent_leaf(geo, JOURNAL_INO, chunk).into()),
            });
            jleaves.push(leaf);
        }
    }
    let jblock = format::extent_root(&jext, &jleaves);
    let journal = InodeFields {
        mode: mode_of(libc::S_IFREG, 0o600),
        time: (geo.time, 0),
        links: 1,
        size: jblocks * B,
        sectors: (jblocks + jleaves.len() as u64) * 8,
        flags: EXT4_EXTENTS_FL,
        block: jblock,
        ..InodeFields::default()
    };

    // Directories, symlink blocks and attribute blocks first (compact metadata), then data,
    // each in inode order.
    let inodes = num.order.len() + 1;
    let mut meta_runs: Vec<Vec<(u64, u64)>> = Vec::with_capacity(pending.meta.len());
    let mut xattr_at: Vec<(u32, u64)> = Vec::with_capacity(pending.xattr.len());
    let (mut m, mut x) = (
        pending.meta.iter().peekable(),
        pending.xattr.iter().peekable(),
    );
    while m.peek().is_some() || x.peek().is_some() {
        let next_m = m.peek().map_or(u32::MAX, |(i, _)| *i);
        let next_x = x.peek().map_or(u32::MAX, |(i, _)| *i);
        let i = next_m.min(next_x);
        if let Some((_, b)) = m.next_if(|(j, _)| *j == i) {
            let r = alloc.runs(b.blocks())?;
            let mut off = 0u64;
            for &(s, l) in &r {
                let fill = match b {
                    MetaBlocks::Dir(_) => Fill::Dir {
                        index: i,
                        skip: off,
                    },
                    MetaBlocks::Bytes(b) if r.len() == 1 => Fill::Bytes(Arc::clone(b)),
                    MetaBlocks::Bytes(b) => {
                        Fill::Bytes(b[(off * B) as usize..((off + l) * B) as usize].into())
                    }
                };
                runs.push(Run {
                    start: s,
                    blocks: l,
                    fill,
                });
                off += l;
            }
            meta_runs.push(r);
        }
        if let Some((_, xb)) = x.next_if(|(j, _)| *j == i) {
            let at = alloc.contiguous(1)?;
            let mut xb = xb.clone();
            xattr::seal_block(geo.fs_seed, at, &mut xb);
            runs.push(Run {
                start: at,
                blocks: 1,
                fill: Fill::Bytes(xb.into()),
            });
            xattr_at.push((i, at));
        }
    }
    // File data, contiguous in inode order; every inode's runs into one list.
    let mut first: Vec<u32> = Vec::with_capacity(inodes + 1);
    let mut extents: Vec<(u64, u64)> = Vec::with_capacity(inodes);
    let mut meta = pending
        .meta
        .iter()
        .map(|(i, _)| *i)
        .zip(meta_runs)
        .peekable();
    for i in 0..inodes {
        let too_many = || NativeError::Fragmented { ino: ino_at(i) };
        first.push(u32::try_from(extents.len()).map_err(|_| too_many())?);
        if let Some((_, r)) = meta.next_if(|(j, _)| *j as usize == i) {
            extents.extend_from_slice(&r);
            continue;
        }
        if let NodeKind::File { size, .. } = tree.node(node_at(num, i)).kind {
            if size > 0 {
                extents.extend(alloc.runs(size.div_ceil(B))?);
            }
        }
    }
    first.push(u32::try_from(extents.len()).map_err(|_| NativeError::Full)?);
    // Extent tree leaves, after all data: the last allocation, so the last step that can fail.
    let mut leaves: Vec<(u32, Vec<u64>)> = Vec::new();
    for i in 0..inodes {
        let r = &extents[first[i] as usize..first[i + 1] as usize];
        if r.len() <= 4 {
            continue;
        }
        let ext = extents_of(r);
        let chunks: Vec<&[Extent]> = ext.chunks(LEAF_EXTENTS).collect();
        if chunks.len() > 4 {
            return Err(NativeError::Fragmented { ino: ino_at(i) });
        }
        let mut mine = Vec::new();
        for chunk in chunks {
            let leaf = alloc.contiguous(1)?;
            runs.push(Run {
                start: leaf,
                blocks: 1,
                fill: Fill::Bytes(format::extent_leaf(geo, ino_at(i), chunk).into()),
            });
            mine.push(leaf);
        }
        leaves.push((i as u32, mine));
    }
    // Bitmaps and counts.
    runs.sort_by_key(|r| r.start);
    let mut used = vec![0u8; (groups * BLOCKS_PER_GROUP / 8) as usize];
    for r in &runs {
        format::set_bits(&mut used, r.start as usize, (r.start + r.blocks) as usize);
    }
    // File data (the other runs in `extents` are listed in `runs` as well).
    let mut meta_at = pending.meta.iter().map(|(i, _)| *i as usize).peekable();
    for i in 0..inodes {
        if meta_at.next_if_eq(&i).is_some() {
            continue;
        }
        for &(s, l) in &extents[first[i] as usize..first[i + 1] as usize] {
            format::set_bits(&mut used, s as usize, (s + l) as usize);
        }
    }
    // The journal's zero blocks are allocated too.
    for &(s, l) in &jruns {
        format::set_bits(&mut used, s as usize, (s + l) as usize);
    }
    for &(s, e) in &alloc.reserved {
        format::set_bits(&mut used, s as usize, e as usize);
    }
    // Blocks past the end of the filesystem are marked used in the last bitmap.
    format::set_bits(
        &mut used,
        total as usize,
        (groups * BLOCKS_PER_GROUP) as usize,
    );
    let mut free_total = 0u64;
    let mut block_bitmaps = Vec::with_capacity(groups as usize);
    for (g, d) in descs.iter_mut().enumerate() {
        let bm = used[g * BLOCK..(g + 1) * BLOCK].to_vec();
        let ones: u32 = bm.iter().map(|b| b.count_ones()).sum();
        d.free_blocks = BLOCKS_PER_GROUP as u32 - ones;
        free_total += u64::from(d.free_blocks);
        d.block_bitmap_csum = super::csum::raw(geo.fs_seed, &bm);
        block_bitmaps.push(bm);
    }
    // Free space as statfs will show it.
    let visible = free_total.saturating_sub(super::super::e2fsprogs::kernel_reserve_blocks(total));
    if visible < need_free {
        return Err(NativeError::Short {
            blocks: need_free - visible,
        });
    }

    // Inodes in use: the reserved ones, the root, and FIRST_INO onwards, one per node.
    let in_use = |ino: usize| -> Option<NodeId> {
        match ino as u32 {
            ROOT_INO => Some(ROOT),
            n if n >= FIRST_INO && ((n - FIRST_INO) as usize) < num.order.len() => {
                Some(num.order[(n - FIRST_INO) as usize])
            }
            _ => None,
        }
    };
    let mut inode_bitmaps = Vec::with_capacity(groups as usize);
    let mut free_inodes_total = 0u32;
    for (g, d) in descs.iter_mut().enumerate() {
        let mut ib = vec![0u8; BLOCK];
        let base = g * ipg as usize;
        let mut last_used = 0u32;
        for j in 0..ipg as usize {
            let ino = base + j + 1;
            let node = in_use(ino);
            if ino < FIRST_INO as usize || node.is_some() {
                ib[j / 8] |= 1 << (j % 8);
                last_used = j as u32 + 1;
                if node.is_some_and(|id| matches!(tree.node(id).kind, NodeKind::Dir { .. })) {
                    d.used_dirs += 1;
                }
            }
        }
        let used_count: u32 = ib[..ipg as usize / 8].iter().map(|b| b.count_ones()).sum();
        d.free_inodes = ipg - used_count;
        free_inodes_total += d.free_inodes;
        d.itable_unused = ipg - last_used;
        format::set_bits(&mut ib, ipg as usize, BLOCK * 8);
        d.inode_bitmap_csum = super::csum::raw(geo.fs_seed, &ib[..ipg as usize / 8]);
        inode_bitmaps.push(ib);
    }
    let journal_inode = (journal.block, journal.size);
    Ok(Layout {
        geo: geo.clone(),
        runs,
        num: Numbering::default(),
        first,
        extents,
        xattr_at,
        leaves,
        indexed: pending.indexed.clone(),
        journal,
        groups: descs,
        block_bitmaps,
        inode_bitmaps,
        counts: format::SuperCounts {
            free_blocks: free_total,
            free_inodes: free_inodes_total,
            journal_blocks: journal_inode.0,
            journal_size: journal_inode.1,
        },
    })
}

/// The inode number of inode index `i` (see [`Layout::node_at`]).
fn ino_at(i: usize) -> u32 {
    if i == 0 {
        ROOT_INO
    } else {
        FIRST_INO + i as u32 - 1
    }
}
