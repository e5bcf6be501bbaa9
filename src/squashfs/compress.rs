//! The four squashfs compressors fledge writes: xz (LZMA2 in an .xz stream with a CRC32
//! check, the only kind the kernel's xz decoder accepts), zstd, gzip (raw zlib streams) and
//! lz4 (raw lz4 blocks, no frame). Each block, data or metadata, is compressed on its own;
//! [`Codec::compress`] answers `None` when compression does not make the block smaller, and
//! the caller then stores it uncompressed, as the format asks.

use std::io::Write as _;

/// A squashfs compressor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compression {
    /// LZMA2 (`-comp xz`); the default, as for mksquashfs' Debian builds of fledge's targets.
    #[default]
    Xz,
    Zstd,
    /// zlib streams (`-comp gzip`).
    Gzip,
    /// lz4 blocks (`-comp lz4`); lz4_flex has no high-compression mode, so no levels.
    Lz4,
}

impl Compression {
    /// The compressor id of the superblock.
    pub fn id(self) -> u16 {
        match self {
            Compression::Gzip => 1,
            Compression::Xz => 4,
            Compression::Lz4 => 5,
            Compression::Zstd => 6,
        }
    }

    /// The name mksquashfs and unsquashfs use.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// The level used when none is given (mksquashfs' defaults), and the valid range.
    pub fn levels(self) -> Option<(u32, std::ops::RangeInclusive<u32>)> {
        match self {
            Compression::Xz => Some((6, 0..=9)),
            Compression::Zstd => Some((15, 1..=22)),
            Compression::Gzip => Some((9, 1..=9)),
            Compression::Lz4 => None,
        }
    }
}

/// A compressor with its settings, checked; cheap to share between threads (each call makes
/// or reuses its own state).
#[derive(Clone, Debug)]
pub struct Codec {
    pub kind: Compression,
    /// The effective level (0 for lz4).
    pub level: u32,
    /// xz only: the LZMA2 dictionary size in bytes.
    pub dict_size: u32,
    /// The data block size (xz's default dictionary size).
    pub block_size: u32,
}

/// An xz dictionary size the kernel accepts: `2^n` or `2^n + 2^(n-1)`, at least 8 KiB.
pub fn valid_dict_size(d: u32) -> bool {
    if d < 8192 {
        return false;
    }
    let low = d & d.wrapping_neg();
    let rest = d - low;
    rest == 0 || rest == low << 1
}

impl Codec {
    /// The compressor options block mksquashfs would write for these settings (payload only),
    /// or `None` when they are the defaults a reader assumes anyway. lz4 always has one.
    pub fn options(&self) -> Option<Vec<u8>> {
        let mut o = Vec::new();
        match self.kind {
            Compression::Xz if self.dict_size != self.block_size => {
                o.extend_from_slice(&self.dict_size.to_le_bytes());
                o.extend_from_slice(&0u32.to_le_bytes()); // no branch/call filters
            }
            Compression::Zstd if self.level != 15 => o.extend_from_slice(&self.level.to_le_bytes()),
            Compression::Gzip if self.level != 9 => {
                o.extend_from_slice(&self.level.to_le_bytes());
                o.extend_from_slice(&15u16.to_le_bytes()); // window bits
                o.extend_from_slice(&0u16.to_le_bytes()); // default strategy
            }
            Compression::Lz4 => {
                o.extend_from_slice(&1u32.to_le_bytes()); // LZ4_LEGACY format version
                o.extend_from_slice(&0u32.to_le_bytes()); // no HC
            }
            _ => return None,
        }
        Some(o)
    }

    /// A compressor for one thread.
    pub fn start(&self) -> Compressor {
        Compressor {
            codec: self.clone(),
            zstd: None,
        }
    }
}

/// One thread's compressor: keeps the zstd context between blocks.
pub struct Compressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    /// `input` compressed, or `None` when that is not smaller than `input`.
    pub fn compress(&mut self, input: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        let out = match self.codec.kind {
            Compression::Xz => return self.xz(input),
            Compression::Zstd => {
                if self.zstd.is_none() {
                    self.zstd = Some(zstd::bulk::Compressor::new(self.codec.level as i32)?);
                }
                match &mut self.zstd {
                    Some(z) => z.compress(input)?,
                    None => unreachable!("set above"),
                }
            }
            Compression::Gzip => {
                let mut e = flate2::write::ZlibEncoder::new(
                    Vec::with_capacity(input.len() / 2),
                    flate2::Compression::new(self.codec.level),
                );
                e.write_all(input)?;
                e.finish()?
            }
            Compression::Lz4 => lz4_flex::block::compress(input),
        };
        Ok((out.len() < input.len()).then_some(out))
    }

    fn xz(&mut self, input: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        use liblzma::stream::{Action, Check, Filters, LzmaOptions, Status, Stream};
        let err = |e: liblzma::stream::Error| std::io::Error::other(format!("xz: {e}"));
        let mut opts = LzmaOptions::new_preset(self.codec.level).map_err(err)?;
        opts.dict_size(self.codec.dict_size);
        let mut filters = Filters::new();
        filters.lzma2(&opts);
        let mut s = Stream::new_stream_encoder(&filters, Check::Crc32).map_err(err)?;
        // Room for exactly one byte less than the input: a stream that does not fit is not
        // worth keeping.
        let room = input.len().saturating_sub(1);
        let mut out = Vec::with_capacity(room);
        loop {
            let consumed = s.total_in() as usize;
            let status = s
                .process_vec(&input[consumed..], &mut out, Action::Finish)
                .map_err(err)?;
            if status == Status::StreamEnd {
                return Ok(Some(out));
            }
            if out.len() >= room || status == Status::MemNeeded {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_sizes_the_kernel_accepts() {
        for ok in [8192, 12288, 65536, 98304, 131072, 1 << 20, 3 << 19] {
            assert!(valid_dict_size(ok), "{ok}");
        }
        for bad in [0, 4096, 8193, 5 << 16, 7 << 16, 100_000] {
            assert!(!valid_dict_size(bad), "{bad}");
        }
    }

    #[test]
    fn incompressible_input_is_refused_and_text_shrinks() {
        let text = b"squashfs ".repeat(2000);
        let mut noise = vec![0u8; 16384];
        let mut x = 0x1234_5678u32;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        for kind in [
            Compression::Xz,
            Compression::Zstd,
            Compression::Gzip,
            Compression::Lz4,
        ] {
            let level = kind.levels().map_or(0, |l| l.0);
            let codec = Codec {
                kind,
                level,
                dict_size: 1 << 17,
                block_size: 1 << 17,
            };
            let mut c = codec.start();
            let small = c.compress(&text).unwrap().expect("text compresses");
            assert!(small.len() < text.len() / 10, "{kind:?}");
            assert!(c.compress(&noise).unwrap().is_none(), "{kind:?}");
        }
    }
}
