//! Extended attributes as ext4 stores them: in the inode's spare space first, the rest in
//! one attribute block. POSIX ACLs are converted from the xattr form (`system.posix_acl_*`,
//! as tar and `getxattr` carry them) to ext4's compact on-disk form.

use super::csum;
use super::format::{put16, put32, BLOCK, EXTRA_ISIZE, INODE_SIZE};

const MAGIC: u32 = 0xEA02_0000;
/// Bytes of the in-inode area: from after the extra fields to the end of the inode.
const INLINE_AREA: usize = INODE_SIZE - 128 - EXTRA_ISIZE as usize;
const BLOCK_HEADER: usize = 32;

/// An attribute ext4 cannot hold.
#[derive(Debug, thiserror::Error)]
pub enum XattrError {
    #[error("extended attributes need {total} bytes (the largest, {name}, has {value}): ext4 without ea_inode holds at most about 4000 bytes of them per inode")]
    TooLarge {
        name: String,
        value: usize,
        total: usize,
    },
    #[error("extended attribute {name} is not a valid POSIX ACL")]
    BadAcl { name: String },
}

/// One attribute in ext4's form: name index, name suffix, value.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// The full name, for messages.
    full: String,
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Entry {
    fn entry_len(&self) -> usize {
        (16 + self.name.len()).div_ceil(4) * 4
    }
    fn value_len(&self) -> usize {
        self.value.len().div_ceil(4) * 4
    }
    /// `ext4_xattr_hash_entry`.
    fn hash(&self) -> u32 {
        let mut h: u32 = 0;
        for &c in &self.name {
            h = (h << 5) ^ (h >> 27) ^ u32::from(c);
        }
        for w in self.value.chunks(4) {
            let mut word = [0u8; 4];
            word[..w.len()].copy_from_slice(w);
            h = (h << 16) ^ (h >> 16) ^ u32::from_le_bytes(word);
        }
        h
    }
}

/// The name index and suffix ext4 stores for a full attribute name.
fn split_name(name: &[u8]) -> (u8, &[u8]) {
    const TABLE: [(&[u8], u8); 7] = [
        (b"system.posix_acl_access", 2),
        (b"system.posix_acl_default", 3),
        (b"system.richacl", 8),
        (b"user.", 1),
        (b"trusted.", 4),
        (b"security.", 6),
        (b"system.", 7),
    ];
    for (prefix, index) in TABLE {
        if index == 2 || index == 3 || index == 8 {
            if name == prefix {
                return (index, b"");
            }
        } else if let Some(rest) = name.strip_prefix(prefix) {
            return (index, rest);
        }
    }
    (0, name)
}

/// Convert a POSIX ACL from the xattr form (version 2, 8-byte entries) to ext4's (version 1,
/// 4-byte entries for the owner, group, mask and other; 8 bytes for named users and groups).
fn acl_to_disk(name: &str, value: &[u8]) -> Result<Vec<u8>, XattrError> {
    let bad = || XattrError::BadAcl { name: name.into() };
    if value.len() < 4 || (value.len() - 4) % 8 != 0 || value[..4] != 2u32.to_le_bytes() {
        return Err(bad());
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in value[4..].chunks(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        out.extend_from_slice(&e[0..4]);
        match tag {
            0x01 | 0x04 | 0x10 | 0x20 => {}
            0x02 | 0x08 => out.extend_from_slice(&e[4..8]),
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// Where an inode's attributes go.
#[derive(Debug, Default)]
pub struct Placed {
    /// The in-inode area (magic, entries, values), when any attribute is stored there.
    pub inline: Option<Vec<u8>>,
    /// The attribute block without its checksum (see [`seal_block`]), when needed.
    pub block: Option<Vec<u8>>,
}

/// Lay out `xattrs` (full names, values as `getxattr` returns them).
pub fn place(xattrs: &[crate::tree::Xattr]) -> Result<Placed, XattrError> {
    if xattrs.is_empty() {
        return Ok(Placed::default());
    }
    let mut entries = Vec::with_capacity(xattrs.len());
    for (name, value) in xattrs {
        let (index, suffix) = split_name(name);
        let value = if index == 2 || index == 3 {
            acl_to_disk(&String::from_utf8_lossy(name), value)?
        } else {
            value.to_vec()
        };
        entries.push(Entry {
            full: String::from_utf8_lossy(name).into_owned(),
            index,
            name: suffix.to_vec(),
            value,
        });
    }
    // ext4 keeps block entries sorted by (index, name length, name) and searches them so.
    entries.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));

    // In-inode: the magic, entries, the 4-byte end marker, values at the end of the area.
    let mut inline = Vec::new();
    let mut rest = Vec::new();
    let mut used = 4 + 4;
    for e in entries {
        let need = e.entry_len() + e.value_len();
        if rest.is_empty() && used + need <= INLINE_AREA {
            used += need;
            inline.push(e);
        } else {
            rest.push(e);
        }
    }
    let mut placed = Placed::default();
    if !inline.is_empty() {
        let mut area = vec![0u8; INLINE_AREA];
        put32(&mut area, 0, MAGIC);
        // Value offsets count from the first entry (after the magic).
        write_entries(&mut area[4..], &inline, INLINE_AREA - 4, 0);
        placed.inline = Some(area);
    }
    if !rest.is_empty() {
        let total: usize = BLOCK_HEADER
            + rest
                .iter()
                .map(|e| e.entry_len() + e.value_len())
                .sum::<usize>()
            + 4;
        if total > BLOCK {
            let (name, value) = rest
                .iter()
                .max_by_key(|e| e.value.len())
                .map_or((String::new(), 0), |e| (e.full.clone(), e.value.len()));
            return Err(XattrError::TooLarge { name, value, total });
        }
        let mut b = vec![0u8; BLOCK];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 1); // refcount
        put32(&mut b, 8, 1); // blocks
        let hashes = write_entries(&mut b, &rest, BLOCK, BLOCK_HEADER);
        let mut h: u32 = 0;
        for eh in hashes {
            h = (h << 16) ^ (h >> 16) ^ eh;
        }
        put32(&mut b, 12, h);
        placed.block = Some(b);
    }
    Ok(placed)
}

/// Write entries from `first` and values from the end of `area` (`len` bytes); value offsets
/// are relative to the start of `area`. Returns the entry hashes.
fn write_entries(area: &mut [u8], entries: &[Entry], len: usize, first: usize) -> Vec<u32> {
    let mut off = first;
    let mut vend = len;
    let mut hashes = Vec::with_capacity(entries.len());
    for e in entries {
        vend -= e.value_len();
        area[vend..vend + e.value.len()].copy_from_slice(&e.value);
        area[off] = e.name.len() as u8;
        area[off + 1] = e.index;
        put16(
            area,
            off + 2,
            if e.value.is_empty() { 0 } else { vend as u16 },
        );
        put32(area, off + 4, 0);
        put32(area, off + 8, e.value.len() as u32);
        let h = e.hash();
        put32(area, off + 12, h);
        area[off + 16..off + 16 + e.name.len()].copy_from_slice(&e.name);
        hashes.push(h);
        off += e.entry_len();
    }
    hashes
}

/// A POSIX ACL in the xattr form: (tag, perm, id) entries after the version-2 header.
#[cfg(test)]
pub(super) fn posix_acl_xattr(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Fill in an attribute block's checksum once its block number is known.
pub fn seal_block(fs_seed: u32, block_nr: u64, b: &mut [u8]) {
    put32(b, 16, 0);
    let c = csum::raw(csum::raw(fs_seed, &block_nr.to_le_bytes()), b);
    put32(b, 16, c);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(name: &str, value: &[u8]) -> (Box<[u8]>, Box<[u8]>) {
        (name.as_bytes().into(), value.into())
    }

    #[test]
    fn names_map_to_ext4_indexes() {
        let cases: [(&str, u8, &str); 7] = [
            ("user.foo", 1, "foo"),
            ("security.capability", 6, "capability"),
            ("trusted.overlay.opaque", 4, "overlay.opaque"),
            ("system.posix_acl_access", 2, ""),
            ("system.posix_acl_default", 3, ""),
            ("system.other", 7, "other"),
            ("weird.name", 0, "weird.name"),
        ];
        for (name, index, suffix) in cases {
            let (i, s) = split_name(name.as_bytes());
            assert_eq!((i, s), (index, suffix.as_bytes()), "{name}");
        }
    }

    #[test]
    fn acls_shrink_to_the_disk_form() {
        // user::rw- user:1000:r-- group::r-- mask::r-- other::---
        let v = posix_acl_xattr(&[
            (1, 6, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ]);
        let d = acl_to_disk("a", &v).unwrap();
        assert_eq!(d.len(), 4 + 4 + 8 + 4 + 4 + 4);
        assert_eq!(&d[..4], &1u32.to_le_bytes());
        assert_eq!(&d[8..16], &[2, 0, 4, 0, 0xe8, 3, 0, 0]);
        assert!(acl_to_disk("a", &v[..7]).is_err());
        assert!(acl_to_disk("a", &[1, 0, 0, 0]).is_err());
    }

    #[test]
    fn small_attributes_stay_in_the_inode_and_large_ones_spill() {
        let p = place(&[x("security.capability", &[1; 20])]).unwrap();
        assert!(p.inline.is_some() && p.block.is_none());
        let p = place(&[x("user.a", &[1; 20]), x("user.big", &[2; 300])]).unwrap();
        assert!(p.inline.is_some() && p.block.is_some());
        let p = place(&[x("user.huge", &[3; 5000])]);
        assert!(matches!(p, Err(XattrError::TooLarge { .. })));
    }
}
