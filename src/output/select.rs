//! Backend selection: which backend can build which filesystem type here, decided from the
//! same probes `fledge doctor` reports ([`crate::probe`]), and which one `auto` picks.
//!
//! Order of preference for `auto`: for ext4 the native writer (needs nothing, fastest: the
//! image is written once, in block order, and hashed as it is written); for xfs and btrfs the
//! kernel backend (file contents go from the layer cache to the image with
//! `copy_file_range`, no FUSE round trip), then the userspace backend when it can reproduce
//! this tree exactly. squashfs and erofs: `auto` picks the native writers
//! ([`super::readonly`]), which need nothing from the host; the userspace backend
//! (`mksquashfs` / `mkfs.erofs` reading the FUSE view) runs only when asked for; the kernel
//! backend has nothing to mount for them.

use serde::Serialize;

use super::job::Writer;
use super::BuildError;
use super::{userspace, BackendChoice};
use crate::config::FsType;
use crate::probe::{self, Probe, Status};
use crate::tree::Tree;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kernel,
    Userspace,
    Native,
}

impl BackendKind {
    /// The writer that implements this backend for `fs` (the output contract,
    /// [`super::job`]).
    pub fn writer(self, fs: FsType) -> &'static dyn Writer {
        match (self, fs) {
            (BackendKind::Kernel, _) => &super::kernel::KernelWriter,
            (BackendKind::Userspace, _) => &super::userspace::UserspaceWriter,
            (BackendKind::Native, FsType::Squashfs) => &super::readonly::SquashfsWriter,
            (BackendKind::Native, FsType::Erofs) => &super::readonly::ErofsWriter,
            (BackendKind::Native, FsType::Initramfs) => &super::initramfs::InitramfsWriter,
            (BackendKind::Native, _) => &super::native::NativeExt4Writer,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
            BackendKind::Native => "native",
        }
    }
}

/// What selection decided: the backend that will write the image (a [`BackendKind`]; the
/// user asked for a [`crate::output::BackendChoice`], which may be `auto`) and why.
#[derive(Clone, Debug)]
pub struct Selection {
    pub kind: BackendKind,
    pub reason: String,
}

impl Selection {
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }
}

/// The probe results a selection is based on.
pub struct Probed {
    pub probes: Vec<Probe>,
}

impl Probed {
    /// Run the probes (the same set `fledge doctor` runs).
    pub fn run(_fs: FsType) -> Probed {
        Probed {
            probes: {
                let mut p = probe::probe_all();
                p.extend(live_probes(&p));
                p
            },
        }
    }

    /// The probes a build of `fs` with `choice` needs: the formatter tools of `fs` only, and
    /// the FUSE mount tried only when the userspace backend may be chosen (asked for, the
    /// kernel backend cannot run, or a reproducible ext4 build). Saves ~0.1 s per build.
    pub fn for_build(fs: FsType, choice: BackendChoice) -> Probed {
        let mut tools = kernel_requirements(fs);
        tools.extend(userspace_requirements(fs, false));
        let mut probes = probe::probe_selected(|id| tools.contains(&id));
        let kernel_ok = |p: &[Probe]| {
            kernel_requirements(fs)
                .iter()
                .all(|id| probe::find(p, id).is_some_and(Probe::is_ok))
        };
        let loop_probe = if fs.is_exactly_sized() {
            // No loop device builds these: none to try.
            Probe::new(
                "kernel.loop_attach",
                Status::Fail,
                "not tried: read-only types are written natively",
            )
        } else {
            live_probe_loop(&probes)
        };
        probes.push(loop_probe);
        let need_fuse = match choice {
            BackendChoice::Userspace => true,
            _ if fs.is_exactly_sized() => false,
            BackendChoice::Kernel | BackendChoice::Native => false,
            // ext4: the native writer needs nothing.
            BackendChoice::Auto => fs != FsType::Ext4 && !kernel_ok(&probes),
        };
        probes.push(if need_fuse {
            live_probe_fuse(&probes)
        } else {
            // Counted as unavailable: nothing chooses the userspace backend in this case.
            Probe::new(
                "fuse.mount",
                Status::Fail,
                "not tried: the kernel backend is used",
            )
        });
        Probed { probes }
    }

    fn ok(&self, id: &str) -> Result<(), String> {
        match probe::find(&self.probes, id) {
            Some(p) if p.is_ok() => Ok(()),
            Some(p) => Err(format!("{}: {}", p.id, p.detail)),
            None => Err(format!("{id}: not probed")),
        }
    }

    fn all_ok(&self, ids: &[&str]) -> Result<(), String> {
        let failed: Vec<String> = ids.iter().filter_map(|id| self.ok(id).err()).collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// The hint of the first failing probe among `ids`.
    fn first_hint(&self, ids: &[&str]) -> Option<String> {
        ids.iter()
            .filter_map(|id| probe::find(&self.probes, id))
            .find(|p| !p.is_ok() && p.hint.is_some())
            .and_then(|p| p.hint.clone())
    }

    fn is_root(&self) -> bool {
        self.ok("privileges.euid").is_ok()
    }
}

/// Probe ids the kernel backend needs for `fs`.
pub fn kernel_requirements(fs: FsType) -> Vec<&'static str> {
    let mut ids = vec![
        "privileges.cap_sys_admin",
        "kernel.loop_control",
        "kernel.loop_attach",
    ];
    match fs {
        FsType::Ext4 => ids.extend(["kernel.fs_ext4", "tools.mkfs_ext4", "tools.resize2fs"]),
        FsType::Xfs => ids.extend(["kernel.fs_xfs", "tools.mkfs_xfs"]),
        FsType::Btrfs => ids.extend(["kernel.fs_btrfs", "tools.mkfs_btrfs", "tools.btrfs"]),
        // Never built by this backend ([`no_kernel_backend`]).
        FsType::Squashfs | FsType::Erofs | FsType::Initramfs => {}
    }
    ids
}

/// Why the kernel backend does not build `fs`, for the read-only types: there is no
/// filesystem to mount and fill, the image is made in one piece by its writer.
pub fn no_kernel_backend(fs: FsType) -> Option<String> {
    if fs == FsType::Initramfs {
        return Some(
            "an initramfs is a cpio archive, not a filesystem to mount: fledge's own writer \
             (--backend native or auto) writes it"
                .into(),
        );
    }
    fs.is_read_only().then(|| {
        let tool = if fs == FsType::Squashfs {
            "mksquashfs"
        } else {
            "mkfs.erofs"
        };
        format!(
            "{fs} images are not made by mounting a filesystem: fledge's own {fs} writer \
             (--backend native or auto) or {tool} over the FUSE view (--backend userspace) \
             writes them"
        )
    })
}

/// Probe ids the userspace backend needs for `fs` (not counting tree fidelity).
pub fn userspace_requirements(fs: FsType, root: bool) -> Vec<&'static str> {
    let mut ids = vec!["fuse.dev", "kernel.fs_fuse", "fuse.mount"];
    if !root {
        ids.push("fuse.fusermount3");
    }
    match fs {
        FsType::Ext4 => ids.extend(["tools.mkfs_ext4", "tools.resize2fs", "tools.debugfs"]),
        FsType::Xfs => ids.extend(["tools.mkfs_xfs"]),
        FsType::Btrfs => ids.extend(["tools.mkfs_btrfs"]),
        FsType::Squashfs => ids.extend(["tools.mksquashfs"]),
        FsType::Erofs => ids.extend(["tools.mkfs_erofs"]),
        FsType::Initramfs => {}
    }
    ids
}

/// Whether the native writers can build `fs`: they write ext4, squashfs and erofs, and
/// need nothing else.
pub fn native_availability(fs: FsType) -> Result<(), String> {
    match fs {
        FsType::Ext4 | FsType::Squashfs | FsType::Erofs | FsType::Initramfs => Ok(()),
        FsType::Xfs | FsType::Btrfs => Err(format!(
            "the native writers build ext4, squashfs, erofs and the initramfs only, not {}",
            fs.as_str()
        )),
    }
}

/// Whether each backend can run for `fs` on this host (ignoring the tree).
pub fn availability(fs: FsType, probed: &Probed) -> [(BackendKind, Result<(), String>); 3] {
    if fs == FsType::Initramfs {
        let why = no_kernel_backend(fs).unwrap_or_default();
        return [
            (BackendKind::Native, Ok(())),
            (BackendKind::Kernel, Err(why.clone())),
            (BackendKind::Userspace, Err(why)),
        ];
    }
    if let Some(why) = no_kernel_backend(fs) {
        return [
            (BackendKind::Native, native_availability(fs)),
            (BackendKind::Kernel, Err(why)),
            (
                BackendKind::Userspace,
                probed.all_ok(&userspace_requirements(fs, probed.is_root())),
            ),
        ];
    }
    [
        (BackendKind::Native, native_availability(fs)),
        (BackendKind::Kernel, probed.all_ok(&kernel_requirements(fs))),
        (
            BackendKind::Userspace,
            probed.all_ok(&userspace_requirements(fs, probed.is_root())),
        ),
    ]
}

/// Fail before any heavy work when the requested backend (or, for auto, every backend) cannot
/// run here.
pub fn precheck(choice: BackendChoice, fs: FsType, probed: &Probed) -> Result<(), BuildError> {
    let avail = availability(fs, probed);
    let want = |k: BackendKind| avail.iter().find(|(kind, _)| *kind == k).map(|(_, r)| r);
    let kernel_hint = || probed.first_hint(&kernel_requirements(fs));
    let user_hint = || probed.first_hint(&userspace_requirements(fs, probed.is_root()));
    if let (Some(reason), BackendChoice::Kernel) = (no_kernel_backend(fs), choice) {
        return Err(BuildError::BackendUnavailable {
            backend: "kernel",
            reason,
            hint: Some(format!(
                "drop --backend (auto picks the {fs} writer) or pass --backend native"
            )),
        });
    }
    match choice {
        BackendChoice::Kernel => want(BackendKind::Kernel)
            .and_then(|r| r.clone().err())
            .map_or(Ok(()), |reason| {
                Err(BuildError::BackendUnavailable {
                    backend: "kernel",
                    reason,
                    hint: kernel_hint(),
                })
            }),
        BackendChoice::Native => {
            native_availability(fs).map_err(|reason| BuildError::BackendUnavailable {
                backend: "native",
                reason,
                hint: Some("use --backend auto, kernel or userspace for xfs and btrfs".into()),
            })
        }
        BackendChoice::Userspace => want(BackendKind::Userspace)
            .and_then(|r| r.clone().err())
            .map_or(Ok(()), |reason| {
                Err(BuildError::BackendUnavailable {
                    backend: "userspace",
                    reason,
                    hint: user_hint(),
                })
            }),
        BackendChoice::Auto => {
            if avail.iter().any(|(_, r)| r.is_ok()) {
                Ok(())
            } else {
                Err(BuildError::NoBackend {
                    fs: fs.as_str(),
                    reasons: avail
                        .iter()
                        .map(|(k, r)| {
                            format!("{}: {}", k.name(), r.clone().err().unwrap_or_default())
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                    hint: user_hint().or_else(kernel_hint),
                })
            }
        }
    }
}

/// What `auto` picks for `fs` on this host, ignoring what a particular tree needs: native for
/// ext4; else the kernel backend when it can run, else the userspace one (never for xfs,
/// whose protofiles lose timestamps). `fledge doctor` reports this.
pub fn auto_choice(fs: FsType, probed: &Probed) -> Option<BackendKind> {
    let [(_, native), (_, kernel), (_, user)] = availability(fs, probed);
    if native.is_ok() {
        Some(BackendKind::Native)
    } else if kernel.is_ok() {
        Some(BackendKind::Kernel)
    } else if user.is_ok() && fs != FsType::Xfs {
        Some(BackendKind::Userspace)
    } else {
        None
    }
}

/// Choose the backend for this tree.
pub fn choose(
    choice: BackendChoice,
    fs: FsType,
    tree: &Tree,
    probed: &Probed,
) -> Result<Selection, BuildError> {
    precheck(choice, fs, probed)?;
    let [(_, native), (_, kernel), (_, user)] = availability(fs, probed);
    let gaps = userspace::unrepresentable(tree, fs);
    match choice {
        BackendChoice::Native => Ok(Selection {
            kind: BackendKind::Native,
            reason: "requested with --backend native".into(),
        }),
        BackendChoice::Kernel => Ok(Selection {
            kind: BackendKind::Kernel,
            reason: "requested with --backend kernel".into(),
        }),
        BackendChoice::Userspace => match gaps {
            Some((what, paths)) => Err(BuildError::Unrepresentable {
                backend: userspace::name_for(fs),
                what,
                paths,
            }),
            None => {
                if fs == FsType::Xfs {
                    tracing::warn!(
                        "mkfs.xfs -p sets every timestamp to the build time; \
                         build as root (kernel backend) to keep the image's mtimes"
                    );
                }
                Ok(Selection {
                    kind: BackendKind::Userspace,
                    reason: "requested with --backend userspace".into(),
                })
            }
        },
        BackendChoice::Auto => {
            // ext4: fledge's own writer. It needs no privileges or tools, writes the image in
            // one pass while hashing it, and is byte-reproducible under SOURCE_DATE_EPOCH.
            if native.is_ok() {
                return Ok(Selection {
                    kind: BackendKind::Native,
                    reason: format!(
                        "{fs} is written directly (no loop device, FUSE or mkfs needed)"
                    ),
                });
            }
            if kernel.is_ok() {
                return Ok(Selection {
                    kind: BackendKind::Kernel,
                    reason: "loop devices and mount are available (fastest: no FUSE round trip)"
                        .into(),
                });
            }
            let kernel_why = kernel.err().unwrap_or_default();
            let gaps = match (fs, gaps) {
                (FsType::Xfs, None) => Some((
                    "timestamps (mkfs.xfs protofiles give every inode the build time; \
                     pass --backend userspace to accept that)"
                        .to_string(),
                    vec!["/".to_string()],
                )),
                (_, gaps) => gaps,
            };
            match (user, gaps) {
                (Ok(()), None) => Ok(Selection {
                    kind: BackendKind::Userspace,
                    reason: format!("kernel backend unavailable ({kernel_why})"),
                }),
                (Ok(()), Some((what, paths))) => Err(BuildError::Unrepresentable {
                    backend: "userspace",
                    what: format!("{what} (and the kernel backend is unavailable: {kernel_why})"),
                    paths,
                }),
                (Err(user_why), _) => Err(BuildError::NoBackend {
                    fs: fs.as_str(),
                    reasons: format!("kernel: {kernel_why}; userspace: {user_why}"),
                    hint: probed
                        .first_hint(&userspace_requirements(fs, probed.is_root()))
                        .or_else(|| probed.first_hint(&kernel_requirements(fs))),
                }),
            }
        }
    }
}

/// Probes that try the real thing: attach a loop device to a scratch file, and mount a
/// one-directory tree through FUSE. They run only when their cheap preconditions passed.
pub fn live_probes(cheap: &[Probe]) -> Vec<Probe> {
    vec![live_probe_loop(cheap), live_probe_fuse(cheap)]
}

fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("fledge-probe-").tempdir()
}

fn live_probe_loop(cheap: &[Probe]) -> Probe {
    if !probe::find(cheap, "kernel.loop_control").is_some_and(Probe::is_ok) {
        return Probe::new(
            "kernel.loop_attach",
            Status::Fail,
            "skipped: /dev/loop-control is not usable",
        )
        .hint("run as root for the kernel backend");
    }
    match scratch_dir() {
        Err(e) => Probe::new(
            "kernel.loop_attach",
            Status::Fail,
            format!("no scratch dir: {e}"),
        ),
        Ok(dir) => probe_loop_attach(dir.path()),
    }
}

fn live_probe_fuse(cheap: &[Probe]) -> Probe {
    if !probe::find(cheap, "fuse.dev").is_some_and(Probe::is_ok) {
        return Probe::new(
            "fuse.mount",
            Status::Fail,
            "skipped: /dev/fuse is not usable",
        )
        .hint("make /dev/fuse accessible (chmod 0666 /dev/fuse) or run as root");
    }
    match scratch_dir() {
        Err(e) => Probe::new("fuse.mount", Status::Fail, format!("no scratch dir: {e}")),
        Ok(dir) => probe_fuse_mount(dir.path()),
    }
}

fn probe_loop_attach(dir: &std::path::Path) -> Probe {
    const ID: &str = "kernel.loop_attach";
    let file = dir.join("loop.img");
    let attach = std::fs::File::create(&file)
        .and_then(|f| f.set_len(1 << 20))
        .map_err(|e| e.to_string())
        .and_then(|()| super::kernel::LoopGuard::attach(&file).map_err(|e| e.to_string()));
    match attach {
        Ok(lo) => {
            let dev = lo.path().display().to_string();
            match lo.detach() {
                Ok(()) => Probe::new(ID, Status::Ok, format!("attached and detached {dev}")),
                Err(e) => Probe::new(ID, Status::Fail, e.to_string()),
            }
        }
        Err(e) => Probe::new(ID, Status::Fail, e)
            .hint("the kernel backend needs root with access to /dev/loop-control and /dev/loop*"),
    }
}

fn probe_fuse_mount(dir: &std::path::Path) -> Probe {
    const ID: &str = "fuse.mount";
    let mnt = dir.join("fuse");
    let tree = std::sync::Arc::new(crate::tree::Tree {
        nodes: vec![crate::tree::Node {
            kind: crate::tree::NodeKind::Dir {
                entries: Vec::new(),
            },
            meta: crate::tree::Meta {
                mode: 0o755,
                ..Default::default()
            },
            nlink: 2,
            parent: crate::tree::ROOT,
        }],
        layer_files: Vec::new(),
    });
    let result = std::fs::create_dir(&mnt)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            crate::fusefs::MountedView::mount(tree, &mnt, &crate::fusefs::MountOptions::default())
                .map_err(|e| e.to_string())
        })
        .and_then(|view| {
            let listed = std::fs::read_dir(view.mountpoint()).map(|d| d.count());
            let unmounted = view.unmount().map_err(|e| e.to_string());
            match (listed, unmounted) {
                (Ok(0), Ok(())) => Ok(()),
                (Ok(n), Ok(())) => Err(format!("test mount listed {n} entries instead of 0")),
                (Err(e), _) => Err(format!("test mount unreadable: {e}")),
                (_, Err(e)) => Err(e),
            }
        });
    match result {
        Ok(()) => Probe::new(ID, Status::Ok, "mounted, read and unmounted a test filesystem"),
        Err(e) => Probe::new(ID, Status::Fail, e).hint(
            "the userspace backend needs FUSE: /dev/fuse accessible and fusermount3 (package fuse3) setuid",
        ),
    }
}
