//! On-disk structures of ext4 (4 KiB blocks, `64bit`, `metadata_csum`), encoded into byte
//! buffers. Field offsets follow the kernel's `struct ext4_super_block`, `ext4_group_desc`,
//! `ext4_inode`, `ext4_extent_header`, `ext4_dir_entry_2`, `ext4_xattr_*` and jbd2's
//! `journal_superblock_t`.

use super::csum;

pub const BLOCK: usize = 4096;
pub const BLOCKS_PER_GROUP: u64 = 32768;
pub const INODE_SIZE: usize = 256;
pub const EXTRA_ISIZE: u16 = 32;
pub const DESC_SIZE: usize = 64;
/// The largest initialized extent.
pub const MAX_EXTENT_LEN: u64 = 32768;
/// Extent entries in an extent tree leaf block (after the 12-byte header, before the tail).
pub const LEAF_EXTENTS: usize = (BLOCK - 12 - 4) / 12;

pub const ROOT_INO: u32 = 2;
pub const JOURNAL_INO: u32 = 8;
pub const LOST_FOUND_INO: u32 = 11;
pub const FIRST_INO: u32 = 11;

// Feature bits.
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

pub const EXT4_EXTENTS_FL: u32 = 0x80000;
pub const EXT4_INDEX_FL: u32 = 0x1000;
const BG_INODE_ZEROED: u16 = 0x4;

pub fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put32be(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Whether group `g` holds a superblock backup (`sparse_super`: 0, 1 and powers of 3, 5, 7).
pub fn has_super(g: u64) -> bool {
    if g <= 1 {
        return true;
    }
    for base in [3u64, 5, 7] {
        let mut p = base;
        while p < g {
            p *= base;
        }
        if p == g {
            return true;
        }
    }
    false
}

/// The filesystem-wide values every structure needs.
#[derive(Clone, Debug)]
pub struct Geometry {
    pub blocks: u64,
    pub groups: u64,
    pub inodes_per_group: u32,
    pub gdt_blocks: u64,
    pub uuid: [u8; 16],
    pub hash_seed: [u8; 16],
    pub time: i64,
    pub fs_seed: u32,
}

impl Geometry {
    pub fn inodes(&self) -> u32 {
        self.inodes_per_group * self.groups as u32
    }
    pub fn itable_blocks(&self) -> u64 {
        (self.inodes_per_group as u64 * INODE_SIZE as u64).div_ceil(BLOCK as u64)
    }
    /// `s_hash_seed` as the directory hash takes it: four little-endian words.
    pub fn hash_seed_words(&self) -> [u32; 4] {
        let mut w = [0u32; 4];
        for (i, c) in self.hash_seed.chunks(4).enumerate() {
            w[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        w
    }
}

/// Per-group values for the descriptor.
#[derive(Clone, Debug, Default)]
pub struct GroupDesc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub free_blocks: u32,
    pub free_inodes: u32,
    pub used_dirs: u32,
    pub itable_unused: u32,
    pub block_bitmap_csum: u32,
    pub inode_bitmap_csum: u32,
}

/// Filesystem-wide counts for the superblock.
pub struct SuperCounts {
    pub free_blocks: u64,
    pub free_inodes: u32,
    /// The journal inode's `i_block` and size, backed up in the superblock.
    pub journal_blocks: [u8; 60],
    pub journal_size: u64,
}

/// The 1024-byte superblock as stored in group `group` (0 = primary).
pub fn superblock(geo: &Geometry, counts: &SuperCounts, group: u16) -> [u8; 1024] {
    let mut s = [0u8; 1024];
    let t = geo.time as u32;
    put32(&mut s, 0x00, geo.inodes());
    put32(&mut s, 0x04, geo.blocks as u32);
    put32(&mut s, 0x0C, counts.free_blocks as u32);
    put32(&mut s, 0x10, counts.free_inodes);
    put32(&mut s, 0x14, 0); // first data block
    put32(&mut s, 0x18, 2); // log2(4096) - 10
    put32(&mut s, 0x1C, 2);
    put32(&mut s, 0x20, BLOCKS_PER_GROUP as u32);
    put32(&mut s, 0x24, BLOCKS_PER_GROUP as u32);
    put32(&mut s, 0x28, geo.inodes_per_group);
    put32(&mut s, 0x30, t); // write time
    put16(&mut s, 0x36, 0xFFFF); // max mount count: -1
    put16(&mut s, 0x38, 0xEF53);
    put16(&mut s, 0x3A, 1); // clean
    put16(&mut s, 0x3C, 1); // errors: continue
    put32(&mut s, 0x40, t); // last check
    put32(&mut s, 0x4C, 1); // dynamic revision
    put32(&mut s, 0x54, FIRST_INO);
    put16(&mut s, 0x58, INODE_SIZE as u16);
    put16(&mut s, 0x5A, group);
    put32(
        &mut s,
        0x5C,
        COMPAT_HAS_JOURNAL | COMPAT_EXT_ATTR | COMPAT_DIR_INDEX,
    );
    put32(
        &mut s,
        0x60,
        INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG,
    );
    put32(
        &mut s,
        0x64,
        RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE
            | RO_COMPAT_METADATA_CSUM,
    );
    s[0x68..0x78].copy_from_slice(&geo.uuid);
    put32(&mut s, 0xE0, JOURNAL_INO);
    s[0xEC..0xFC].copy_from_slice(&geo.hash_seed);
    s[0xFC] = 1; // half_md4
    s[0xFD] = 1; // journal backup: inode blocks
    put16(&mut s, 0xFE, DESC_SIZE as u16);
    put32(&mut s, 0x100, 0x0004 | 0x0008); // user_xattr, acl
    put32(&mut s, 0x108, t); // mkfs time
    s[0x10C..0x10C + 60].copy_from_slice(&counts.journal_blocks);
    put32(&mut s, 0x10C + 60, (counts.journal_size >> 32) as u32);
    put32(&mut s, 0x10C + 64, counts.journal_size as u32);
    put32(&mut s, 0x150, (geo.blocks >> 32) as u32);
    put32(&mut s, 0x158, (counts.free_blocks >> 32) as u32);
    put16(&mut s, 0x15C, EXTRA_ISIZE);
    put16(&mut s, 0x15E, EXTRA_ISIZE);
    put32(&mut s, 0x160, 0x1); // signed directory hash
    s[0x174] = 4; // 16 groups per flex group
    s[0x175] = 1; // crc32c
    let c = csum::raw(!0, &s[..0x3FC]);
    put32(&mut s, 0x3FC, c);
    s
}

/// One 64-byte group descriptor with its checksum.
pub fn group_desc(geo: &Geometry, group: u32, d: &GroupDesc) -> [u8; DESC_SIZE] {
    let mut b = [0u8; DESC_SIZE];
    put32(&mut b, 0x00, d.block_bitmap as u32);
    put32(&mut b, 0x04, d.inode_bitmap as u32);
    put32(&mut b, 0x08, d.inode_table as u32);
    put16(&mut b, 0x0C, d.free_blocks as u16);
    put16(&mut b, 0x0E, d.free_inodes as u16);
    put16(&mut b, 0x10, d.used_dirs as u16);
    put16(&mut b, 0x12, BG_INODE_ZEROED);
    put16(&mut b, 0x18, d.block_bitmap_csum as u16);
    put16(&mut b, 0x1A, d.inode_bitmap_csum as u16);
    put16(&mut b, 0x1C, d.itable_unused as u16);
    put32(&mut b, 0x20, (d.block_bitmap >> 32) as u32);
    put32(&mut b, 0x24, (d.inode_bitmap >> 32) as u32);
    put32(&mut b, 0x28, (d.inode_table >> 32) as u32);
    put16(&mut b, 0x2C, (d.free_blocks >> 16) as u16);
    put16(&mut b, 0x2E, (d.free_inodes >> 16) as u16);
    put16(&mut b, 0x30, (d.used_dirs >> 16) as u16);
    put16(&mut b, 0x32, (d.itable_unused >> 16) as u16);
    put16(&mut b, 0x38, (d.block_bitmap_csum >> 16) as u16);
    put16(&mut b, 0x3A, (d.inode_bitmap_csum >> 16) as u16);
    let c = csum::raw(csum::raw(geo.fs_seed, &group.to_le_bytes()), &b);
    put16(&mut b, 0x1E, c as u16);
    b
}

/// A timestamp as ext4 stores it: the low 32 bits of the seconds, and the extra field with
/// two epoch bits and the nanoseconds.
pub fn time_fields(sec: i64, nsec: u32) -> (u32, u32) {
    let epoch = ((sec - (sec as i32 as i64)) >> 32) as u32 & 3;
    (sec as u32, (nsec.min(999_999_999) << 2) | epoch)
}

/// Everything an inode records, before encoding.
#[derive(Clone, Debug)]
pub struct InodeFields {
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub time: (i64, u32),
    pub links: u16,
    /// In 512-byte sectors.
    pub sectors: u64,
    pub flags: u32,
    pub block: [u8; 60],
    pub xattr_block: u64,
    /// The in-inode extended attribute area (after the 32 extra bytes), already encoded.
    pub inline_xattrs: Option<Vec<u8>>,
}

impl Default for InodeFields {
    fn default() -> Self {
        InodeFields {
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            time: (0, 0),
            links: 0,
            sectors: 0,
            flags: 0,
            block: [0; 60],
            xattr_block: 0,
            inline_xattrs: None,
        }
    }
}

/// Encode an inode with its checksum.
pub fn inode(geo: &Geometry, ino: u32, f: &InodeFields) -> [u8; INODE_SIZE] {
    let mut b = [0u8; INODE_SIZE];
    let (t, extra) = time_fields(f.time.0, f.time.1);
    put16(&mut b, 0x00, f.mode);
    put16(&mut b, 0x02, f.uid as u16);
    put32(&mut b, 0x04, f.size as u32);
    put32(&mut b, 0x08, t);
    put32(&mut b, 0x0C, t);
    put32(&mut b, 0x10, t);
    put16(&mut b, 0x18, f.gid as u16);
    put16(&mut b, 0x1A, f.links);
    put32(&mut b, 0x1C, f.sectors as u32);
    put32(&mut b, 0x20, f.flags);
    b[0x28..0x64].copy_from_slice(&f.block);
    put32(&mut b, 0x68, f.xattr_block as u32);
    put32(&mut b, 0x6C, (f.size >> 32) as u32);
    put16(&mut b, 0x74, (f.sectors >> 32) as u16);
    put16(&mut b, 0x76, (f.xattr_block >> 32) as u16);
    put16(&mut b, 0x78, (f.uid >> 16) as u16);
    put16(&mut b, 0x7A, (f.gid >> 16) as u16);
    put16(&mut b, 0x80, EXTRA_ISIZE);
    put32(&mut b, 0x84, extra);
    put32(&mut b, 0x88, extra);
    put32(&mut b, 0x8C, extra);
    put32(&mut b, 0x90, t);
    put32(&mut b, 0x94, extra);
    if let Some(x) = &f.inline_xattrs {
        b[128 + EXTRA_ISIZE as usize..][..x.len()].copy_from_slice(x);
    }
    let c = csum::raw(csum::inode_seed(geo.fs_seed, ino, 0), &b);
    put16(&mut b, 0x7C, c as u16);
    put16(&mut b, 0x82, (c >> 16) as u16);
    b
}

/// A physical run of blocks backing logical blocks `logical..logical + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u32,
    pub start: u64,
    pub len: u32,
}

fn extent_header(b: &mut [u8], entries: u16, max: u16, depth: u16) {
    put16(b, 0, 0xF30A);
    put16(b, 2, entries);
    put16(b, 4, max);
    put16(b, 6, depth);
}

fn put_extent(b: &mut [u8], e: &Extent) {
    put32(b, 0, e.logical);
    put16(b, 4, e.len as u16);
    put16(b, 6, (e.start >> 32) as u16);
    put32(b, 8, e.start as u32);
}

/// The inode's `i_block` for `extents`: the extents themselves (up to four), or an index
/// pointing at `leaves` (depth 1).
pub fn extent_root(extents: &[Extent], leaves: &[u64]) -> [u8; 60] {
    let mut b = [0u8; 60];
    if leaves.is_empty() {
        extent_header(&mut b, extents.len() as u16, 4, 0);
        for (i, e) in extents.iter().enumerate() {
            put_extent(&mut b[12 + 12 * i..], e);
        }
    } else {
        extent_header(&mut b, leaves.len() as u16, 4, 1);
        for (i, (chunk, leaf)) in extents.chunks(LEAF_EXTENTS).zip(leaves).enumerate() {
            let o = 12 + 12 * i;
            put32(&mut b, o, chunk[0].logical);
            put32(&mut b, o + 4, *leaf as u32);
            put16(&mut b, o + 8, (*leaf >> 32) as u16);
        }
    }
    b
}

/// One extent tree leaf block holding `extents` (at most [`LEAF_EXTENTS`]).
pub fn extent_leaf(geo: &Geometry, ino: u32, extents: &[Extent]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    extent_header(&mut b, extents.len() as u16, LEAF_EXTENTS as u16, 0);
    for (i, e) in extents.iter().enumerate() {
        put_extent(&mut b[12 + 12 * i..], e);
    }
    let tail = 12 + 12 * LEAF_EXTENTS;
    let c = csum::raw(csum::inode_seed(geo.fs_seed, ino, 0), &b[..tail]);
    put32(&mut b, tail, c);
    b
}

/// The `i_block` of a character or block device.
pub fn device_block(major: u32, minor: u32) -> [u8; 60] {
    let mut b = [0u8; 60];
    if major < 256 && minor < 256 {
        put32(&mut b, 0, (major << 8) | minor);
    } else {
        put32(
            &mut b,
            4,
            (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12),
        );
    }
    b
}

/// Directory entry file types.
pub fn dirent_type(mode: u16) -> u8 {
    match u32::from(mode) & libc::S_IFMT {
        libc::S_IFREG => 1,
        libc::S_IFDIR => 2,
        libc::S_IFCHR => 3,
        libc::S_IFBLK => 4,
        libc::S_IFIFO => 5,
        libc::S_IFSOCK => 6,
        libc::S_IFLNK => 7,
        _ => 0,
    }
}

fn dirent_len(name_len: usize) -> usize {
    (8 + name_len).div_ceil(4) * 4
}

/// Seal a linear directory block: the checksum tail in its last 12 bytes.
fn dir_tail(geo: &Geometry, ino: u32, b: &mut [u8]) {
    let t = BLOCK - 12;
    put32(b, t, 0);
    put16(b, t + 4, 12);
    b[t + 6] = 0;
    b[t + 7] = 0xDE;
    let c = csum::raw(csum::inode_seed(geo.fs_seed, ino, 0), &b[..t]);
    put32(b, t + 8, c);
}

/// A directory's blocks in the linear format: ".", "..", then `entries` in order, each
/// block ending in its checksum tail; at least `min_blocks` blocks.
pub fn linear_dir(
    geo: &Geometry,
    ino: u32,
    parent: u32,
    entries: &[(&[u8], u32, u8)],
    min_blocks: usize,
) -> Vec<u8> {
    let usable = BLOCK - 12;
    let mut out: Vec<u8> = Vec::with_capacity(BLOCK);
    let mut block = vec![0u8; BLOCK];
    let mut used = 0usize;
    let mut last = 0usize;
    let all = [(&b"."[..], ino, 2u8), (&b".."[..], parent, 2u8)];
    let finish = |block: &mut Vec<u8>, used: usize, last: usize, out: &mut Vec<u8>| {
        if used == 0 {
            // An empty block: one unused entry spanning it.
            put16(block, 4, usable as u16);
        } else {
            put16(block, last + 4, (usable - last) as u16);
        }
        dir_tail(geo, ino, block);
        out.extend_from_slice(block);
        block.iter_mut().for_each(|x| *x = 0);
    };
    for (name, child, ftype) in all.iter().copied().chain(entries.iter().copied()) {
        let len = dirent_len(name.len());
        if used + len > usable {
            finish(&mut block, used, last, &mut out);
            used = 0;
        }
        put32(&mut block, used, child);
        put16(&mut block, used + 4, len as u16);
        block[used + 6] = name.len() as u8;
        block[used + 7] = ftype;
        block[used + 8..used + 8 + name.len()].copy_from_slice(name);
        last = used;
        used += len;
    }
    finish(&mut block, used, last, &mut out);
    while out.len() < min_blocks * BLOCK {
        finish(&mut block, 0, 0, &mut out);
    }
    out
}

/// How many linear blocks `entries` (with "." and "..") take.
pub fn linear_dir_blocks(entries: &[(&[u8], u32, u8)]) -> usize {
    let usable = BLOCK - 12;
    let mut blocks = 1;
    let mut used = 24; // "." and ".."
    for (name, _, _) in entries {
        let len = dirent_len(name.len());
        if used + len > usable {
            blocks += 1;
            used = 0;
        }
        used += len;
    }
    blocks
}

/// The jbd2 superblock of an empty internal journal of `blocks` blocks.
pub fn journal_superblock(geo: &Geometry, blocks: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    put32be(&mut b, 0x00, 0xC03B_3998);
    put32be(&mut b, 0x04, 4); // superblock v2
    put32be(&mut b, 0x0C, BLOCK as u32);
    put32be(&mut b, 0x10, blocks);
    put32be(&mut b, 0x14, 1); // first log block
    put32be(&mut b, 0x18, 1); // sequence
    b[0x30..0x40].copy_from_slice(&geo.uuid);
    put32be(&mut b, 0x40, 1); // users
    b
}

/// Set bits `from..to` of a bitmap.
pub fn set_bits(map: &mut [u8], from: usize, to: usize) {
    for i in from..to {
        map[i / 8] |= 1 << (i % 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let with: Vec<u64> = (0..130).filter(|g| has_super(*g)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
    }

    #[test]
    fn timestamps_carry_epoch_bits_and_nanoseconds() {
        let cases = [
            ((0i64, 0u32), (0u32, 0u32)),
            ((1_700_000_000, 5), (1_700_000_000, 5 << 2)),
            ((-1, 0), (u32::MAX, 0)),
            ((1i64 << 31, 0), (1u32 << 31, 1)),
            ((1i64 << 32, 7), (0, (7 << 2) | 1)),
            ((3i64 << 32, 0), (0, 3)),
        ];
        for ((sec, nsec), want) in cases {
            assert_eq!(time_fields(sec, nsec), want, "{sec}.{nsec}");
        }
    }

    #[test]
    fn device_numbers_use_the_old_encoding_when_they_fit() {
        let b = device_block(8, 1);
        assert_eq!(&b[..8], &[1, 8, 0, 0, 0, 0, 0, 0]);
        let b = device_block(259, 70000);
        let v = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        assert_eq!(b[..4], [0; 4]);
        assert_eq!(v, (70000 & 0xff) | (259 << 8) | ((70000 & !0xff) << 12));
    }

    #[test]
    fn linear_dirs_fill_blocks_and_count_them() {
        let names: Vec<Vec<u8>> = (0..600)
            .map(|i| format!("file-{i:05}").into_bytes())
            .collect();
        let entries: Vec<(&[u8], u32, u8)> = names.iter().map(|n| (n.as_slice(), 20, 1)).collect();
        let geo = Geometry {
            blocks: 1000,
            groups: 1,
            inodes_per_group: 64,
            gdt_blocks: 1,
            uuid: [1; 16],
            hash_seed: [2; 16],
            time: 0,
            fs_seed: csum::fs_seed(&[1; 16]),
        };
        let n = linear_dir_blocks(&entries);
        let bytes = linear_dir(&geo, 12, 2, &entries, 1);
        assert_eq!(bytes.len(), n * BLOCK);
        assert!(n > 1);
        // Walk every block's entries: rec_lens chain to the tail, and all names are there.
        let mut seen = 0;
        for block in bytes.chunks(BLOCK) {
            let mut off = 0;
            while off < BLOCK - 12 {
                let rec = u16::from_le_bytes([block[off + 4], block[off + 5]]) as usize;
                assert!(rec >= 8 && off + rec <= BLOCK - 12);
                if u32::from_le_bytes([block[off], block[off + 1], block[off + 2], block[off + 3]])
                    != 0
                {
                    seen += 1;
                }
                off += rec;
            }
            assert_eq!(off, BLOCK - 12);
            assert_eq!(block[BLOCK - 5], 0xDE);
        }
        assert_eq!(seen, 602);
    }
}
