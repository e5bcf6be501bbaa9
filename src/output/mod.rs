//! `fledge build`: from fledge.toml to a root filesystem image and its plugin manifest.
//!
//! 1. Load and validate fledge.toml (and manifest.toml), plan the mappings, check that the
//!    output directory is writable: every cheap check runs before any heavy work.
//! 2. Resolve the image, decode its layers into the cache, merge them ([`crate::image`]).
//! 3. Inject `/etc/fsify-entrypoint`, the agent and the mappings into the merged view (no file
//!    is edited on disk), then freeze the tree.
//! 4. Choose the backend ([`select`]) with the same probes `fledge doctor` reports.
//! 5. Size the image from the tree ([`size`]), build it in a private work directory next to
//!    the output, checksum it: `native` (ext4 written and hashed in one pass, sized exactly),
//!    or [`kernel`] / `userspace` (formatted, size corrected, then hashed).
//! 6. Move the image and its manifest into place with `rename(2)`: a failed or interrupted
//!    build leaves nothing at the output paths, and an existing output untouched.

mod copy;
mod e2fsprogs;
pub mod flush;
pub mod initramfs;
pub mod job;
pub(crate) mod kernel;
mod kmsg;
mod native;
pub mod readonly;
pub mod recover;
pub mod select;
pub mod size;
mod userspace;
mod xfsproto;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::config::{Config, FsType, ImageFormat};
use crate::error::Error;
use crate::image::ImageRequest;
use crate::manifest::{self, ImageRuntimeConfig, ManifestInputs, ManifestOverrides};
use crate::mapping::{self, PlannedKind};
use crate::runner::RunError;
use crate::timing::Phase;
use crate::tree::{Content, Meta, NodeKind, Timestamp};
use crate::ui::Ui;

pub use job::{uuid_text, Identity, Job, Tools, Writer, Written};
pub use select::{BackendKind, Selection};

/// Which formatter backend to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// Probe the host and pick the fastest faithful backend.
    #[default]
    Auto,
    /// Loop device + mkfs + mount + copy (root).
    Kernel,
    /// mkfs reading the FUSE view (`mkfs.ext4 -d`, `mkfs.btrfs --rootdir`, `mkfs.xfs -p`).
    Userspace,
    /// fledge's own writers (ext4, squashfs, erofs): no privileges, FUSE or tools needed.
    Native,
}

impl BackendChoice {
    /// Every choice, in the order help texts list them.
    pub const ALL: [BackendChoice; 4] = [
        BackendChoice::Auto,
        BackendChoice::Kernel,
        BackendChoice::Userspace,
        BackendChoice::Native,
    ];

    /// The name `--backend` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Kernel => "kernel",
            BackendChoice::Userspace => "userspace",
            BackendChoice::Native => "native",
        }
    }

    /// One line on what the choice means (help texts show it).
    pub fn description(self) -> &'static str {
        match self {
            BackendChoice::Auto => "Probe the host and pick the fastest faithful backend",
            BackendChoice::Kernel => "Loop device + mkfs + mount + copy (root)",
            BackendChoice::Userspace => {
                "mkfs reading the FUSE view (`mkfs.ext4 -d`, `mkfs.btrfs --rootdir`, `mkfs.xfs -p`)"
            }
            BackendChoice::Native => {
                "fledge's own writers (ext4, squashfs, erofs): no privileges, FUSE or tools needed"
            }
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backend name that is not one of [`BackendChoice::ALL`].
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("unknown backend '{0}' (expected auto, kernel, userspace or native)")]
pub struct UnknownBackend(pub String);

impl std::str::FromStr for BackendChoice {
    type Err = UnknownBackend;

    fn from_str(s: &str) -> Result<BackendChoice, UnknownBackend> {
        BackendChoice::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownBackend(s.to_string()))
    }
}

/// What to build: `fledge build`'s inputs, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRequest {
    /// The build configuration (fledge.toml).
    pub config: PathBuf,
    /// Output image path; `None`: derived from the image reference and the type (e.g.
    /// `nginx.img`, `nginx.squashfs`, `nginx.erofs`).
    pub output: Option<PathBuf>,
    /// Plugin manifest settings (manifest.toml).
    pub manifest: Option<PathBuf>,
    pub backend: BackendChoice,
    /// How to read the image.
    pub image: ImageRequest,
    /// `--image-format`: overrides `[filesystem] image_format` (the config file, and so a
    /// reproducible build's identity, stay the same: the raw and the qcow2 build of one
    /// config hold the same filesystem).
    pub image_format: Option<ImageFormat>,
    /// `SOURCE_DATE_EPOCH`: a reproducible build at this time (injected files' mtimes, the
    /// filesystem's clock, and a UUID and hash seed derived from the inputs).
    pub source_date_epoch: Option<i64>,
}

impl BuildRequest {
    /// Build from `config` with every other setting at its default.
    pub fn new(config: impl Into<PathBuf>) -> BuildRequest {
        BuildRequest {
            config: config.into(),
            output: None,
            manifest: None,
            backend: BackendChoice::Auto,
            image: ImageRequest::default(),
            image_format: None,
            source_date_epoch: None,
        }
    }
}

/// What a finished build produced (`fledge build --json` prints it).
#[derive(Clone, Debug, Serialize)]
pub struct BuildOutcome {
    /// `fledge-build/1`: the version of this document's shape.
    pub schema: &'static str,
    pub fledge_version: &'static str,
    /// The image file (absolute).
    pub image: PathBuf,
    /// The plugin manifest beside it.
    pub manifest: PathBuf,
    /// The image file's size.
    pub image_bytes: u64,
    /// sha256 of the image file, lower-case hex (the manifest's `rootfs.checksum`).
    pub sha256: String,
    pub filesystem: FsType,
    /// The image file's format: `raw`, or `qcow2` (`[filesystem] image_format`).
    pub image_format: ImageFormat,
    pub backend: BackendKind,
    /// Why the backend was chosen.
    pub backend_reason: String,
    /// What the backend wrote.
    pub report: BuildReport,
    /// The build's steps in order, each with its duration.
    pub timings: Vec<Phase>,
    pub elapsed_seconds: f64,
}

impl BuildOutcome {
    /// The one-line summary `fledge build` prints.
    pub fn summary(&self) -> String {
        let free = self.report.free_bytes.map_or_else(
            || {
                if self.filesystem.is_read_only() {
                    "read-only".to_string()
                } else {
                    "free space not measured".to_string()
                }
            },
            |f| format!("{} MiB free", f / size::MIB),
        );
        let container = match self.image_format {
            ImageFormat::Raw => String::new(),
            f => format!(" in {f}"),
        };
        format!(
            "built {} ({}{container}, {} MiB, {free}, backend {}) and {} in {:.1}s",
            self.image.display(),
            self.filesystem.as_str(),
            self.image_bytes / size::MIB,
            self.backend.name(),
            self.manifest.display(),
            self.elapsed_seconds
        )
    }
}

/// Errors of the build itself (config, image and tool errors have their own types).
#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Tool(#[from] RunError),
    #[error("cannot {what}: {source}")]
    Loop {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot {what}: {source}{}", kernel_says(kernel))]
    Mount {
        what: String,
        source: std::io::Error,
        /// What the kernel logged about the device during the attempt ([`kmsg`]).
        kernel: Vec<String>,
    },
    #[error(
        "the filesystem on {} is still mounted after unmounting {}: {}",
        device.display(),
        mountpoint.display(),
        held_by(holders)
    )]
    StillMounted {
        device: PathBuf,
        mountpoint: PathBuf,
        /// Processes whose mount namespaces have a copy of the mount.
        holders: Vec<u32>,
    },
    #[error("cannot write {}: {source}", path.display())]
    Copy {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {} (mapped into the image): {source}", path.display())]
    HostFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("output directory {} is not usable: {source}", dir.display())]
    OutputDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Unexpected { what: String, detail: String },
    #[error(
        "not enough space in {} for the qcow2 copy of the image: about {} MiB needed, {} MiB \
         free (this filesystem cannot make the raw image a qcow2 in place)",
        dir.display(), needed >> 20, available >> 20
    )]
    NoSpaceForCopy {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error(transparent)]
    Native(#[from] native::NativeError),
    #[error(
        "not enough space in {}: the image needs about {} MiB, {} MiB are free",
        dir.display(), needed >> 20, available >> 20
    )]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("the {backend} backend cannot represent {what}: {}", list_paths(paths))]
    Unrepresentable {
        backend: &'static str,
        what: String,
        paths: Vec<String>,
    },
    #[error("no backend can build {fs} images here: {reasons}")]
    NoBackend {
        fs: &'static str,
        reasons: String,
        hint: Option<String>,
    },
    #[error("the {backend} backend cannot run here: {reason}")]
    BackendUnavailable {
        backend: &'static str,
        reason: String,
        hint: Option<String>,
    },
    #[error(transparent)]
    Squashfs(crate::squashfs::SquashError),
    #[error(transparent)]
    Erofs(crate::erofs::ErofsError),
    #[error(transparent)]
    Initramfs(crate::initramfs::InitramfsError),
    #[error("{source}")]
    Init {
        source: crate::initramfs::init::InitError,
        hint: &'static str,
    },
    #[error(transparent)]
    Fuse(#[from] crate::fusefs::FuseError),
    #[error(transparent)]
    Qcow2(#[from] crate::qcow2::Qcow2Error),
    #[error("interrupted")]
    Interrupted,
}

fn held_by(pids: &[u32]) -> String {
    if pids.is_empty() {
        "a copy of the mount lives in another mount namespace".into()
    } else {
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        format!(
            "a copy of the mount lives in the mount namespace of process {}",
            list.join(", ")
        )
    }
}

fn kernel_says(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; kernel log: {}", lines.join(" | "))
    }
}

/// The hint for a loop device or mount failure of a process without the privilege.
const ROOT_HINT: &str = "the kernel backend needs root; run as root or use --backend userspace";

/// Whether this process may attach loop devices and mount: euid 0 or CAP_SYS_ADMIN.
fn privileged() -> bool {
    nix::unistd::geteuid().is_root() || crate::probe::cap_sys_admin_effective() == Some(true)
}

/// Whether `e` says the process lacks a privilege (or it has none to begin with).
fn lacks_privilege(e: &std::io::Error, privileged: bool) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) || !privileged
}

/// The hint for a failed loop device operation, fitting its cause.
fn loop_hint(e: &std::io::Error, privileged: bool) -> String {
    if lacks_privilege(e, privileged) {
        return ROOT_HINT.into();
    }
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) => {
            "no usable loop devices here: load the loop module (modprobe loop), or in a \
             container pass /dev/loop-control and /dev/loop*; or use --backend userspace"
                .into()
        }
        Some(libc::EBUSY) | Some(libc::ENXIO) => {
            "every loop device was busy; `losetup -a` lists what holds them: detach unused \
             ones or build again"
                .into()
        }
        _ => "run `fledge doctor` to check the loop devices (kernel.loop_attach)".into(),
    }
}

/// The hint for a failed mount or unmount, fitting its cause.
fn mount_hint(e: &std::io::Error, kernel: &[String], privileged: bool) -> String {
    if lacks_privilege(e, privileged) {
        return ROOT_HINT.into();
    }
    match e.raw_os_error() {
        Some(libc::ENODEV) => {
            "the kernel lacks this filesystem type: load its module (modprobe xfs, modprobe \
             btrfs), or build ext4"
                .into()
        }
        Some(libc::EBUSY) => {
            "the device or the mount point is in use; `findmnt` and `losetup -a` show by what"
                .into()
        }
        _ if kernel.is_empty() => {
            "the kernel's reason is in its log (`dmesg`; fledge could not read /dev/kmsg); \
             run again with -vv and report it if it persists"
                .into()
        }
        _ => "the kernel's reason is quoted above; run again with -vv and report it if it \
              persists"
            .into(),
    }
}

/// What to do when a tree does not fit a read-only format.
const OTHER_TYPE: &str = "build type = \"ext4\" (the default), or the other read-only type; \
                          README 'Formats' lists what each type cannot hold";

fn write_hint(source: &std::io::Error) -> String {
    if source.raw_os_error() == Some(libc::ENOSPC) {
        "the disk holding the output is full; free space or choose another -o".into()
    } else {
        "check the output directory's permissions and free space".into()
    }
}

fn squashfs_hint(e: &crate::squashfs::SquashError) -> Option<String> {
    use crate::squashfs::SquashError as E;
    Some(match e {
        E::Xattr { .. } => "squashfs stores only user., trusted. and security. attributes \
                            (no POSIX ACLs); build type = \"erofs\" or \"ext4\", or drop \
                            the attribute from the image"
            .into(),
        E::Option(_) => "check [filesystem] compression and compression_level \
                         (README 'Configuration')"
            .into(),
        E::Name { .. }
        | E::XattrSize { .. }
        | E::Device { .. }
        | E::Symlink { .. }
        | E::TooManyIds { .. }
        | E::TooLarge { .. } => OTHER_TYPE.into(),
        E::Read { .. } => {
            "the layer cache may be damaged; run `fledge cache prune` and build again".into()
        }
        E::Write { source, .. } => write_hint(source),
        E::Hash { source, .. } => write_hint(source),
        E::Compress { .. } | E::Internal(_) => {
            "run again with -vv and report the output if it persists".into()
        }
        E::Interrupted => "nothing was written; run the build again".into(),
    })
}

fn initramfs_hint(e: &crate::initramfs::InitramfsError) -> String {
    use crate::initramfs::InitramfsError as E;
    match e {
        E::TooLarge { .. } | E::PathTooLong { .. } => {
            "newc cannot hold it; remove the file from the image or build strategy = \"oci_rootfs\""
                .into()
        }
        E::Read { .. } | E::Short { .. } => {
            "the layer cache may be damaged; run `fledge cache prune` and build again".into()
        }
        E::Write { .. } => "check the output directory's permissions and free space".into(),
        E::Compress(_) => {
            "a compressor failed; run again with FLEDGE_LOG=debug and report it".into()
        }
        E::Interrupted => "nothing was written; run the build again".into(),
    }
}

fn erofs_hint(e: &crate::erofs::ErofsError) -> Option<String> {
    use crate::erofs::ErofsError as E;
    Some(match e {
        E::Name { .. }
        | E::Xattr { .. }
        | E::XattrSize { .. }
        | E::Device { .. }
        | E::Symlink { .. }
        | E::TooLarge => OTHER_TYPE.into(),
        E::Read { .. } => {
            "the layer cache may be damaged; run `fledge cache prune` and build again".into()
        }
        E::Write { source, .. } => write_hint(source),
        E::Internal(_) => "run again with -vv and report the output if it persists".into(),
        E::Interrupted => "nothing was written; run the build again".into(),
    })
}

fn list_paths(paths: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut s = paths
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if paths.len() > SHOWN {
        s.push_str(&format!(" and {} more", paths.len() - SHOWN));
    }
    s
}

impl BuildError {
    pub fn hint(&self) -> Option<String> {
        match self {
            BuildError::Tool(RunError::Failed { stderr, .. })
                if stderr.contains("non-unique UUID") || stderr.contains("is not unique") =>
            {
                Some(
                    "a block device here carries this reproducible build's UUID (an image of \
                     the same config is loop-mounted?); unmount it, or build as root, which \
                     hides the host's block devices from btrfs-progs"
                        .into(),
                )
            }
            BuildError::Tool(e) => e.hint(),
            BuildError::Loop { source, .. } => Some(loop_hint(source, privileged())),
            BuildError::Mount { source, kernel, .. } => {
                Some(mount_hint(source, kernel, privileged()))
            }
            BuildError::StillMounted { .. } => Some(
                "a process that unshared its mounts while the build had its filesystem \
                 mounted keeps it alive; let it end (or stop it) and build again"
                    .into(),
            ),
            BuildError::OutputDir { .. } => {
                Some("choose a writable output directory with -o DIR/NAME.img".into())
            }
            BuildError::Unrepresentable { backend, .. } if backend.contains("mk") => Some(
                "drop --backend userspace: fledge's own writer (auto, --backend native) keeps it"
                    .into(),
            ),
            BuildError::Unrepresentable { .. } => {
                Some("use the kernel backend (--backend kernel, as root)".into())
            }
            BuildError::NoBackend { hint, .. } | BuildError::BackendUnavailable { hint, .. } => {
                Some(match hint {
                    Some(h) => format!("{h} (`fledge doctor` shows every check)"),
                    None => "run `fledge doctor` to see what is missing and how to fix it".into(),
                })
            }
            // A copy error is a write into the mounted image: that filesystem is what filled.
            BuildError::Copy { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => Some(
                "the image filled up while the tree was copied into it (the size estimate \
                     fell short, or the filesystem held space back for writes still in \
                     flight); build again, or raise size_buffer_mb"
                    .into(),
            ),
            BuildError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                Some("the disk holding the output is full; free space or choose another -o".into())
            }
            BuildError::Fuse(e) => e.hint().map(str::to_string),
            BuildError::Interrupted => Some("nothing was written; run the build again".into()),
            BuildError::HostFile { .. } => Some(
                "the file changed or vanished during the build; check [mappings] and build again"
                    .into(),
            ),
            BuildError::NoSpace { .. } | BuildError::NoSpaceForCopy { .. } => {
                Some("free space there, or write the image elsewhere with -o DIR/NAME.img".into())
            }
            BuildError::Copy { .. } | BuildError::Io { .. } => {
                Some("check the output directory's permissions and free space".into())
            }
            BuildError::Unexpected { .. } => {
                Some("run again with -vv and report the output if it persists".into())
            }
            BuildError::Native(native::NativeError::Xattr { .. }) => Some(
                "ext4 cannot hold this many attribute bytes on one file; \
                 build xfs or btrfs, or drop the attribute from the image"
                    .into(),
            ),
            BuildError::Native(native::NativeError::Read { .. }) => Some(
                "the layer cache may be damaged; run `fledge cache prune` and build again".into(),
            ),
            BuildError::Native(_) => {
                Some("check the output directory's permissions and free space".into())
            }
            BuildError::Qcow2(crate::qcow2::Qcow2Error::Interrupted) => {
                Some("nothing was written; run the build again".into())
            }
            BuildError::Qcow2(crate::qcow2::Qcow2Error::Write { source, .. }) => {
                Some(write_hint(source))
            }
            BuildError::Qcow2(crate::qcow2::Qcow2Error::Read { .. }) => {
                Some("run again with -vv and report the output if it persists".into())
            }
            BuildError::Squashfs(e) => squashfs_hint(e),
            BuildError::Erofs(e) => erofs_hint(e),
            BuildError::Initramfs(e) => Some(initramfs_hint(e)),
            BuildError::Init { hint, .. } => Some((*hint).to_string()),
        }
    }

    /// Whether a formatter failed because the image was too small.
    fn is_out_of_space(&self) -> bool {
        match self {
            BuildError::Tool(RunError::Failed { stderr, .. }) => {
                let s = stderr.to_ascii_lowercase();
                s.contains("no space left")
                    || s.contains("could not allocate block")
                    || s.contains("enospc")
                    || s.contains("not enough free space")
                    || s.contains("is too small")
            }
            _ => false,
        }
    }
}

fn check_interrupt() -> Result<(), BuildError> {
    if crate::interrupt::requested() {
        Err(BuildError::Interrupted)
    } else {
        Ok(())
    }
}

/// What a backend did.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct BuildReport {
    pub entries: u64,
    pub bytes: u64,
    /// Free bytes in the finished filesystem (None when it cannot be measured offline).
    pub free_bytes: Option<u64>,
    pub resizes: u32,
    /// squashfs: how many data and fragment blocks came from the block cache and how many
    /// were compressed (absent for the other types).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<BlockReuse>,
}

/// The compressed blocks of a squashfs build: taken from the block cache, or compressed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlockReuse {
    pub reused: u64,
    pub compressed: u64,
}

/// Build the image and its manifest; messages go to `ui`, the result is returned (the caller
/// prints it).
pub fn run(args: &BuildRequest, ui: &Ui) -> Result<BuildOutcome, Error> {
    crate::interrupt::install().map_err(|e| BuildError::Unexpected {
        what: "installing signal handlers".into(),
        detail: e.to_string(),
    })?;
    let mut sw = crate::timing::Stopwatch::start();

    // 1. Every cheap check first.
    let mut cfg = Config::load(&args.config)?;
    if let Some(f) = args.image_format {
        cfg.filesystem = cfg.filesystem.clone().with_image_format(f)?;
    }
    // Once, through the output sink (a tracing line too would print it twice).
    for w in &cfg.warnings {
        ui.info(format!("warning: {}: {w}", cfg.path.display()));
    }
    let overrides = args
        .manifest
        .as_deref()
        .map(ManifestOverrides::load)
        .transpose()?;
    let reference = cfg.source.image.clone();
    // Parsed once: the base name and version of every default come from here.
    let image_ref = crate::source::reference::ImageRef::parse(&reference)?;
    let fs = cfg.filesystem.fs_type;
    let output = absolute(args.output.clone().unwrap_or_else(|| {
        let ext = match cfg.filesystem.image_format {
            ImageFormat::Raw => cfg.filesystem.extension(),
            ImageFormat::Qcow2 => "qcow2".into(),
        };
        PathBuf::from(format!("{}.{ext}", image_ref.base_name()))
    }))?;
    let manifest_path = manifest::manifest_path_for(&output);
    let out_dir = output
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let planned = mapping::plan_mappings(&cfg.dir, &cfg.mappings)?;
    let probes = select::Probed::for_build(fs, args.backend);
    // Fail early when nothing can build this type at all (the tree is not needed for that).
    select::precheck(args.backend, fs, &probes)?;
    sw.mark("config and probes");
    // Release what builds killed with SIGKILL left here (theirs only), then claim our own
    // work directory next to the output.
    let recovered = recover::recover(&out_dir);
    if !recovered.dirs.is_empty() {
        ui.info(format!(
            "released {} mount(s) and {} loop device(s) left by {} killed build(s) in {}",
            recovered.mounts,
            recovered.loops,
            recovered.dirs.len(),
            out_dir.display()
        ));
    }
    let work = tempfile::Builder::new()
        .prefix(recover::PREFIX)
        .tempdir_in(&out_dir)
        .map_err(|e| BuildError::OutputDir {
            dir: out_dir.clone(),
            source: e,
        })?;
    recover::claim(work.path()).map_err(|e| BuildError::OutputDir {
        dir: out_dir.clone(),
        source: e,
    })?;

    // 2. The image.
    let opts = args.image.open_options()?;
    let merged = crate::image::merge(&reference, &opts, ui)?;
    check_interrupt()?;
    sw.mark("image resolved, layers ready and merged");

    // 3. Injection through the merged view.
    let mut merged = merged;
    let stamp = source_date(&merged.resolved, args.source_date_epoch);
    let meta = |mode: u32| Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime: stamp,
        xattrs: Default::default(),
    };
    let b = &mut merged.builder;
    b.insert(
        b"/etc/fsify-entrypoint",
        NodeKind::File {
            size: merged.resolved.config_raw.len() as u64,
            content: Content::Bytes(merged.resolved.config_raw.clone().into()),
        },
        meta(0o644),
    )?;
    if let Some(agent) = &cfg.agent {
        let cache = crate::image::cache_dir(&opts)?;
        let path = crate::agent::fetch_agent(agent, &cfg.dir, &cache)?;
        let size = std::fs::metadata(&path)
            .map_err(|e| BuildError::Io {
                path: path.clone(),
                source: e,
            })?
            .len();
        b.insert(
            crate::agent::AGENT_DEST.as_bytes(),
            NodeKind::File {
                size,
                content: Content::HostFile(path),
            },
            meta(crate::agent::AGENT_MODE),
        )?;
    }
    for entry in &planned {
        let m = Meta {
            mode: entry.mode,
            uid: entry.uid,
            gid: entry.gid,
            // Whole seconds: a host file's sub-second mtime is noise, and every formatter
            // keeps whole seconds.
            mtime: Timestamp::new(entry.mtime.sec, 0),
            xattrs: Default::default(),
        };
        match &entry.kind {
            PlannedKind::Dir => b.mkdir_all(&entry.dest, m)?,
            PlannedKind::File { host_path, size } => b.insert(
                &entry.dest,
                NodeKind::File {
                    size: *size,
                    content: Content::HostFile(host_path.clone()),
                },
                m,
            )?,
            PlannedKind::Symlink { target } => b.insert(
                &entry.dest,
                NodeKind::Symlink {
                    target: target.clone().into(),
                },
                m,
            )?,
        }
    }
    // An initramfs: its /init ([init]), after the mappings (which may bring the init).
    if cfg.strategy == crate::config::Strategy::Initramfs {
        use crate::initramfs::init::{self, InitEntry};
        if cfg.init == crate::config::InitConfig::Default && !merged.builder.exists(b"/bin/sh") {
            let arch = merged.resolved.config.architecture().to_string();
            let (path, from) = match &cfg.source.busybox {
                Some(bb) => {
                    let cache = crate::image::cache_dir(&opts)?;
                    let p = crate::agent::fetch_verified(
                        &crate::agent::BUSYBOX,
                        &bb.url,
                        &bb.sha256,
                        &cache,
                    )?;
                    (p, bb.url.clone())
                }
                None => {
                    let looked = crate::initramfs::busybox::HOST_PATHS.join(", ");
                    let p = crate::initramfs::busybox::host().ok_or_else(|| {
                        let e = init::InitError::NoBusybox { looked };
                        BuildError::Init {
                            hint: e.hint(),
                            source: e,
                        }
                    })?;
                    let from = format!("the host's {}", p.display());
                    (p, from)
                }
            };
            inject_busybox(&mut merged.builder, &path, &arch, &from, meta(0o755), ui)?;
        }
        let rt = ImageRuntimeConfig::from_oci(&merged.resolved.config);
        let b = &merged.builder;
        let exists = |p: &str| b.exists(p.as_bytes());
        let image = init::Image {
            exists: &exists,
            argv: rt.entrypoint.iter().chain(&rt.cmd).cloned().collect(),
            env: rt.env.clone(),
            workdir: rt.working_dir.clone(),
        };
        let entry = init::plan(&cfg.init, &image).map_err(|e| BuildError::Init {
            hint: e.hint(),
            source: e,
        })?;
        let b = &mut merged.builder;
        match entry {
            InitEntry::Script(text) => b.insert(
                init::INIT_PATH.as_bytes(),
                NodeKind::File {
                    size: text.len() as u64,
                    content: Content::Bytes(text.into_bytes().into()),
                },
                meta(0o755),
            )?,
            InitEntry::Link(target) => b.insert(
                init::INIT_PATH.as_bytes(),
                NodeKind::Symlink {
                    target: target.into_bytes().into(),
                },
                meta(0o777),
            )?,
        }
    }
    let (resolved, tree) = merged.freeze();
    let tree = Arc::new(tree);
    // The build's identity, once: derived from the inputs when reproducible.
    let identity = match args.source_date_epoch {
        Some(epoch) => {
            let config_text = std::fs::read(&cfg.path).unwrap_or_default();
            Identity::derived(
                epoch,
                &[
                    resolved.manifest_digest.as_bytes(),
                    &config_text,
                    env!("CARGO_PKG_VERSION").as_bytes(),
                    &epoch.to_le_bytes(),
                ],
            )
        }
        None => Identity::random(),
    };

    // 4. Backend.
    let backend = select::choose(args.backend, fs, &tree, &probes)?;
    ui.detail(format!("backend: {} ({})", backend.name(), backend.reason));

    // 5. Size and build.
    let buffer = cfg.filesystem.buffer_bytes(size::content_bytes(&tree, fs));
    let plan = size::plan(&tree, fs, buffer);
    tracing::info!(
        "content {} MiB, buffer {} MiB, initial image {} MiB, {} inodes",
        plan.content_bytes / size::MIB,
        plan.buffer_bytes / size::MIB,
        plan.image_bytes / size::MIB,
        plan.inodes
    );
    check_space(&out_dir, &plan, cfg.filesystem.preallocate)?;
    test_hook_pause()?;
    let image_tmp = work.path().join("image.img");
    create_image(&image_tmp, plan.image_bytes, cfg.filesystem.preallocate)?;
    sw.mark("injection, backend choice, sizing");
    let progress = progress_for(ui, tree.stats().file_bytes);
    // The persistent cache, for writers that keep work there; none with `--no-cache`.
    let cache_dir = match opts.temp_cache {
        Some(_) => None,
        None => Some(crate::image::cache_dir(&opts)?),
    };
    let job = Job {
        tree: &tree,
        cache_dir: cache_dir.as_deref(),
        fs,
        settings: &cfg.filesystem,
        plan: &plan,
        identity: &identity,
        image: &image_tmp,
        work: work.path(),
        progress: &|n| progress.set_position(n),
    };
    let Written {
        report,
        mut sha256,
        format,
    } = flush::while_writing(&image_tmp, || backend.kind.writer(fs).write(&job, &mut sw))?;
    progress.finish_and_clear();
    if cfg.filesystem.preallocate {
        preallocate(&image_tmp)?;
    }
    check_interrupt()?;
    sw.mark("formatted");
    let image_format = cfg.filesystem.image_format;
    let mut image_tmp = image_tmp;
    if image_format == ImageFormat::Qcow2 && format == ImageFormat::Raw {
        // The writer filled a raw file (through a loop device, mkfs, or its own layout that
        // writes the superblock last): made a qcow2 file in place where the host filesystem
        // can move extents, else one read of its data extents into a new qcow2 file.
        let interrupted = |e| match e {
            crate::qcow2::Qcow2Error::Interrupted => BuildError::Interrupted,
            e => e.into(),
        };
        let stop = &crate::interrupt::requested;
        test_hook_raw_copy(&image_tmp)?;
        let converted = match crate::qcow2::convert_in_place(&image_tmp, stop)
            .map_err(interrupted)?
        {
            // The host filesystem moved the data clusters into place: nothing copied.
            Some(c) => {
                sw.mark("converted to qcow2 in place and hashed");
                c
            }
            None => {
                let qcow = work.path().join("image.qcow2");
                check_copy_space(work.path(), &image_tmp)?;
                let converted =
                    flush::while_writing(&qcow, || crate::qcow2::convert(&image_tmp, &qcow, stop))
                        .map_err(interrupted)?;
                std::fs::remove_file(&image_tmp).map_err(|e| BuildError::Io {
                    path: image_tmp.clone(),
                    source: e,
                })?;
                image_tmp = qcow;
                sw.mark("copied into a qcow2 file and hashed");
                converted
            }
        };
        sha256 = Some(converted.sha256);
    }
    let checksum = match sha256 {
        // The writer hashed the image as it wrote it.
        Some(sum) => sum,
        None => {
            let sum = crate::digest::sha256_file(&image_tmp, &crate::interrupt::requested)
                .map_err(|e| {
                    if crate::interrupt::requested() {
                        BuildError::Interrupted
                    } else {
                        BuildError::Io {
                            path: image_tmp.clone(),
                            source: e,
                        }
                    }
                })?;
            sw.mark("sha256 of the image");
            sum
        }
    };

    // 6. Manifest, then both into place.
    let runtime = ImageRuntimeConfig::from_oci(&resolved.config);
    let plugin = manifest::build_manifest(&ManifestInputs {
        image_ref: &reference,
        image: &image_ref,
        image_digest: Some(&resolved.manifest_digest),
        image_path: &output,
        image_sha256: &checksum,
        fs_type: fs,
        image_format,
        image_config: &runtime,
        overrides: overrides.as_ref(),
    })?;
    let manifest_tmp = work.path().join("manifest.json");
    plugin.write(&manifest_tmp)?;
    make_readable(&manifest_tmp)?;
    // On disk before it has its name: a build reported done survives a crash.
    let flush_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Io { path, source }
    };
    flush::durable(&image_tmp).map_err(flush_err(&image_tmp))?;
    flush::durable(&manifest_tmp).map_err(flush_err(&manifest_tmp))?;
    sw.mark("image and manifest flushed to disk");
    check_interrupt()?;
    // A large image this build replaces is freed by a background process after the
    // rename, not by the rename itself (`sys::close_in_background`).
    let replaced = std::fs::File::open(&output).ok().filter(|f| {
        use std::os::unix::fs::MetadataExt;
        f.metadata()
            .is_ok_and(|m| m.is_file() && m.blocks() * 512 >= FREE_IN_BACKGROUND)
    });
    rename(&image_tmp, &output)?;
    rename(&manifest_tmp, &manifest_path)?;
    flush::durable_dir(&out_dir).map_err(flush_err(&out_dir))?;
    if let Some(old) = replaced {
        crate::sys::close_in_background(old);
    }
    sw.mark("manifest written, outputs renamed");

    let image_bytes = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
    Ok(BuildOutcome {
        schema: "fledge-build/1",
        fledge_version: env!("CARGO_PKG_VERSION"),
        image: output,
        manifest: manifest_path,
        image_bytes,
        sha256: checksum,
        filesystem: fs,
        image_format,
        backend: backend.kind,
        backend_reason: backend.reason,
        report,
        timings: sw.phases().to_vec(),
        elapsed_seconds: sw.elapsed().as_secs_f64(),
    })
}

/// Timestamp for injected files: `SOURCE_DATE_EPOCH` when set, else the image's creation
/// time, else the epoch, so the same inputs give the same tree.
fn source_date(resolved: &crate::source::ResolvedImage, epoch: Option<i64>) -> Timestamp {
    if let Some(sec) = epoch {
        return Timestamp::new(sec, 0);
    }
    resolved
        .config
        .created()
        .as_deref()
        .and_then(parse_rfc3339_seconds)
        .map(|s| Timestamp::new(s, 0))
        .unwrap_or_default()
}

/// `SOURCE_DATE_EPOCH` from the environment, when set to an integer (the command line
/// passes it in [`BuildRequest::source_date_epoch`]).
pub fn source_date_epoch_from_env() -> Option<i64> {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
}

/// Seconds since the epoch of an RFC 3339 UTC time like `2024-01-02T03:04:05.123Z`.
fn parse_rfc3339_seconds(s: &str) -> Option<i64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-');
    let (y, m, day) = (
        d.next()?.parse::<i64>().ok()?,
        d.next()?.parse::<i64>().ok()?,
        d.next()?.parse::<i64>().ok()?,
    );
    let hms = time.get(..8)?;
    let mut t = hms.split(':');
    let (hh, mm, ss) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn absolute(p: PathBuf) -> Result<PathBuf, BuildError> {
    std::path::absolute(&p).map_err(|e| BuildError::Io { path: p, source: e })
}

/// Fault injection for the test suite: with `FLEDGE_TEST_PAUSE_FILE=PATH`, the build creates
/// PATH just before formatting and waits (up to 60 s) until it is removed, so a test can
/// change the world (delete a mapped file, say) at that exact point.
fn test_hook_pause() -> Result<(), BuildError> {
    let Some(path) = std::env::var_os("FLEDGE_TEST_PAUSE_FILE").map(PathBuf::from) else {
        return Ok(());
    };
    std::fs::write(&path, b"paused\n").map_err(|e| BuildError::Io {
        path: path.clone(),
        source: e,
    })?;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while path.exists() && Instant::now() < deadline {
        check_interrupt()?;
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}

/// Tests: with `FLEDGE_TEST_RAW_COPY` set to a path, the raw image a writer filled is copied
/// there before it becomes a qcow2, so that a build that is not reproducible (the kernel
/// backend) can still be compared with the raw image its qcow2 holds.
fn test_hook_raw_copy(raw: &Path) -> Result<(), BuildError> {
    let Some(path) = std::env::var_os("FLEDGE_TEST_RAW_COPY").map(PathBuf::from) else {
        return Ok(());
    };
    std::fs::copy(raw, &path)
        .map(|_| ())
        .map_err(|e| BuildError::Io { path, source: e })
}

/// Refuse to start when the output filesystem cannot hold the image
/// ([`size::SizePlan::space_needed`]).
fn check_space(dir: &Path, plan: &size::SizePlan, preallocate: bool) -> Result<(), BuildError> {
    let Ok(available) = crate::probe::free_bytes(dir) else {
        return Ok(()); // unknown: let the build find out
    };
    let needed = plan.space_needed(preallocate);
    if available < needed {
        return Err(BuildError::NoSpace {
            dir: dir.to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

/// Replaced images at least this large (allocated) are freed in the background.
const FREE_IN_BACKGROUND: u64 = 64 << 20;

/// Refuse to copy the raw image `raw` into a qcow2 file beside it in `dir` when the copy
/// (its data clusters and their tables: about the raw image's allocated bytes) cannot fit,
/// rather than failing with a full disk part way through the copy.
fn check_copy_space(dir: &Path, raw: &Path) -> Result<(), BuildError> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(available), Ok(meta)) = (crate::probe::free_bytes(dir), std::fs::metadata(raw)) else {
        return Ok(()); // unknown: let the copy find out
    };
    let allocated = meta.blocks() * 512;
    // The data, with a margin for its rounding to 64 KiB clusters and for the tables.
    let needed = allocated + allocated / 64 + (4 << 20);
    if available < needed {
        return Err(BuildError::NoSpaceForCopy {
            // The build's work directory goes away: name the output directory.
            dir: dir.parent().unwrap_or(dir).to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

fn create_image(path: &Path, size: u64, preallocate: bool) -> Result<(), BuildError> {
    let err = |e| BuildError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let f = std::fs::File::create(path).map_err(err)?;
    if preallocate {
        nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, size as i64)
            .map_err(|e| err(e.into()))?;
    } else {
        f.set_len(size).map_err(err)?;
    }
    Ok(())
}

/// Allocate every block of the finished image (`preallocate = true`).
fn preallocate(path: &Path) -> Result<(), BuildError> {
    let err = |e| BuildError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    nix::fcntl::fallocate(
        &f,
        nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        len as i64,
    )
    .map_err(|e| err(e.into()))
}

/// Outputs are ordinary files: 0644 (temporary files start out 0600).
fn make_readable(path: &Path) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(|e| {
        BuildError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), BuildError> {
    std::fs::rename(from, to).map_err(|e| BuildError::Io {
        path: to.to_path_buf(),
        source: e,
    })
}

/// Install the busybox at `path` (checked: static, for `arch`) as `/bin/busybox`, with
/// `/bin/sh` and the applets of fledge's default `/init` linked to it, none of them over a
/// file the image has.
fn inject_busybox(
    b: &mut crate::merge::TreeBuilder,
    path: &Path,
    arch: &str,
    from: &str,
    meta: Meta,
    ui: &Ui,
) -> Result<(), Error> {
    use crate::initramfs::busybox;
    let init_err = |e: crate::initramfs::init::InitError| BuildError::Init {
        hint: e.hint(),
        source: e,
    };
    busybox::check(path, arch, from).map_err(init_err)?;
    let size = std::fs::metadata(path)
        .map_err(|e| BuildError::Io {
            path: path.to_path_buf(),
            source: e,
        })?
        .len();
    let dest = busybox::DEST.as_bytes();
    // The image's own /bin/busybox (without a /bin/sh) stays; the links point at it.
    if !b.exists(dest) {
        b.insert(
            dest,
            NodeKind::File {
                size,
                content: Content::HostFile(path.to_path_buf()),
            },
            Meta {
                mode: busybox::MODE,
                ..meta.clone()
            },
        )?;
    }
    let mut linked = Vec::new();
    for applet in busybox::APPLETS {
        let at = format!("/bin/{applet}");
        if !b.exists(at.as_bytes()) {
            b.insert(
                at.as_bytes(),
                NodeKind::Symlink {
                    target: b"busybox".to_vec().into(),
                },
                meta.clone(),
            )?;
            linked.push(applet);
        }
    }
    let msg = format!(
        "the image has no /bin/sh: the initramfs gets busybox from {from} at {} ({} linked \
         to it)",
        busybox::DEST,
        linked.join(", ")
    );
    // Once, through the output sink (as the config warnings).
    ui.info(format!("warning: {msg}"));
    Ok(())
}

fn progress_for(ui: &Ui, total: u64) -> indicatif::ProgressBar {
    if !ui.progress_bars() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "copying {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_choice_names_round_trip() {
        for c in BackendChoice::ALL {
            assert_eq!(c.to_string().parse::<BackendChoice>(), Ok(c));
            assert!(!c.description().is_empty());
        }
        assert_eq!(BackendChoice::default(), BackendChoice::Auto);
        let err = "Native".parse::<BackendChoice>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown backend 'Native' (expected auto, kernel, userspace or native)"
        );
    }

    #[test]
    fn hints_fit_the_cause() {
        let err = |n| std::io::Error::from_raw_os_error(n);
        let dup = vec!["XFS (loop1): Filesystem has duplicate UUID 0c14 - can't mount".to_string()];
        // A privileged process is told it needs root only when the kernel says EPERM/EACCES.
        for n in [libc::EPERM, libc::EACCES] {
            assert_eq!(mount_hint(&err(n), &[], true), ROOT_HINT);
            assert_eq!(loop_hint(&err(n), true), ROOT_HINT);
        }
        for n in [libc::EINVAL, libc::EBUSY, libc::ENODEV, libc::EIO] {
            assert!(!mount_hint(&err(n), &dup, true).contains("root"), "{n}");
            assert!(!mount_hint(&err(n), &[], true).contains("root"), "{n}");
        }
        for n in [libc::EBUSY, libc::ENOENT, libc::EINVAL] {
            assert!(!loop_hint(&err(n), true).contains("root"), "{n}");
        }
        assert!(mount_hint(&err(libc::EINVAL), &dup, true).contains("quoted above"));
        assert!(mount_hint(&err(libc::EINVAL), &[], true).contains("dmesg"));
        assert!(mount_hint(&err(libc::ENODEV), &[], true).contains("modprobe"));
        assert!(loop_hint(&err(libc::ENOENT), true).contains("modprobe loop"));
        // btrfs-progs' own uniqueness check (a non-root userspace build cannot hide devices).
        let e = BuildError::Tool(RunError::Failed {
            program: "mkfs.btrfs".into(),
            args: "-U 95998f4d-86e2-44d7-9e6f-82a3be08649f x.img".into(),
            status: "exit status 1".into(),
            stderr: "ERROR: non-unique UUID: 95998f4d-86e2-44d7-9e6f-82a3be08649f".into(),
        });
        assert!(e.hint().unwrap().contains("loop-mounted"));
        // ENOSPC: the image (a write into the mounted image) or the output disk.
        let enospc = || err(libc::ENOSPC);
        let copy = BuildError::Copy {
            path: "/o/.fledge-build-x/mnt/usr/share/zoneinfo/right/America/Montreal".into(),
            source: enospc(),
        };
        assert!(copy.hint().unwrap().contains("the image filled up"));
        let io = BuildError::Io {
            path: "/o/.fledge-build-x/image.img".into(),
            source: enospc(),
        };
        assert!(io
            .hint()
            .unwrap()
            .contains("the disk holding the output is full"));
        // An unprivileged process gets the root hint whatever the errno.
        assert_eq!(mount_hint(&err(libc::EINVAL), &dup, false), ROOT_HINT);
        assert_eq!(loop_hint(&err(libc::ENOENT), false), ROOT_HINT);
        // The message quotes the kernel.
        let e = BuildError::Mount {
            what: "mount /dev/loop1 (xfs) on /o/.fledge-build-x/mnt".into(),
            source: err(libc::EINVAL),
            kernel: dup.clone(),
        };
        assert_eq!(
            e.to_string(),
            "cannot mount /dev/loop1 (xfs) on /o/.fledge-build-x/mnt: Invalid argument \
             (os error 22); kernel log: XFS (loop1): Filesystem has duplicate UUID 0c14 - \
             can't mount"
        );
        let e = BuildError::Mount {
            what: "unmount /o/mnt".into(),
            source: err(libc::EBUSY),
            kernel: Vec::new(),
        };
        assert_eq!(
            e.to_string(),
            "cannot unmount /o/mnt: Device or resource busy (os error 16)"
        );
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_seconds("2024-02-29T12:34:56.789Z"),
            Some(1_709_210_096)
        );
        assert_eq!(parse_rfc3339_seconds("garbage"), None);
    }
}
