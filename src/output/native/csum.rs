//! ext4's metadata checksums (`metadata_csum`): CRC32C in the kernel's "raw" form, without
//! the initial and final inversion that the standard CRC32C applies.

/// `crc32c_le(seed, data)` as the kernel and e2fsprogs compute it: the running value is not
/// inverted on entry or exit, so checksums can be chained (`raw(raw(s, a), b)`).
pub fn raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// The filesystem's checksum seed: `raw(!0, uuid)`.
pub fn fs_seed(uuid: &[u8; 16]) -> u32 {
    raw(!0, uuid)
}

/// The per-inode seed used for inode, extent, directory and htree checksums:
/// `raw(raw(fs_seed, ino), generation)`.
pub fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    raw(raw(fs_seed, &ino.to_le_bytes()), &generation.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_chains_and_matches_the_standard_crc_when_inverted() {
        // The standard CRC32C check value of "123456789" is 0xE3069283.
        assert_eq!(!raw(!0, b"123456789"), 0xE306_9283);
        assert_eq!(raw(raw(7, b"1234"), b"56789"), raw(7, b"123456789"));
    }
}
