//! The userspace backend: no loop device, no mount(2). The merged tree is mounted through
//! FUSE (which an unprivileged user may do) and a formatter that can populate a filesystem
//! from a directory reads it: `mkfs.ext4 -d`, `mkfs.btrfs --rootdir`, `mkfs.xfs -p`, and for
//! the read-only types `mksquashfs` and `mkfs.erofs` (the tools the existing Go tool runs on
//! an unpacked rootfs; fledge's own writers are the default, these are the alternative and a
//! second opinion).
//!
//! What each formatter cannot carry is found before anything is built
//! ([`unrepresentable`]); the backend choice uses that to pick another backend, and an
//! explicit `--backend userspace` stops with the list of affected paths.

use std::path::Path;
use std::sync::Arc;

use super::job::{Job, Writer, Written};
use super::size::MIB;
use super::{e2fsprogs, kernel, xfsproto, BuildError, BuildReport};
use crate::config::FsType;
use crate::fusefs::{MountOptions, MountedView};
use crate::tree::Tree;

/// Paths (with the reason) that the userspace formatter for `fs` cannot reproduce exactly.
pub fn unrepresentable(tree: &Tree, fs: FsType) -> Option<(String, Vec<String>)> {
    match fs {
        // debugfs repairs mtimes; everything else mkfs.ext4 -d copies.
        FsType::Ext4 => e2fsprogs::fixup_script(tree).err().map(|e| match e {
            BuildError::Unrepresentable { what, paths, .. } => (what, paths),
            other => (other.to_string(), Vec::new()),
        }),
        FsType::Btrfs => {
            // mkfs.btrfs --rootdir (btrfs-progs 6.2, and still 6.14) keeps whole seconds only
            // and writes device numbers as 0.
            let mut reasons = std::collections::BTreeSet::new();
            let mut paths = Vec::new();
            tree.walk(|path, id| {
                let node = tree.node(id);
                let reason = if node.rdev() != 0 {
                    "device numbers (mkfs.btrfs --rootdir writes 0,0)"
                } else if node.meta.mtime.nsec != 0 {
                    "sub-second mtimes (mkfs.btrfs --rootdir keeps whole seconds)"
                } else {
                    return;
                };
                reasons.insert(reason);
                if paths.len() < 10_000 {
                    paths.push(String::from_utf8_lossy(path).escape_debug().to_string());
                }
            });
            (!paths.is_empty()).then(|| (reasons.into_iter().collect::<Vec<_>>().join(", "), paths))
        }
        FsType::Xfs => xfsproto::unrepresentable(tree),
        // The xattrs the formats cannot store: fledge's own writers refuse them naming the
        // path, mksquashfs and mkfs.erofs 1.5 would drop them without a word.
        FsType::Squashfs | FsType::Erofs => {
            let stored = |name: &[u8]| {
                [&b"user."[..], b"trusted.", b"security."]
                    .iter()
                    .any(|p| name.starts_with(p))
                    || (fs == FsType::Erofs
                        && [&b"system.posix_acl_access"[..], b"system.posix_acl_default"]
                            .contains(&name))
            };
            let mut paths = Vec::new();
            tree.walk(|path, id| {
                if paths.len() < 10_000
                    && tree
                        .node(id)
                        .meta
                        .xattrs
                        .iter()
                        .any(|(name, _)| !stored(name))
                {
                    paths.push(String::from_utf8_lossy(path).escape_debug().to_string());
                }
            });
            (!paths.is_empty()).then(|| {
                (
                    format!("extended attributes {fs} does not store (the tool would drop them)"),
                    paths,
                )
            })
        }
        // Written natively only; nothing to check for this backend.
        FsType::Initramfs => None,
    }
}

/// How errors name this backend for `fs`: the read-only types' tools by name.
pub fn name_for(fs: FsType) -> &'static str {
    match fs {
        FsType::Squashfs => "userspace (mksquashfs)",
        FsType::Erofs => "userspace (mkfs.erofs)",
        _ => "userspace",
    }
}

/// Paths whose mtime is after `epoch`: mkfs.erofs, given SOURCE_DATE_EPOCH (the only way
/// erofs-utils 1.5 takes a build time other than now, short of `-T`, which sets every
/// file's), clamps them to it.
fn mtimes_after(tree: &Tree, epoch: i64) -> Vec<String> {
    let mut paths = Vec::new();
    tree.walk(|path, id| {
        let t = tree.node(id).meta.mtime;
        if paths.len() < 10_000 && (t.sec > epoch || (t.sec == epoch && t.nsec > 0)) {
            paths.push(String::from_utf8_lossy(path).escape_debug().to_string());
        }
    });
    paths
}

/// The userspace backend: mkfs reading the tree through a read-only FUSE view.
pub struct UserspaceWriter;

impl Writer for UserspaceWriter {
    fn write(
        &self,
        job: &Job<'_>,
        _sw: &mut crate::timing::Stopwatch,
    ) -> Result<Written, BuildError> {
        let report = build(job)?;
        Ok(Written {
            format: crate::config::ImageFormat::Raw,
            report,
            sha256: None,
        })
    }
}

/// Build `job.image` (created at `plan.image_bytes`) from the FUSE view of the tree.
fn build(job: &Job<'_>) -> Result<BuildReport, BuildError> {
    let (tree, fs, plan, image, work) = (job.tree, job.fs, job.plan, job.image, job.work);
    if fs.is_read_only() {
        return build_read_only(job);
    }
    let tools = job.tools();
    let uuid_from = Some(job.identity);
    let mnt = work.join("view");
    std::fs::create_dir_all(&mnt).map_err(|e| BuildError::Io {
        path: mnt.clone(),
        source: e,
    })?;
    let view = MountedView::mount(Arc::clone(tree), &mnt, &MountOptions::default())?;
    let stats = tree.stats();
    let mut size = plan.image_bytes;
    let mut attempts = 0;
    loop {
        attempts += 1;
        set_len(image, size)?;
        let result = match fs {
            FsType::Ext4 => {
                let (mkfs, mut args) = kernel::mkfs_args(fs, plan, uuid_from);
                args.extend(["-d".to_string(), mnt.display().to_string()]);
                args.push(image.display().to_string());
                tools.run(mkfs, &args).map(|_| ())
            }
            FsType::Btrfs => {
                let (mkfs, mut args) = kernel::mkfs_args(fs, plan, uuid_from);
                args.extend(["--rootdir".to_string(), mnt.display().to_string()]);
                args.push(image.display().to_string());
                if job.identity.reproducible {
                    // `-U` with the derived UUID, which any image of this config has: an
                    // image of it mounted elsewhere, or a kernel build's loop device, must
                    // not make mkfs.btrfs refuse it.
                    tools.run_hiding_block_devices(mkfs, &args).map(|_| ())
                } else {
                    tools.run(mkfs, &args).map(|_| ())
                }
            }
            FsType::Xfs => {
                let proto = work.join("xfs.proto");
                xfsproto::write(tree, &mnt, &proto)?;
                let (mkfs, mut args) = kernel::mkfs_args(fs, plan, uuid_from);
                args.extend(["-p".to_string(), proto.display().to_string()]);
                args.push(image.display().to_string());
                tools.run(mkfs, &args).map(|_| ())
            }
            FsType::Squashfs | FsType::Erofs | FsType::Initramfs => {
                unreachable!("built by build_read_only or natively")
            }
        };
        match result {
            Ok(()) => break,
            // Too small after all (the estimate is a model): grow and try again.
            Err(e) if attempts < 4 && e.is_out_of_space() => {
                tracing::info!("{} was too small, retrying larger", image.display());
                size = (size + size / 2).div_ceil(MIB) * MIB;
            }
            Err(e) => return Err(e),
        }
    }
    view.unmount()?;
    if fs == FsType::Btrfs {
        let made = std::fs::metadata(image).map(|m| m.len()).unwrap_or(0);
        if made > size {
            tracing::warn!(
                "mkfs.btrfs --rootdir made the image {} MiB, its own minimum for this content \
                 (fledge asked for {} MiB): it has more free space than the {} MiB buffer",
                made >> 20,
                size >> 20,
                plan.buffer_bytes >> 20
            );
        }
    }
    if fs == FsType::Xfs {
        let fixed = xfsproto::fix_sticky(tools, tree, image)?;
        tracing::debug!("restored {fixed} sticky bits with xfs_db");
    }

    let (free, resizes) = match fs {
        FsType::Ext4 => {
            let script = e2fsprogs::fixup_script(tree)?;
            let fixed = e2fsprogs::apply_fixups(tools, image, &script, work)?;
            if fixed > 0 {
                tracing::info!("repaired {fixed} mtimes that mkfs.ext4 -d truncated");
            }
            let (free, n) = e2fsprogs::calibrate(tools, image, plan)?;
            (Some(free), n)
        }
        // No offline resize for these; the estimate stands (tests check the window).
        FsType::Btrfs | FsType::Xfs | FsType::Squashfs | FsType::Erofs | FsType::Initramfs => {
            (None, 0)
        }
    };
    Ok(BuildReport {
        entries: stats.entries,
        bytes: stats.file_bytes,
        free_bytes: free,
        resizes: resizes + attempts - 1,
        blocks: None,
    })
}

/// The read-only types: `mksquashfs` or `mkfs.erofs` reading the FUSE view, with the same
/// settings the native writers take from `[filesystem]` (compressor, level, block size) and
/// the build's clock and UUID, so that `SOURCE_DATE_EPOCH` makes these images reproducible
/// too. Both tools size the image themselves.
fn build_read_only(job: &Job<'_>) -> Result<BuildReport, BuildError> {
    let (tree, fs, image, work) = (job.tree, job.fs, job.image, job.work);
    let mnt = work.join("view");
    std::fs::create_dir_all(&mnt).map_err(|e| BuildError::Io {
        path: mnt.clone(),
        source: e,
    })?;
    let view = MountedView::mount(Arc::clone(tree), &mnt, &MountOptions::default())?;
    let (view_dir, out) = (mnt.display().to_string(), image.display().to_string());
    let epoch = job.identity.epoch.max(0).to_string();
    let tools = job.tools();
    let result = match fs {
        FsType::Squashfs => {
            let mut args = vec![view_dir, out];
            args.extend(squashfs_args(job.settings, &epoch));
            // `-mkfs-time` sets the build time; mksquashfs refuses it together with a
            // SOURCE_DATE_EPOCH in its environment (which it would also use to clamp every
            // file's time), so the variable is kept from it.
            tools.run_with_env("mksquashfs", &args, &[("SOURCE_DATE_EPOCH", None)])
        }
        _ => {
            // A reproducible build's clock reaches mkfs.erofs only through SOURCE_DATE_EPOCH,
            // which also clamps every later mtime to it (`-T` would set all of them): such a
            // tree is refused rather than changed. Otherwise the variable is kept from it,
            // so the build time is now and every mtime stays.
            let env = if job.identity.reproducible {
                let after = mtimes_after(tree, job.identity.epoch);
                if !after.is_empty() {
                    let _ = view.unmount();
                    return Err(BuildError::Unrepresentable {
                        backend: name_for(fs),
                        what: format!(
                            "mtimes after SOURCE_DATE_EPOCH ({}; mkfs.erofs would clamp \
                             them to it)",
                            job.identity.epoch
                        ),
                        paths: after,
                    });
                }
                Some(epoch)
            } else {
                None
            };
            let mut args = vec!["-U".to_string(), super::job::uuid_text(&job.identity.uuid)];
            args.extend(erofs_args(job.settings));
            args.extend([out, view_dir]);
            tools.run_with_env("mkfs.erofs", &args, &[("SOURCE_DATE_EPOCH", env)])
        }
    };
    // The view is released whether the tool succeeded or not (its guard also unmounts on
    // drop; this reports an unmount failure).
    let unmounted = view.unmount();
    result?;
    unmounted?;
    let stats = tree.stats();
    Ok(BuildReport {
        entries: stats.entries,
        bytes: stats.file_bytes,
        free_bytes: None,
        resizes: 0,
        blocks: None,
    })
}

/// mksquashfs' options for `[filesystem]`: the native writer's block size, compressor, level
/// and xz dictionary ([`super::readonly::squash_options`]; mksquashfs has no xz preset
/// option and always runs preset 6), no progress output.
fn squashfs_args(settings: &crate::config::FilesystemConfig, epoch: &str) -> Vec<String> {
    use crate::config::Compression;
    let level = settings.compression_level;
    let mut args: Vec<String> = ["-noappend", "-no-progress", "-quiet", "-b"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(super::readonly::SQUASHFS_BLOCK.to_string());
    args.extend(["-mkfs-time".to_string(), epoch.to_string(), "-comp".into()]);
    match settings.compression {
        Compression::Zstd => args.extend([
            "zstd".into(),
            "-Xcompression-level".into(),
            level.to_string(),
        ]),
        Compression::Gzip => args.extend([
            "gzip".into(),
            "-Xcompression-level".into(),
            level.min(9).to_string(),
        ]),
        Compression::Lz4 => args.push("lz4".into()),
        // lz4hc is refused for squashfs when the config is loaded.
        // mksquashfs takes the dictionary only (it always runs xz preset 6).
        Compression::Xz | Compression::None | Compression::Lz4hc => {
            let (dict, _preset) = super::readonly::xz_band(level);
            args.extend(["xz".into(), "-Xdict-size".into(), format!("{dict}%")]);
        }
    }
    args
}

/// mkfs.erofs' compression option for `[filesystem]` (none: uncompressed; lz4hc at the
/// native writer's level).
fn erofs_args(settings: &crate::config::FilesystemConfig) -> Vec<String> {
    use crate::config::Compression;
    match settings.compression {
        Compression::Lz4 => vec!["-zlz4".into()],
        Compression::Lz4hc => vec![format!("-zlz4hc,{}", settings.compression_level)],
        _ => Vec::new(),
    }
}

/// Start an attempt from an empty file of `size` bytes (all holes).
fn set_len(image: &Path, size: u64) -> Result<(), BuildError> {
    e2fsprogs::truncate_to(image, 0)?;
    e2fsprogs::truncate_to(image, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Compression, FilesystemConfig, FsType};

    /// The xattrs mksquashfs / mkfs.erofs would drop are found before the build, naming the
    /// paths; what each format stores passes.
    #[test]
    fn read_only_tools_refuse_xattrs_their_format_drops() {
        use crate::tree::ROOT;
        use crate::treetest::{meta, with_x, x, T};
        for (name, squashfs_drops, erofs_drops) in [
            ("user.a", false, false),
            ("trusted.b", false, false),
            ("security.capability", false, false),
            ("system.posix_acl_access", true, false),
            ("system.posix_acl_default", true, false),
            ("system.other", true, true),
            ("os2.x", true, true),
        ] {
            let mut t = T::new();
            t.file(ROOT, "plain", b"p", meta(0o644, 0, 0, 1));
            t.file(
                ROOT,
                "marked",
                b"m",
                with_x(meta(0o644, 0, 0, 1), vec![x(name, b"v")]),
            );
            let tree = t.tree();
            for (fs, drops) in [
                (FsType::Squashfs, squashfs_drops),
                (FsType::Erofs, erofs_drops),
            ] {
                let got = unrepresentable(&tree, fs);
                if drops {
                    let (what, paths) = got.unwrap_or_else(|| panic!("{fs}: {name} passed"));
                    assert!(what.contains("extended attributes"), "{what}");
                    assert_eq!(paths, ["/marked"], "{fs} {name}");
                } else {
                    assert_eq!(got, None, "{fs}: {name}");
                }
            }
        }
    }

    #[test]
    fn mkfs_erofs_gets_the_configured_compression() {
        for (c, level, want) in [
            (Compression::None, 15, vec![]),
            (Compression::Lz4, 15, vec!["-zlz4".to_string()]),
            (Compression::Lz4hc, 9, vec!["-zlz4hc,9".to_string()]),
            (Compression::Lz4hc, 12, vec!["-zlz4hc,12".to_string()]),
        ] {
            let fs = FilesystemConfig {
                fs_type: FsType::Erofs,
                compression: c,
                compression_level: level,
                ..FilesystemConfig::default()
            };
            assert_eq!(erofs_args(&fs), want, "{c:?} {level}");
        }
    }
}
