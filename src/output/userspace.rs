//! The userspace backend: no loop device, no mount(2). The merged tree is mounted through
//! FUSE (which an unprivileged user may do) and a formatter that can populate a filesystem
//! from a directory reads it: `mkfs.ext4 -d`, `mkfs.btrfs --rootdir`, `mkfs.xfs -p`.
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
        // Written natively only; nothing to check for this backend.
        FsType::Squashfs | FsType::Erofs => None,
    }
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
            report,
            sha256: None,
        })
    }
}

/// Build `job.image` (created at `plan.image_bytes`) from the FUSE view of the tree.
fn build(job: &Job<'_>) -> Result<BuildReport, BuildError> {
    let (tree, fs, plan, image, work) = (job.tree, job.fs, job.plan, job.image, job.work);
    if let Some(reason) = super::select::native_only(fs) {
        return Err(BuildError::BackendUnavailable {
            backend: "userspace",
            reason,
            hint: None,
        });
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
            FsType::Squashfs | FsType::Erofs => unreachable!("refused above"),
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
        FsType::Btrfs | FsType::Xfs | FsType::Squashfs | FsType::Erofs => (None, 0),
    };
    Ok(BuildReport {
        entries: stats.entries,
        bytes: stats.file_bytes,
        free_bytes: free,
        resizes: resizes + attempts - 1,
    })
}

/// Start an attempt from an empty file of `size` bytes (all holes).
fn set_len(image: &Path, size: u64) -> Result<(), BuildError> {
    e2fsprogs::truncate_to(image, 0)?;
    e2fsprogs::truncate_to(image, size)
}
