//! The read-only outputs: thin adapters from the output contract ([`super::job`]) to
//! fledge's own squashfs ([`crate::squashfs`]) and EROFS ([`crate::erofs`]) writers.
//!
//! Both need nothing from the host (no root, loop device, FUSE or tool), write the image
//! exactly sized (no free space: the guest puts a writable overlay of `overlay_size` over
//! it), and take their clock and UUID from the build's [`super::Identity`], so
//! `SOURCE_DATE_EPOCH` makes them byte-reproducible.

use super::job::{Job, Writer, Written};
use super::{BlockReuse, BuildError, BuildReport};
use crate::config::{Compression, FilesystemConfig};
use crate::erofs::{self, ErofsError, ErofsOptions};
use crate::squashfs::{self, SquashError, SquashOptions};
use crate::timing::Stopwatch;
use crate::tree::{Content, NodeKind, Tree};

/// squashfs data block size: 128 KiB, mksquashfs' default (and the Go tool's).
pub const SQUASHFS_BLOCK: u32 = 128 * 1024;

/// The squashfs writer's settings for `fs` (compression, level) at `epoch`.
///
/// `compression_level` (1 to 22) means, per compressor: zstd, its level; xz, the dictionary
/// (25% of the block for 1-7, 50% for 8-15, 100% for 16-22) and the encoder preset (2, 4,
/// 6 in those bands); gzip,
/// its level capped at 9 (zlib's highest); lz4 has no levels.
pub fn squash_options(fs: &FilesystemConfig, epoch: i64) -> SquashOptions {
    let level = fs.compression_level;
    let mut o = SquashOptions {
        block_size: SQUASHFS_BLOCK,
        mkfs_time: clamp_u32(epoch),
        ..SquashOptions::default()
    };
    match fs.compression {
        Compression::Zstd => {
            o.compression = squashfs::Compression::Zstd;
            o.compression_level = Some(level);
        }
        Compression::Gzip => {
            o.compression = squashfs::Compression::Gzip;
            o.compression_level = Some(level.min(9));
        }
        Compression::Lz4 => o.compression = squashfs::Compression::Lz4,
        // xz (the default; `none` and `lz4hc` are refused for squashfs when the config is
        // loaded). The
        // level picks the dictionary as the Go tool does, and the encoder's effort (its
        // preset: match finder and match length) with it. mksquashfs always runs preset 6.
        // Measured on the Debian test image's 128 KiB blocks with a 64 KiB dictionary
        // (CPU time, size): preset 4 takes 0.82x preset 6's time for +0.3% bytes, preset 5
        // 0.92x for +0.04%, preset 3 (fast mode) 0.55x for +1.4-3%. So the default band
        // (8-15) runs preset 4, 16-22 preset 6 (the most mksquashfs does), 1-7 preset 2.
        Compression::Xz | Compression::None | Compression::Lz4hc => {
            o.compression = squashfs::Compression::Xz;
            let (dict, preset) = xz_band(level);
            o.xz_dict_percent(dict);
            o.compression_level = Some(preset);
        }
    }
    o
}

/// xz's settings for `compression_level`: the dictionary (percent of the block, as the Go
/// tool maps it) and the encoder preset.
pub fn xz_band(level: u32) -> (u32, u32) {
    match level {
        0..=7 => (25, 2),
        8..=15 => (50, 4),
        _ => (100, 6),
    }
}

/// Seconds since 1970 as squashfs' unsigned 32-bit time (before 1970: 0; after 2106: max).
fn clamp_u32(epoch: i64) -> u32 {
    epoch.clamp(0, i64::from(u32::MAX)) as u32
}

/// The EROFS writer's compression for `fs`: none, lz4, or lz4hc at `compression_level`
/// (1 to 12, checked when the config is loaded).
pub fn erofs_compression(fs: &FilesystemConfig) -> erofs::Compression {
    match fs.compression {
        Compression::Lz4 => erofs::Compression::Lz4,
        Compression::Lz4hc => erofs::Compression::Lz4hc {
            level: fs.compression_level,
        },
        // The rest are refused for erofs when the config is loaded.
        _ => erofs::Compression::None,
    }
}

/// The EROFS writer's settings at the build's identity.
pub fn erofs_options(job: &Job<'_>) -> ErofsOptions {
    ErofsOptions {
        compression: erofs_compression(job.settings),
        build_time: job.identity.epoch.max(0) as u64,
        uuid: job.identity.uuid,
        share_xattrs: true,
        threads: 0,
        qcow2: job.settings.image_format == crate::config::ImageFormat::Qcow2,
    }
}

/// The host file behind the image path `path`, when it is a mapped file (its read failing
/// means the file changed or vanished since the build planned it).
fn host_file(tree: &Tree, path: &str) -> Option<std::path::PathBuf> {
    let id = tree.resolve(std::path::Path::new(path))?;
    match &tree.node(id).kind {
        NodeKind::File {
            content: Content::HostFile(host),
            ..
        } => Some(host.clone()),
        _ => None,
    }
}

fn squash_error(tree: &Tree, e: SquashError) -> BuildError {
    match e {
        SquashError::Interrupted => BuildError::Interrupted,
        SquashError::Read { path, source } => match host_file(tree, &path) {
            Some(host) => BuildError::HostFile { path: host, source },
            None => BuildError::Squashfs(SquashError::Read { path, source }),
        },
        other => BuildError::Squashfs(other),
    }
}

fn erofs_error(tree: &Tree, e: ErofsError) -> BuildError {
    match e {
        ErofsError::Interrupted => BuildError::Interrupted,
        ErofsError::Read { path, source } => match host_file(tree, &path) {
            Some(host) => BuildError::HostFile { path: host, source },
            None => BuildError::Erofs(ErofsError::Read { path, source }),
        },
        other => BuildError::Erofs(other),
    }
}

fn report(job: &Job<'_>) -> BuildReport {
    let stats = job.tree.stats();
    BuildReport {
        entries: stats.entries,
        bytes: stats.file_bytes,
        // Read-only: there is no free space to measure.
        free_bytes: None,
        resizes: 0,
        blocks: None,
    }
}

/// `type = "squashfs"`: fledge's squashfs writer (compressed on every core, hashed after
/// it is written).
pub struct SquashfsWriter;

impl Writer for SquashfsWriter {
    fn write(&self, job: &Job<'_>, sw: &mut Stopwatch) -> Result<Written, BuildError> {
        let mut opts = squash_options(job.settings, job.identity.epoch);
        opts.block_cache = job.cache_dir.map(std::path::Path::to_path_buf);
        // A qcow2 image is hashed when the raw one is converted.
        opts.hash = job.settings.image_format == crate::config::ImageFormat::Raw;
        let r = squashfs::write_with_progress(job.tree, &opts, job.image, job.progress)
            .map_err(|e| squash_error(job.tree, e))?;
        sw.mark("squashfs written and hashed");
        tracing::info!(
            "squashfs: {} inodes, {} fragments, {} data blocks ({} sparse, {} stored raw), \
             {} duplicate files, {} bytes used; {} blocks from the block cache, {} compressed",
            r.inodes,
            r.fragments,
            r.data_blocks,
            r.sparse_blocks,
            r.raw_blocks,
            r.duplicates,
            r.bytes_used,
            r.reused_blocks,
            r.compressed_blocks
        );
        (job.progress)(job.tree.stats().file_bytes);
        Ok(Written {
            format: crate::config::ImageFormat::Raw,
            report: BuildReport {
                blocks: Some(BlockReuse {
                    reused: r.reused_blocks,
                    compressed: r.compressed_blocks,
                }),
                ..report(job)
            },
            sha256: r.sha256,
        })
    }
}

/// `type = "erofs"`: fledge's EROFS writer (uncompressed or LZ4 on every core, hashed as
/// it is written).
pub struct ErofsWriter;

impl Writer for ErofsWriter {
    fn write(&self, job: &Job<'_>, sw: &mut Stopwatch) -> Result<Written, BuildError> {
        let opts = erofs_options(job);
        let r = erofs::write(job.tree, &opts, job.image).map_err(|e| erofs_error(job.tree, e))?;
        sw.mark("erofs written and hashed");
        tracing::info!(
            "erofs: {} inodes ({} compact, {} extended), {} inline tails, {} metadata and \
             {} data blocks, {} shared xattrs, {} compressed files ({} compressed and {} \
             stored blocks)",
            r.inodes,
            r.compact_inodes,
            r.extended_inodes,
            r.inline_tails,
            r.meta_blocks,
            r.data_blocks,
            r.shared_xattrs,
            r.compressed_files,
            r.packed_blocks,
            r.raw_blocks
        );
        (job.progress)(job.tree.stats().file_bytes);
        Ok(Written {
            // The EROFS writer streams a qcow2 image itself when asked.
            format: job.settings.image_format,
            report: report(job),
            sha256: Some(r.sha256),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(compression: Compression, level: u32) -> FilesystemConfig {
        FilesystemConfig {
            fs_type: crate::config::FsType::Squashfs,
            compression,
            compression_level: level,
            ..FilesystemConfig::default()
        }
    }

    #[test]
    fn compression_level_picks_the_xz_dictionary_and_preset() {
        for (level, dict, preset) in [
            (1, 32 * 1024, 2),
            (7, 32 * 1024, 2),
            (8, 64 * 1024, 4),
            (15, 64 * 1024, 4),
            (16, 128 * 1024, 6),
            (22, 128 * 1024, 6),
        ] {
            let o = squash_options(&fs(Compression::Xz, level), 7);
            assert_eq!(o.compression, squashfs::Compression::Xz);
            assert_eq!(o.xz_dict_size, Some(dict), "level {level}");
            assert_eq!(o.compression_level, Some(preset), "level {level}");
            assert_eq!(o.block_size, 128 * 1024);
            assert_eq!(o.mkfs_time, 7);
        }
        let z = squash_options(&fs(Compression::Zstd, 19), 0);
        assert_eq!(
            (z.compression, z.compression_level, z.xz_dict_size),
            (squashfs::Compression::Zstd, Some(19), None)
        );
        let g = squash_options(&fs(Compression::Gzip, 15), 0);
        assert_eq!(g.compression_level, Some(9));
        let l = squash_options(&fs(Compression::Lz4, 15), 0);
        assert_eq!(
            (l.compression, l.compression_level),
            (squashfs::Compression::Lz4, None)
        );
        assert_eq!(
            erofs_compression(&fs(Compression::Lz4hc, 12)),
            erofs::Compression::Lz4hc { level: 12 }
        );
        assert_eq!(
            erofs_compression(&fs(Compression::Lz4, 15)),
            erofs::Compression::Lz4
        );
        assert_eq!(
            erofs_compression(&fs(Compression::None, 15)),
            erofs::Compression::None
        );
        assert_eq!(clamp_u32(-5), 0);
        assert_eq!(clamp_u32(1 << 40), u32::MAX);
    }
}
