//! Tests of the htree writer: kernel name hashes against debugfs, a reader of the dx blocks
//! it writes, and real images checked by e2fsck, debugfs and a kernel mount.

use super::HashVersion::{HalfMd4, Legacy, Tea};
use super::*;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;

/// The seed `debugfs dx_hash -s` was given for the SEED rows below.
const SEED_UUID: &str = "5f1c3a2b-9d4e-4f60-8a7b-c0d1e2f3a4b5";

fn uuid_bytes(uuid: &str) -> [u8; 16] {
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    for (n, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * n..2 * n + 2], 16).unwrap();
    }
    out
}

fn seed_words(bytes: &[u8]) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (n, word) in out.iter_mut().enumerate() {
        *word = u32::from_le_bytes(bytes[4 * n..4 * n + 4].try_into().unwrap());
    }
    out
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|n| u8::from_str_radix(&hex[2 * n..2 * n + 2], 16).unwrap())
        .collect()
}

/// Printed by `debugfs -R "dx_hash -h N [-s SEED_UUID] NAME"` (e2fsprogs 1.47.0), with
/// N = 0..2 for the signed and 3..5 for the unsigned variants; names in hex.
#[rustfmt::skip]
const DEBUGFS_HASHES: &[(HashVersion, bool, bool, &str, u32, u32)] = &[
    (Legacy, true, false, "68656c6c6f", 0x32252546, 0x0),
    (Legacy, true, true, "68656c6c6f", 0x32252546, 0x0),
    (HalfMd4, true, false, "68656c6c6f", 0x1746da32, 0x420013b5),
    (HalfMd4, true, true, "68656c6c6f", 0x60613cac, 0xdff79564),
    (Tea, true, false, "68656c6c6f", 0x6f5bb1a8, 0x231917c2),
    (Tea, true, true, "68656c6c6f", 0xa6bc73b6, 0x4aa6b90),
    (Legacy, false, false, "68656c6c6f", 0x32252546, 0x0),
    (Legacy, false, true, "68656c6c6f", 0x32252546, 0x0),
    (HalfMd4, false, false, "68656c6c6f", 0x1746da32, 0x420013b5),
    (HalfMd4, false, true, "68656c6c6f", 0x60613cac, 0xdff79564),
    (Tea, false, false, "68656c6c6f", 0x6f5bb1a8, 0x231917c2),
    (Tea, false, true, "68656c6c6f", 0xa6bc73b6, 0x4aa6b90),
    (Legacy, true, false, "61", 0xe74b53e2, 0x0),
    (Legacy, true, true, "61", 0xe74b53e2, 0x0),
    (HalfMd4, true, false, "61", 0xd5fa7d7a, 0xacb48187),
    (HalfMd4, true, true, "61", 0xcd80d6cc, 0x29792629),
    (Tea, true, false, "61", 0x6d0ea4c0, 0xc18922df),
    (Tea, true, true, "61", 0x6ce20fd2, 0xe92570b5),
    (Legacy, false, false, "61", 0xe74b53e2, 0x0),
    (Legacy, false, true, "61", 0xe74b53e2, 0x0),
    (HalfMd4, false, false, "61", 0xd5fa7d7a, 0xacb48187),
    (HalfMd4, false, true, "61", 0xcd80d6cc, 0x29792629),
    (Tea, false, false, "61", 0x6d0ea4c0, 0xc18922df),
    (Tea, false, true, "61", 0x6ce20fd2, 0xe92570b5),
    (Legacy, true, false, "6c6f73742b666f756e64", 0x5e2aba24, 0x0),
    (Legacy, true, true, "6c6f73742b666f756e64", 0x5e2aba24, 0x0),
    (HalfMd4, true, false, "6c6f73742b666f756e64", 0x591de422, 0x6ffc56e0),
    (HalfMd4, true, true, "6c6f73742b666f756e64", 0xc1ac1d6e, 0x39272ec8),
    (Tea, true, false, "6c6f73742b666f756e64", 0x2dbf9e80, 0xbfebee4f),
    (Tea, true, true, "6c6f73742b666f756e64", 0x69c9f226, 0xcaeb172),
    (Legacy, false, false, "6c6f73742b666f756e64", 0x5e2aba24, 0x0),
    (Legacy, false, true, "6c6f73742b666f756e64", 0x5e2aba24, 0x0),
    (HalfMd4, false, false, "6c6f73742b666f756e64", 0x591de422, 0x6ffc56e0),
    (HalfMd4, false, true, "6c6f73742b666f756e64", 0xc1ac1d6e, 0x39272ec8),
    (Tea, false, false, "6c6f73742b666f756e64", 0x2dbf9e80, 0xbfebee4f),
    (Tea, false, true, "6c6f73742b666f756e64", 0x69c9f226, 0xcaeb172),
    (Legacy, true, false, "68e96c6c6fff", 0xbdbc7c5e, 0x0),
    (Legacy, true, true, "68e96c6c6fff", 0xbdbc7c5e, 0x0),
    (HalfMd4, true, false, "68e96c6c6fff", 0x67bb2376, 0xec4ac060),
    (HalfMd4, true, true, "68e96c6c6fff", 0x8118bc36, 0x7bf0f715),
    (Tea, true, false, "68e96c6c6fff", 0x71b17e08, 0xf811ad18),
    (Tea, true, true, "68e96c6c6fff", 0xabb7b6e4, 0x19eb058a),
    (Legacy, false, false, "68e96c6c6fff", 0x729c6054, 0x0),
    (Legacy, false, true, "68e96c6c6fff", 0x729c6054, 0x0),
    (HalfMd4, false, false, "68e96c6c6fff", 0xd8bfff52, 0x501bc43d),
    (HalfMd4, false, true, "68e96c6c6fff", 0x6d1bb9a0, 0xd1048bd3),
    (Tea, false, false, "68e96c6c6fff", 0x26508c1e, 0xa3b9428e),
    (Tea, false, true, "68e96c6c6fff", 0x4113d92, 0xae90e157),
    (Legacy, true, false, "8081fe", 0x4bb9ab7c, 0x0),
    (Legacy, true, true, "8081fe", 0x4bb9ab7c, 0x0),
    (HalfMd4, true, false, "8081fe", 0xe266501e, 0x8b80a84b),
    (HalfMd4, true, true, "8081fe", 0xdda38dc4, 0x107fda5f),
    (Tea, true, false, "8081fe", 0x836fc97a, 0xdd902b57),
    (Tea, true, true, "8081fe", 0xc44b28b2, 0x11aa5fb5),
    (Legacy, false, false, "8081fe", 0xded55b78, 0x0),
    (Legacy, false, true, "8081fe", 0xded55b78, 0x0),
    (HalfMd4, false, false, "8081fe", 0xa1e0b328, 0x28b1daeb),
    (HalfMd4, false, true, "8081fe", 0xe0eea654, 0x3de7846f),
    (Tea, false, false, "8081fe", 0xf5197208, 0xad924957),
    (Tea, false, true, "8081fe", 0x40e51886, 0xd25945ea),
    (Legacy, true, false, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0xf613e2ec, 0x0),
    (Legacy, true, true, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0xf613e2ec, 0x0),
    (HalfMd4, true, false, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0xa1c8c4d8, 0x597cc081),
    (HalfMd4, true, true, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0xf9156054, 0xb61c4ec1),
    (Tea, true, false, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0x8c5db0aa, 0xf98a8b4),
    (Tea, true, true, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0x43647cc8, 0xd6c4ce7c),
    (Legacy, false, false, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0xf613e2ec, 0x0),
    (Legacy, false, true, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0xf613e2ec, 0x0),
    (HalfMd4, false, false, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0xa1c8c4d8, 0x597cc081),
    (HalfMd4, false, true, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0xf9156054, 0xb61c4ec1),
    (Tea, false, false, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0x8c5db0aa, 0xf98a8b4),
    (Tea, false, true, "303132333435363738396162636465663031323334353637383961626364656630313233343536373839", 0x43647cc8, 0xd6c4ce7c),
    (Legacy, true, false, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0x30557da6, 0x0),
    (Legacy, true, true, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0x30557da6, 0x0),
    (HalfMd4, true, false, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0x2aa7169e, 0x655f9d9c),
    (HalfMd4, true, true, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0xeab947c4, 0x73350fae),
    (Tea, true, false, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0x6c4c00ee, 0xeafdb6b),
    (Tea, true, true, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0x9ade79c4, 0x909e9604),
    (Legacy, false, false, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0x30557da6, 0x0),
    (Legacy, false, true, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0x30557da6, 0x0),
    (HalfMd4, false, false, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0x2aa7169e, 0x655f9d9c),
    (HalfMd4, false, true, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0xeab947c4, 0x73350fae),
    (Tea, false, false, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0x6c4c00ee, 0xeafdb6b),
    (Tea, false, true, "787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878", 0x9ade79c4, 0x909e9604),
    (Legacy, true, false, "4d616b6566696c652e616d", 0x6c11291a, 0x0),
    (Legacy, true, true, "4d616b6566696c652e616d", 0x6c11291a, 0x0),
    (HalfMd4, true, false, "4d616b6566696c652e616d", 0x8a1b93e2, 0x745e048d),
    (HalfMd4, true, true, "4d616b6566696c652e616d", 0x18117a7e, 0x44731e8d),
    (Tea, true, false, "4d616b6566696c652e616d", 0xf44bf2e8, 0x5d742653),
    (Tea, true, true, "4d616b6566696c652e616d", 0xe1539b16, 0x61c1eae8),
    (Legacy, false, false, "4d616b6566696c652e616d", 0x6c11291a, 0x0),
    (Legacy, false, true, "4d616b6566696c652e616d", 0x6c11291a, 0x0),
    (HalfMd4, false, false, "4d616b6566696c652e616d", 0x8a1b93e2, 0x745e048d),
    (HalfMd4, false, true, "4d616b6566696c652e616d", 0x18117a7e, 0x44731e8d),
    (Tea, false, false, "4d616b6566696c652e616d", 0xf44bf2e8, 0x5d742653),
    (Tea, false, true, "4d616b6566696c652e616d", 0xe1539b16, 0x61c1eae8),
    (Legacy, true, false, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0xa28193d8, 0x0),
    (Legacy, true, true, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0xa28193d8, 0x0),
    (HalfMd4, true, false, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0x8724cd48, 0x70356fff),
    (HalfMd4, true, true, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0xb1e18220, 0x4251d8d5),
    (Tea, true, false, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0x79072b72, 0xce40058e),
    (Tea, true, true, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0x77d84910, 0xc9e2a505),
    (Legacy, false, false, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0xc2004586, 0x0),
    (Legacy, false, true, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0xc2004586, 0x0),
    (HalfMd4, false, false, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0xcf14ced2, 0x288e7db9),
    (HalfMd4, false, true, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0xcc23eeec, 0xb4cad5dc),
    (Tea, false, false, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0x14be6c96, 0x6e3316c0),
    (Tea, false, true, "c3a974c3a92d636166c3a92de282ac2dc3a974c3a92d636166c3a92de282ac2d", 0xd9c27a54, 0x8ed2bfa3),
];

#[test]
fn name_hash_matches_debugfs() {
    let seed = seed_words(&uuid_bytes(SEED_UUID));
    for &(version, signed, seeded, name, major, minor) in DEBUGFS_HASHES {
        let seed = if seeded { seed } else { [0; 4] };
        assert_eq!(
            name_hash(&unhex(name), version, &seed, signed),
            (major, minor),
            "{version:?} signed={signed} seeded={seeded} name={name}"
        );
    }
}

#[test]
fn signedness_only_matters_for_high_bytes() {
    let seed = seed_words(&uuid_bytes(SEED_UUID));
    for version in [Legacy, HalfMd4, Tea] {
        assert_eq!(
            name_hash(b"plain-ascii", version, &seed, true),
            name_hash(b"plain-ascii", version, &seed, false)
        );
        assert_ne!(
            name_hash("café".as_bytes(), version, &seed, true),
            name_hash("café".as_bytes(), version, &seed, false)
        );
    }
}

#[test]
fn str_to_words_pads_with_the_remaining_length() {
    let mut words = [0u32; 4];
    str_to_words(b"abcde", &mut words, false);
    // Big-end-first packing: "abcd", then "e" after three pad bytes, then pad words.
    assert_eq!(words, [0x6162_6364, 0x0505_0565, 0x0505_0505, 0x0505_0505]);
    str_to_words(&[0xff; 4], &mut words, true);
    // Sign-extended bytes borrow from the bytes above them.
    assert_eq!(words[0], 0xfefe_feff);
}

// -----------------------------------------------------------------------------------------
// An independent reader of the produced blocks: structure, checksums, kernel-style lookup.
// -----------------------------------------------------------------------------------------

fn le16(block: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([block[at], block[at + 1]]))
}

fn le32(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(block[at..at + 4].try_into().unwrap())
}

struct Reader<'a> {
    data: &'a [u8],
    csum_seed: Option<u32>,
}

/// One dx block's entries: (stored hash, target block); entry 0's hash reads as 0.
type Index = Vec<(u32, u32)>;

impl Reader<'_> {
    fn block(&self, n: u32) -> &[u8] {
        let at = n as usize * BLOCK_SIZE;
        &self.data[at..at + BLOCK_SIZE]
    }

    fn levels(&self) -> u8 {
        self.block(0)[30]
    }

    fn dx(&self, n: u32) -> Index {
        let block = self.block(n);
        let (offset, limit) = match (n, self.csum_seed) {
            (0, None) => (32, 508),
            (0, Some(_)) => (32, 507),
            (_, None) => (8, 511),
            (_, Some(_)) => (8, 510),
        };
        if n != 0 {
            assert_eq!(le32(block, 0), 0, "node {n}: fake dirent inode");
            assert_eq!(le16(block, 4), BLOCK_SIZE, "node {n}: fake dirent rec_len");
        }
        assert_eq!(le16(block, offset), limit, "block {n}: limit");
        let count = le16(block, offset + 2);
        assert!((1..=limit).contains(&count), "block {n}: count {count}");
        if let Some(seed) = self.csum_seed {
            let tail = offset + limit * 8;
            assert_eq!(le32(block, tail), 0, "block {n}: dt_reserved");
            let mut covered = block[..offset + count * 8].to_vec();
            covered.extend_from_slice(&[0; 8]);
            assert_eq!(
                le32(block, tail + 4),
                csum::raw(seed, &covered),
                "block {n}: dx csum"
            );
        }
        (0..count)
            .map(|i| {
                let at = offset + i * 8;
                let hash = if i == 0 { 0 } else { le32(block, at) };
                (hash, le32(block, at + 4))
            })
            .collect()
    }

    /// The live entries of a leaf: (name, inode, file type), after checking the rec_len
    /// chain and the checksum tail.
    fn leaf(&self, n: u32) -> Vec<(Vec<u8>, u32, u8)> {
        let block = self.block(n);
        let usable = BLOCK_SIZE - if self.csum_seed.is_some() { 12 } else { 0 };
        let mut out = Vec::new();
        let mut at = 0;
        while at < usable {
            let rec = le16(block, at + 4);
            let name_len = usize::from(block[at + 6]);
            assert!(
                rec >= rec_len(name_len) && rec % 4 == 0,
                "leaf {n}+{at}: rec_len {rec}"
            );
            assert!(
                at + rec <= usable,
                "leaf {n}+{at}: rec_len {rec} crosses the end"
            );
            let ino = le32(block, at);
            if ino != 0 {
                out.push((
                    block[at + 8..at + 8 + name_len].to_vec(),
                    ino,
                    block[at + 7],
                ));
            }
            at += rec;
        }
        if let Some(seed) = self.csum_seed {
            assert_eq!(
                &block[usable..usable + 8],
                &[0, 0, 0, 0, 12, 0, 0, 0xde],
                "leaf {n}: tail"
            );
            assert_eq!(
                le32(block, usable + 8),
                csum::raw(seed, &block[..usable]),
                "leaf {n}: csum"
            );
        }
        out
    }

    /// The kernel's `dx_probe`: the path of (block, entry index) from the root to the leaf
    /// whose range holds `hash`.
    fn probe(&self, hash: u32) -> Vec<(u32, Index, usize)> {
        let mut path = Vec::new();
        let mut block = 0;
        for _ in 0..=self.levels() {
            let index = self.dx(block);
            // The last entry whose stored hash is <= hash (entry 0 counts as 0).
            let at = index.iter().rposition(|&(h, _)| h <= hash).unwrap_or(0);
            let next = index[at].1;
            path.push((block, index, at));
            block = next;
        }
        path
    }

    /// The kernel's `ext4_dx_find_entry` with `ext4_htree_next_block`: looks `name` up.
    fn lookup(&self, name: &[u8], hash: u32) -> Option<u32> {
        let mut path = self.probe(hash);
        loop {
            let (_, index, at) = path.last().unwrap();
            let leaf = index[*at].1;
            if let Some(found) = self.leaf(leaf).iter().find(|e| e.0 == name) {
                return Some(found.1);
            }
            // Step to the next leaf if its index hash says the run continues there.
            let level = path
                .iter()
                .rposition(|(_, index, at)| at + 1 < index.len())?;
            path.truncate(level + 1);
            let (_, index, at) = path.last_mut().unwrap();
            *at += 1;
            let next_hash = index[*at].0;
            if next_hash & 1 == 0 && next_hash != hash {
                return None;
            }
            let mut block = index[*at].1;
            while path.len() <= usize::from(self.levels()) {
                let index = self.dx(block);
                let child = index[0].1;
                path.push((block, index, 0));
                block = child;
            }
        }
    }

    /// Every leaf in index order with the hash range its index entry gives it:
    /// (block, low, high, high inclusive because the next leaf continues a run).
    fn leaves(&self) -> Vec<(u32, u32, u32, bool)> {
        let mut out = Vec::new();
        self.walk(0, 0, u32::MAX, true, &mut out);
        out
    }

    fn walk(
        &self,
        block: u32,
        low: u32,
        high: u32,
        incl: bool,
        out: &mut Vec<(u32, u32, u32, bool)>,
    ) {
        let index = self.dx(block);
        for (i, &(hash, target)) in index.iter().enumerate() {
            let lo = if i == 0 { low } else { hash & !1 };
            let (hi, inc) = match index.get(i + 1) {
                Some(&(next, _)) => (next & !1, next & 1 == 1),
                None => (high, incl),
            };
            let depth = self.depth_of(block);
            if depth == usize::from(self.levels()) {
                out.push((target, lo, hi, inc));
            } else {
                self.walk(target, lo, hi, inc, out);
            }
        }
    }

    fn depth_of(&self, block: u32) -> usize {
        if block == 0 {
            0
        } else {
            1
        }
    }
}

/// Reads back a directory produced by `indexed_dir_blocks`, checks everything e2fsck and
/// the kernel would, looks every name up and returns name -> (inode, file type).
fn check_dir(
    data: &[u8],
    self_ino: u32,
    parent_ino: u32,
    version: HashVersion,
    csum_seed: Option<u32>,
    hash: &dyn Fn(&[u8]) -> u32,
) -> BTreeMap<Vec<u8>, (u32, u8)> {
    assert_eq!(data.len() % BLOCK_SIZE, 0);
    let reader = Reader { data, csum_seed };
    let root = reader.block(0);
    assert_eq!(
        (le32(root, 0), le16(root, 4), root[6], root[7], root[8]),
        (self_ino, 12, 1, 2, b'.')
    );
    assert_eq!(
        (
            le32(root, 12),
            le16(root, 16),
            root[18],
            root[19],
            &root[20..22]
        ),
        (parent_ino, BLOCK_SIZE - 12, 2, 2, &b".."[..])
    );
    assert_eq!(
        &root[24..32],
        &[0, 0, 0, 0, version.code(), 8, reader.levels(), 0]
    );
    assert!(reader.levels() <= 1);

    let leaves = reader.leaves();
    let mut referenced: BTreeSet<u32> = leaves.iter().map(|l| l.0).collect();
    assert_eq!(referenced.len(), leaves.len(), "a leaf is referenced twice");
    if reader.levels() == 1 {
        for (_, node) in reader.dx(0) {
            assert!(referenced.insert(node), "node {node} referenced twice");
        }
    }
    let total = (data.len() / BLOCK_SIZE) as u32;
    assert_eq!(
        referenced,
        (1..total).collect(),
        "every block is referenced once"
    );

    let mut names = BTreeMap::new();
    let mut previous = 0;
    for &(block, low, high, inclusive) in &leaves {
        for (name, ino, file_type) in reader.leaf(block) {
            let h = hash(&name);
            assert!(h >= previous, "leaf {block}: hashes out of order");
            previous = h;
            assert!(h >= low, "leaf {block}: {h:#x} below its range {low:#x}");
            assert!(
                h < high || (inclusive && h == high),
                "leaf {block}: {h:#x} above {high:#x}"
            );
            assert!(
                names.insert(name, (ino, file_type)).is_none(),
                "duplicate entry"
            );
        }
    }
    for (name, &(ino, _)) in &names {
        assert_eq!(
            reader.lookup(name, hash(name)),
            Some(ino),
            "lookup of {name:?}"
        );
    }
    names
}

/// Entries for `names`, inode numbers from 100, file types by inode number.
fn entries_of(names: &[Vec<u8>], file_type: fn(u32) -> u8) -> Vec<DirEntry<'_>> {
    names
        .iter()
        .zip(100u32..)
        .map(|(name, ino)| DirEntry {
            name,
            ino,
            file_type: file_type(ino),
        })
        .collect()
}

fn sample_names(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|n| match n % 4 {
            0 => format!("file-{n:06}-abcdefghijklm").into_bytes(),
            1 => format!("{n}").into_bytes(),
            2 => format!("caf\u{e9}-\u{20ac}-{n}").into_bytes(),
            _ => format!("{n:0>width$}", width = 40 + n % 200).into_bytes(),
        })
        .collect()
}

#[test]
fn directories_read_back_with_every_name_found() {
    let seed = seed_words(&uuid_bytes(SEED_UUID));
    let cases = [
        (HalfMd4, true, Some(0x1234_5678), 200, 0),
        (HalfMd4, true, Some(0x1234_5678), 500, 0),
        (HalfMd4, false, None, 5_000, 0),
        (Tea, true, Some(7), 5_000, 0),
        (Legacy, true, None, 3_000, 0),
        (HalfMd4, true, Some(0xdead_beef), 60_000, 1),
        (Tea, false, None, 60_000, 1),
    ];
    for (version, signed, csum_seed, count, levels) in cases {
        let names = sample_names(count);
        let entries = entries_of(&names, |ino| 1 + (ino % 7) as u8);
        let data = indexed_dir_blocks(&entries, 12, 2, version, &seed, signed, csum_seed).unwrap();
        assert_eq!(data[30], levels, "{count} entries");
        let hash = |name: &[u8]| name_hash(name, version, &seed, signed).0;
        let read = check_dir(&data, 12, 2, version, csum_seed, &hash);
        let expected: BTreeMap<Vec<u8>, (u32, u8)> = entries
            .iter()
            .map(|e| (e.name.to_vec(), (e.ino, e.file_type)))
            .collect();
        assert_eq!(read, expected, "{version:?} {count}");
        // Leaves are reasonably full: at most 1/3 more blocks than a perfect packing.
        let bytes: usize = entries.iter().map(|e| rec_len(e.name.len())).sum();
        let blocks = data.len() / BLOCK_SIZE;
        assert!(
            blocks * 3 <= (bytes / 4084 + 2) * 4,
            "{count} entries in {blocks} blocks"
        );
    }
}

#[test]
fn leaves_keep_hash_runs_together_and_mark_continuations() {
    let usable = 4084;
    // Runs of small entries with equal hashes: a leaf must never end inside a run.
    let items: Vec<(u32, usize)> = (0..3_000u32)
        .map(|n| ((n / 3) * 2, 12 + 4 * (n % 5) as usize))
        .collect();
    let leaves = pack_leaves(&items, usable, 816);
    assert!(leaves.len() > 5);
    for pair in leaves.windows(2) {
        assert_eq!(pair[0].end, pair[1].start);
        let (last, first) = (items[pair[0].end - 1].0, items[pair[1].start].0);
        assert_ne!(last, first, "run split at {}", pair[1].start);
        assert_eq!(pair[1].index_hash, first);
    }
    for leaf in &leaves[..leaves.len() - 1] {
        let used: usize = items[leaf.start..leaf.end].iter().map(|i| i.1).sum();
        assert!(
            used <= usable && used >= usable - 816 - 60,
            "leaf fill {used}"
        );
    }
    // One run larger than a leaf, between two ordinary entries: split with continuations.
    let mut items = vec![(10, 16)];
    items.extend(std::iter::repeat_n((20, 16), 600));
    items.push((30, 16));
    let leaves = pack_leaves(&items, usable, 816);
    let hashes: Vec<u32> = leaves.iter().map(|l| l.index_hash).collect();
    assert_eq!(hashes, [10, 20, 21, 21]);
    assert_eq!(leaves.last().map(|l| l.end), Some(602));
    // An empty directory still has one (empty) leaf.
    assert_eq!(
        pack_leaves(&[], usable, 816),
        [Leaf {
            start: 0,
            end: 0,
            index_hash: 0
        }]
    );
}

#[test]
fn colliding_hashes_are_found_across_leaves() {
    // 700 names sharing one hash (more than fit one leaf) among ordinary ones: lookups must
    // follow the continuation bit into the next leaves.
    let names = sample_names(3_000);
    let entries = entries_of(&names, |_| 1);
    let fake = |name: &[u8]| -> u32 {
        let (hash, _) = name_hash(name, HalfMd4, &[0; 4], true);
        if name.len() > 40 {
            0x5000_0000
        } else {
            hash
        }
    };
    let mut sorted: Vec<Hashed> = entries
        .iter()
        .map(|entry| Hashed {
            hash: fake(entry.name),
            minor: 0,
            entry,
        })
        .collect();
    sorted.sort_by(|a, b| (a.hash, a.entry.name).cmp(&(b.hash, b.entry.name)));
    for csum_seed in [None, Some(99)] {
        let data = layout(&sorted, 12, 2, HalfMd4, csum_seed).unwrap();
        let reader = Reader {
            data: &data,
            csum_seed,
        };
        let continued = reader
            .dx(0)
            .iter()
            .filter(|(hash, _)| hash & 1 == 1)
            .count();
        assert!(
            continued >= 2,
            "expected continuation entries, found {continued}"
        );
        let read = check_dir(&data, 12, 2, HalfMd4, csum_seed, &fake);
        assert_eq!(read.len(), entries.len());
    }
}

#[test]
fn node_shares_split_evenly_up_to_the_two_level_limit() {
    let cases: &[(usize, Option<Vec<usize>>)] = &[
        (1, Some(vec![])),
        (507, Some(vec![])),
        (508, Some(vec![508])),
        (1020, Some(vec![510, 510])),
        (1021, Some(vec![341, 340, 340])),
        (507 * 510, Some(vec![510; 507])),
        (507 * 510 + 1, None),
    ];
    for (leaves, expected) in cases {
        assert_eq!(&node_shares(*leaves, 507, 510), expected, "{leaves} leaves");
    }
}

#[test]
fn invalid_entries_are_rejected() {
    let long = [b'x'; 256];
    let ok = DirEntry {
        name: b"ok",
        ino: 5,
        file_type: 1,
    };
    let cases: Vec<(Vec<DirEntry>, &str)> = vec![
        (vec![DirEntry { name: b"", ..ok }], "invalid name"),
        (vec![DirEntry { name: &long, ..ok }], "invalid name"),
        (vec![DirEntry { name: b"a/b", ..ok }], "invalid name"),
        (vec![DirEntry { name: b"a\0", ..ok }], "invalid name"),
        (vec![DirEntry { name: b"..", ..ok }], "invalid name"),
        (vec![ok, DirEntry { ino: 6, ..ok }], "more than once"),
        (vec![DirEntry { ino: 0, ..ok }], "inode 0"),
        (vec![DirEntry { file_type: 0, ..ok }], "file type 0"),
        (vec![DirEntry { file_type: 8, ..ok }], "file type 8"),
    ];
    for (entries, message) in cases {
        let err = indexed_dir_blocks(&entries, 12, 2, HalfMd4, &[0; 4], true, None).unwrap_err();
        assert!(err.to_string().contains(message), "{err}");
    }
}

#[test]
fn too_many_entries_for_two_levels_is_an_error() {
    // 258,570 leaves at most; 13 entries of 255 bytes per leaf ~ 3.4M entries. Check the
    // error path on the computed leaf count instead of building that many names.
    let err = HtreeError::TooManyEntries {
        entries: 1,
        leaves: 2,
        max: 1,
    };
    assert_eq!(err.to_string().lines().count(), 1);
    assert!(node_shares(258_571, 507, 510).is_none());
    assert!(node_shares(258_570, 507, 510).is_some());
}

// -----------------------------------------------------------------------------------------
// Real images: e2fsprogs (e2fsck, debugfs) and, as root, the kernel read our directories.
// -----------------------------------------------------------------------------------------

mod image {
    use std::ffi::OsStr;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    pub fn find_tool(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/sbin", "/usr/sbin"].map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    }

    pub fn run<S: AsRef<OsStr>>(tool: &Path, args: &[S]) -> Output {
        let out = Command::new(tool).args(args).output().unwrap();
        out
    }

    pub fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// Runs a debugfs command script read-write; panics on any error it reports.
    pub fn debugfs_script(debugfs: &Path, img: &Path, script: &str) {
        let file = img.with_extension("debugfs");
        std::fs::write(&file, script).unwrap();
        let out = run(
            debugfs,
            &[
                OsStr::new("-w"),
                OsStr::new("-f"),
                file.as_os_str(),
                img.as_os_str(),
            ],
        );
        let errors: Vec<String> = text(&out.stderr)
            .lines()
            .filter(|line| !line.starts_with("debugfs "))
            .map(str::to_owned)
            .collect();
        assert!(
            out.status.success() && errors.is_empty(),
            "debugfs: {errors:?}"
        );
    }

    /// Runs one read-only debugfs request and returns its standard output.
    pub fn debugfs(debugfs: &Path, img: &Path, request: &str) -> String {
        let out = run(
            debugfs,
            &[OsStr::new("-R"), OsStr::new(request), img.as_os_str()],
        );
        assert!(
            out.status.success(),
            "debugfs -R {request}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// The value after `key` in `debugfs stat` output.
    pub fn stat_field(stat: &str, key: &str) -> String {
        let at = stat
            .find(key)
            .unwrap_or_else(|| panic!("no {key} in {stat}"));
        stat[at + key.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    }
}

struct TestDir {
    path: &'static str,
    file: &'static str,
    names: Vec<Vec<u8>>,
    levels: u8,
}

#[test]
fn e2fsck_debugfs_and_the_kernel_accept_indexed_directories() {
    let (Some(mkfs), Some(debugfs_bin), Some(e2fsck)) = (
        image::find_tool("mkfs.ext4"),
        image::find_tool("debugfs"),
        image::find_tool("e2fsck"),
    ) else {
        eprintln!("SKIP: mkfs.ext4, debugfs or e2fsck not installed");
        return;
    };
    // The mkfs default, then the other algorithms and char signedness set with debugfs.
    let variants = [
        ("", HalfMd4, true),
        ("ssv def_hash_version tea\nssv flags 2\n", Tea, false),
        ("ssv def_hash_version legacy\n", Legacy, true),
    ];
    for (setup, version, signed) in variants {
        check_real_image(&mkfs, &debugfs_bin, &e2fsck, setup, version, signed);
    }
}

/// Makes an image, sets its hash options with the debugfs `setup` script, puts three
/// indexed directories made by `indexed_dir_blocks` into it and has e2fsck, debugfs and
/// (as root) the kernel read them.
fn check_real_image(
    mkfs: &std::path::Path,
    debugfs_bin: &std::path::Path,
    e2fsck: &std::path::Path,
    setup: &str,
    expect_version: HashVersion,
    expect_signed: bool,
) {
    use image::*;
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    let out = run(
        mkfs,
        &[
            "-F",
            "-q",
            "-b",
            "4096",
            "-O",
            "metadata_csum,64bit",
            "-E",
            "root_owner=0:0",
        ]
        .map(OsStr::new)
        .into_iter()
        .chain([img.as_os_str(), OsStr::new("64M")])
        .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "mkfs.ext4: {}", text(&out.stderr));
    if !setup.is_empty() {
        debugfs_script(debugfs_bin, &img, setup);
    }

    // The superblock fields the layout depends on.
    let image = std::fs::read(&img).unwrap();
    let sb = &image[1024..2048];
    let uuid: [u8; 16] = sb[0x68..0x78].try_into().unwrap();
    let seed = seed_words(&sb[0xec..0xfc]);
    let version = match sb[0xfc] {
        0 => Legacy,
        1 => HalfMd4,
        2 => Tea,
        other => panic!("hash version {other}"),
    };
    let s_flags = le32(sb, 0x160);
    let signed = s_flags & 1 != 0;
    assert_ne!(
        signed,
        s_flags & 2 != 0,
        "exactly one of signed/unsigned hash flags"
    );
    assert_eq!(
        (version, signed),
        (expect_version, expect_signed),
        "after {setup:?}"
    );
    let fs_seed = if le32(sb, 0x60) & 0x2000 != 0 {
        le32(sb, 0x270)
    } else {
        csum::fs_seed(&uuid)
    };
    drop(image);

    // Names sharing a major hash under this filesystem's seed, for the largest directory.
    let mut seen = std::collections::HashMap::new();
    let mut colliding = Vec::new();
    for n in 0..600_000u32 {
        let name = format!("coll-{n}").into_bytes();
        let (hash, _) = name_hash(&name, version, &seed, signed);
        if let Some(other) = seen.insert(hash, name.clone()) {
            colliding.push(other);
            colliding.push(name);
            if colliding.len() >= 6 {
                break;
            }
        }
    }
    assert!(colliding.len() >= 2, "no hash collision among 600000 names");
    let mut big = sample_names(60_000);
    big.extend(colliding.iter().cloned());
    let dirs = [
        TestDir {
            path: "/d500",
            file: "/f500",
            names: sample_names(500),
            levels: 0,
        },
        TestDir {
            path: "/d5000",
            file: "/f5000",
            names: sample_names(5_000),
            levels: 0,
        },
        TestDir {
            path: "/d60000",
            file: "/f60000",
            names: big,
            levels: 1,
        },
    ];

    let payload = tmp.path().join("payload");
    std::fs::write(&payload, b"payload\n").unwrap();
    let mut script = String::new();
    for dir in &dirs {
        script += &format!(
            "write {} {}\nmkdir {}\n",
            payload.display(),
            dir.file,
            dir.path
        );
    }
    debugfs_script(debugfs_bin, &img, &script);

    let mut layouts = Vec::new();
    let mut script = String::new();
    for dir in &dirs {
        let stat = debugfs(debugfs_bin, &img, &format!("stat {}", dir.path));
        let ino: u32 = stat_field(&stat, "Inode:").parse().unwrap();
        let generation: u32 = stat_field(&stat, "Generation:").parse().unwrap();
        let flags =
            u32::from_str_radix(stat_field(&stat, "Flags:").trim_start_matches("0x"), 16).unwrap();
        let file_stat = debugfs(debugfs_bin, &img, &format!("stat {}", dir.file));
        let file_ino: u32 = stat_field(&file_stat, "Inode:").parse().unwrap();
        let entries: Vec<DirEntry> = dir
            .names
            .iter()
            .map(|name| DirEntry {
                name,
                ino: file_ino,
                file_type: 1,
            })
            .collect();
        let csum_seed = csum::inode_seed(fs_seed, ino, generation);
        let data =
            indexed_dir_blocks(&entries, ino, 2, version, &seed, signed, Some(csum_seed)).unwrap();
        assert_eq!(data[30], dir.levels, "{}", dir.path);
        let blocks = data.len() / BLOCK_SIZE;
        for _ in 1..blocks {
            script += &format!("expand_dir {}\n", dir.path);
        }
        script += &format!("sif {} flags {:#x}\n", dir.path, flags | 0x1000);
        script += &format!("sif {} links_count {}\n", dir.file, entries.len() + 1);
        layouts.push((data, file_ino));
    }
    debugfs_script(debugfs_bin, &img, &script);

    // Write the blocks where the directories' blocks are.
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        for (dir, (data, _)) in dirs.iter().zip(&layouts) {
            let listed = debugfs(debugfs_bin, &img, &format!("blocks {}", dir.path));
            let physical: Vec<u64> = listed
                .split_whitespace()
                .map(|b| b.parse().unwrap())
                .collect();
            assert_eq!(physical.len(), data.len() / BLOCK_SIZE, "{}", dir.path);
            for (block, chunk) in physical.iter().zip(data.chunks(BLOCK_SIZE)) {
                file.write_all_at(chunk, block * BLOCK_SIZE as u64).unwrap();
            }
        }
    }

    let out = run(e2fsck, &[OsStr::new("-fn"), img.as_os_str()]);
    assert!(
        out.status.success(),
        "e2fsck -fn failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );

    for (dir, (_, file_ino)) in dirs.iter().zip(&layouts) {
        // Every name listed, once, pointing at the file.
        let listing = debugfs(debugfs_bin, &img, &format!("ls -p {}", dir.path));
        let mut listed = BTreeSet::new();
        for line in listing.lines().filter(|line| line.starts_with('/')) {
            let fields: Vec<&str> = line.split('/').collect();
            // Empty dirents (the fake ones heading interior dx nodes) list as inode 0.
            if fields[5] == "." || fields[5] == ".." || fields[1] == "0" {
                continue;
            }
            assert_eq!(fields[1], file_ino.to_string(), "{line}");
            assert!(listed.insert(fields[5].to_owned()), "{line} listed twice");
        }
        let expected: BTreeSet<String> = dir.names.iter().map(|n| text(n)).collect();
        assert_eq!(listed.len(), expected.len(), "{}", dir.path);
        let ascii: Vec<&String> = expected.iter().filter(|n| n.is_ascii()).collect();
        for name in &ascii {
            assert!(listed.contains(*name), "{} misses {name}", dir.path);
        }
        // debugfs walks the index and recomputes each name's hash.
        let htree = debugfs(debugfs_bin, &img, &format!("htree {}", dir.path));
        assert!(
            htree.contains(&format!("Indirect levels: {}", dir.levels)),
            "{htree:.400}"
        );
        // Each leaf entry as "ino 0xHASH-MINOR (rec_len) name", several to a line, hashed
        // by libext2fs (the test's names have no blanks).
        let mut dumped = BTreeMap::new();
        let tokens: Vec<&str> = htree.split_whitespace().collect();
        for (n, window) in tokens.windows(4).enumerate() {
            let Some((hash, minor)) = window[1].strip_prefix("0x").and_then(|t| t.split_once('-'))
            else {
                continue;
            };
            let (Ok(hash), Ok(minor)) = (
                u32::from_str_radix(hash, 16),
                u32::from_str_radix(minor, 16),
            ) else {
                continue;
            };
            assert!(window[2].starts_with('('), "token {n}: {window:?}");
            assert_eq!(window[0], file_ino.to_string(), "token {n}: {window:?}");
            assert!(
                dumped.insert(window[3].to_owned(), (hash, minor)).is_none(),
                "{window:?}"
            );
        }
        let ours: BTreeMap<String, (u32, u32)> = dir
            .names
            .iter()
            .map(|n| (text(n), name_hash(n, version, &seed, signed)))
            .collect();
        let differing: Vec<_> = ours
            .iter()
            .filter(|(name, hashes)| dumped.get(*name) != Some(hashes))
            .take(5)
            .map(|(name, hashes)| (name, hashes, dumped.get(name)))
            .collect();
        assert!(
            differing.is_empty() && dumped.len() == ours.len(),
            "{}: debugfs htree dump has {} entries, {} expected; ours vs dumped: {differing:x?}",
            dir.path,
            dumped.len(),
            ours.len()
        );
        // Path lookups of a sample of names.
        for name in ascii.iter().step_by(ascii.len() / 20 + 1) {
            let stat = debugfs(debugfs_bin, &img, &format!("stat {}/{name}", dir.path));
            assert_eq!(stat_field(&stat, "Inode:"), file_ino.to_string(), "{name}");
        }
    }

    // The kernel: hashed lookups (with checksum verification) and readdir of every name.
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !is_root {
        eprintln!("SKIP: kernel check of the image needs root (loop mount)");
        return;
    }
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            OsStr::new("-o"),
            OsStr::new("loop,ro"),
            img.as_os_str(),
            mnt.as_os_str(),
        ])
        .output();
    match mounted {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!("SKIP: kernel check: cannot loop-mount the image: {other:?}");
            return;
        }
    }
    let _guard = crate::testkit::Mount::adopt(&mnt);
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    for (dir, (_, file_ino)) in dirs.iter().zip(&layouts) {
        let path = mnt.join(&dir.path[1..]);
        for name in &dir.names {
            let meta = std::fs::symlink_metadata(path.join(OsStr::from_bytes(name)))
                .unwrap_or_else(|e| panic!("kernel lookup of {}/{}: {e}", dir.path, text(name)));
            assert_eq!(meta.ino(), u64::from(*file_ino));
        }
        let missing = path.join("no-such-name-here");
        assert!(std::fs::symlink_metadata(missing).is_err());
        let read: BTreeSet<Vec<u8>> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().as_bytes().to_vec())
            .collect();
        let expected: BTreeSet<Vec<u8>> = dir.names.iter().cloned().collect();
        assert_eq!(read, expected, "kernel readdir of {}", dir.path);
    }
}
