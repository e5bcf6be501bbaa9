//! The kernel backend: image file -> loop device -> mkfs -> mount -> copy the merged tree
//! straight from the layer data -> size correction -> unmount -> detach. Needs root (or
//! CAP_SYS_ADMIN with access to /dev/loop-control).
//!
//! The loop device and the mount are RAII guards: they are released on success, on every
//! error, and on Ctrl-C/SIGTERM (the interrupt flag turns into an error that unwinds through
//! them).
//!
//! A reproducible build gives its filesystem a UUID derived from the inputs, so every build of
//! one config has the same one, and the kernel refuses a second xfs or btrfs filesystem with a
//! UUID it knows: builds of one config at once, or while a user has such an image mounted,
//! would collide. So xfs is mounted with `nouuid` (its on-disk format is not touched by that),
//! and btrfs is formatted under a random fsid of its own, which the kernel never confuses
//! with another, and given the derived one with `btrfstune -U` once it is unmounted and
//! detached (every live tree block, the device item and the superblocks; no `metadata_uuid`
//! indirection). Tree blocks btrfs freed by copy-on-write during the build are not live and
//! keep the fsid they were written with: unreferenced bytes in free space, as in any btrfs
//! image (discarding them costs a FITRIM pass of seconds through the loop device).

use std::fs::File;
use std::path::{Path, PathBuf};

use loopdev::{LoopControl, LoopDevice};
use sys_mount::{FilesystemType, Mount};

use super::job::{uuid_text, Identity, Job, Tools, Writer, Written};
use super::kmsg::KernelLog;
use super::size::{SizePlan, MIB};
use super::{e2fsprogs, BuildError, BuildReport};
use crate::config::FsType;
use crate::tree::Tree;

/// Attach `image` to the free device `dev` with autoclear: one `LOOP_CONFIGURE` where the
/// kernel has it (Linux 5.8+), else `LOOP_SET_FD` + `LOOP_SET_STATUS64`.
fn attach_one(dev: &LoopDevice, image: &Path) -> std::io::Result<()> {
    let backing = File::options().read(true).write(true).open(image)?;
    match crate::sys::loop_configure(dev, &backing) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) => {
            tracing::debug!("LOOP_CONFIGURE refused ({e}); attaching in two steps");
            dev.with().autoclear(true).attach(image)
        }
        r => r,
    }
}

/// How often [`LoopGuard::attach`] tries (pauses of 1, 2, 4 ... 50 ms between: about 0.9 s).
const ATTACH_ATTEMPTS: u32 = 24;

/// How long [`LoopGuard::wait_released`] waits for a copy of the build's mount in another
/// mount namespace to go.
const RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Processes (one per mount namespace, at most 8) whose mount table has a mount on
/// `mountpoint`, from `/proc/*/mountinfo`.
fn namespaces_mounting(mountpoint: &Path) -> Vec<u32> {
    use crate::mountinfo::parse_line;
    let mut seen = std::collections::HashSet::new();
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(ns) = std::fs::read_link(p.path().join("ns/mnt")) else {
            continue;
        };
        if seen.contains(&ns) {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(p.path().join("mountinfo")) else {
            continue;
        };
        seen.insert(ns);
        if info
            .lines()
            .filter_map(parse_line)
            .any(|e| e.mount_point == mountpoint)
        {
            pids.push(pid);
            if pids.len() == 8 {
                break;
            }
        }
    }
    pids
}

/// An attached loop device, detached on drop.
pub struct LoopGuard {
    dev: Option<LoopDevice>,
    path: PathBuf,
}

impl LoopGuard {
    /// Attach `image` to a free loop device. Other processes attach and detach devices at
    /// the same time: a device reported free may be taken before we configure it (`EBUSY`)
    /// or still be tearing down its last use (`ENXIO` when opened); both are retried with a
    /// short, growing pause.
    pub fn attach(image: &Path) -> Result<LoopGuard, BuildError> {
        let ctl = LoopControl::open().map_err(|e| BuildError::Loop {
            what: "open /dev/loop-control".into(),
            source: e,
        })?;
        let transient =
            |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::ENXIO));
        let mut last = None;
        let mut pause = std::time::Duration::from_millis(1);
        for _ in 0..ATTACH_ATTEMPTS {
            if last.is_some() {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            let dev = match ctl.next_free() {
                Ok(dev) => dev,
                Err(e) if transient(&e) => {
                    last = Some((e, "find a free loop device".to_string()));
                    continue;
                }
                Err(e) => {
                    return Err(BuildError::Loop {
                        what: "find a free loop device".into(),
                        source: e,
                    })
                }
            };
            match attach_one(&dev, image) {
                Ok(()) => {
                    let path = dev.path().unwrap_or_else(|| PathBuf::from("/dev/loop?"));
                    tracing::debug!("attached {} to {}", image.display(), path.display());
                    return Ok(LoopGuard {
                        dev: Some(dev),
                        path,
                    });
                }
                Err(e) if transient(&e) => {
                    last = Some((e, format!("attach {}", image.display())));
                }
                Err(e) => {
                    return Err(BuildError::Loop {
                        what: format!("attach {}", image.display()),
                        source: e,
                    })
                }
            }
        }
        let (source, what) = last.unwrap_or_else(|| {
            (
                std::io::Error::from_raw_os_error(libc::EBUSY),
                format!("attach {}", image.display()),
            )
        });
        Err(BuildError::Loop {
            what: format!("{what} (every free device was taken or still detaching)"),
            source,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tell the loop driver that the backing file changed size.
    pub fn refresh_capacity(&self) -> Result<(), BuildError> {
        if let Some(dev) = &self.dev {
            dev.set_capacity().map_err(|e| BuildError::Loop {
                what: format!("resize {}", self.path.display()),
                source: e,
            })?;
        }
        Ok(())
    }

    pub fn detach(mut self) -> Result<(), BuildError> {
        self.release()
    }

    /// Wait until no filesystem holds the device any more, after `mountpoint` was unmounted.
    /// umount(2) returns once the mount is gone from this mount namespace, but a process that
    /// unshared its mounts while it was mounted (a service started with private mounts,
    /// `unshare -m`, btrfs-progs run by another build) holds a copy of it: the filesystem
    /// then lives on, and writes to the image when that copy goes. Nothing may read or change
    /// the image before. A device held longer than [`RELEASE_TIMEOUT`] is an error naming
    /// the processes whose mount namespaces hold it.
    pub fn wait_released(&self, mountpoint: &Path) -> Result<(), BuildError> {
        use std::os::unix::fs::OpenOptionsExt;
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(1);
        let mut said = false;
        loop {
            // A mounted filesystem claims its device exclusively: O_EXCL fails with EBUSY.
            match File::options()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(&self.path)
            {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    return Err(BuildError::Loop {
                        what: format!("open {} exclusively", self.path.display()),
                        source: e,
                    })
                }
            }
            if crate::interrupt::requested() {
                return Err(BuildError::Interrupted);
            }
            if started.elapsed() > RELEASE_TIMEOUT {
                return Err(BuildError::StillMounted {
                    device: self.path.clone(),
                    mountpoint: mountpoint.to_path_buf(),
                    holders: namespaces_mounting(mountpoint),
                });
            }
            if !said {
                tracing::info!(
                    "{} is still held after unmounting {}: a copy of the mount lives in \
                     another mount namespace; waiting for it to go",
                    self.path.display(),
                    mountpoint.display()
                );
                said = true;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
        }
        if said {
            tracing::info!(
                "{} released after {:.1}s",
                self.path.display(),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    fn release(&mut self) -> Result<(), BuildError> {
        if let Some(dev) = self.dev.take() {
            match dev.detach() {
                Ok(()) => {}
                // Autoclear already released it once the last user closed it.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
                Err(e) => {
                    return Err(BuildError::Loop {
                        what: format!("detach {}", self.path.display()),
                        source: e,
                    })
                }
            }
        }
        Ok(())
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!("{e}");
        }
    }
}

/// A mounted filesystem, unmounted on drop (lazily if a normal unmount fails).
pub struct MountGuard {
    /// Whether it is still ours to unmount.
    mounted: bool,
    target: PathBuf,
}

/// Mount options for the build's own mount of `fs`.
fn mount_data(fs: FsType) -> &'static str {
    match fs {
        // The image is sparse and fresh: nothing to zero, nothing to discard.
        FsType::Ext4 => "noinit_itable",
        // Without it the kernel refuses a filesystem whose UUID a mounted one has ("Filesystem
        // has duplicate UUID - can't mount"), which is every other reproducible build of this
        // config and any image of it mounted elsewhere. It changes nothing on disk.
        // `allocsize=64k`: a fixed end-of-file preallocation instead of xfs's growing
        // speculative one, which is reserved until writeback; on an image sized close to its
        // content, under load, those reservations ran the copy out of space (ENOSPC with
        // 69 MiB that a quiet build leaves free). Preallocations are trimmed at close, so the
        // finished filesystem is the same.
        FsType::Xfs => "nouuid,allocsize=64k",
        FsType::Btrfs => "",
        // Read-only types are never built by this backend (see `build`).
        FsType::Squashfs | FsType::Erofs | FsType::Initramfs => "ro",
    }
}

impl MountGuard {
    /// Mount `dev` on `target`. A refusal carries what the kernel logged about `dev` while
    /// it refused.
    pub fn mount(dev: &Path, target: &Path, fs: FsType) -> Result<MountGuard, BuildError> {
        let data = mount_data(fs);
        let mut builder = Mount::builder().fstype(FilesystemType::Manual(fs.as_str()));
        if !data.is_empty() {
            builder = builder.data(data);
        }
        let mut log = KernelLog::watch();
        builder.mount(dev, target).map_err(|e| {
            let device = dev.file_name().map(|n| n.to_string_lossy().into_owned());
            BuildError::Mount {
                what: format!(
                    "mount {} ({}) on {}",
                    dev.display(),
                    fs.as_str(),
                    target.display()
                ),
                source: e,
                kernel: log.about(device.as_deref().unwrap_or_default()),
            }
        })?;
        // The `Mount` handle is not kept: it unmounts nothing when dropped, and unmounting
        // goes through `hostmount` like every other unmount.
        Ok(MountGuard {
            mounted: true,
            target: target.to_path_buf(),
        })
    }

    pub fn unmount(mut self) -> Result<(), BuildError> {
        self.release(false)
    }

    /// A normal unmount; when it fails and `lazy_fallback` is set, the mount is detached
    /// lazily, and the failure of the normal unmount is still reported.
    fn release(&mut self, lazy_fallback: bool) -> Result<(), BuildError> {
        use crate::hostmount::{unmount, Detach, Fusermount, Policy, Unmounted};
        if !std::mem::take(&mut self.mounted) {
            return Ok(());
        }
        let policy = Policy {
            not_mounted_is_success: false,
            detach: if lazy_fallback {
                Detach::Always
            } else {
                Detach::Never
            },
            fusermount: Fusermount::Never,
        };
        let first = match unmount(&self.target, policy) {
            Ok(Unmounted::Now | Unmounted::NotMounted) => return Ok(()),
            Ok(Unmounted::Detached { first }) => first,
            Err(e) => e.first(),
        };
        Err(BuildError::Mount {
            what: format!("unmount {}", self.target.display()),
            source: first.into(),
            kernel: Vec::new(),
        })
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.release(true) {
            tracing::warn!("{e}");
        }
    }
}

/// Free bytes an unprivileged process could still write on the mounted filesystem.
fn free_bytes(mountpoint: &Path) -> Result<u64, BuildError> {
    crate::probe::free_bytes(mountpoint).map_err(|e| BuildError::Copy {
        path: mountpoint.to_path_buf(),
        source: e.into(),
    })
}

/// mkfs arguments shared by both backends (without the device or the -d/--rootdir source).
/// `identity`: the reproducible identity mkfs is given (`None`: mkfs draws its own).
pub fn mkfs_args(
    fs: FsType,
    plan: &SizePlan,
    identity: Option<&Identity>,
) -> (&'static str, Vec<String>) {
    let repro = identity.filter(|i| i.reproducible);
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<String>>();
    match fs {
        FsType::Ext4 => {
            let mut ext = "nodiscard,assume_storage_prezeroed=1".to_string();
            let mut args = s(&["-F", "-q", "-b", "4096", "-m", "0", "-I", "256"]);
            args.extend(["-N".to_string(), plan.inodes.to_string()]);
            if let Some(r) = repro {
                ext.push_str(&format!(",hash_seed={}", uuid_text(&r.hash_seed)));
                args.extend(["-U".to_string(), uuid_text(&r.uuid)]);
            }
            args.extend(["-E".to_string(), ext]);
            ("mkfs.ext4", args)
        }
        FsType::Xfs => {
            let mut args = s(&["-f", "-q", "-K"]);
            if let Some(r) = repro {
                args.extend(["-m".to_string(), format!("uuid={}", uuid_text(&r.uuid))]);
            }
            ("mkfs.xfs", args)
        }
        FsType::Btrfs => {
            let mut args = s(&["-f", "-q", "-K"]);
            if let Some(r) = repro {
                args.extend(["-U".to_string(), uuid_text(&r.uuid)]);
            }
            ("mkfs.btrfs", args)
        }
        FsType::Squashfs | FsType::Erofs | FsType::Initramfs => {
            unreachable!("{fs} has no mkfs backend (select::no_kernel_backend)")
        }
    }
}

/// The kernel backend: loop device, mkfs, mount, copy, size correction, unmount.
pub struct KernelWriter;

impl Writer for KernelWriter {
    fn write(
        &self,
        job: &Job<'_>,
        sw: &mut crate::timing::Stopwatch,
    ) -> Result<Written, BuildError> {
        let report = build(job, sw)?;
        Ok(Written {
            format: crate::config::ImageFormat::Raw,
            report,
            sha256: None,
        })
    }
}

/// Build `job.image` (already created at `plan.image_bytes`) with the kernel backend.
fn build(job: &Job<'_>, sw: &mut crate::timing::Stopwatch) -> Result<BuildReport, BuildError> {
    let (tree, fs, plan, image, work) = (job.tree.as_ref(), job.fs, job.plan, job.image, job.work);
    if let Some(reason) = super::select::no_kernel_backend(fs) {
        return Err(BuildError::BackendUnavailable {
            backend: "kernel",
            reason,
            hint: None,
        });
    }
    let tools = job.tools();
    let lo = LoopGuard::attach(image)?;
    sw.mark("loop attached");
    // btrfs gets a derived UUID only once it is unmounted (see the module documentation).
    let later_fsid =
        (job.identity.reproducible && fs == FsType::Btrfs).then_some(job.identity.uuid);
    let (mkfs, mut args) = mkfs_args(fs, plan, later_fsid.is_none().then_some(job.identity));
    // ext4 is made without its journal and gets it after the copy (e2fsprogs::add_journal): the
    // copy then skips journaling every metadata change, and the result is the same normal,
    // journaled, fsck-clean filesystem.
    let late_journal = fs == FsType::Ext4;
    if late_journal {
        args.extend(["-O".to_string(), "^has_journal".to_string()]);
    }
    args.push(lo.path().display().to_string());
    tools.run(mkfs, &args)?;
    sw.mark(mkfs);
    if let Some(uuid) = later_fsid {
        let temporary = btrfs_fsid(image)?;
        tracing::debug!(
            "formatted with the temporary fsid {}; the derived {} is set once unmounted",
            uuid_text(&temporary),
            uuid_text(&uuid)
        );
    }

    let target = work.join("mnt");
    std::fs::create_dir_all(&target).map_err(|e| BuildError::Io {
        path: target.clone(),
        source: e,
    })?;
    let mnt = MountGuard::mount(lo.path(), &target, fs)?;
    if fs == FsType::Ext4 {
        // mkfs made an empty lost+found. The image has one only if the tree does, and then
        // as the tree says (a directory with its own metadata and children, or a symlink or
        // file): the copy creates it like any other entry.
        let lf = target.join("lost+found");
        std::fs::remove_dir(&lf).map_err(|e| BuildError::Io {
            path: lf.clone(),
            source: e,
        })?;
    }
    sw.mark("mounted");
    let stats = copy_with_background_writeback(tree, &target, job.progress)?;
    sw.mark("copied");

    // Correct the size while mounted where the filesystem can be resized online.
    let mut resizes = 0;
    let file = File::options()
        .write(true)
        .open(image)
        .map_err(|e| BuildError::Io {
            path: image.to_path_buf(),
            source: e,
        })?;
    if fs != FsType::Ext4 {
        for _ in 0..4 {
            sync_fs(tools, &target, fs)?;
            let free = free_bytes(&target)?;
            if free >= plan.buffer_bytes && free <= plan.max_free() {
                break;
            }
            let size = file
                .metadata()
                .map_err(|e| BuildError::Io {
                    path: image.to_path_buf(),
                    source: e,
                })?
                .len();
            let wanted = (size as i64 + plan.target_free() as i64 - free as i64).max(0) as u64;
            let wanted = wanted.div_ceil(MIB) * MIB;
            if wanted > size {
                file.set_len(wanted).map_err(|e| BuildError::Io {
                    path: image.to_path_buf(),
                    source: e,
                })?;
                lo.refresh_capacity()?;
                match fs {
                    FsType::Xfs => tools.run("xfs_growfs", &[target.display().to_string()])?,
                    FsType::Btrfs => tools.run(
                        "btrfs",
                        &[
                            "filesystem".to_string(),
                            "resize".into(),
                            "max".into(),
                            target.display().to_string(),
                        ],
                    )?,
                    FsType::Ext4 => unreachable!("ext4 is resized offline"),
                    FsType::Squashfs | FsType::Erofs | FsType::Initramfs => {
                        unreachable!("refused in build")
                    }
                };
            } else if fs == FsType::Btrfs {
                tools.run(
                    "btrfs",
                    &[
                        "filesystem".to_string(),
                        "resize".into(),
                        wanted.to_string(),
                        target.display().to_string(),
                    ],
                )?;
                sync_fs(tools, &target, fs)?;
                file.set_len(wanted).map_err(|e| BuildError::Io {
                    path: image.to_path_buf(),
                    source: e,
                })?;
                lo.refresh_capacity()?;
            } else {
                // xfs cannot shrink: the estimate was too generous; keep what we have.
                break;
            }
            resizes += 1;
        }
    }
    let free = {
        sync_fs(tools, &target, fs)?;
        free_bytes(&target)?
    };
    sw.mark("synced");
    mnt.unmount()?;
    lo.wait_released(&target)?;
    sw.mark("unmounted");
    lo.detach()?;
    sw.mark("loop detached");
    if let Some(uuid) = later_fsid {
        set_btrfs_fsid(tools, image, &uuid)?;
        sw.mark("derived fsid set");
    }
    if late_journal {
        e2fsprogs::add_journal(tools, image)?;
        sw.mark("journal added");
    }
    let free = if fs == FsType::Ext4 {
        let (free, n) = e2fsprogs::calibrate(tools, image, plan)?;
        sw.mark("size calibrated");
        resizes += n;
        free
    } else {
        free
    };
    Ok(BuildReport {
        entries: stats.entries,
        bytes: stats.bytes,
        free_bytes: Some(free),
        resizes,
        blocks: None,
    })
}

/// Where a btrfs superblock starts, and where its magic and fsid are in it.
const BTRFS_SUPER_OFFSET: u64 = 64 << 10;
const BTRFS_SUPER_FSID: usize = 0x20;
const BTRFS_SUPER_MAGIC: usize = 0x40;

/// The fsid in the (primary) btrfs superblock of `image`.
fn btrfs_fsid(image: &Path) -> Result<[u8; 16], BuildError> {
    use std::os::unix::fs::FileExt;
    let err = |e| BuildError::Io {
        path: image.to_path_buf(),
        source: e,
    };
    let mut sb = [0u8; BTRFS_SUPER_MAGIC + 8];
    File::open(image)
        .and_then(|f| f.read_exact_at(&mut sb, BTRFS_SUPER_OFFSET))
        .map_err(err)?;
    if &sb[BTRFS_SUPER_MAGIC..] != b"_BHRfS_M" {
        return Err(BuildError::Unexpected {
            what: format!("reading the btrfs superblock of {}", image.display()),
            detail: "no btrfs magic at 64 KiB".into(),
        });
    }
    let mut fsid = [0u8; 16];
    fsid.copy_from_slice(&sb[BTRFS_SUPER_FSID..BTRFS_SUPER_FSID + 16]);
    Ok(fsid)
}

/// Give the unmounted btrfs `image` the fsid `uuid` (every tree block header, the device
/// items and the superblocks). btrfstune refuses a UUID that any block device on the host
/// carries, as an image of this config mounted elsewhere does; it works on the image file
/// here, so it runs where it sees no block device.
fn set_btrfs_fsid(tools: Tools, image: &Path, uuid: &[u8; 16]) -> Result<(), BuildError> {
    let text = uuid_text(uuid);
    tools.run_hiding_block_devices(
        "btrfstune",
        &[
            "-f".to_string(),
            "-U".into(),
            text.clone(),
            image.display().to_string(),
        ],
    )?;
    let now = btrfs_fsid(image)?;
    if &now != uuid {
        return Err(BuildError::Unexpected {
            what: format!("btrfstune -U {text} {}", image.display()),
            detail: format!("the fsid is still {}", uuid_text(&now)),
        });
    }
    Ok(())
}

/// Copy the tree while a second thread keeps writing the dirty data back (`syncfs` in a
/// loop), so that the writeback through the loop device runs on another core during the copy
/// instead of all at once before the unmount.
fn copy_with_background_writeback(
    tree: &Tree,
    target: &Path,
    progress: &dyn Fn(u64),
) -> Result<super::copy::CopyStats, BuildError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = AtomicBool::new(false);
    let dir = File::open(target).map_err(|e| BuildError::Io {
        path: target.to_path_buf(),
        source: e,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                // Only a hint: the final sync before the unmount reports errors.
                let _ = nix::unistd::syncfs(&dir);
                std::thread::sleep(std::time::Duration::from_millis(WRITEBACK_PERIOD_MS));
            }
        });
        let r = super::copy::copy_tree(tree, target, &crate::interrupt::requested, progress);
        done.store(true, Ordering::Relaxed);
        r
    })
}

/// How often the background writeback runs during the copy (measured on the Debian image:
/// 2 ms finishes copy + unmount ~20 ms sooner than 5 ms, 20 ms ~45 ms later, none ~110 ms).
const WRITEBACK_PERIOD_MS: u64 = 2;

fn sync_fs(tools: Tools, target: &Path, fs: FsType) -> Result<(), BuildError> {
    if fs == FsType::Btrfs {
        // btrfs accounts space lazily; a sync makes statfs honest.
        tools.run(
            "btrfs",
            &[
                "filesystem".to_string(),
                "sync".into(),
                target.display().to_string(),
            ],
        )?;
    } else {
        let dir = File::open(target).map_err(|e| BuildError::Io {
            path: target.to_path_buf(),
            source: e,
        })?;
        nix::unistd::syncfs(&dir).map_err(|e| BuildError::Io {
            path: target.to_path_buf(),
            source: e.into(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root only: a mount that exists only in another process's mount namespace is found,
    /// and the error for a device held that way names the process.
    #[test]
    fn mounts_in_other_namespaces_are_found() {
        let test = "mounts_in_other_namespaces_are_found";
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: {test}: needs root (unshare, mount)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let ready = dir.path().join("ready");
        let script = format!(
            "mount -t tmpfs fledge-test '{}' && touch '{}' && sleep 20",
            mnt.display(),
            ready.display()
        );
        let mut child = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ready.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let found = namespaces_mounting(&mnt);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            ready.exists(),
            "{test}: the mount in the other namespace never appeared"
        );
        assert_eq!(found, vec![child.id()], "{test}");
        // Not in ours.
        assert!(!crate::mountinfo::is_mounted(&mnt));
        let e = BuildError::StillMounted {
            device: "/dev/loop3".into(),
            mountpoint: mnt.clone(),
            holders: found,
        };
        assert_eq!(
            e.to_string(),
            format!(
                "the filesystem on /dev/loop3 is still mounted after unmounting {}: a copy of \
                 the mount lives in the mount namespace of process {}",
                mnt.display(),
                child.id()
            )
        );
        assert!(e.hint().unwrap().contains("unshared its mounts"));
    }

    /// Root only: a mount the kernel refuses says what the kernel logged about the device,
    /// and the hint does not blame privileges the process has.
    #[test]
    fn a_refused_mount_quotes_the_kernel() {
        let test = "a_refused_mount_quotes_the_kernel";
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: {test}: needs root (loop device and mount)");
            return;
        }
        let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !filesystems.lines().any(|l| l.trim_end().ends_with("\txfs")) {
            eprintln!("SKIP: {test}: the kernel has no xfs (modprobe xfs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("blank.img");
        File::create(&image).unwrap().set_len(64 * MIB).unwrap();
        let target = dir.path().join("mnt");
        std::fs::create_dir(&target).unwrap();
        let lo = LoopGuard::attach(&image).unwrap();
        let err = MountGuard::mount(lo.path(), &target, FsType::Xfs)
            .err()
            .expect("a blank image mounted as xfs");
        let device = lo.path().file_name().unwrap().to_string_lossy().to_string();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot mount {} (xfs) on {}: ",
                lo.path().display(),
                target.display()
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("; kernel log: XFS ({device}): ")),
            "{text}"
        );
        let hint = err.hint().unwrap();
        eprintln!("{text}\nhint: {hint}");
        assert!(!hint.contains("root"), "{hint}");
        assert!(hint.contains("quoted above"), "{hint}");
    }
}
