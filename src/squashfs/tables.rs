//! The squashfs 4.0 on-disk structures: metadata block streams, inodes, directory listings
//! with their index, the xattr table, lookup tables (ids, fragments, xattr ids) and the
//! superblock. Everything is little-endian; nothing here does I/O.

use std::collections::HashMap;

use super::compress::Compressor;

/// Uncompressed size of a metadata block.
pub const META: usize = 8192;
/// "No such table" / "no xattrs" / "no fragment".
pub const NONE64: u64 = u64::MAX;
pub const NONE32: u32 = u32::MAX;
/// Bit of a data block size word: the block is stored uncompressed.
pub const DATA_RAW: u32 = 1 << 24;
/// Bit of a metadata block header: the block is stored uncompressed.
const META_RAW: u16 = 0x8000;
/// At most this many entries follow one directory header.
const DIR_RUN: usize = 256;

pub fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
pub fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
pub fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// One metadata block as stored: compressed when that is smaller, with its 2-byte header.
pub fn meta_block(c: &mut Compressor, raw: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    debug_assert!(raw.len() <= META);
    match c.compress(raw)? {
        Some(z) => {
            put16(out, z.len() as u16);
            out.extend_from_slice(&z);
        }
        None => {
            put16(out, raw.len() as u16 | META_RAW);
            out.extend_from_slice(raw);
        }
    }
    Ok(())
}

/// A stream of metadata blocks (the inode table, the directory table, the xattr pairs): bytes
/// are appended, and each 8 KiB block is compressed as soon as it is full, so the on-disk
/// position of everything written so far, and of the block being filled, is known.
pub struct MetaWriter {
    /// The finished blocks, as stored.
    disk: Vec<u8>,
    /// The block being filled.
    cur: Vec<u8>,
    /// On-disk offset (from the stream's start) of every finished block.
    starts: Vec<u64>,
    /// Bytes appended so far.
    total: u64,
}

impl Default for MetaWriter {
    fn default() -> Self {
        MetaWriter {
            disk: Vec::new(),
            cur: Vec::with_capacity(META),
            starts: Vec::new(),
            total: 0,
        }
    }
}

impl MetaWriter {
    /// Where the next byte goes: the on-disk offset of its block from the stream's start,
    /// and its offset in the uncompressed block.
    pub fn pos(&self) -> (u64, u16) {
        (self.disk.len() as u64, self.cur.len() as u16)
    }

    /// `pos()` as a squashfs reference (block offset << 16 | offset in the block).
    pub fn reference(&self) -> u64 {
        let (b, o) = self.pos();
        (b << 16) | u64::from(o)
    }

    /// Bytes appended so far (the uncompressed position).
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn push(&mut self, c: &mut Compressor, mut bytes: &[u8]) -> std::io::Result<()> {
        self.total += bytes.len() as u64;
        while !bytes.is_empty() {
            let n = (META - self.cur.len()).min(bytes.len());
            self.cur.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.cur.len() == META {
                self.flush(c)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, c: &mut Compressor) -> std::io::Result<()> {
        self.starts.push(self.disk.len() as u64);
        meta_block(c, &self.cur, &mut self.disk)?;
        self.cur.clear();
        Ok(())
    }

    /// The stored stream, and the on-disk offset of each of its blocks.
    pub fn finish(mut self, c: &mut Compressor) -> std::io::Result<(Vec<u8>, Vec<u64>)> {
        if !self.cur.is_empty() {
            self.flush(c)?;
        }
        Ok((self.disk, self.starts))
    }
}

/// A lookup table (ids, fragments, xattr ids) to be placed at absolute offset `at`: its
/// metadata blocks followed by the list of their absolute locations. Returns the bytes and
/// the absolute offset of the location list, which is what the superblock points to.
pub fn lookup_table(
    c: &mut Compressor,
    at: u64,
    entries: &[u8],
) -> std::io::Result<(Vec<u8>, u64)> {
    let mut w = MetaWriter::default();
    w.push(c, entries)?;
    let (mut bytes, starts) = w.finish(c)?;
    let list = at + bytes.len() as u64;
    for s in starts {
        put64(&mut bytes, at + s);
    }
    Ok((bytes, list))
}

/// The part of an inode header every inode has, the type aside.
#[derive(Clone, Copy, Debug)]
pub struct Common {
    pub perm: u16,
    pub uid: u16,
    pub gid: u16,
    pub mtime: u32,
    pub ino: u32,
}

/// One directory index entry: where a directory header is, and the first name after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirIndex {
    /// Byte offset of the header from the start of the listing.
    pub index: u32,
    /// On-disk offset of its metadata block from the directory table's start.
    pub start: u32,
    pub name: Vec<u8>,
}

/// What an inode holds beyond the common header.
pub enum Body<'a> {
    Dir {
        listing: &'a Listing,
        nlink: u32,
        parent: u32,
        xattr: u32,
    },
    File {
        blocks_start: u64,
        size: u64,
        /// Bytes not stored because they are in all-zero blocks.
        sparse: u64,
        nlink: u32,
        frag: u32,
        frag_offset: u32,
        xattr: u32,
        blocks: &'a [u32],
    },
    Symlink {
        nlink: u32,
        target: &'a [u8],
        xattr: u32,
    },
    Device {
        block: bool,
        nlink: u32,
        rdev: u32,
        xattr: u32,
    },
    Fifo {
        nlink: u32,
        xattr: u32,
    },
}

/// Basic inode types (the extended ones are these + 7); directory entries carry the basic one.
pub const T_DIR: u16 = 1;
pub const T_FILE: u16 = 2;
pub const T_SYMLINK: u16 = 3;
pub const T_BLKDEV: u16 = 4;
pub const T_CHRDEV: u16 = 5;
pub const T_FIFO: u16 = 6;
const EXT: u16 = 7;

fn header(out: &mut Vec<u8>, kind: u16, c: &Common) {
    put16(out, kind);
    put16(out, c.perm);
    put16(out, c.uid);
    put16(out, c.gid);
    put32(out, c.mtime);
    put32(out, c.ino);
}

/// Append the inode to `out`, in its basic form where that can hold it, else extended.
pub fn inode(out: &mut Vec<u8>, c: &Common, body: &Body) {
    match body {
        Body::Dir {
            listing,
            nlink,
            parent,
            xattr,
        } => {
            let size = listing.size + 3;
            if listing.index.is_empty() && *xattr == NONE32 && size <= u32::from(u16::MAX) {
                header(out, T_DIR, c);
                put32(out, listing.start);
                put32(out, *nlink);
                put16(out, size as u16);
                put16(out, listing.offset);
                put32(out, *parent);
            } else {
                header(out, T_DIR + EXT, c);
                put32(out, *nlink);
                put32(out, size);
                put32(out, listing.start);
                put32(out, *parent);
                put16(out, listing.index.len() as u16);
                put16(out, listing.offset);
                put32(out, *xattr);
                for ix in &listing.index {
                    put32(out, ix.index);
                    put32(out, ix.start);
                    put32(out, ix.name.len() as u32 - 1);
                    out.extend_from_slice(&ix.name);
                }
            }
        }
        Body::File {
            blocks_start,
            size,
            sparse,
            nlink,
            frag,
            frag_offset,
            xattr,
            blocks,
        } => {
            let basic = *nlink == 1
                && *xattr == NONE32
                && *sparse == 0
                && *size <= u64::from(u32::MAX)
                && *blocks_start <= u64::from(u32::MAX);
            if basic {
                header(out, T_FILE, c);
                put32(out, *blocks_start as u32);
                put32(out, *frag);
                put32(out, *frag_offset);
                put32(out, *size as u32);
            } else {
                header(out, T_FILE + EXT, c);
                put64(out, *blocks_start);
                put64(out, *size);
                put64(out, *sparse);
                put32(out, *nlink);
                put32(out, *frag);
                put32(out, *frag_offset);
                put32(out, *xattr);
            }
            for b in *blocks {
                put32(out, *b);
            }
        }
        Body::Symlink {
            nlink,
            target,
            xattr,
        } => {
            let ext = *xattr != NONE32;
            header(out, T_SYMLINK + if ext { EXT } else { 0 }, c);
            put32(out, *nlink);
            put32(out, target.len() as u32);
            out.extend_from_slice(target);
            if ext {
                put32(out, *xattr);
            }
        }
        Body::Device {
            block,
            nlink,
            rdev,
            xattr,
        } => {
            let ext = *xattr != NONE32;
            let kind = if *block { T_BLKDEV } else { T_CHRDEV };
            header(out, kind + if ext { EXT } else { 0 }, c);
            put32(out, *nlink);
            put32(out, *rdev);
            if ext {
                put32(out, *xattr);
            }
        }
        Body::Fifo { nlink, xattr } => {
            let ext = *xattr != NONE32;
            header(out, T_FIFO + if ext { EXT } else { 0 }, c);
            put32(out, *nlink);
            if ext {
                put32(out, *xattr);
            }
        }
    }
}

/// A device number as squashfs (and the kernel's `new_encode_dev`) stores it: 12 bits of
/// major, 20 of minor. `None` when the numbers do not fit.
pub fn encode_dev(major: u32, minor: u32) -> Option<u32> {
    if major > 0xfff || minor > 0xf_ffff {
        return None;
    }
    Some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// One directory entry to list: name, and where its inode is.
pub struct Entry<'a> {
    pub name: &'a [u8],
    /// On-disk offset of the inode's metadata block from the inode table's start.
    pub block: u32,
    pub offset: u16,
    pub ino: u32,
    /// Basic inode type.
    pub kind: u16,
}

/// Where a directory's listing went in the directory table.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// On-disk offset of the listing's first metadata block from the table's start.
    pub start: u32,
    pub offset: u16,
    /// Bytes of the listing (headers and entries).
    pub size: u32,
    pub index: Vec<DirIndex>,
}

/// Append the listing of `entries` (sorted by name) to the directory table.
///
/// Entries are grouped in runs behind a header holding the inode block and a base inode
/// number: a new run starts when the inode block changes, the inode number is more than
/// ±32767 from the base, 256 entries are reached, or the listing crosses into a new
/// metadata block. The last rule puts a header at the start of every block the listing
/// spans, and each such header gets an index entry, so a lookup decompresses one block.
pub fn listing(
    w: &mut MetaWriter,
    c: &mut Compressor,
    entries: &[Entry],
) -> std::io::Result<Listing> {
    let (start, offset) = w.pos();
    let base = w.total();
    // Plan the runs on the uncompressed positions: (first entry, end) of each.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut at = base;
    let mut cur: Option<(usize, u64, u32, u32)> = None; // first, header position, block, base ino
    for (i, e) in entries.iter().enumerate() {
        let split = match cur {
            None => true,
            Some((first, hpos, block, ino)) => {
                i - first == DIR_RUN
                    || e.block != block
                    || i16::try_from(i64::from(e.ino) - i64::from(ino)).is_err()
                    || at / META as u64 != hpos / META as u64
            }
        };
        if split {
            if let Some((first, ..)) = cur {
                runs.push((first, i));
            }
            cur = Some((i, at, e.block, e.ino));
            at += 12;
        }
        at += 8 + e.name.len() as u64;
    }
    if let Some((first, ..)) = cur {
        runs.push((first, entries.len()));
    }
    let mut index = Vec::new();
    let mut indexed_block = base / META as u64;
    let mut buf = Vec::with_capacity(META);
    for (first, end) in runs {
        let hpos = w.total();
        if hpos / META as u64 != indexed_block {
            indexed_block = hpos / META as u64;
            index.push(DirIndex {
                index: (hpos - base) as u32,
                start: w.pos().0 as u32,
                name: entries[first].name.to_vec(),
            });
        }
        let head = &entries[first];
        buf.clear();
        put32(&mut buf, (end - first - 1) as u32);
        put32(&mut buf, head.block);
        put32(&mut buf, head.ino);
        for e in &entries[first..end] {
            put16(&mut buf, e.offset);
            put16(
                &mut buf,
                (i64::from(e.ino) - i64::from(head.ino)) as i16 as u16,
            );
            put16(&mut buf, e.kind);
            put16(&mut buf, (e.name.len() - 1) as u16);
            buf.extend_from_slice(e.name);
        }
        w.push(c, &buf)?;
    }
    debug_assert_eq!(w.total(), at);
    Ok(Listing {
        start: start as u32,
        offset,
        size: (w.total() - base) as u32,
        index,
    })
}

/// The squashfs prefix id of an xattr name and the rest of the name; `None` for names
/// outside `user.`, `trusted.` and `security.`, the only namespaces squashfs stores.
pub fn xattr_prefix(name: &[u8]) -> Option<(u16, &[u8])> {
    const PREFIXES: [(&[u8], u16); 3] = [(b"user.", 0), (b"trusted.", 1), (b"security.", 2)];
    PREFIXES.iter().find_map(|(p, id)| {
        name.strip_prefix(*p)
            .filter(|rest| !rest.is_empty())
            .map(|rest| (*id, rest))
    })
}

/// The xattr table being built: key/value pairs in a metadata stream, one id per distinct
/// set of attributes (identical sets share an id).
#[derive(Default)]
pub struct XattrTable {
    kv: MetaWriter,
    /// (reference into `kv`, number of pairs, bytes) of each id.
    ids: Vec<(u64, u32, u32)>,
    seen: HashMap<Vec<u8>, u32>,
}

impl XattrTable {
    /// The id of this set of attributes (all names valid, see [`xattr_prefix`]).
    pub fn add(
        &mut self,
        c: &mut Compressor,
        xattrs: &[crate::tree::Xattr],
    ) -> std::io::Result<u32> {
        let mut enc = Vec::new();
        for (name, value) in xattrs {
            let (prefix, rest) = xattr_prefix(name).unwrap_or((0, name));
            put16(&mut enc, prefix);
            put16(&mut enc, rest.len() as u16);
            enc.extend_from_slice(rest);
            put32(&mut enc, value.len() as u32);
            enc.extend_from_slice(value);
        }
        if let Some(id) = self.seen.get(&enc) {
            return Ok(*id);
        }
        let id = self.ids.len() as u32;
        self.ids
            .push((self.kv.reference(), xattrs.len() as u32, enc.len() as u32));
        self.kv.push(c, &enc)?;
        self.seen.insert(enc, id);
        Ok(id)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The whole table placed at absolute offset `at`: pairs, id lookup table, then the
    /// header the superblock points to (returned as the second value).
    pub fn finish(self, c: &mut Compressor, at: u64) -> std::io::Result<(Vec<u8>, u64)> {
        let count = self.ids.len() as u32;
        let (mut out, _) = self.kv.finish(c)?;
        let mut entries = Vec::with_capacity(self.ids.len() * 16);
        for (r, n, size) in &self.ids {
            put64(&mut entries, *r);
            put32(&mut entries, *n);
            put32(&mut entries, *size);
        }
        let table_at = at + out.len() as u64;
        let (table, list) = lookup_table(c, table_at, &entries)?;
        out.extend_from_slice(&table[..(list - table_at) as usize]);
        let head = at + out.len() as u64;
        put64(&mut out, at);
        put32(&mut out, count);
        put32(&mut out, 0);
        out.extend_from_slice(&table[(list - table_at) as usize..]);
        Ok((out, head))
    }
}

/// Superblock fields (the constant ones are filled in by [`superblock`]).
pub struct Super {
    pub inodes: u32,
    pub mkfs_time: u32,
    pub block_size: u32,
    pub fragments: u32,
    pub compression: u16,
    pub flags: u16,
    pub ids: u16,
    pub root: u64,
    pub bytes_used: u64,
    pub id_table: u64,
    pub xattr_table: u64,
    pub inode_table: u64,
    pub dir_table: u64,
    pub frag_table: u64,
    pub export_table: u64,
}

pub const SUPER_SIZE: usize = 96;
pub const F_ALWAYS_FRAGMENTS: u16 = 0x0020;
pub const F_DUPLICATES: u16 = 0x0040;
pub const F_NO_XATTRS: u16 = 0x0200;
pub const F_COMP_OPTS: u16 = 0x0400;

pub fn superblock(s: &Super) -> Vec<u8> {
    let mut b = Vec::with_capacity(SUPER_SIZE);
    put32(&mut b, 0x7371_7368); // "hsqs"
    put32(&mut b, s.inodes);
    put32(&mut b, s.mkfs_time);
    put32(&mut b, s.block_size);
    put32(&mut b, s.fragments);
    put16(&mut b, s.compression);
    put16(&mut b, s.block_size.trailing_zeros() as u16);
    put16(&mut b, s.flags);
    put16(&mut b, s.ids);
    put16(&mut b, 4);
    put16(&mut b, 0);
    for v in [
        s.root,
        s.bytes_used,
        s.id_table,
        s.xattr_table,
        s.inode_table,
        s.dir_table,
        s.frag_table,
        s.export_table,
    ] {
        put64(&mut b, v);
    }
    debug_assert_eq!(b.len(), SUPER_SIZE);
    b
}
