//! `strategy = "initramfs"`: the thin adapter from the output contract ([`super::job`]) to
//! fledge's newc writer ([`crate::initramfs`]). Needs nothing from the host; the archive is
//! exactly its content, compressed on every core and hashed while it is written, and the
//! same bytes for the same tree (`SOURCE_DATE_EPOCH` makes the injected files' times fixed).

use super::job::{Job, Writer, Written};
use super::{BuildError, BuildReport};
use crate::config::Compression;
use crate::initramfs::{self, InitramfsError, InitramfsOptions};
use crate::timing::Stopwatch;

/// The writer's settings from `[filesystem]`: gzip at `compression_level` capped at 9 (so
/// the default, 15, is `gzip -9` as the Go tool's pipeline), or zstd at the level itself.
pub fn options(job: &Job<'_>) -> InitramfsOptions {
    let level = job.settings.compression_level;
    InitramfsOptions {
        compression: match job.settings.compression {
            Compression::Zstd => initramfs::Compression::Zstd(level as i32),
            _ => initramfs::Compression::Gzip(level.clamp(1, 9)),
        },
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// `strategy = "initramfs"`: fledge's newc writer.
pub struct InitramfsWriter;

impl Writer for InitramfsWriter {
    fn write(&self, job: &Job<'_>, sw: &mut Stopwatch) -> Result<Written, BuildError> {
        let opts = options(job);
        let r = initramfs::write(job.tree, &opts, job.image).map_err(|e| match e {
            InitramfsError::Interrupted => BuildError::Interrupted,
            other => BuildError::Initramfs(other),
        })?;
        sw.mark("initramfs written and hashed");
        tracing::info!(
            "initramfs: {} entries, {} cpio bytes, {} compressed ({:?})",
            r.entries,
            r.cpio_bytes,
            r.bytes,
            opts.compression
        );
        if r.lost_xattrs > 0 {
            tracing::info!(
                "initramfs: extended attributes of {} paths dropped (newc has none)",
                r.lost_xattrs
            );
        }
        if !r.lost_capabilities.is_empty() {
            tracing::warn!(
                "newc cpio cannot hold file capabilities (security.capability); these lose \
                 them and need root (or setcap at boot) to do what they did: {}",
                r.lost_capabilities.join(", ")
            );
        }
        if r.inexact_mtimes > 0 {
            tracing::debug!(
                "initramfs: {} mtimes kept to whole seconds in 0..2^32-1",
                r.inexact_mtimes
            );
        }
        (job.progress)(job.tree.stats().file_bytes);
        let stats = job.tree.stats();
        Ok(Written {
            report: BuildReport {
                entries: stats.entries,
                bytes: stats.file_bytes,
                free_bytes: None,
                resizes: 0,
                blocks: None,
            },
            sha256: Some(r.sha256),
            format: crate::config::ImageFormat::Raw,
        })
    }
}
