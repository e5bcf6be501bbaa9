//! Hashed (htree, "dx") directories: ext4's indexed directory format, for every directory
//! whose entries do not fit into one block.
//!
//! Layout produced by [`indexed_dir_blocks`] (4096-byte blocks, logical block numbers):
//!
//! * block 0, the dx_root: the "." entry (rec_len 12), the ".." entry whose rec_len covers the
//!   rest of the block, the 8-byte `dx_root_info` (hash version, info length 8, indirect
//!   levels), then the dx entries (`{hash, block}`; the first entry's hash field holds the
//!   `{limit, count}` pair) and, with `metadata_csum`, a `dx_tail` in the last 8 bytes;
//! * blocks 1..=L, the leaves: ordinary directory blocks holding the entries sorted by
//!   (major hash, minor hash, name), filled like `e2fsck -D` does (a leaf is closed once less
//!   than 20% of it is free), each ending in the 12-byte checksum dirent tail with
//!   `metadata_csum`;
//! * with a second index level, the interior dx nodes after the leaves (as `e2fsck -D` places
//!   them): a fake empty dirent spanning the block, then `{limit, count}` and the dx entries.
//!
//! A run of entries with the same major hash is never split across two leaves unless it does
//! not fit into one; when it must be, the index entry of the continuation leaf carries the
//! hash with its lowest bit set, which tells the kernel's lookup to go on into that leaf.

use thiserror::Error;

use super::csum;

/// The directory block size this module lays out.
const BLOCK_SIZE: usize = 4096;
/// Size of the checksum dirent tail at the end of every leaf (`metadata_csum`).
const DIRENT_TAIL_SIZE: usize = 12;
/// Size of the `dx_tail` after the dx entries of the root and interior nodes.
const DX_TAIL_SIZE: usize = 8;
/// Size of one dx entry (`{hash, block}`).
const DX_ENTRY_SIZE: usize = 8;
/// Offset of the `{limit, count}` pair in the root: "." (12) + ".." (12) + dx_root_info (8).
const ROOT_COUNT_OFFSET: usize = 32;
/// Offset of the `{limit, count}` pair in an interior node: after its empty 8-byte dirent.
const NODE_COUNT_OFFSET: usize = 8;
/// Free space a leaf keeps, as `e2fsck -D` does by default (`indexed_dir_slack_percentage`).
const SLACK_PERCENT: usize = 20;
/// File type byte of the checksum dirent tail.
const FT_DIR_CSUM: u8 = 0xDE;
/// Directory file type in dirents.
const FT_DIR: u8 = 2;
/// The kernel's end-of-directory hash marker (`EXT4_HTREE_EOF_32BIT`): a name hashing to it
/// (shifted) is moved one step down.
const HTREE_EOF_32BIT: u32 = 0x7fff_ffff;

/// The directory hash algorithm: `s_def_hash_version` 0, 1 or 2 (the value stored in the
/// dx_root); whether chars are signed is a separate flag. fledge writes half_md4 (mke2fs's
/// default); the other two are implemented and tested against debugfs for completeness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub enum HashVersion {
    Legacy,
    HalfMd4,
    Tea,
}

impl HashVersion {
    /// The value of `s_def_hash_version` / `dx_root_info.hash_version`.
    pub fn code(self) -> u8 {
        match self {
            HashVersion::Legacy => 0,
            HashVersion::HalfMd4 => 1,
            HashVersion::Tea => 2,
        }
    }
}

/// One directory entry to place in an indexed directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub name: &'a [u8],
    pub ino: u32,
    /// As in ext4 dirents: 1 reg, 2 dir, 3 chr, 4 blk, 5 fifo, 6 sock, 7 symlink.
    pub file_type: u8,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HtreeError {
    #[error(
        "directory with {entries} entries needs {leaves} leaf blocks, more than a two-level htree holds ({max})"
    )]
    TooManyEntries {
        entries: usize,
        leaves: usize,
        max: usize,
    },
    #[error("directory entry {name:?} has an invalid name: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("directory entry {name:?} appears more than once")]
    DuplicateName { name: String },
    #[error("directory entry {name:?} points at inode 0")]
    ZeroInode { name: String },
    #[error("directory entry {name:?} has invalid file type {file_type}")]
    InvalidFileType { name: String, file_type: u8 },
}

fn display_name(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Name hashes (fs/ext4/hash.c, lib/ext2fs/dirhash.c)
// ---------------------------------------------------------------------------------------------

/// The MD4 initial state, used as the seed when `s_hash_seed` is all zero.
const DEFAULT_SEED: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

/// ext4's directory name hash (major, minor) as the kernel's `ext4fs_dirhash` computes it,
/// for `signed` (s_flags signed_directory_hash; x86 mke2fs default) or unsigned char handling.
/// `seed`: s_hash_seed as four u32 (read little-endian from the 16 UUID bytes); an all-zero
/// seed means the kernel default seed. The returned major hash has its lowest bit cleared
/// (as the kernel does); the legacy hash has no minor hash (0).
pub fn name_hash(name: &[u8], version: HashVersion, seed: &[u32; 4], signed: bool) -> (u32, u32) {
    let mut buf = if seed.iter().any(|&w| w != 0) {
        *seed
    } else {
        DEFAULT_SEED
    };
    let (major, minor) = match version {
        HashVersion::Legacy => (legacy_hash(name, signed), 0),
        HashVersion::HalfMd4 => {
            fold(name, &mut buf, signed, half_md4_transform);
            (buf[1], buf[2])
        }
        HashVersion::Tea => {
            fold(name, &mut buf, signed, tea_transform);
            (buf[0], buf[1])
        }
    };
    let mut major = major & !1;
    if major == HTREE_EOF_32BIT << 1 {
        major = (HTREE_EOF_32BIT - 1) << 1;
    }
    (major, minor)
}

/// A name byte as the hash sees it: sign-extended (`signed char`) or not.
fn char_value(byte: u8, signed: bool) -> u32 {
    if signed {
        i32::from(byte as i8) as u32
    } else {
        u32::from(byte)
    }
}

/// The kernel's `str2hashbuf`: packs up to `4 * out.len()` bytes of `rest` (the remaining
/// name, whose full length sets the padding) big-end-first into words, padding the rest.
/// Feed `name` to `transform` in chunks of `W` words (four name bytes each), as the kernel's
/// ext4fs_dirhash does for half_md4 (8 words) and tea (4 words).
fn fold<const W: usize>(
    name: &[u8],
    buf: &mut [u32; 4],
    signed: bool,
    transform: fn(&mut [u32; 4], &[u32; W]),
) {
    let mut words = [0u32; W];
    let mut rest = name;
    while !rest.is_empty() {
        str_to_words(rest, &mut words, signed);
        transform(buf, &words);
        rest = &rest[rest.len().min(4 * W)..];
    }
}

fn str_to_words(rest: &[u8], out: &mut [u32], signed: bool) {
    // The kernel truncates the length to an int and then to u32; names are at most 255 bytes.
    let len = rest.len() as u32;
    let mut pad = len | (len << 8);
    pad |= pad << 16;
    let take = rest.len().min(out.len() * 4);
    let mut val = pad;
    let mut filled = 0;
    for (i, &byte) in rest[..take].iter().enumerate() {
        val = char_value(byte, signed).wrapping_add(val << 8);
        if i % 4 == 3 {
            out[filled] = val;
            filled += 1;
            val = pad;
        }
    }
    if filled < out.len() {
        out[filled] = val;
        filled += 1;
    }
    for word in &mut out[filled..] {
        *word = pad;
    }
}

/// The legacy "dx_hack_hash".
fn legacy_hash(name: &[u8], signed: bool) -> u32 {
    let (mut hash0, mut hash1) = (0x12a3_fe2d_u32, 0x37ab_e8f9_u32);
    for &byte in name {
        let mut hash = hash1.wrapping_add(hash0 ^ char_value(byte, signed).wrapping_mul(7_152_373));
        if hash & 0x8000_0000 != 0 {
            hash = hash.wrapping_sub(0x7fff_ffff);
        }
        hash1 = hash0;
        hash0 = hash;
    }
    hash0 << 1
}

/// Three rounds of MD4 over eight input words (the kernel's `half_md4_transform`).
fn half_md4_transform(buf: &mut [u32; 4], input: &[u32; 8]) {
    type Function = fn(u32, u32, u32) -> u32;
    /// Per round: the boolean function (selection, majority, parity) and the added constant.
    const FUNCTIONS: [(Function, u32); 3] = [
        (|x, y, z| z ^ (x & (y ^ z)), 0),
        (|x, y, z| (x & y).wrapping_add((x ^ y) & z), 0x5a82_7999),
        (|x, y, z| x ^ y ^ z, 0x6ed9_eba1),
    ];
    /// Per round: the input word each of the eight steps adds.
    const WORDS: [[usize; 8]; 3] = [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [1, 3, 5, 7, 0, 2, 4, 6],
        [3, 7, 2, 6, 1, 5, 0, 4],
    ];
    /// Per round: the rotation of steps 0..4 (repeated for steps 4..8).
    const SHIFTS: [[u32; 4]; 3] = [[3, 7, 11, 19], [3, 5, 9, 13], [3, 9, 11, 15]];

    let mut s = *buf;
    for ((&(func, k), words), shifts) in FUNCTIONS.iter().zip(WORDS).zip(SHIFTS) {
        for (n, word) in words.into_iter().enumerate() {
            // Step n updates a = s[(4 - n % 4) % 4] from the next three words in rotation:
            // a = rol(a + func(b, c, d) + in[word] + k, shift), as MD4's ROUND(a, b, c, d)
            // followed by ROUND(d, a, b, c) and so on.
            let a = (4 - n % 4) % 4;
            let (b, c, d) = ((a + 1) % 4, (a + 2) % 4, (a + 3) % 4);
            s[a] = s[a]
                .wrapping_add(func(s[b], s[c], s[d]))
                .wrapping_add(input[word].wrapping_add(k))
                .rotate_left(shifts[n % 4]);
        }
    }
    for (out, add) in buf.iter_mut().zip(s) {
        *out = out.wrapping_add(add);
    }
}

/// Sixteen TEA rounds keyed by four input words (the kernel's `TEA_transform`).
fn tea_transform(buf: &mut [u32; 4], input: &[u32; 4]) {
    const DELTA: u32 = 0x9e37_79b9;
    let (mut b0, mut b1) = (buf[0], buf[1]);
    let [a, b, c, d] = *input;
    let mut sum = 0u32;
    for _ in 0..16 {
        sum = sum.wrapping_add(DELTA);
        b0 = b0.wrapping_add(
            ((b1 << 4).wrapping_add(a)) ^ b1.wrapping_add(sum) ^ ((b1 >> 5).wrapping_add(b)),
        );
        b1 = b1.wrapping_add(
            ((b0 << 4).wrapping_add(c)) ^ b0.wrapping_add(sum) ^ ((b0 >> 5).wrapping_add(d)),
        );
    }
    buf[0] = buf[0].wrapping_add(b0);
    buf[1] = buf[1].wrapping_add(b1);
}

// ---------------------------------------------------------------------------------------------
// Block layout
// ---------------------------------------------------------------------------------------------

/// The on-disk size of a dirent with a name of `name_len` bytes (`EXT4_DIR_REC_LEN`).
fn rec_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// An entry with its hash, ready for placement.
struct Hashed<'a> {
    hash: u32,
    minor: u32,
    entry: &'a DirEntry<'a>,
}

/// One leaf: the range of sorted entries it holds and the hash its index entry carries
/// (with the continuation bit set when it continues a run of equal hashes).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Leaf {
    start: usize,
    end: usize,
    index_hash: u32,
}

/// Splits entries (their major hashes and record lengths, in hash order) into leaves of
/// `usable` bytes, closing a leaf once it has less than `slack` bytes free and keeping runs
/// of equal hashes together whenever the run fits into one leaf.
fn pack_leaves(items: &[(u32, usize)], usable: usize, slack: usize) -> Vec<Leaf> {
    let first_hash = items.first().map_or(0, |&(hash, _)| hash);
    let mut leaves = Vec::new();
    let mut current = Leaf {
        start: 0,
        end: 0,
        index_hash: first_hash,
    };
    let mut used = 0usize;
    let mut i = 0;
    while i < items.len() {
        let hash = items[i].0;
        let run_end = items[i..]
            .iter()
            .position(|&(h, _)| h != hash)
            .map_or(items.len(), |n| i + n);
        let run_size: usize = items[i..run_end].iter().map(|&(_, size)| size).sum();
        let free = usable - used;
        if used > 0 && (free < slack || run_size > free) {
            current.end = i;
            leaves.push(current);
            // The previous entry has a different hash: no continuation.
            current = Leaf {
                start: i,
                end: i,
                index_hash: hash,
            };
            used = 0;
        }
        for (k, &(_, size)) in items.iter().enumerate().take(run_end).skip(i) {
            if used + size > usable {
                // A run larger than a whole leaf: continue it in the next one.
                current.end = k;
                leaves.push(current);
                current = Leaf {
                    start: k,
                    end: k,
                    index_hash: hash | 1,
                };
                used = 0;
            }
            used += size;
        }
        i = run_end;
    }
    current.end = items.len();
    leaves.push(current);
    leaves
}

/// How many leaves each interior node indexes: none (an empty list) when the root can point
/// at all leaves itself, else an even split over as few nodes as hold them; `None` when even
/// a full root of full nodes cannot.
fn node_shares(leaves: usize, root_limit: usize, node_limit: usize) -> Option<Vec<usize>> {
    if leaves <= root_limit {
        return Some(Vec::new());
    }
    let count = leaves.div_ceil(node_limit);
    if count > root_limit {
        return None;
    }
    let (base, extra) = (leaves / count, leaves % count);
    Some((0..count).map(|n| base + usize::from(n < extra)).collect())
}

fn put_u16(block: &mut [u8], at: usize, value: u16) {
    block[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

fn put_u32(block: &mut [u8], at: usize, value: u32) {
    block[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// Writes a dirent header and name at `at`.
fn put_dirent(block: &mut [u8], at: usize, ino: u32, rec: usize, name: &[u8], file_type: u8) {
    put_u32(block, at, ino);
    // rec_len <= 4096 always fits 16 bits.
    put_u16(block, at + 4, rec as u16);
    block[at + 6] = name.len() as u8;
    block[at + 7] = file_type;
    block[at + 8..at + 8 + name.len()].copy_from_slice(name);
}

/// Fills a leaf block with `entries` (in order), the last one's record reaching the end of the
/// usable space, and adds the checksum tail.
fn write_leaf(block: &mut [u8], entries: &[Hashed], csum_seed: Option<u32>) {
    let usable = BLOCK_SIZE
        - if csum_seed.is_some() {
            DIRENT_TAIL_SIZE
        } else {
            0
        };
    if entries.is_empty() {
        put_dirent(block, 0, 0, usable, b"", 0);
    }
    let mut at = 0;
    for (n, item) in entries.iter().enumerate() {
        let name = item.entry.name;
        let rec = if n + 1 == entries.len() {
            usable - at
        } else {
            rec_len(name.len())
        };
        put_dirent(block, at, item.entry.ino, rec, name, item.entry.file_type);
        at += rec;
    }
    if let Some(seed) = csum_seed {
        put_dirent(block, usable, 0, DIRENT_TAIL_SIZE, b"", FT_DIR_CSUM);
        let crc = csum::raw(seed, &block[..usable]);
        put_u32(block, usable + 8, crc);
    }
}

/// Writes `{limit, count}` and the dx entries at `count_offset`, and the dx_tail checksum
/// as the kernel's `ext4_dx_csum` computes it.
fn write_dx_entries(
    block: &mut [u8],
    count_offset: usize,
    limit: usize,
    entries: &[(u32, u32)],
    csum_seed: Option<u32>,
) {
    // Limits are at most 511 and counts never exceed them.
    put_u16(block, count_offset, limit as u16);
    put_u16(block, count_offset + 2, entries.len() as u16);
    for (n, &(hash, target)) in entries.iter().enumerate() {
        let at = count_offset + n * DX_ENTRY_SIZE;
        if n > 0 {
            put_u32(block, at, hash);
        }
        put_u32(block, at + 4, target);
    }
    if let Some(seed) = csum_seed {
        let tail = count_offset + limit * DX_ENTRY_SIZE;
        let covered = count_offset + entries.len() * DX_ENTRY_SIZE;
        // dt_reserved is zero; the checksum covers it and a zeroed dt_checksum.
        let crc = csum::raw(seed, &block[..covered]);
        let crc = csum::raw(crc, &block[tail..tail + 4]);
        let crc = csum::raw(crc, &[0; 4]);
        put_u32(block, tail + 4, crc);
    }
}

fn validate(entry: &DirEntry) -> Result<(), HtreeError> {
    let name = entry.name;
    let invalid = |reason| HtreeError::InvalidName {
        name: display_name(name),
        reason,
    };
    if name.is_empty() || name.len() > 255 {
        return Err(invalid("length must be 1 to 255 bytes"));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(invalid("contains '/' or NUL"));
    }
    if name == b"." || name == b".." {
        return Err(invalid(
            "\".\" and \"..\" are added by the directory itself",
        ));
    }
    if entry.ino == 0 {
        return Err(HtreeError::ZeroInode {
            name: display_name(name),
        });
    }
    if !(1..=7).contains(&entry.file_type) {
        return Err(HtreeError::InvalidFileType {
            name: display_name(name),
            file_type: entry.file_type,
        });
    }
    Ok(())
}

/// The complete blocks (concatenated, len = n * 4096) of an indexed directory holding
/// `entries` (any order; names unique, 1..=255 bytes, no '/' or NUL) plus "." (`self_ino`)
/// and ".." (`parent_ino`). Block 0 is the dx_root, then the leaves (sorted by hash, filled
/// like `e2fsck -D` does), then, when one index level is not enough, the interior nodes.
/// With `csum_seed = Some(inode_seed)` (metadata_csum) every leaf ends in the checksum dirent
/// tail and every dx block has its dx_tail; with `None`, no tails.
pub fn indexed_dir_blocks(
    entries: &[DirEntry],
    self_ino: u32,
    parent_ino: u32,
    version: HashVersion,
    seed: &[u32; 4],
    signed: bool,
    csum_seed: Option<u32>,
) -> Result<Vec<u8>, HtreeError> {
    for entry in entries {
        validate(entry)?;
    }
    let mut sorted: Vec<Hashed> = entries
        .iter()
        .map(|entry| {
            let (hash, minor) = name_hash(entry.name, version, seed, signed);
            Hashed { hash, minor, entry }
        })
        .collect();
    sorted.sort_unstable_by(|a, b| {
        (a.hash, a.minor, a.entry.name).cmp(&(b.hash, b.minor, b.entry.name))
    });
    if let Some(pair) = sorted
        .windows(2)
        .find(|pair| pair[0].entry.name == pair[1].entry.name)
    {
        return Err(HtreeError::DuplicateName {
            name: display_name(pair[0].entry.name),
        });
    }
    layout(&sorted, self_ino, parent_ino, version, csum_seed)
}

/// Lays out the blocks of an indexed directory from entries already hashed and sorted by
/// (hash, minor hash, name).
fn layout(
    sorted: &[Hashed],
    self_ino: u32,
    parent_ino: u32,
    version: HashVersion,
    csum_seed: Option<u32>,
) -> Result<Vec<u8>, HtreeError> {
    let (leaf_tail, dx_tail) = match csum_seed {
        Some(_) => (DIRENT_TAIL_SIZE, DX_TAIL_SIZE),
        None => (0, 0),
    };
    let usable = BLOCK_SIZE - leaf_tail;
    let slack = (usable * SLACK_PERCENT / 100).max(12);
    let root_limit = (BLOCK_SIZE - ROOT_COUNT_OFFSET - dx_tail) / DX_ENTRY_SIZE;
    let node_limit = (BLOCK_SIZE - NODE_COUNT_OFFSET - dx_tail) / DX_ENTRY_SIZE;

    let items: Vec<(u32, usize)> = sorted
        .iter()
        .map(|item| (item.hash, rec_len(item.entry.name.len())))
        .collect();
    let leaves = pack_leaves(&items, usable, slack);
    let shares =
        node_shares(leaves.len(), root_limit, node_limit).ok_or(HtreeError::TooManyEntries {
            entries: sorted.len(),
            leaves: leaves.len(),
            max: root_limit * node_limit,
        })?;

    // Index entries pointing at the leaves (logical blocks 1..=L).
    let leaf_refs: Vec<(u32, u32)> = leaves
        .iter()
        .zip(1u32..)
        .map(|(leaf, block)| (leaf.index_hash, block))
        .collect();
    let mut rest = leaf_refs.as_slice();
    let nodes: Vec<&[(u32, u32)]> = shares
        .iter()
        .map(|&share| {
            let (head, tail) = rest.split_at(share);
            rest = tail;
            head
        })
        .collect();
    let total_blocks = 1 + leaves.len() + nodes.len();
    let mut out = vec![0u8; total_blocks * BLOCK_SIZE];
    let (root, rest) = out.split_at_mut(BLOCK_SIZE);
    let mut blocks = rest.chunks_exact_mut(BLOCK_SIZE);

    // Root: ".", "..", dx_root_info, entries.
    put_dirent(root, 0, self_ino, 12, b".", FT_DIR);
    put_dirent(root, 12, parent_ino, BLOCK_SIZE - 12, b"..", FT_DIR);
    root[24 + 4] = version.code();
    root[24 + 5] = 8; // info_length
    root[24 + 6] = u8::from(!nodes.is_empty()); // indirect_levels
    let root_entries: Vec<(u32, u32)> = if nodes.is_empty() {
        leaf_refs.clone()
    } else {
        nodes
            .iter()
            .zip(1 + leaves.len() as u32..)
            .map(|(node, block)| (node.first().map_or(0, |&(hash, _)| hash), block))
            .collect()
    };
    write_dx_entries(
        root,
        ROOT_COUNT_OFFSET,
        root_limit,
        &root_entries,
        csum_seed,
    );

    for (leaf, block) in leaves.iter().zip(blocks.by_ref()) {
        write_leaf(block, &sorted[leaf.start..leaf.end], csum_seed);
    }
    for (node, block) in nodes.iter().zip(blocks) {
        put_u16(block, 4, BLOCK_SIZE as u16); // empty dirent spanning the block
        write_dx_entries(block, NODE_COUNT_OFFSET, node_limit, node, csum_seed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
