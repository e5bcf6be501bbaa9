//! The compressed-block cache: what a squashfs data or fragment block compressed to, kept
//! between builds so that a rebuild that changes only a few files (a mapping, the agent, the
//! manifest) compresses only the blocks whose bytes changed.
//!
//! # Key
//! A block's compressed form is a pure function of its uncompressed bytes and the codec
//! settings (compressor, level, xz dictionary, block size) and of the compressor code itself.
//! The key is therefore sha256 over a salt and the settings and then the block's own sha256:
//! - the block's bytes are hashed (by the compressing workers, in parallel; sha256 runs at
//!   well over 1 GB/s, so the 150 MB of a Debian image cost about 0.1 s per core), rather
//!   than keyed by where they come from (layer diff_id, offset, length). A content key serves
//!   mapped files, the agent and fragment blocks (the tails of several files, from several
//!   sources) with no special case, can never serve a changed host file stale, and finds
//!   blocks that moved (a layer rebuilt, a file renamed);
//! - the salt is this format's version, fledge's version, a hash of the `Cargo.lock` it
//!   was built with and a hash of the compressor code (`compress.rs`), so a fledge with
//!   another compressor crate or other encoder parameters (liblzma is built from its bundled
//!   source, so the host's library does not matter) never reuses bytes that a cold build of
//!   its own would not write. The encoder's settings (compressor, level: for xz the preset,
//!   dictionary, block size) are part of the key after the salt.
//!
//! # Storage
//! One file per block under `<cache>/squashfs/blocks-v1/<2 hex>/<64 hex>`: a header (magic,
//! how the block is stored, payload length, the key, the payload's sha256) and the
//! compressed bytes. A block that compression does not shrink is cached too (an empty
//! payload marked raw), so it is not tried again. Entries are written to a temporary file in
//! the same directory and renamed into place, so a reader sees a whole entry or none; two
//! builds writing the same entry both write the same bytes and the last rename wins. Entries
//! are not fsynced: after a crash an entry may be empty or cut short, and every read checks
//! the magic, the key, the length and the payload's hash, and compresses afresh on any
//! mismatch (the bad entry is then overwritten). Failing to read or write the cache never
//! fails a build.
//!
//! The cache holds about the compressed size of the image's data for each distinct set of
//! settings it has seen (blocks shared between images or configs are stored once), and grows
//! with every changed block; `fledge cache prune` empties it, and `--no-cache` builds neither
//! read nor write it.

use std::fs;
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::compress::Codec;

/// The cache's subdirectory of the cache directory (everything under it belongs to this
/// module).
pub const SUBDIR: &str = "squashfs";
/// This entry format's directory; a format change gets a new one.
const VERSION_DIR: &str = "blocks-v1";
const MAGIC: &[u8; 8] = b"FLSQBLK1";
const HEADER: usize = 8 + 4 + 4 + 32 + 32;

/// The `Cargo.lock` fledge was built with: the compressor crates' versions, in the key.
const CARGO_LOCK: &[u8] = include_bytes!("../../Cargo.lock");

/// How a block is stored in the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Uncompressed: compression did not make it smaller.
    Raw,
    /// These compressed bytes.
    Packed(Vec<u8>),
}

/// The block cache of one build: a directory and the settings' salt.
#[derive(Debug)]
pub struct BlockCache {
    dir: PathBuf,
    /// sha256 state after the salt and the codec settings.
    base: Sha256,
}

impl BlockCache {
    /// The cache for blocks compressed with `codec`, under cache directory `cache_dir`. The
    /// directories are made as entries are written.
    pub fn new(cache_dir: &Path, codec: &Codec) -> BlockCache {
        let mut base = Sha256::new();
        for part in [
            &b"fledge squashfs block"[..],
            VERSION_DIR.as_bytes(),
            env!("CARGO_PKG_VERSION").as_bytes(),
            &Sha256::digest(CARGO_LOCK),
            // The compressor code: any change to how blocks are encoded (filters, check
            // type, parameters) must not meet blocks the old code wrote.
            &Sha256::digest(include_str!("compress.rs")),
        ] {
            base.update((part.len() as u64).to_le_bytes());
            base.update(part);
        }
        base.update(codec.kind.id().to_le_bytes());
        base.update(codec.level.to_le_bytes());
        base.update(codec.dict_size.to_le_bytes());
        base.update(codec.block_size.to_le_bytes());
        BlockCache {
            dir: dir(cache_dir),
            base,
        }
    }

    /// The key of a block holding `data`.
    pub fn key(&self, data: &[u8]) -> [u8; 32] {
        let mut h = self.base.clone();
        h.update((data.len() as u64).to_le_bytes());
        h.update(Sha256::digest(data));
        h.finalize().into()
    }

    fn path(&self, key: &[u8; 32]) -> PathBuf {
        let name = hex::encode(key);
        self.dir.join(&name[..2]).join(name)
    }

    /// The cached form of the block of `len` bytes keyed `key`, when a whole, valid entry is
    /// there.
    pub fn get(&self, key: &[u8; 32], len: usize) -> Option<Entry> {
        let path = self.path(key);
        // An entry holds the block compressed (smaller than the block) or nothing: anything
        // longer is not an entry, and the shared directory is not trusted to say so, so at
        // most that much is read.
        let limit = (HEADER + len) as u64;
        let read = |path: &Path| -> std::io::Result<Vec<u8>> {
            use std::io::Read as _;
            let mut b = Vec::new();
            fs::File::open(path)?.take(limit + 1).read_to_end(&mut b)?;
            Ok(b)
        };
        let bytes = match read(&path) {
            Ok(b) if b.len() as u64 > limit => {
                tracing::debug!(
                    "squashfs block cache: {} is longer than any entry; compressing afresh",
                    path.display()
                );
                return None;
            }
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::debug!("squashfs block cache: cannot read {}: {e}", path.display());
                return None;
            }
        };
        let entry = decode(&bytes, key, len);
        if entry.is_none() {
            tracing::debug!(
                "squashfs block cache: {} is damaged; compressing afresh",
                path.display()
            );
        }
        entry
    }

    /// Keep the form of the block keyed `key`: `packed`, its compressed bytes, or `None`
    /// when it is stored raw (atomically; errors are only logged).
    pub fn put(&self, key: &[u8; 32], packed: Option<&[u8]>) {
        let path = self.path(key);
        if let Err(e) = self.put_at(&path, key, packed) {
            tracing::debug!("squashfs block cache: cannot write {}: {e}", path.display());
        }
    }

    fn put_at(&self, path: &Path, key: &[u8; 32], packed: Option<&[u8]>) -> std::io::Result<()> {
        let parent = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent)?;
        // A temporary file of a random name beside the entry (removed if anything fails),
        // then a rename.
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(parent)?;
        tmp.write_all(&encode(key, packed))?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// The block cache's directory under cache directory `cache_dir` (what `fledge cache prune`
/// empties).
pub fn dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join(SUBDIR).join(VERSION_DIR)
}

fn encode(key: &[u8; 32], packed: Option<&[u8]>) -> Vec<u8> {
    let (kind, payload): (u32, &[u8]) = match packed {
        None => (0, &[]),
        Some(z) => (1, z),
    };
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

/// The entry in `bytes`, when it is whole and is the one for `key` (a block of `len` bytes).
fn decode(bytes: &[u8], key: &[u8; 32], len: usize) -> Option<Entry> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC || &bytes[16..48] != key {
        return None;
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let (kind, plen) = (word(8), word(12) as usize);
    let payload = &bytes[HEADER..];
    if payload.len() != plen || Sha256::digest(payload)[..] != bytes[48..80] {
        return None;
    }
    match kind {
        0 if plen == 0 => Some(Entry::Raw),
        // A compressed block is always smaller than the block itself.
        1 if plen > 0 && plen < len => Some(Entry::Packed(payload.to_vec())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::compress::Compression;
    use super::*;

    fn codec(kind: Compression, level: u32) -> Codec {
        Codec {
            kind,
            level,
            dict_size: if kind == Compression::Xz { 1 << 17 } else { 0 },
            block_size: 1 << 17,
        }
    }

    #[test]
    fn keys_follow_content_and_settings() {
        let dir = tempfile::tempdir().unwrap();
        let xz = BlockCache::new(dir.path(), &codec(Compression::Xz, 6));
        let k = xz.key(b"abc");
        assert_eq!(
            k,
            BlockCache::new(dir.path(), &codec(Compression::Xz, 6)).key(b"abc")
        );
        assert_ne!(k, xz.key(b"abd"));
        assert_ne!(k, xz.key(b"abc\0"));
        let mut others = vec![
            codec(Compression::Xz, 5),
            codec(Compression::Zstd, 6),
            codec(Compression::Gzip, 6),
        ];
        let mut small_dict = codec(Compression::Xz, 6);
        small_dict.dict_size = 1 << 15;
        others.push(small_dict);
        let mut small_block = codec(Compression::Xz, 6);
        small_block.block_size = 1 << 16;
        others.push(small_block);
        for c in others {
            assert_ne!(BlockCache::new(dir.path(), &c).key(b"abc"), k, "{c:?}");
        }
    }

    #[test]
    fn entries_round_trip_and_damage_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::new(dir.path(), &codec(Compression::Zstd, 3));
        let (k1, k2) = (c.key(b"one"), c.key(b"two"));
        assert_eq!(c.get(&k1, 100), None);
        let packed = Entry::Packed(vec![7; 40]);
        c.put(&k1, Some(&[7; 40]));
        c.put(&k2, None);
        assert_eq!(c.get(&k1, 100), Some(packed.clone()));
        assert_eq!(c.get(&k2, 100), Some(Entry::Raw));
        // Not smaller than the block: not a valid compressed form of it.
        assert_eq!(c.get(&k1, 40), None);
        // An entry under another key's name (a renamed or mixed-up file).
        fs::copy(c.path(&k1), c.path(&k2)).unwrap();
        assert_eq!(c.get(&k2, 100), None);
        // Cut short, one byte flipped, emptied.
        let whole = fs::read(c.path(&k1)).unwrap();
        for bad in [
            whole[..whole.len() - 1].to_vec(),
            {
                let mut b = whole.clone();
                *b.last_mut().unwrap() ^= 1;
                b
            },
            Vec::new(),
            // Longer than any entry for a block of 100 bytes (read no further than that).
            [whole.as_slice(), &[0u8; 1 << 20]].concat(),
        ] {
            fs::write(c.path(&k1), &bad).unwrap();
            assert_eq!(c.get(&k1, 100), None);
        }
        // Rewritten whole: found again; no temporary files left.
        c.put(&k1, Some(&[7; 40]));
        assert_eq!(c.get(&k1, 100), Some(packed));
        let names: Vec<_> = fs::read_dir(c.path(&k1).parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
    }

    #[test]
    fn concurrent_writers_leave_whole_entries() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::new(dir.path(), &codec(Compression::Xz, 6));
        let payloads: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1000 + usize::from(i)]).collect();
        let keys: Vec<[u8; 32]> = (0..8u8).map(|i| c.key(&[i])).collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    // Each writer with its own cache value, as separate processes would.
                    let mine = BlockCache::new(dir.path(), &codec(Compression::Xz, 6));
                    for round in 0..20 {
                        for (k, p) in keys.iter().zip(&payloads) {
                            mine.put(k, Some(p));
                            if round % 2 == 1 {
                                assert_eq!(mine.get(k, 1 << 17), Some(Entry::Packed(p.clone())));
                            }
                        }
                    }
                });
            }
        });
        for (k, p) in keys.iter().zip(&payloads) {
            assert_eq!(c.get(k, 1 << 17), Some(Entry::Packed(p.clone())));
        }
    }
}
