//! The EROFS on-disk structures fledge writes: the superblock, compact and extended inodes,
//! the inline xattr body and xattr entries, and directory blocks. Everything is
//! little-endian; nothing here does I/O. Field layouts follow the kernel's
//! `fs/erofs/erofs_fs.h` (the format's definition).

/// Block size: 4 KiB (`blkszbits` 12), the page size the kernel needs to mount it.
pub const BLOCK: usize = 4096;
pub const BLOCK_BITS: u8 = 12;
/// The superblock's offset in block 0 and its size (no extension slots).
pub const SUPER_OFFSET: usize = 1024;
pub const SUPER_SIZE: usize = 128;
const MAGIC: u32 = 0xE0F5_E1E2;
/// `feature_compat`: the superblock checksum, and per-inode mtimes (as mkfs.erofs sets it).
const COMPAT_SB_CHKSUM: u32 = 0x1;
const COMPAT_MTIME: u32 = 0x2;
/// Inode numbers (nids) count 32-byte slots from the metadata area's start.
pub const SLOT: u64 = 32;
pub const COMPACT_SIZE: usize = 32;
pub const EXTENDED_SIZE: usize = 64;
/// A block address meaning "no block" (an inode whose data is all inline, or empty).
pub const NULL_BLOCK: u32 = u32::MAX;
/// The inline xattr body's header: name filter (unused: 0), shared count, reserved.
pub const XATTR_HEADER: usize = 12;
/// A directory entry: nid (8), name offset (2), file type (1), reserved (1).
pub const DIRENT: usize = 12;
/// The longest name a directory entry holds.
pub const NAME_MAX: usize = 255;

/// Data layouts (`i_format` bits 1..3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// All data in whole blocks from `startblk` (the last one zero-padded).
    FlatPlain = 0,
    /// Whole blocks from `startblk`, the tail right after the inode and its xattrs.
    FlatInline = 2,
    /// LZ4 physical clusters anywhere in the data area, found through a full index (one
    /// 8-byte entry per 4 KiB logical cluster) after the inode and its xattrs.
    CompressedFull = 1,
}

/// `feature_incompat`: LZ4 data ends at its physical cluster's end, zeros before it
/// (`EROFS_FEATURE_INCOMPAT_ZERO_PADDING`, "lz4_0padding"; kernel 5.3+).
const INCOMPAT_ZERO_PADDING: u32 = 0x1;

/// Logical cluster types of a full index entry (`Z_EROFS_LCLUSTER_TYPE_*`).
pub const LCLUSTER_PLAIN: u16 = 0;
pub const LCLUSTER_HEAD: u16 = 1;
pub const LCLUSTER_NONHEAD: u16 = 2;

/// Bytes of a compressed inode's metadata after the inode and its xattrs (from its start
/// at `after`, the offset just past the xattrs): padding to 8, the map header (8 bytes), 8
/// reserved bytes, then one entry per logical cluster.
pub fn zindex_size(after: u64, lclusters: u64) -> u64 {
    after.next_multiple_of(8) - after + 16 + 8 * lclusters
}

/// Append a compressed inode's map header (LZ4 for both heads, 4 KiB logical clusters,
/// no advise bits: full index, one-block physical clusters) after zero padding to 8.
pub fn zmap_header(out: &mut Vec<u8>, record_start: u64) {
    let at = record_start + out.len() as u64;
    out.resize(out.len() + (at.next_multiple_of(8) - at) as usize, 0);
    out.extend_from_slice(&[0u8; 4]); // h_reserved1 / fragment offset
    out.extend_from_slice(&0u16.to_le_bytes()); // h_advise
    out.push(0); // h_algorithmtype: LZ4, LZ4
    out.push(0); // h_clusterbits: 12 - 12
    out.extend_from_slice(&[0u8; 8]); // the legacy header padding
}

/// One full index entry: a head (`PLAIN` or `HEAD`) with the offset in its logical cluster
/// where its extent begins and its physical block, or a `NONHEAD` with the distances (in
/// logical clusters) back to its head and on to the next one.
pub fn zindex_entry(out: &mut Vec<u8>, kind: u16, clusterofs: u16, u: u32) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&clusterofs.to_le_bytes());
    out.extend_from_slice(&u.to_le_bytes());
}

/// Directory entry file types (`EROFS_FT_*`).
pub fn file_type(st_mode: u32) -> u8 {
    match st_mode & libc::S_IFMT {
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

/// The kernel's `new_encode_dev`: 12-bit major, 20-bit minor in 32 bits; `None` when the
/// numbers do not fit.
pub fn encode_dev(major: u32, minor: u32) -> Option<u32> {
    (major < 1 << 12 && minor < 1 << 20)
        .then_some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// The xattr name index of `name` and the suffix stored after it; `None` for namespaces
/// EROFS has no index for (the kernel would neither list nor find them).
pub fn xattr_prefix(name: &[u8]) -> Option<(u8, &[u8])> {
    match name {
        b"system.posix_acl_access" => return Some((2, b"")),
        b"system.posix_acl_default" => return Some((3, b"")),
        _ => {}
    }
    for (index, prefix) in [
        (1u8, b"user.".as_slice()),
        (4, b"trusted."),
        (6, b"security."),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some((index, rest));
        }
    }
    None
}

/// Bytes of one xattr entry (header, name suffix, value), padded to 4.
pub fn xattr_entry_size(suffix: usize, value: usize) -> usize {
    (4 + suffix + value).next_multiple_of(4)
}

/// Append one xattr entry (for the inline body and the shared area alike).
pub fn xattr_entry(out: &mut Vec<u8>, index: u8, suffix: &[u8], value: &[u8]) {
    let start = out.len();
    out.push(suffix.len() as u8);
    out.push(index);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(suffix);
    out.extend_from_slice(value);
    out.resize(start + xattr_entry_size(suffix.len(), value.len()), 0);
}

/// The inline xattr body's header, followed by the shared xattr ids.
pub fn xattr_header(out: &mut Vec<u8>, shared: &[u32]) {
    out.extend_from_slice(&[0u8; 4]); // name filter: no filter feature
    out.push(shared.len() as u8);
    out.extend_from_slice(&[0u8; 7]);
    for id in shared {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

/// `i_xattr_icount` for an inline xattr body of `bytes` (header included; 0: none).
pub fn xattr_icount(bytes: usize) -> u16 {
    if bytes == 0 {
        0
    } else {
        ((bytes - XATTR_HEADER) / 4 + 1) as u16
    }
}

/// Everything an inode records.
pub struct Inode {
    pub extended: bool,
    pub layout: Layout,
    pub xattr_bytes: usize,
    pub st_mode: u32,
    pub nlink: u32,
    pub size: u64,
    /// `startblk` for flat layouts, the encoded device number for devices.
    pub u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    /// Extended inodes only: compact ones take the superblock's time.
    pub mtime: i64,
    pub mtime_nsec: u32,
}

pub fn inode(out: &mut Vec<u8>, i: &Inode) {
    let format = ((i.layout as u16) << 1) | u16::from(i.extended);
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&xattr_icount(i.xattr_bytes).to_le_bytes());
    out.extend_from_slice(&(i.st_mode as u16).to_le_bytes());
    if i.extended {
        out.extend_from_slice(&[0u8; 2]); // reserved (startblk_hi with 48-bit addresses)
        out.extend_from_slice(&i.size.to_le_bytes());
        out.extend_from_slice(&i.u.to_le_bytes());
        out.extend_from_slice(&i.ino.to_le_bytes());
        out.extend_from_slice(&i.uid.to_le_bytes());
        out.extend_from_slice(&i.gid.to_le_bytes());
        out.extend_from_slice(&i.mtime.to_le_bytes());
        out.extend_from_slice(&i.mtime_nsec.to_le_bytes());
        out.extend_from_slice(&i.nlink.to_le_bytes());
        out.extend_from_slice(&[0u8; 16]);
    } else {
        out.extend_from_slice(&(i.nlink as u16).to_le_bytes());
        out.extend_from_slice(&(i.size as u32).to_le_bytes());
        // i_mtime: seconds after the superblock's epoch on kernels that read it, reserved
        // (and so 0) on older ones: only 0 means the same time to both.
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&i.u.to_le_bytes());
        out.extend_from_slice(&i.ino.to_le_bytes());
        out.extend_from_slice(&(i.uid as u16).to_le_bytes());
        out.extend_from_slice(&(i.gid as u16).to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
    }
}

/// The superblock's contents.
pub struct Super {
    pub root_nid: u16,
    pub inodes: u64,
    /// Seconds of the build time; the mtime of every compact inode.
    pub epoch: u64,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
    /// Some inode is LZ4-compressed (sets the zero-padding incompat feature).
    pub lz4: bool,
}

/// Block 0 with the superblock at 1024 and `rest` (what the metadata area puts after it in
/// this block) following, checksummed: crc32c over the block from offset 1024 with the
/// checksum field zero, in the kernel's form (seed !0, no final inversion).
pub fn first_block(s: &Super, rest: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    let mut sb = Vec::with_capacity(SUPER_SIZE);
    sb.extend_from_slice(&MAGIC.to_le_bytes());
    sb.extend_from_slice(&0u32.to_le_bytes()); // checksum, below
    sb.extend_from_slice(&(COMPAT_SB_CHKSUM | COMPAT_MTIME).to_le_bytes());
    sb.push(BLOCK_BITS);
    sb.push(0); // sb_extslots
    sb.extend_from_slice(&s.root_nid.to_le_bytes());
    sb.extend_from_slice(&s.inodes.to_le_bytes());
    sb.extend_from_slice(&s.epoch.to_le_bytes());
    sb.extend_from_slice(&0u32.to_le_bytes()); // nanoseconds of compact inodes' time
    sb.extend_from_slice(&s.blocks.to_le_bytes());
    sb.extend_from_slice(&s.meta_blkaddr.to_le_bytes());
    sb.extend_from_slice(&s.xattr_blkaddr.to_le_bytes());
    sb.extend_from_slice(&s.uuid);
    sb.extend_from_slice(&[0u8; 16]); // volume name
    let incompat = if s.lz4 { INCOMPAT_ZERO_PADDING } else { 0 };
    sb.extend_from_slice(&incompat.to_le_bytes());
    // lz4_max_distance (0: liblz4's 64 KiB; without the compression-configs feature it is
    // LZ4 only), extra devices, device table, dirblkbits (0: directory blocks are
    // filesystem blocks), long xattr prefixes, packed inode, build time after epoch, 48-bit
    // root nid: all unused, 0.
    sb.resize(SUPER_SIZE, 0);
    let end = SUPER_OFFSET + SUPER_SIZE;
    b[SUPER_OFFSET..end].copy_from_slice(&sb);
    let n = rest.len().min(BLOCK - end);
    b[end..end + n].copy_from_slice(&rest[..n]);
    let crc = !crc32c::crc32c(&b[SUPER_OFFSET..]);
    b[SUPER_OFFSET + 4..SUPER_OFFSET + 8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// One directory entry as [`dir_block`] takes it.
pub struct Dirent<'a> {
    pub name: &'a [u8],
    pub nid: u64,
    pub file_type: u8,
}

/// Split a sorted directory listing (`.` and `..` included) into blocks: the entries each
/// block holds, as the end index of each block's run. Every block holds whole entries.
pub fn dir_blocks(name_lens: impl Iterator<Item = usize>) -> (Vec<usize>, u64) {
    let mut ends = Vec::new();
    let mut used = 0usize;
    let mut count = 0usize;
    for len in name_lens {
        if used + DIRENT + len > BLOCK {
            ends.push(count);
            used = 0;
        }
        used += DIRENT + len;
        count += 1;
    }
    let size = ends.len() as u64 * BLOCK as u64 + used as u64;
    ends.push(count);
    (ends, size)
}

/// One directory block: the entries, then their names, unpadded (the reader takes the
/// last name's end from the block end or the directory's size, stopping at a NUL).
pub fn dir_block(out: &mut Vec<u8>, entries: &[Dirent]) {
    let mut nameoff = entries.len() * DIRENT;
    for e in entries {
        out.extend_from_slice(&e.nid.to_le_bytes());
        out.extend_from_slice(&(nameoff as u16).to_le_bytes());
        out.push(e.file_type);
        out.push(0);
        nameoff += e.name.len();
    }
    for e in entries {
        out.extend_from_slice(e.name);
    }
}
