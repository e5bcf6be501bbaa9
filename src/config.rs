//! `fledge.toml`: the build-time configuration.
//!
//! Loading goes through [`crate::tomlfile`] (the loader manifest.toml shares) in three
//! steps, so every error can be precise:
//! 1. parse the text into a [`toml::Table`] (syntax errors carry `line:column`);
//! 2. check every key against the known keys of its table (an unknown key is named together
//!    with its table and, when one is close, the key that was probably meant);
//! 3. deserialize into the raw serde structs (type errors carry `line:column`) and validate the
//!    values (each message names the field concerned).
//!
//! Relative host paths (`[agent] path`, the keys of `[mappings]`) are kept as written; they are
//! relative to [`Config::dir`], the directory that holds the configuration file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::tomlfile::{self, Keys, TomlProblem};

/// The only configuration version this fledge understands.
pub const CONFIG_VERSION: &str = "1";

const MIB: u64 = 1024 * 1024;

/// Buffer used when `size_buffer_mb` is absent.
pub const DEFAULT_SIZE_BUFFER_MB: u64 = 100;

/// Every key fledge.toml may hold (checked before deserializing, for "did you mean").
static KEYS: Keys = Keys::Table(&[
    ("version", Keys::Any),
    ("strategy", Keys::Any),
    (
        "source",
        Keys::Table(&[
            ("image", Keys::Any),
            ("busybox_url", Keys::Any),
            ("busybox_sha256", Keys::Any),
        ]),
    ),
    (
        "init",
        Keys::Table(&[("path", Keys::Any), ("none", Keys::Any)]),
    ),
    (
        "filesystem",
        Keys::Table(&[
            ("type", Keys::Any),
            ("size_buffer_mb", Keys::Any),
            ("preallocate", Keys::Any),
            ("compression", Keys::Any),
            ("compression_level", Keys::Any),
            ("overlay_size", Keys::Any),
            ("image_format", Keys::Any),
        ]),
    ),
    (
        "agent",
        Keys::Table(&[
            ("source_strategy", Keys::Any),
            ("version", Keys::Any),
            ("path", Keys::Any),
            ("url", Keys::Any),
            ("checksum", Keys::Any),
        ]),
    ),
    ("mappings", Keys::Any),
]);

/// An error while loading or validating `fledge.toml`.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {} not found", path.display())]
    NotFound { path: PathBuf },
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax error, or a value of the wrong type.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("unknown key '{key}' in {table}{}", suggestion.as_ref().map(|s| format!(" (did you mean '{s}'?)")).unwrap_or_default())]
    UnknownKey {
        key: String,
        /// `[filesystem]`, `[agent]`, ... or `the top-level table`.
        table: String,
        suggestion: Option<String>,
    },
    #[error("unsupported config version '{found}', must be \"1\"")]
    UnsupportedVersion { found: String },
    #[error("invalid strategy '{found}', must be one of: oci_rootfs, initramfs")]
    InvalidStrategy { found: String },
    #[error(
        "invalid filesystem type '{found}', must be one of: ext4, xfs, btrfs, squashfs, erofs"
    )]
    InvalidFilesystemType { found: String },
    #[error("'filesystem.size_buffer_mb' must be >= 0, got {value}")]
    NegativeSizeBuffer { value: i64 },
    #[error("invalid mapping '{host}' = '{dest}': {reason}")]
    InvalidMapping {
        host: String,
        dest: String,
        reason: String,
    },
    /// Any other invalid or missing value; the message names the field.
    #[error("{message}")]
    Invalid {
        message: String,
        hint: Option<String>,
    },
}

impl ConfigError {
    /// A one-line remedy, when there is an obvious one.
    pub fn hint(&self) -> Option<&str> {
        match self {
            ConfigError::NotFound { .. } => {
                Some("create one (see README 'Configuration') or pass -c")
            }
            ConfigError::UnsupportedVersion { .. } => Some("set version = \"1\""),
            ConfigError::NegativeSizeBuffer { .. } => {
                Some("use 0 for an automatic buffer sized by the image content")
            }
            ConfigError::InvalidMapping { .. } => {
                Some("mappings are \"host/path\" = \"/absolute/destination\"")
            }
            ConfigError::Invalid { hint, .. } => Some(
                hint.as_deref()
                    .unwrap_or("README 'Configuration' lists every key and its values"),
            ),
            ConfigError::Read { .. } => {
                Some("check the file's permissions, or pass another with -c")
            }
            ConfigError::Syntax { .. } => {
                Some("fix the TOML at that line and column (strings need double quotes)")
            }
            ConfigError::UnknownKey { .. } => {
                Some("remove or rename the key; README 'Configuration' lists every key")
            }
            ConfigError::InvalidStrategy { .. } => Some(
                "set strategy = \"oci_rootfs\" (a disk image) or \"initramfs\" (a cpio archive)",
            ),
            ConfigError::InvalidFilesystemType { .. } => {
                Some("set [filesystem] type to \"ext4\" (the default), \"xfs\", \"btrfs\", \"squashfs\" or \"erofs\"")
            }
        }
    }

    fn invalid(message: impl Into<String>, hint: Option<&str>) -> Self {
        ConfigError::Invalid {
            message: message.into(),
            hint: hint.map(str::to_owned),
        }
    }
}

/// The build strategy: a root filesystem image (`oci_rootfs`) or a compressed cpio archive
/// the kernel unpacks into RAM as the whole root (`initramfs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    OciRootfs,
    Initramfs,
}

/// `[init]` (initramfs only): what the kernel runs as `/init`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InitConfig {
    /// No `[init]`: fledge's `/init` script (mounts, then the agent or the entrypoint).
    #[default]
    Default,
    /// `path = "/sbin/init"`: the image's own init, linked at `/init`.
    Path(String),
    /// `none = true`: the image's entrypoint is `/init` itself, PID 1 with nothing before it.
    None,
}

/// The filesystem of the produced image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    #[default]
    Ext4,
    Xfs,
    Btrfs,
    /// A compressed read-only image (fledge's own squashfs writer).
    Squashfs,
    /// An uncompressed read-only image (fledge's own EROFS writer).
    Erofs,
    /// A compressed newc cpio archive (`strategy = "initramfs"`; not a `[filesystem] type`).
    Initramfs,
}

impl FsType {
    pub const ALL: [FsType; 5] = [
        FsType::Ext4,
        FsType::Xfs,
        FsType::Btrfs,
        FsType::Squashfs,
        FsType::Erofs,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
            FsType::Squashfs => "squashfs",
            FsType::Erofs => "erofs",
            FsType::Initramfs => "initramfs",
        }
    }

    /// Whether images of this type are read-only (no free space, no size buffer: the guest
    /// writes to an overlay). An initramfs is neither: it is unpacked into a writable tmpfs.
    pub fn is_read_only(self) -> bool {
        matches!(self, FsType::Squashfs | FsType::Erofs)
    }

    /// No free space to plan: the read-only types and the initramfs.
    pub fn is_exactly_sized(self) -> bool {
        self.is_read_only() || self == FsType::Initramfs
    }

    /// The extension of the default output name: `img` for the writable types, the type's
    /// name for the read-only ones (`nginx.squashfs`).
    pub fn extension(self) -> &'static str {
        match self {
            FsType::Ext4 | FsType::Xfs | FsType::Btrfs => "img",
            FsType::Squashfs | FsType::Erofs => self.as_str(),
            FsType::Initramfs => "cpio",
        }
    }

    /// Parse `ext4`, `xfs`, `btrfs`, `squashfs` or `erofs` (exact, lower case; `initramfs`
    /// is chosen by the strategy, not here).
    pub fn parse(s: &str) -> Option<FsType> {
        FsType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[source]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceConfig {
    /// The image reference as written (`nginx:alpine`, `oci:/dir:tag`, ...).
    pub image: String,
    /// `busybox_url` + `busybox_sha256`: the shell of an initramfs whose image has none.
    pub busybox: Option<BusyboxSource>,
}

/// Where the busybox of an initramfs without `/bin/sh` comes from (`[source] busybox_url`,
/// `busybox_sha256`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BusyboxSource {
    /// An `http://` or `https://` URL of a static busybox binary.
    pub url: String,
    /// Its SHA-256, 64 lower-case hex digits.
    pub sha256: String,
}

/// `compression_level` when absent (squashfs and erofs).
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 15;

/// The range of `compression_level`.
pub const COMPRESSION_LEVELS: std::ops::RangeInclusive<u32> = 1..=22;

/// `compression_level` for lz4hc: liblz4's LZ4HC levels, and its default (mkfs.erofs'
/// too).
pub const LZ4HC_LEVELS: std::ops::RangeInclusive<u32> = 1..=12;
pub const LZ4HC_DEFAULT_LEVEL: u32 = 9;

/// `overlay_size` when absent.
pub const DEFAULT_OVERLAY_SIZE: &str = "1G";

/// How a read-only image's file data is compressed (`[filesystem] compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is: the only choice for erofs (and what the writable types are).
    None,
    Xz,
    Zstd,
    Gzip,
    Lz4,
    /// LZ4HC (erofs only): LZ4's format at a higher compression effort.
    Lz4hc,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
            Compression::Lz4hc => "lz4hc",
        }
    }

    fn parse(s: &str) -> Option<Compression> {
        [
            Compression::None,
            Compression::Xz,
            Compression::Zstd,
            Compression::Gzip,
            Compression::Lz4,
            Compression::Lz4hc,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// `overlay_size`: the size of the writable overlay the in-guest agent puts over a read-only
/// root, as written (`"512M"`, `"1G"`, `"50%"`). The plugin manifest has no field for it,
/// so fledge validates it and keeps it in the configuration only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OverlaySize {
    /// As written.
    pub text: String,
    pub size: OverlayAmount,
}

/// What an [`OverlaySize`] means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverlayAmount {
    Bytes(u64),
    /// Percent of the guest's memory, 1 to 100.
    Percent(u32),
}

impl OverlaySize {
    /// Parse `<n>` (bytes), `<n>K`, `<n>M`, `<n>G`, `<n>T` (binary units, either case) or
    /// `<n>%` (1 to 100); `n` is a positive integer without leading zeros.
    pub fn parse(text: &str) -> Option<OverlaySize> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        // No leading zero: the guest hands the text to tmpfs' `size=`, whose parser reads
        // `010M` as octal (8 MiB), so it would not mean what it seems to.
        if digits.starts_with('0') {
            return None;
        }
        let n: u64 = digits.parse().ok().filter(|&n| n > 0)?;
        let size = match unit.to_ascii_uppercase().as_str() {
            "%" if n <= 100 => OverlayAmount::Percent(n as u32),
            "%" => return None,
            "" => OverlayAmount::Bytes(n),
            u => {
                let shift = match u {
                    "K" => 10,
                    "M" => 20,
                    "G" => 30,
                    "T" => 40,
                    _ => return None,
                };
                OverlayAmount::Bytes(n.checked_mul(1u64 << shift)?)
            }
        };
        Some(OverlaySize {
            text: t.to_string(),
            size,
        })
    }
}

impl Default for OverlaySize {
    fn default() -> Self {
        OverlaySize {
            text: DEFAULT_OVERLAY_SIZE.into(),
            size: OverlayAmount::Bytes(1 << 30),
        }
    }
}

/// `[filesystem]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FilesystemConfig {
    pub fs_type: FsType,
    /// Extra free space in MiB; 0 means "auto" (see [`FilesystemConfig::buffer_bytes`]).
    /// Writable types only.
    pub size_buffer_mb: u64,
    /// `true`: allocate the image file with fallocate; `false`: sparse file. Writable types
    /// only.
    pub preallocate: bool,
    /// Read-only types: the data compression (squashfs: xz unless set; erofs: none).
    /// `None` for the writable types.
    pub compression: Compression,
    /// Read-only types: 1 to 22 (see README "Formats" for what it does per compressor).
    pub compression_level: u32,
    /// Read-only types: the writable overlay the guest puts over the image.
    pub overlay_size: OverlaySize,
    /// The container the filesystem is written in: a raw image, or qcow2 (any type).
    pub image_format: ImageFormat,
}

/// `image_format`: how the filesystem image is stored on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// The filesystem's bytes as they are (sparse where the filesystem is free).
    #[default]
    Raw,
    /// A qcow2 (version 3) image holding only the allocated clusters ([`crate::qcow2`]).
    Qcow2,
}

impl ImageFormat {
    /// The name `image_format` takes, and the manifest's `rootfs.format` for qcow2.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for FilesystemConfig {
    fn default() -> Self {
        FilesystemConfig {
            fs_type: FsType::Ext4,
            size_buffer_mb: DEFAULT_SIZE_BUFFER_MB,
            preallocate: false,
            compression: Compression::None,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            overlay_size: OverlaySize::default(),
            image_format: ImageFormat::Raw,
        }
    }
}

impl FilesystemConfig {
    /// These settings with `image_format` set to `format` (`fledge build --image-format`),
    /// refused where the settings cannot combine with it.
    pub fn with_image_format(mut self, format: ImageFormat) -> Result<Self, ConfigError> {
        if format == ImageFormat::Qcow2 && self.fs_type == FsType::Initramfs {
            return Err(ConfigError::invalid(
                "--image-format qcow2 means nothing for strategy = \"initramfs\" (the kernel \
                 unpacks a cpio archive, not a disk image)",
                Some("drop --image-format"),
            ));
        }
        if format == ImageFormat::Qcow2 && self.preallocate {
            return Err(qcow2_preallocate());
        }
        self.image_format = format;
        Ok(self)
    }

    /// The extension of the default output name: [`FsType::extension`], and for an initramfs
    /// its compression's (`cpio.gz`, `cpio.zst`).
    pub fn extension(&self) -> String {
        match (self.fs_type, self.compression) {
            (FsType::Initramfs, Compression::Zstd) => "cpio.zst".into(),
            (FsType::Initramfs, _) => "cpio.gz".into(),
            (t, _) => t.extension().into(),
        }
    }

    /// Free space to add on top of `content_bytes`. An explicit `size_buffer_mb` is used as is;
    /// 0 means auto, tiered by content size: <= 128 MiB -> 32 MiB, <= 512 MiB -> 64 MiB,
    /// <= 2 GiB -> 128 MiB, larger -> 256 MiB.
    /// Read-only types have none.
    pub fn buffer_bytes(&self, content_bytes: u64) -> u64 {
        if self.fs_type.is_exactly_sized() {
            return 0;
        }
        if self.size_buffer_mb > 0 {
            return self.size_buffer_mb.saturating_mul(MIB);
        }
        let mib = if content_bytes <= 128 * MIB {
            32
        } else if content_bytes <= 512 * MIB {
            64
        } else if content_bytes <= 2048 * MIB {
            128
        } else {
            256
        };
        mib * MIB
    }
}

/// `[agent]`: where the kestrel agent binary comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "source_strategy", rename_all = "snake_case")]
pub enum AgentConfig {
    /// A GitHub release of volantvm/volant: `"latest"` or a version such as `"0.4.1"`.
    Release { version: String },
    /// A file on the host, relative to the config directory unless absolute.
    Local { path: PathBuf },
    /// A download; `checksum` is the expected SHA-256 as 64 lower-case hex digits.
    Http {
        url: String,
        checksum: Option<String>,
    },
}

/// One `[mappings]` entry: `host = dest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mapping {
    /// As written; relative to the config directory unless absolute.
    pub host: String,
    /// Absolute, without `..` components.
    pub dest: String,
}

/// A validated `fledge.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The directory relative host paths are resolved against.
    pub dir: PathBuf,
    pub version: String,
    pub strategy: Strategy,
    pub source: SourceConfig,
    pub filesystem: FilesystemConfig,
    pub agent: Option<AgentConfig>,
    /// `[init]`: initramfs only ([`InitConfig::Default`] for `oci_rootfs`).
    pub init: InitConfig,
    /// Sorted by host path (TOML tables have no significant order).
    pub mappings: Vec<Mapping>,
    /// Settings that were accepted but have no effect (`fledge build` prints them).
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    version: Option<String>,
    strategy: Option<String>,
    source: Option<RawSource>,
    init: Option<RawInit>,
    filesystem: Option<RawFilesystem>,
    agent: Option<RawAgent>,
    mappings: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    image: Option<String>,
    busybox_url: Option<String>,
    busybox_sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInit {
    path: Option<String>,
    none: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilesystem {
    #[serde(rename = "type")]
    fs_type: Option<String>,
    size_buffer_mb: Option<i64>,
    preallocate: Option<bool>,
    compression: Option<String>,
    compression_level: Option<i64>,
    overlay_size: Option<String>,
    image_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    source_strategy: Option<String>,
    version: Option<String>,
    path: Option<String>,
    url: Option<String>,
    checksum: Option<String>,
}

impl Config {
    /// Read, parse and validate the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::NotFound {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Config::parse(&text, path, &dir)
    }

    /// Parse and validate configuration text; `path` is used in messages, `dir` becomes
    /// [`Config::dir`].
    pub fn parse(text: &str, path: &Path, dir: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = tomlfile::parse(text, &KEYS).map_err(|p| match p {
            TomlProblem::Syntax {
                line,
                column,
                message,
            } => ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message,
            },
            TomlProblem::UnknownKey {
                key,
                table,
                suggestion,
            } => ConfigError::UnknownKey {
                key,
                table,
                suggestion,
            },
        })?;
        validate(raw, path, dir)
    }
}

fn validate(mut raw: RawConfig, path: &Path, dir: &Path) -> Result<Config, ConfigError> {
    let version = raw.version.ok_or_else(|| {
        ConfigError::invalid("'version' is required", Some("set version = \"1\""))
    })?;
    if version != CONFIG_VERSION {
        return Err(ConfigError::UnsupportedVersion { found: version });
    }
    let strategy = match raw.strategy.as_deref() {
        None => {
            return Err(ConfigError::invalid(
                "'strategy' is required",
                Some("set strategy = \"oci_rootfs\""),
            ))
        }
        Some("oci_rootfs") => Strategy::OciRootfs,
        Some("initramfs") => Strategy::Initramfs,
        Some(other) => {
            return Err(ConfigError::InvalidStrategy {
                found: other.into(),
            })
        }
    };
    let (busybox_url, busybox_sha256) = raw.source.as_mut().map_or((None, None), |s| {
        (s.busybox_url.take(), s.busybox_sha256.take())
    });
    let busybox = validate_busybox(strategy, busybox_url, busybox_sha256)?;
    let image = raw
        .source
        .and_then(|s| s.image)
        .filter(|i| !i.trim().is_empty())
        .ok_or_else(|| {
            ConfigError::invalid(
                format!(
                    "'source.image' is required for {} strategy",
                    strategy.as_str()
                ),
                Some("add [source] image = \"nginx:alpine\" (or any image reference)"),
            )
        })?;

    let mut warnings = Vec::new();
    let filesystem = match (strategy, raw.filesystem) {
        (Strategy::OciRootfs, Some(fs)) => validate_filesystem(fs, &mut warnings)?,
        (Strategy::OciRootfs, None) => FilesystemConfig::default(),
        (Strategy::Initramfs, fs) => validate_initramfs(fs)?,
    };
    let init = match (strategy, raw.init) {
        (_, None) => InitConfig::Default,
        (Strategy::OciRootfs, Some(_)) => {
            return Err(ConfigError::invalid(
                "'[init]' applies to strategy = \"initramfs\" only (a disk image boots the \
                 image's own /sbin/init through the kernel's root=)",
                Some("remove [init], or set strategy = \"initramfs\""),
            ))
        }
        (Strategy::Initramfs, Some(i)) => validate_init(i)?,
    };

    let agent = raw.agent.map(validate_agent).transpose()?;

    let mut mappings = Vec::new();
    for (host, dest) in raw.mappings.unwrap_or_default() {
        validate_mapping(&host, &dest)?;
        mappings.push(Mapping { host, dest });
    }

    Ok(Config {
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
        version,
        strategy,
        source: SourceConfig { image, busybox },
        filesystem,
        agent,
        init,
        mappings,
        warnings,
    })
}

/// A qcow2 image allocates only the clusters that hold data: nothing to preallocate.
fn qcow2_preallocate() -> ConfigError {
    ConfigError::invalid(
        "'filesystem.preallocate = true' cannot combine with image_format = \"qcow2\" \
         (a qcow2 image holds only the allocated clusters; free space is not stored)",
        Some("remove preallocate, or set image_format = \"raw\""),
    )
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::OciRootfs => "oci_rootfs",
            Strategy::Initramfs => "initramfs",
        }
    }
}

/// `[filesystem]` of an initramfs: only `compression` (gzip, the default, or zstd) and
/// `compression_level`; the other keys size or shape a filesystem, which an archive is not.
fn validate_initramfs(fs: Option<RawFilesystem>) -> Result<FilesystemConfig, ConfigError> {
    let mut out = FilesystemConfig {
        fs_type: FsType::Initramfs,
        size_buffer_mb: 0,
        preallocate: false,
        compression: Compression::Gzip,
        ..FilesystemConfig::default()
    };
    let Some(fs) = fs else {
        return Ok(out);
    };
    for (key, set) in [
        ("type", fs.fs_type.is_some()),
        ("size_buffer_mb", fs.size_buffer_mb.is_some()),
        ("preallocate", fs.preallocate.is_some()),
        ("overlay_size", fs.overlay_size.is_some()),
        ("image_format", fs.image_format.is_some()),
    ] {
        if set {
            return Err(ConfigError::invalid(
                format!(
                    "'filesystem.{key}' means nothing for strategy = \"initramfs\" (a cpio \
                     archive unpacked into RAM, not a filesystem image)"
                ),
                Some("remove it; only compression (gzip or zstd) and compression_level apply"),
            ));
        }
    }
    if let Some(c) = fs.compression {
        out.compression = match Compression::parse(&c) {
            Some(k @ (Compression::Gzip | Compression::Zstd)) => k,
            _ => {
                return Err(ConfigError::invalid(
                    format!(
                        "invalid 'filesystem.compression' '{c}' for an initramfs, must be one \
                         of: gzip, zstd"
                    ),
                    Some("gzip (the default) or zstd; the kernel unpacks both"),
                ))
            }
        };
    }
    if let Some(l) = fs.compression_level {
        out.compression_level = u32::try_from(l)
            .ok()
            .filter(|l| COMPRESSION_LEVELS.contains(l))
            .ok_or_else(|| {
                ConfigError::invalid(
                    format!("'filesystem.compression_level' must be from 1 to 22, got {l}"),
                    Some("omit it for the default, 15 (gzip: 9, its highest)"),
                )
            })?;
    }
    Ok(out)
}

/// `[source] busybox_url` + `busybox_sha256`: both or neither, an http(s) URL and 64 hex
/// digits, and only for an initramfs (a disk image boots the image's own init).
fn validate_busybox(
    strategy: Strategy,
    url: Option<String>,
    sha256: Option<String>,
) -> Result<Option<BusyboxSource>, ConfigError> {
    let (url, sha256) = match (url, sha256) {
        (None, None) => return Ok(None),
        (Some(u), Some(s)) => (u, s),
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "'source.busybox_url' needs 'source.busybox_sha256'",
                Some("add busybox_sha256 = \"<64 hex digits>\" (sha256sum of the binary)"),
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "'source.busybox_sha256' without 'source.busybox_url'",
                Some("add busybox_url = \"https://...\", or remove busybox_sha256"),
            ))
        }
    };
    if strategy != Strategy::Initramfs {
        return Err(ConfigError::invalid(
            "'source.busybox_url' applies to strategy = \"initramfs\" only (a disk image \
             boots the image's own init)",
            Some("remove busybox_url and busybox_sha256, or set strategy = \"initramfs\""),
        ));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    if !rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')) {
        return Err(ConfigError::invalid(
            format!("'source.busybox_url' = \"{url}\" is not an http:// or https:// URL"),
            Some("give the URL of a static busybox binary"),
        ));
    }
    let hex = sha256.strip_prefix("sha256:").unwrap_or(&sha256);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ConfigError::invalid(
            format!("'source.busybox_sha256' = \"{sha256}\" is not a SHA-256 (64 hex digits)"),
            Some("use the output of sha256sum on the binary"),
        ));
    }
    Ok(Some(BusyboxSource {
        url,
        sha256: hex.to_ascii_lowercase(),
    }))
}

fn validate_init(i: RawInit) -> Result<InitConfig, ConfigError> {
    match (i.path, i.none) {
        (Some(_), Some(true)) => Err(ConfigError::invalid(
            "'init.path' and 'init.none = true' contradict each other: the first names an \
             init to run, the second says the entrypoint is PID 1",
            Some("keep one of them"),
        )),
        (Some(p), _) => {
            if !p.starts_with('/') || p.contains('\0') || p.split('/').any(|c| c == "..") {
                return Err(ConfigError::invalid(
                    format!("invalid 'init.path' '{p}': must be an absolute path in the image, without '..'"),
                    Some("for example path = \"/sbin/init\""),
                ));
            }
            if p == "/init" {
                return Err(ConfigError::invalid(
                    "'init.path' = \"/init\" names the link itself; name the file it is to run",
                    Some("to run the image's own /init as it is, use none = true"),
                ));
            }
            Ok(InitConfig::Path(p))
        }
        (None, Some(true)) => Ok(InitConfig::None),
        (None, Some(false)) | (None, None) => Ok(InitConfig::Default),
    }
}

fn validate_filesystem(
    fs: RawFilesystem,
    warnings: &mut Vec<String>,
) -> Result<FilesystemConfig, ConfigError> {
    let mut out = FilesystemConfig::default();
    if let Some(t) = fs.fs_type {
        out.fs_type = FsType::parse(&t).ok_or(ConfigError::InvalidFilesystemType { found: t })?;
    }
    let ty = out.fs_type;
    if let Some(b) = fs.size_buffer_mb {
        out.size_buffer_mb =
            u64::try_from(b).map_err(|_| ConfigError::NegativeSizeBuffer { value: b })?;
    }
    if let Some(p) = fs.preallocate {
        out.preallocate = p;
    }
    if let Some(f) = &fs.image_format {
        out.image_format = match f.as_str() {
            "raw" => ImageFormat::Raw,
            "qcow2" => ImageFormat::Qcow2,
            _ => {
                return Err(ConfigError::invalid(
                    format!("invalid 'filesystem.image_format' '{f}': must be one of: raw, qcow2"),
                    Some("omit it for a raw image, or set image_format = \"qcow2\""),
                ))
            }
        };
    }
    if out.image_format == ImageFormat::Qcow2 && fs.preallocate == Some(true) {
        return Err(qcow2_preallocate());
    }
    if !ty.is_read_only() {
        // The read-only types' keys are mistakes on a writable image.
        let present = [
            ("compression", fs.compression.is_some()),
            ("compression_level", fs.compression_level.is_some()),
            ("overlay_size", fs.overlay_size.is_some()),
        ];
        if let Some((key, _)) = present.iter().find(|(_, set)| *set) {
            return Err(ConfigError::invalid(
                format!(
                    "'filesystem.{key}' applies to the read-only types (squashfs, erofs), not to type = \"{ty}\""
                ),
                Some("remove it, or set [filesystem] type = \"squashfs\" or \"erofs\""),
            ));
        }
        return Ok(out);
    }
    // A read-only image has no free space to size or to preallocate.
    for (key, set) in [
        ("size_buffer_mb", fs.size_buffer_mb.is_some()),
        ("preallocate", fs.preallocate.is_some()),
    ] {
        if set {
            warnings.push(format!(
                "'filesystem.{key}' has no effect on a read-only {ty} image (it has no free \
                 space; the guest writes to an overlay of overlay_size)"
            ));
        }
    }
    out.size_buffer_mb = 0;
    out.preallocate = false;
    if let Some(o) = fs.overlay_size {
        out.overlay_size = OverlaySize::parse(&o).ok_or_else(|| {
            ConfigError::invalid(
                format!(
                    "invalid 'filesystem.overlay_size' '{o}': expected a size such as \
                     \"512M\", \"1G\" or a share of the guest's memory such as \"50%\""
                ),
                Some("a positive integer with K, M, G or T (binary units), or 1% to 100%"),
            )
        })?;
    }
    let (default, allowed, implemented): (Compression, &[Compression], &[Compression]) = match ty {
        FsType::Squashfs => (
            Compression::Xz,
            &[
                Compression::Xz,
                Compression::Zstd,
                Compression::Gzip,
                Compression::Lz4,
            ],
            &[
                Compression::Xz,
                Compression::Zstd,
                Compression::Gzip,
                Compression::Lz4,
            ],
        ),
        _ => (
            Compression::None,
            &[Compression::None, Compression::Lz4, Compression::Lz4hc],
            &[Compression::None, Compression::Lz4, Compression::Lz4hc],
        ),
    };
    let names = |cs: &[Compression]| cs.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ");
    out.compression = match fs.compression {
        None => default,
        Some(c) => match Compression::parse(&c) {
            Some(k) if implemented.contains(&k) => k,
            Some(k) if allowed.contains(&k) => {
                return Err(ConfigError::invalid(
                    format!(
                        "'filesystem.compression' = \"{c}\" is not implemented for {ty} yet; \
                         fledge's {ty} writer supports: {}",
                        names(implemented)
                    ),
                    Some(
                        "remove the key (uncompressed EROFS), or build type = \"squashfs\" \
                         for a compressed image (xz, zstd, gzip, lz4)",
                    ),
                ))
            }
            _ => {
                return Err(ConfigError::invalid(
                    format!(
                        "invalid 'filesystem.compression' '{c}' for {ty}, must be one of: {}",
                        names(implemented)
                    ),
                    None,
                ))
            }
        },
    };
    if let Some(l) = fs.compression_level {
        // lz4hc has liblz4's LZ4HC levels; the squashfs compressors share 1 to 22.
        let hc = out.compression == Compression::Lz4hc;
        let (levels, what, hint) = if hc {
            (
                LZ4HC_LEVELS,
                " for lz4hc (liblz4's LZ4HC levels)",
                "omit it for the default, 9 (as mkfs.erofs); 12 makes the smallest image",
            )
        } else {
            (COMPRESSION_LEVELS, "", "omit it for the default, 15")
        };
        out.compression_level = u32::try_from(l)
            .ok()
            .filter(|l| levels.contains(l))
            .ok_or_else(|| {
                ConfigError::invalid(
                    format!(
                        "'filesystem.compression_level' must be from {} to {}{what}, got {l}",
                        levels.start(),
                        levels.end()
                    ),
                    Some(hint),
                )
            })?;
    }
    if out.compression == Compression::None && fs.compression_level.is_some() {
        warnings.push(format!(
            "'filesystem.compression_level' has no effect on an uncompressed {ty} image"
        ));
    }
    if out.compression == Compression::Lz4 && fs.compression_level.is_some() {
        warnings.push(
            "'filesystem.compression_level' has no effect with lz4 (it has no levels)".into(),
        );
    }
    if out.compression == Compression::Lz4hc && fs.compression_level.is_none() {
        out.compression_level = LZ4HC_DEFAULT_LEVEL;
    }
    Ok(out)
}

fn validate_agent(a: RawAgent) -> Result<AgentConfig, ConfigError> {
    const STRATEGIES: &str = "release, local, http";
    let strategy = a.source_strategy.ok_or_else(|| {
        ConfigError::invalid(
            format!("'agent.source_strategy' is required, must be one of: {STRATEGIES}"),
            None,
        )
    })?;
    // Keys that belong to another strategy are almost certainly a mistake.
    let present = [
        ("version", a.version.is_some()),
        ("path", a.path.is_some()),
        ("url", a.url.is_some()),
        ("checksum", a.checksum.is_some()),
    ];
    let allowed: &[&str] = match strategy.as_str() {
        "release" => &["version"],
        "local" => &["path"],
        "http" => &["url", "checksum"],
        other => {
            return Err(ConfigError::invalid(
                format!("invalid agent source_strategy '{other}', must be one of: {STRATEGIES}"),
                None,
            ))
        }
    };
    if let Some((key, _)) = present.iter().find(|(k, set)| *set && !allowed.contains(k)) {
        return Err(ConfigError::invalid(
            format!("'agent.{key}' is not used with source_strategy = \"{strategy}\""),
            Some("remove it, or change agent.source_strategy"),
        ));
    }
    let required = |v: Option<String>, key: &str| {
        v.filter(|s| !s.trim().is_empty()).ok_or_else(|| {
            ConfigError::invalid(
                format!("'agent.{key}' is required for source_strategy = \"{strategy}\""),
                None,
            )
        })
    };
    match strategy.as_str() {
        "release" => Ok(AgentConfig::Release {
            version: required(a.version, "version")?,
        }),
        "local" => Ok(AgentConfig::Local {
            path: PathBuf::from(required(a.path, "path")?),
        }),
        _ => {
            let url = required(a.url, "url")?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    format!("invalid 'agent.url' '{url}': must start with http:// or https://"),
                    None,
                ));
            }
            let checksum = a.checksum.map(|c| parse_checksum(&c)).transpose()?;
            Ok(AgentConfig::Http { url, checksum })
        }
    }
}

/// `sha256:<hex>` or bare hex -> 64 lower-case hex digits.
fn parse_checksum(c: &str) -> Result<String, ConfigError> {
    let hex = c.strip_prefix("sha256:").unwrap_or(c);
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(ConfigError::invalid(
            format!(
                "invalid 'agent.checksum' '{c}': expected 64 hex digits, optionally prefixed with 'sha256:'"
            ),
            None,
        ))
    }
}

fn validate_mapping(host: &str, dest: &str) -> Result<(), ConfigError> {
    let bad = |reason: &str| ConfigError::InvalidMapping {
        host: host.into(),
        dest: dest.into(),
        reason: reason.into(),
    };
    if host.is_empty() {
        return Err(bad("host path is empty"));
    }
    if !dest.starts_with('/') {
        return Err(bad("destination must be an absolute path"));
    }
    if Path::new(dest)
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(bad("destination must not contain '..'"));
    }
    if dest.contains('\0') || host.contains('\0') {
        return Err(bad("paths must not contain NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/cfg/fledge.toml"), Path::new("/cfg"))
    }

    const HEAD: &str = "version = \"1\"\nstrategy = \"oci_rootfs\"\n";

    #[test]
    fn initramfs_strategy_and_init_modes() {
        let head = "version = \"1\"\nstrategy = \"initramfs\"\n[source]\nimage = \"x\"\n";
        let c = parse(head).unwrap();
        assert_eq!(c.strategy, Strategy::Initramfs);
        assert_eq!(c.filesystem.fs_type, FsType::Initramfs);
        assert_eq!(c.filesystem.compression, Compression::Gzip);
        assert_eq!(c.filesystem.extension(), "cpio.gz");
        assert_eq!(c.filesystem.buffer_bytes(1 << 30), 0);
        assert_eq!(c.init, InitConfig::Default);
        let c = parse(&format!(
            "{head}[filesystem]\ncompression = \"zstd\"\ncompression_level = 19\n[init]\nnone = true\n"
        ))
        .unwrap();
        assert_eq!(c.filesystem.extension(), "cpio.zst");
        assert_eq!(c.filesystem.compression_level, 19);
        assert_eq!(c.init, InitConfig::None);
        let c = parse(&format!("{head}[init]\npath = \"/sbin/tini\"\n")).unwrap();
        assert_eq!(c.init, InitConfig::Path("/sbin/tini".into()));
        let c = parse(&format!("{head}[init]\nnone = false\n")).unwrap();
        assert_eq!(c.init, InitConfig::Default);
        // `initramfs` is not a [filesystem] type, and an archive is no qcow2 disk.
        assert_eq!(FsType::parse("initramfs"), None);
        let e = parse(&format!("{head}[filesystem]\nimage_format = \"qcow2\"\n")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("'filesystem.image_format' means nothing"),
            "{e}"
        );
        let e = c
            .filesystem
            .with_image_format(ImageFormat::Qcow2)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--image-format qcow2 means nothing"),
            "{e}"
        );
    }

    #[test]
    fn busybox_url_and_sha256() {
        let head = "version = \"1\"\nstrategy = \"initramfs\"\n[source]\nimage = \"x\"\n";
        let sum = "AB".repeat(32);
        let c = parse(&format!(
            "{head}busybox_url = \"https://example.test/busybox\"\nbusybox_sha256 = \"sha256:{sum}\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.source.busybox,
            Some(BusyboxSource {
                url: "https://example.test/busybox".into(),
                sha256: "ab".repeat(32),
            })
        );
        assert_eq!(parse(head).unwrap().source.busybox, None);
        let err =
            |extra: &str, head: &str| parse(&format!("{head}{extra}")).unwrap_err().to_string();
        let url = "busybox_url = \"http://127.0.0.1:8/bb\"\n";
        let good = format!("busybox_sha256 = \"{}\"\n", "0".repeat(64));
        assert!(parse(&format!("{head}{url}{good}")).is_ok());
        assert!(err(url, head).contains("needs 'source.busybox_sha256'"));
        assert!(err(&good, head).contains("without 'source.busybox_url'"));
        for bad in [
            "ftp://x/bb",
            "/usr/bin/busybox",
            "https://",
            "file:///bin/busybox",
        ] {
            let e = err(&format!("busybox_url = \"{bad}\"\n{good}"), head);
            assert!(
                e.contains("is not an http:// or https:// URL"),
                "{bad}: {e}"
            );
        }
        for bad in ["abc", &"g".repeat(64), &"0".repeat(63), &"0".repeat(65)] {
            let e = err(&format!("{url}busybox_sha256 = \"{bad}\"\n"), head);
            assert!(e.contains("is not a SHA-256"), "{bad}: {e}");
        }
        // A disk image boots its own init: the keys are an error there.
        let disk = format!("{HEAD}[source]\nimage = \"x\"\n");
        assert!(err(&format!("{url}{good}"), &disk).contains("strategy = \"initramfs\" only"));
        // A misspelt key is caught.
        assert!(err("busybox_sha = \"x\"\n", head).contains("unknown key 'busybox_sha'"));
    }

    #[test]
    fn minimal_config_uses_defaults() {
        let c = parse(&format!("{HEAD}[source]\nimage = \"nginx:alpine\"\n")).unwrap();
        assert_eq!(c.source.image, "nginx:alpine");
        assert_eq!(c.filesystem, FilesystemConfig::default());
        assert_eq!(c.filesystem.fs_type, FsType::Ext4);
        assert_eq!(c.filesystem.size_buffer_mb, 100);
        assert!(!c.filesystem.preallocate);
        assert_eq!(c.agent, None);
        assert!(c.mappings.is_empty());
        assert_eq!(c.dir, Path::new("/cfg"));
        assert_eq!(c.strategy, Strategy::OciRootfs);
    }

    #[test]
    fn full_config() {
        let text = format!(
            "{HEAD}[source]\nimage = \"oci:/images/app:v1\"\n\
             [filesystem]\ntype = \"btrfs\"\nsize_buffer_mb = 0\npreallocate = true\n\
             [agent]\nsource_strategy = \"http\"\nurl = \"https://example.test/kestrel\"\n\
             checksum = \"sha256:{}\"\n\
             [mappings]\n\"bin/tool\" = \"/usr/local/bin/tool\"\n\"conf\" = \"/etc/app\"\n",
            "AB".repeat(32)
        );
        let c = parse(&text).unwrap();
        assert_eq!(
            c.filesystem,
            FilesystemConfig {
                fs_type: FsType::Btrfs,
                size_buffer_mb: 0,
                preallocate: true,
                ..FilesystemConfig::default()
            }
        );
        assert_eq!(
            c.agent,
            Some(AgentConfig::Http {
                url: "https://example.test/kestrel".into(),
                checksum: Some("ab".repeat(32)),
            })
        );
        assert_eq!(
            c.mappings,
            vec![
                Mapping {
                    host: "bin/tool".into(),
                    dest: "/usr/local/bin/tool".into()
                },
                Mapping {
                    host: "conf".into(),
                    dest: "/etc/app".into()
                },
            ]
        );
    }

    #[test]
    fn agent_variants() {
        let cases: &[(&str, AgentConfig)] = &[
            (
                "source_strategy = \"release\"\nversion = \"latest\"",
                AgentConfig::Release {
                    version: "latest".into(),
                },
            ),
            (
                "source_strategy = \"local\"\npath = \"bin/kestrel\"",
                AgentConfig::Local {
                    path: "bin/kestrel".into(),
                },
            ),
            (
                "source_strategy = \"http\"\nurl = \"http://h/k\"",
                AgentConfig::Http {
                    url: "http://h/k".into(),
                    checksum: None,
                },
            ),
        ];
        for (body, want) in cases {
            let c = parse(&format!("{HEAD}[source]\nimage = \"x\"\n[agent]\n{body}\n")).unwrap();
            assert_eq!(c.agent.as_ref(), Some(want), "{body}");
        }
    }

    /// (config text after the header, expected message, expected hint)
    #[test]
    fn error_messages() {
        let img = "[source]\nimage = \"x\"\n";
        let cases: Vec<(String, &str, Option<&str>)> = vec![
            (
                "version = \"2\"\nstrategy = \"oci_rootfs\"\n[source]\nimage = \"x\"\n".into(),
                "unsupported config version '2', must be \"1\"",
                Some("set version = \"1\""),
            ),
            (
                "strategy = \"oci_rootfs\"\n[source]\nimage = \"x\"\n".into(),
                "'version' is required",
                Some("set version = \"1\""),
            ),
            (
                "version = \"1\"\n[source]\nimage = \"x\"\n".into(),
                "'strategy' is required",
                Some("set strategy = \"oci_rootfs\""),
            ),
            (
                "version = \"1\"\nstrategy = \"initramfs\"\n".into(),
                "'source.image' is required for initramfs strategy",
                Some("add [source] image = \"nginx:alpine\" (or any image reference)"),
            ),
            (
                "version = \"1\"\nstrategy = \"docker\"\n".into(),
                "invalid strategy 'docker', must be one of: oci_rootfs, initramfs",
                Some("set strategy = \"oci_rootfs\" (a disk image) or \"initramfs\" (a cpio archive)"),
            ),
            (
                format!("{HEAD}{img}[init]\nnone = true\n"),
                "'[init]' applies to strategy = \"initramfs\" only (a disk image boots the image's own /sbin/init through the kernel's root=)",
                Some("remove [init], or set strategy = \"initramfs\""),
            ),
            (
                "version = \"1\"\nstrategy = \"initramfs\"\n[source]\nimage = \"x\"\n[init]\npath = \"/sbin/init\"\nnone = true\n".into(),
                "'init.path' and 'init.none = true' contradict each other: the first names an init to run, the second says the entrypoint is PID 1",
                Some("keep one of them"),
            ),
            (
                "version = \"1\"\nstrategy = \"initramfs\"\n[source]\nimage = \"x\"\n[init]\npath = \"sbin/init\"\n".into(),
                "invalid 'init.path' 'sbin/init': must be an absolute path in the image, without '..'",
                Some("for example path = \"/sbin/init\""),
            ),
            (
                "version = \"1\"\nstrategy = \"initramfs\"\n[source]\nimage = \"x\"\n[init]\npath = \"/init\"\n".into(),
                "'init.path' = \"/init\" names the link itself; name the file it is to run",
                Some("to run the image's own /init as it is, use none = true"),
            ),
            (
                "version = \"1\"\nstrategy = \"initramfs\"\n[source]\nimage = \"x\"\n[filesystem]\ntype = \"ext4\"\n".into(),
                "'filesystem.type' means nothing for strategy = \"initramfs\" (a cpio archive unpacked into RAM, not a filesystem image)",
                Some("remove it; only compression (gzip or zstd) and compression_level apply"),
            ),
            (
                "version = \"1\"\nstrategy = \"initramfs\"\n[source]\nimage = \"x\"\n[filesystem]\noverlay_size = \"1G\"\n".into(),
                "'filesystem.overlay_size' means nothing for strategy = \"initramfs\" (a cpio archive unpacked into RAM, not a filesystem image)",
                Some("remove it; only compression (gzip or zstd) and compression_level apply"),
            ),
            (
                "version = \"1\"\nstrategy = \"initramfs\"\n[source]\nimage = \"x\"\n[filesystem]\ncompression = \"xz\"\n".into(),
                "invalid 'filesystem.compression' 'xz' for an initramfs, must be one of: gzip, zstd",
                Some("gzip (the default) or zstd; the kernel unpacks both"),
            ),
            (
                HEAD.into(),
                "'source.image' is required for oci_rootfs strategy",
                Some("add [source] image = \"nginx:alpine\" (or any image reference)"),
            ),
            (
                format!("{HEAD}[source]\nimage = \" \"\n"),
                "'source.image' is required for oci_rootfs strategy",
                Some("add [source] image = \"nginx:alpine\" (or any image reference)"),
            ),
            (
                format!("{HEAD}{img}[filesystem]\ntype = \"zfs\"\n"),
                "invalid filesystem type 'zfs', must be one of: ext4, xfs, btrfs, squashfs, erofs",
                Some("set [filesystem] type to \"ext4\" (the default), \"xfs\", \"btrfs\", \"squashfs\" or \"erofs\""),
            ),
            (
                format!("{HEAD}{img}[filesystem]\nsize_buffer_mb = -5\n"),
                "'filesystem.size_buffer_mb' must be >= 0, got -5",
                Some("use 0 for an automatic buffer sized by the image content"),
            ),
            (
                format!("{HEAD}{img}[filesystem]\npreallocat = true\n"),
                "unknown key 'preallocat' in [filesystem] (did you mean 'preallocate'?)",
                Some("remove or rename the key; README 'Configuration' lists every key"),
            ),
            (
                format!("{HEAD}{img}[filesystem]\nencryption = true\n"),
                "unknown key 'encryption' in [filesystem]",
                Some("remove or rename the key; README 'Configuration' lists every key"),
            ),
            (
                format!("{HEAD}{img}strateg = 1\n"),
                "unknown key 'strateg' in [source]",
                Some("remove or rename the key; README 'Configuration' lists every key"),
            ),
            (
                format!("{HEAD}imag = \"x\"\n"),
                "unknown key 'imag' in the top-level table",
                Some("remove or rename the key; README 'Configuration' lists every key"),
            ),
            (
                format!("versio = \"1\"\n{HEAD}"),
                "unknown key 'versio' in the top-level table (did you mean 'version'?)",
                Some("remove or rename the key; README 'Configuration' lists every key"),
            ),
            (
                format!("{HEAD}[sources]\nimage = \"x\"\n"),
                "unknown key 'sources' in the top-level table (did you mean 'source'?)",
                Some("remove or rename the key; README 'Configuration' lists every key"),
            ),
            (
                format!("{HEAD}{img}[agent]\nsource_strategy = \"release\"\nurll = \"u\"\n"),
                "unknown key 'urll' in [agent] (did you mean 'url'?)",
                Some("remove or rename the key; README 'Configuration' lists every key"),
            ),
            (
                format!("{HEAD}{img}[agent]\nversion = \"latest\"\n"),
                "'agent.source_strategy' is required, must be one of: release, local, http",
                Some("README 'Configuration' lists every key and its values"),
            ),
            (
                format!("{HEAD}{img}[agent]\nsource_strategy = \"ftp\"\n"),
                "invalid agent source_strategy 'ftp', must be one of: release, local, http",
                Some("README 'Configuration' lists every key and its values"),
            ),
            (
                format!("{HEAD}{img}[agent]\nsource_strategy = \"release\"\n"),
                "'agent.version' is required for source_strategy = \"release\"",
                Some("README 'Configuration' lists every key and its values"),
            ),
            (
                format!("{HEAD}{img}[agent]\nsource_strategy = \"local\"\n"),
                "'agent.path' is required for source_strategy = \"local\"",
                Some("README 'Configuration' lists every key and its values"),
            ),
            (
                format!("{HEAD}{img}[agent]\nsource_strategy = \"http\"\n"),
                "'agent.url' is required for source_strategy = \"http\"",
                Some("README 'Configuration' lists every key and its values"),
            ),
            (
                format!(
                    "{HEAD}{img}[agent]\nsource_strategy = \"local\"\npath = \"k\"\nurl = \"http://x\"\n"
                ),
                "'agent.url' is not used with source_strategy = \"local\"",
                Some("remove it, or change agent.source_strategy"),
            ),
            (
                format!("{HEAD}{img}[agent]\nsource_strategy = \"http\"\nurl = \"ftp://x/k\"\n"),
                "invalid 'agent.url' 'ftp://x/k': must start with http:// or https://",
                Some("README 'Configuration' lists every key and its values"),
            ),
            (
                format!(
                    "{HEAD}{img}[agent]\nsource_strategy = \"http\"\nurl = \"http://x/k\"\nchecksum = \"sha256:abc\"\n"
                ),
                "invalid 'agent.checksum' 'sha256:abc': expected 64 hex digits, optionally prefixed with 'sha256:'",
                Some("README 'Configuration' lists every key and its values"),
            ),
            (
                format!(
                    "{HEAD}{img}[agent]\nsource_strategy = \"http\"\nurl = \"http://x/k\"\nchecksum = \"{}\"\n",
                    "g".repeat(64)
                ),
                "invalid 'agent.checksum' 'gggggggggggggggggggggggggggggggggggggggggggggggggggggggggggggggg': expected 64 hex digits, optionally prefixed with 'sha256:'",
                Some("README 'Configuration' lists every key and its values"),
            ),
            (
                format!("{HEAD}{img}[mappings]\n\"a\" = \"etc/a\"\n"),
                "invalid mapping 'a' = 'etc/a': destination must be an absolute path",
                Some("mappings are \"host/path\" = \"/absolute/destination\""),
            ),
            (
                format!("{HEAD}{img}[mappings]\n\"a\" = \"/etc/../root/a\"\n"),
                "invalid mapping 'a' = '/etc/../root/a': destination must not contain '..'",
                Some("mappings are \"host/path\" = \"/absolute/destination\""),
            ),
            (
                format!("{HEAD}{img}[mappings]\n\"\" = \"/a\"\n"),
                "invalid mapping '' = '/a': host path is empty",
                Some("mappings are \"host/path\" = \"/absolute/destination\""),
            ),
        ];
        for (text, msg, hint) in cases {
            let err = parse(&text).expect_err(&text);
            assert_eq!(err.to_string(), msg, "config:\n{text}");
            assert_eq!(err.hint(), hint, "config:\n{text}");
        }
    }

    #[test]
    fn dotted_names_are_fine_in_mapping_destinations() {
        let c = parse(&format!(
            "{HEAD}[source]\nimage = \"x\"\n[mappings]\n\"a\" = \"/etc/..d/a\"\n"
        ))
        .unwrap();
        assert_eq!(c.mappings[0].dest, "/etc/..d/a");
    }

    #[test]
    fn syntax_and_type_errors_have_line_and_column() {
        let cases = [
            // (text, line, column, part of the message)
            (format!("{HEAD}[source\nimage = \"x\"\n"), 3, 8, ""),
            (format!("{HEAD}[source]\nimage = \"x\n"), 4, 11, ""),
            (format!("{HEAD}[source]\nimage = 5\n"), 4, 9, "string"),
            (
                format!("{HEAD}[source]\nimage = \"x\"\n[filesystem]\npreallocate = \"yes\"\n"),
                6,
                15,
                "bool",
            ),
            ("version = 1\n".to_string(), 1, 11, "string"),
        ];
        for (text, line, column, part) in cases {
            match parse(&text) {
                Err(ConfigError::Syntax {
                    path,
                    line: l,
                    column: c,
                    message,
                }) => {
                    assert_eq!(path, Path::new("/cfg/fledge.toml"));
                    assert_eq!((l, c), (line, column), "{text}: {message}");
                    assert!(message.contains(part), "{message} lacks {part}");
                    assert!(!message.contains('\n'), "multi-line message: {message}");
                }
                other => panic!("expected a syntax error for {text}, got {other:?}"),
            }
        }
        let err = parse("version = \"1\n").unwrap_err();
        assert!(err.to_string().starts_with("/cfg/fledge.toml:1:"), "{err}");
    }

    #[test]
    fn load_reports_missing_file_with_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fledge.toml");
        let err = Config::load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("config file {} not found", path.display())
        );
        assert_eq!(
            err.hint(),
            Some("create one (see README 'Configuration') or pass -c")
        );
        std::fs::write(&path, format!("{HEAD}[source]\nimage = \"busybox\"\n")).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.dir, dir.path());
        assert_eq!(c.path, path);
        let c = Config::parse(
            &std::fs::read_to_string(&path).unwrap(),
            Path::new("fledge.toml"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.source.image, "busybox");
    }

    #[test]
    fn buffer_bytes_explicit_and_auto_tiers() {
        let fs = |mb| FilesystemConfig {
            size_buffer_mb: mb,
            ..FilesystemConfig::default()
        };
        let cases = [
            (100, 5 * MIB, 100 * MIB),
            (1, 10_000 * MIB, MIB),
            (0, 0, 32 * MIB),
            (0, 128 * MIB, 32 * MIB),
            (0, 128 * MIB + 1, 64 * MIB),
            (0, 512 * MIB, 64 * MIB),
            (0, 512 * MIB + 1, 128 * MIB),
            (0, 2048 * MIB, 128 * MIB),
            (0, 2048 * MIB + 1, 256 * MIB),
            (0, u64::MAX, 256 * MIB),
            (u64::MAX, 0, u64::MAX),
        ];
        for (mb, content, want) in cases {
            assert_eq!(fs(mb).buffer_bytes(content), want, "{mb} MiB, {content}");
        }
    }

    fn fs_section(body: &str) -> Result<Config, ConfigError> {
        parse(&format!(
            "{HEAD}[source]\nimage = \"debian\"\n[filesystem]\n{body}"
        ))
    }

    #[test]
    fn read_only_types_and_their_defaults() {
        let c = fs_section("type = \"squashfs\"\n").unwrap();
        let f = &c.filesystem;
        assert_eq!(f.fs_type, FsType::Squashfs);
        assert_eq!(f.compression, Compression::Xz);
        assert_eq!(f.compression_level, 15);
        assert_eq!(f.overlay_size, OverlaySize::default());
        assert_eq!(f.overlay_size.size, OverlayAmount::Bytes(1 << 30));
        assert_eq!(f.buffer_bytes(1 << 30), 0);
        assert!(c.warnings.is_empty());
        let c = fs_section("type = \"erofs\"\n").unwrap();
        assert_eq!(c.filesystem.compression, Compression::None);
        assert!(FsType::Erofs.is_read_only() && !FsType::Ext4.is_read_only());
        assert_eq!(FsType::Squashfs.extension(), "squashfs");
        assert_eq!(FsType::Erofs.extension(), "erofs");
        assert_eq!(FsType::Btrfs.extension(), "img");
        // ext4 stays the default.
        assert_eq!(fs_section("").unwrap().filesystem.fs_type, FsType::Ext4);

        let c = fs_section(
            "type = \"squashfs\"\ncompression = \"zstd\"\ncompression_level = 22\n\
             overlay_size = \"50%\"\n",
        )
        .unwrap();
        assert_eq!(c.filesystem.compression, Compression::Zstd);
        assert_eq!(c.filesystem.compression_level, 22);
        assert_eq!(c.filesystem.overlay_size.size, OverlayAmount::Percent(50));
        for (c, want) in [
            ("xz", Compression::Xz),
            ("gzip", Compression::Gzip),
            ("lz4", Compression::Lz4),
        ] {
            let body = format!("type = \"squashfs\"\ncompression = \"{c}\"\n");
            assert_eq!(fs_section(&body).unwrap().filesystem.compression, want);
        }
        let c = fs_section("type = \"erofs\"\ncompression = \"none\"\n").unwrap();
        assert_eq!(c.filesystem.compression, Compression::None);
    }

    #[test]
    fn overlay_sizes() {
        let b = |t: &str| OverlaySize::parse(t).map(|o| o.size);
        assert_eq!(b("512M"), Some(OverlayAmount::Bytes(512 << 20)));
        assert_eq!(b("1G"), Some(OverlayAmount::Bytes(1 << 30)));
        assert_eq!(b("2g"), Some(OverlayAmount::Bytes(2 << 30)));
        assert_eq!(b("64k"), Some(OverlayAmount::Bytes(64 << 10)));
        assert_eq!(b("1T"), Some(OverlayAmount::Bytes(1 << 40)));
        assert_eq!(b("4096"), Some(OverlayAmount::Bytes(4096)));
        assert_eq!(b("100%"), Some(OverlayAmount::Percent(100)));
        assert_eq!(b("1%"), Some(OverlayAmount::Percent(1)));
        for bad in [
            "",
            "0",
            "0M",
            "101%",
            "0%",
            "-1G",
            "1.5G",
            "G",
            "1GB",
            "1 G",
            "1P",
            "%",
            "99999999999T",
            "010M",
            "01G",
            "050%",
        ] {
            assert_eq!(b(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn read_only_validation_errors() {
        let err = |body: &str| {
            let e = fs_section(body).unwrap_err();
            (e.to_string(), e.hint().map(str::to_owned))
        };
        // Keys of the read-only types on a writable one.
        for ty in ["ext4", "xfs", "btrfs"] {
            for (key, value) in [
                ("compression", "\"xz\""),
                ("compression_level", "3"),
                ("overlay_size", "\"1G\""),
            ] {
                let (msg, hint) = err(&format!("type = \"{ty}\"\n{key} = {value}\n"));
                assert_eq!(
                    msg,
                    format!(
                        "'filesystem.{key}' applies to the read-only types (squashfs, erofs), \
                         not to type = \"{ty}\""
                    )
                );
                assert!(hint.unwrap().contains("squashfs"));
            }
        }
        // Without a type it is ext4.
        assert!(err("compression = \"xz\"\n")
            .0
            .contains("not to type = \"ext4\""));
        for level in ["0", "23", "-1"] {
            let (msg, hint) = err(&format!(
                "type = \"squashfs\"\ncompression_level = {level}\n"
            ));
            assert_eq!(
                msg,
                format!("'filesystem.compression_level' must be from 1 to 22, got {level}")
            );
            assert_eq!(hint.as_deref(), Some("omit it for the default, 15"));
        }
        assert!(err("type = \"erofs\"\ncompression_level = 99\n")
            .0
            .contains("1 to 22"));
        let (msg, _) = err("type = \"squashfs\"\noverlay_size = \"lots\"\n");
        assert!(
            msg.starts_with("invalid 'filesystem.overlay_size' 'lots'"),
            "{msg}"
        );
        // erofs: none, lz4, lz4hc; lz4hc has liblz4's levels 1 to 12, default 9.
        for (c, want, level) in [
            ("none", Compression::None, 15),
            ("lz4", Compression::Lz4, 15),
            ("lz4hc", Compression::Lz4hc, 9),
        ] {
            let f = fs_section(&format!("type = \"erofs\"\ncompression = \"{c}\"\n")).unwrap();
            assert_eq!(
                (f.filesystem.compression, f.filesystem.compression_level),
                (want, level)
            );
        }
        let f = fs_section("type = \"erofs\"\ncompression = \"lz4hc\"\ncompression_level = 12\n")
            .unwrap();
        assert_eq!(f.filesystem.compression_level, 12);
        for level in ["0", "13", "22", "-1"] {
            let (msg, hint) = err(&format!(
                "type = \"erofs\"\ncompression = \"lz4hc\"\ncompression_level = {level}\n"
            ));
            assert_eq!(
                msg,
                format!(
                    "'filesystem.compression_level' must be from 1 to 12 for lz4hc (liblz4's \
                     LZ4HC levels), got {level}"
                )
            );
            assert!(hint.unwrap().contains("default, 9"));
        }
        for c in ["xz", "zstd", "brotli"] {
            let (msg, _) = err(&format!("type = \"erofs\"\ncompression = \"{c}\"\n"));
            assert_eq!(
                msg,
                format!(
                    "invalid 'filesystem.compression' '{c}' for erofs, must be one of: none, \
                     lz4, lz4hc"
                )
            );
        }
        // squashfs has no lz4hc.
        assert!(err("type = \"squashfs\"\ncompression = \"lz4hc\"\n")
            .0
            .contains("for squashfs, must be one of: xz, zstd, gzip, lz4"));
        for c in ["none", "lzo", "XZ"] {
            let (msg, _) = err(&format!("type = \"squashfs\"\ncompression = \"{c}\"\n"));
            assert_eq!(
                msg,
                format!(
                    "invalid 'filesystem.compression' '{c}' for squashfs, must be one of: xz, \
                     zstd, gzip, lz4"
                )
            );
        }
        let (msg, hint) = err("type = \"zfs\"\n");
        assert_eq!(
            msg,
            "invalid filesystem type 'zfs', must be one of: ext4, xfs, btrfs, squashfs, erofs"
        );
        assert!(hint.unwrap().contains("\"erofs\""));
        // Unknown keys are still suggested.
        let e = fs_section("type = \"squashfs\"\ncompresion = \"xz\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown key 'compresion' in [filesystem] (did you mean 'compression'?)"
        );
        let e = fs_section("type = \"squashfs\"\noverlay_sise = \"1G\"\n").unwrap_err();
        assert!(e.to_string().contains("did you mean 'overlay_size'"), "{e}");
    }

    #[test]
    fn meaningless_keys_on_read_only_types_warn() {
        let c = fs_section(
            "type = \"erofs\"\nsize_buffer_mb = 200\npreallocate = true\ncompression_level = 3\n",
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
        assert!(c.warnings[0].starts_with("'filesystem.size_buffer_mb' has no effect"));
        assert!(c.warnings[1].starts_with("'filesystem.preallocate' has no effect"));
        assert!(c.warnings[2].contains("uncompressed erofs"));
        assert_eq!(c.filesystem.size_buffer_mb, 0);
        assert!(!c.filesystem.preallocate);
        assert_eq!(c.filesystem.buffer_bytes(10 << 30), 0);
        let c = fs_section("type = \"squashfs\"\ncompression = \"lz4\"\ncompression_level = 3\n")
            .unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        // Writable types: no warnings.
        let c = fs_section("type = \"xfs\"\nsize_buffer_mb = 200\npreallocate = true\n").unwrap();
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn image_format() {
        for ty in FsType::ALL {
            let f = fs_section(&format!("type = \"{ty}\"\n"))
                .unwrap()
                .filesystem;
            assert_eq!(f.image_format, ImageFormat::Raw, "{ty}");
            let f = fs_section(&format!("type = \"{ty}\"\nimage_format = \"qcow2\"\n"))
                .unwrap()
                .filesystem;
            assert_eq!(f.image_format, ImageFormat::Qcow2, "{ty}");
            assert_eq!(f.fs_type, ty);
        }
        let f = fs_section("image_format = \"raw\"\npreallocate = true\n")
            .unwrap()
            .filesystem;
        assert!(f.preallocate);
        let e = fs_section("image_format = \"vmdk\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid 'filesystem.image_format' 'vmdk': must be one of: raw, qcow2"
        );
        // A qcow2 image keeps no free space to preallocate.
        for ty in ["ext4", "squashfs"] {
            let e = fs_section(&format!(
                "type = \"{ty}\"\nimage_format = \"qcow2\"\npreallocate = true\n"
            ))
            .unwrap_err();
            assert!(e.to_string().contains("cannot combine"), "{e}");
            assert!(e.hint().unwrap().contains("remove preallocate"));
        }
        // preallocate = false is what qcow2 does anyway.
        assert!(fs_section("image_format = \"qcow2\"\npreallocate = false\n").is_ok());
        assert_eq!(ImageFormat::Qcow2.to_string(), "qcow2");
        // --image-format over the config: the same rule.
        let f = fs_section("preallocate = true\n").unwrap().filesystem;
        assert!(
            f.clone()
                .with_image_format(ImageFormat::Raw)
                .unwrap()
                .preallocate
        );
        let e = f.with_image_format(ImageFormat::Qcow2).unwrap_err();
        assert!(e.to_string().contains("cannot combine"), "{e}");
        let f = fs_section("type = \"xfs\"\n").unwrap().filesystem;
        assert_eq!(
            f.with_image_format(ImageFormat::Qcow2)
                .unwrap()
                .image_format,
            ImageFormat::Qcow2
        );
    }
}
