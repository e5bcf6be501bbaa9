//! The Volant plugin manifest written next to the image (`<name>.manifest.json`).
//!
//! It is built from the image's runtime configuration (entrypoint, cmd, env, working dir,
//! exposed ports), the image reference, the produced image file and, optionally, a
//! `manifest.toml` whose keys mirror the manifest schema (`plugin-manifest-v1.json`) and
//! override what is derived.
//!
//! Derivation rules when `manifest.toml` does not say otherwise:
//! - `name` and `runtime`: the reference's [`ImageRef::base_name`] (`nginx:alpine` -> `nginx`,
//!   `docker-archive:app.tar:myapp:1.2` -> `myapp`);
//! - `version`: [`ImageRef::version`]: the reference's tag with a leading `v` dropped when the
//!   tag starts with a digit (`1.25-alpine`, `v2.0.1` -> `2.0.1`), else `0.1.0` (`latest`,
//!   `alpine`, no tag, digest only);
//! - `workload.entrypoint`: Entrypoint followed by Cmd (must be non-empty);
//! - `workload.env`: the image's `K=V` entries (entries without `=` are skipped), with
//!   `manifest.toml`'s `workload.env` merged over them;
//! - `workload.base_url`: `http://127.0.0.1:<port>` with the lowest exposed TCP port, or 80;
//! - `resources`: 1 CPU, 1024 MiB; `health_check`: `/`, 10000 ms;
//! - `rootfs`: the absolute image path, `sha256:<hex>` of the file, and the filesystem type as
//!   `format` (as the seed does, although the schema lists only `raw|qcow2` there); a qcow2
//!   image (`image_format = "qcow2"`) says `qcow2`, as the schema wants (the guest finds
//!   the filesystem by its superblock; `fledge build --json` reports both);
//! - `initramfs` instead of `rootfs` for `strategy = "initramfs"`: the archive's absolute path
//!   and `sha256:<hex>` (the schema's `initramfs {url, checksum}`, exactly one of the two).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{FsType, ImageFormat};
use crate::source::reference::ImageRef;
pub use crate::source::reference::DEFAULT_VERSION;
use crate::tomlfile::{self, Keys, TomlProblem};

/// The schema's `$id`, written as `$schema`.
pub const SCHEMA_ID: &str =
    "https://raw.githubusercontent.com/volantvm/volant/main/docs/schemas/plugin-manifest-v1.json";
pub const SCHEMA_VERSION: &str = "1.0";
pub const DEFAULT_CPU_CORES: u32 = 1;
pub const DEFAULT_MEMORY_MB: u64 = 1024;
pub const DEFAULT_PORT: u16 = 80;
pub const DEFAULT_HEALTH_ENDPOINT: &str = "/";
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 10_000;

/// An error building or writing the manifest.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key or wrong type in `manifest.toml`.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: unknown key '{key}' in {table}{}", path.display(), suggestion.as_ref().map(|s| format!(" (did you mean '{s}'?)")).unwrap_or_default())]
    UnknownKey {
        path: PathBuf,
        key: String,
        table: String,
        suggestion: Option<String>,
    },
    #[error("{}: invalid '{field}': {reason}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("image has no Entrypoint or Cmd; set workload.entrypoint in manifest.toml")]
    NoEntrypoint,
    #[error("image checksum '{0}' is not a sha256 hex digest")]
    BadChecksum(String),
    #[error("image path {} is not valid UTF-8 or cannot be made absolute", .0.display())]
    ImagePath(PathBuf),
    #[error("cannot write manifest {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

// ---- manifest.toml -----------------------------------------------------------------------

static CLOUD_INIT_DOC: Keys = Keys::Table(&[
    ("inline", Keys::Any),
    ("content", Keys::Any),
    ("path", Keys::Any),
]);
static ACTION: Keys = Keys::Table(&[
    ("description", Keys::Any),
    ("method", Keys::Any),
    ("path", Keys::Any),
    ("timeout_ms", Keys::Any),
]);
static DISK: Keys = Keys::Table(&[
    ("name", Keys::Any),
    ("source", Keys::Any),
    ("checksum", Keys::Any),
    ("format", Keys::Any),
    ("readonly", Keys::Any),
    ("target", Keys::Any),
]);

/// Every key manifest.toml may hold (checked before deserializing, for "did you mean").
static KEYS: Keys = Keys::Table(&[
    ("name", Keys::Any),
    ("version", Keys::Any),
    ("runtime", Keys::Any),
    ("enabled", Keys::Any),
    ("openapi", Keys::Any),
    ("labels", Keys::Any),
    (
        "resources",
        Keys::Table(&[("cpu_cores", Keys::Any), ("memory_mb", Keys::Any)]),
    ),
    (
        "workload",
        Keys::Table(&[
            ("type", Keys::Any),
            ("base_url", Keys::Any),
            ("entrypoint", Keys::Any),
            ("env", Keys::Any),
            ("workdir", Keys::Any),
        ]),
    ),
    (
        "health_check",
        Keys::Table(&[("endpoint", Keys::Any), ("timeout_ms", Keys::Any)]),
    ),
    ("actions", Keys::MapOf(&ACTION)),
    (
        "network",
        Keys::Table(&[
            ("mode", Keys::Any),
            ("subnet", Keys::Any),
            ("gateway", Keys::Any),
            ("auto_assign", Keys::Any),
        ]),
    ),
    (
        "devices",
        Keys::Table(&[("pci_passthrough", Keys::Any), ("allowlist", Keys::Any)]),
    ),
    (
        "cloud_init",
        Keys::Table(&[
            ("datasource", Keys::Any),
            ("seed_mode", Keys::Any),
            ("user_data", Keys::Shape(&CLOUD_INIT_DOC)),
            ("meta_data", Keys::Shape(&CLOUD_INIT_DOC)),
            ("network_config", Keys::Shape(&CLOUD_INIT_DOC)),
        ]),
    ),
    ("disks", Keys::ArrayOf(&DISK)),
]);

/// `manifest.toml`: every key optional; present keys override the derived values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestOverrides {
    pub name: Option<String>,
    pub version: Option<String>,
    pub runtime: Option<String>,
    pub enabled: Option<bool>,
    pub openapi: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub resources: Option<ResourcesOverrides>,
    pub workload: Option<WorkloadOverrides>,
    pub health_check: Option<HealthCheckOverrides>,
    pub actions: Option<BTreeMap<String, Action>>,
    pub network: Option<Network>,
    pub devices: Option<Devices>,
    pub cloud_init: Option<CloudInit>,
    pub disks: Option<Vec<Disk>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesOverrides {
    pub cpu_cores: Option<u32>,
    pub memory_mb: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadOverrides {
    #[serde(rename = "type")]
    pub workload_type: Option<String>,
    pub base_url: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub workdir: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckOverrides {
    pub endpoint: Option<String>,
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub method: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Devices {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_passthrough: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowlist: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datasource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<CloudInitDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<CloudInitDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_config: Option<CloudInitDoc>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitDoc {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inline: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub name: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl ManifestOverrides {
    /// Read and validate `manifest.toml`.
    pub fn load(path: &Path) -> Result<ManifestOverrides, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ManifestOverrides::parse(&text, path)
    }

    /// Parse and validate `manifest.toml` text; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<ManifestOverrides, ManifestError> {
        let o: ManifestOverrides = tomlfile::parse(text, &KEYS).map_err(|p| match p {
            TomlProblem::Syntax {
                line,
                column,
                message,
            } => ManifestError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message,
            },
            TomlProblem::UnknownKey {
                key,
                table,
                suggestion,
            } => ManifestError::UnknownKey {
                path: path.to_path_buf(),
                key,
                table,
                suggestion,
            },
        })?;
        o.validate(path)?;
        Ok(o)
    }

    fn validate(&self, path: &Path) -> Result<(), ManifestError> {
        let bad = |field: &str, reason: &str| ManifestError::Invalid {
            path: path.to_path_buf(),
            field: field.into(),
            reason: reason.into(),
        };
        for (field, v) in [
            ("name", &self.name),
            ("version", &self.version),
            ("runtime", &self.runtime),
        ] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return Err(bad(field, "must not be empty"));
            }
        }
        if let Some(r) = &self.resources {
            if r.cpu_cores == Some(0) {
                return Err(bad("resources.cpu_cores", "must be at least 1"));
            }
            if r.memory_mb == Some(0) {
                return Err(bad("resources.memory_mb", "must be at least 1"));
            }
        }
        if let Some(w) = &self.workload {
            if w.workload_type.as_deref().is_some_and(|t| t != "http") {
                return Err(bad("workload.type", "must be \"http\""));
            }
            if w.entrypoint.as_ref().is_some_and(|e| e.is_empty()) {
                return Err(bad("workload.entrypoint", "must not be empty"));
            }
        }
        if let Some(n) = &self.network {
            if n.mode
                .as_deref()
                .is_some_and(|m| !["vsock", "bridged", "dhcp"].contains(&m))
            {
                return Err(bad("network.mode", "must be one of: vsock, bridged, dhcp"));
            }
        }
        if let Some(c) = &self.cloud_init {
            if c.seed_mode.as_deref().is_some_and(|m| m != "vfat") {
                return Err(bad("cloud_init.seed_mode", "must be \"vfat\""));
            }
        }
        for d in self.disks.iter().flatten() {
            if d.format
                .as_deref()
                .is_some_and(|f| !["raw", "qcow2"].contains(&f))
            {
                return Err(bad(
                    &format!("disks.{}.format", d.name),
                    "must be one of: raw, qcow2",
                ));
            }
        }
        Ok(())
    }
}

// ---- inputs ------------------------------------------------------------------------------

/// The parts of an image's runtime configuration the manifest uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageRuntimeConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `K=V` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// `80/tcp`, `53/udp`, `8080` (tcp).
    pub exposed_ports: Vec<String>,
}

impl ImageRuntimeConfig {
    /// From an OCI image configuration (an image without a `config` section gives all empty).
    pub fn from_oci(cfg: &oci_spec::image::ImageConfiguration) -> ImageRuntimeConfig {
        let Some(c) = cfg.config() else {
            return ImageRuntimeConfig::default();
        };
        ImageRuntimeConfig {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone(),
            exposed_ports: c.exposed_ports().clone().unwrap_or_default(),
        }
    }
}

/// Everything the manifest is built from.
#[derive(Clone, Debug)]
pub struct ManifestInputs<'a> {
    /// The image reference as configured (`source.image`), recorded as written.
    pub image_ref: &'a str,
    /// The same reference, parsed: the only source of the derived name and version.
    pub image: &'a ImageRef,
    /// The image manifest digest (`sha256:...`), when known.
    pub image_digest: Option<&'a str>,
    /// The produced image file.
    pub image_path: &'a Path,
    /// SHA-256 of the image file: 64 hex digits, optionally prefixed with `sha256:`.
    pub image_sha256: &'a str,
    pub fs_type: FsType,
    /// The image file's format: a qcow2 image says `qcow2` in `rootfs.format`.
    pub image_format: ImageFormat,
    pub image_config: &'a ImageRuntimeConfig,
    pub overrides: Option<&'a ManifestOverrides>,
}

// ---- output ------------------------------------------------------------------------------

/// The manifest, serialized in schema order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PluginManifest {
    #[serde(rename = "$schema")]
    pub schema: String,
    pub schema_version: String,
    pub name: String,
    pub version: String,
    pub runtime: String,
    pub enabled: bool,
    pub image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openapi: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    pub resources: Resources,
    pub workload: Workload,
    pub health_check: HealthCheck,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions: Option<BTreeMap<String, Action>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<Rootfs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<Initramfs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Devices>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<Disk>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub cpu_cores: u32,
    pub memory_mb: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    #[serde(rename = "type")]
    pub workload_type: String,
    pub entrypoint: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    pub base_url: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub endpoint: String,
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rootfs {
    pub url: String,
    pub checksum: String,
    pub format: String,
}

/// The boot archive of an initramfs plugin (Volant boots it with `volant.boot=initramfs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Initramfs {
    pub url: String,
    pub checksum: String,
}

impl PluginManifest {
    /// Pretty JSON with a trailing newline.
    pub fn to_json_pretty(&self) -> String {
        // Serializing plain structs of strings, numbers and maps cannot fail.
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Write the pretty JSON to `path` (replacing it atomically).
    pub fn write(&self, path: &Path) -> Result<(), ManifestError> {
        let err = |source| ManifestError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".manifest-")
            .tempfile_in(dir)
            .map_err(err)?;
        std::io::Write::write_all(&mut tmp, self.to_json_pretty().as_bytes()).map_err(err)?;
        tmp.persist(path).map_err(|e| err(e.error))?;
        Ok(())
    }
}

/// `out/nginx.img` -> `out/nginx.manifest.json`.
pub fn manifest_path_for(image_path: &Path) -> PathBuf {
    let mut stem = image_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rootfs".into());
    // `nginx.cpio.gz` -> `nginx.manifest.json`, as `nginx.img` gives.
    if let Some(s) = stem.strip_suffix(".cpio").filter(|s| !s.is_empty()) {
        stem = s.to_string();
    }
    image_path.with_file_name(format!("{stem}.manifest.json"))
}

/// The lowest exposed TCP port (`80/tcp`, bare `8080`), if any.
pub fn first_tcp_port(exposed: &[String]) -> Option<u16> {
    exposed
        .iter()
        .filter_map(|p| {
            let (num, proto) = p.trim().split_once('/').unwrap_or((p.trim(), "tcp"));
            if !proto.eq_ignore_ascii_case("tcp") {
                return None;
            }
            num.parse::<u16>().ok().filter(|n| *n > 0)
        })
        .min()
}

/// Build the manifest.
pub fn build_manifest(inp: &ManifestInputs<'_>) -> Result<PluginManifest, ManifestError> {
    let default = ManifestOverrides::default();
    let o = inp.overrides.unwrap_or(&default);
    let w = o.workload.clone().unwrap_or_default();
    let ic = inp.image_config;

    let base = inp.image.base_name();
    let name = o.name.clone().unwrap_or_else(|| base.clone());
    let runtime = o.runtime.clone().unwrap_or_else(|| base.clone());
    let version = o.version.clone().unwrap_or_else(|| inp.image.version());

    let entrypoint = match w.entrypoint {
        Some(e) => e,
        None => ic.entrypoint.iter().chain(&ic.cmd).cloned().collect(),
    };
    if entrypoint.is_empty() {
        return Err(ManifestError::NoEntrypoint);
    }
    let mut env: BTreeMap<String, String> = ic
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.extend(w.env.unwrap_or_default());
    let workdir = w
        .workdir
        .or_else(|| ic.working_dir.clone())
        .filter(|d| !d.is_empty());
    let base_url = w.base_url.unwrap_or_else(|| {
        format!(
            "http://127.0.0.1:{}",
            first_tcp_port(&ic.exposed_ports).unwrap_or(DEFAULT_PORT)
        )
    });

    let r = o.resources.clone().unwrap_or_default();
    let h = o.health_check.clone().unwrap_or_default();

    let hex = inp
        .image_sha256
        .strip_prefix("sha256:")
        .unwrap_or(inp.image_sha256);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ManifestError::BadChecksum(inp.image_sha256.to_string()));
    }
    let url = std::path::absolute(inp.image_path)
        .ok()
        .and_then(|p| p.to_str().map(str::to_owned))
        .ok_or_else(|| ManifestError::ImagePath(inp.image_path.to_path_buf()))?;

    Ok(PluginManifest {
        schema: SCHEMA_ID.to_string(),
        schema_version: SCHEMA_VERSION.to_string(),
        name,
        version,
        runtime,
        enabled: o.enabled.unwrap_or(true),
        image: inp.image_ref.to_string(),
        image_digest: inp.image_digest.map(str::to_owned),
        openapi: o.openapi.clone(),
        labels: o.labels.clone().filter(|l| !l.is_empty()),
        resources: Resources {
            cpu_cores: r.cpu_cores.unwrap_or(DEFAULT_CPU_CORES),
            memory_mb: r.memory_mb.unwrap_or(DEFAULT_MEMORY_MB),
        },
        workload: Workload {
            workload_type: "http".to_string(),
            entrypoint,
            env,
            workdir,
            base_url,
        },
        health_check: HealthCheck {
            endpoint: h
                .endpoint
                .unwrap_or_else(|| DEFAULT_HEALTH_ENDPOINT.to_string()),
            timeout_ms: h.timeout_ms.unwrap_or(DEFAULT_HEALTH_TIMEOUT_MS),
        },
        actions: o.actions.clone().filter(|a| !a.is_empty()),
        rootfs: (inp.fs_type != FsType::Initramfs).then(|| Rootfs {
            url: url.clone(),
            checksum: format!("sha256:{}", hex.to_ascii_lowercase()),
            format: match inp.image_format {
                ImageFormat::Raw => inp.fs_type.as_str().to_string(),
                ImageFormat::Qcow2 => ImageFormat::Qcow2.as_str().to_string(),
            },
        }),
        initramfs: (inp.fs_type == FsType::Initramfs).then(|| Initramfs {
            url: url.clone(),
            checksum: format!("sha256:{}", hex.to_ascii_lowercase()),
        }),
        network: o.network.clone(),
        devices: o.devices.clone(),
        cloud_init: o.cloud_init.clone(),
        disks: o.disks.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const SUM: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn nginx_config() -> ImageRuntimeConfig {
        ImageRuntimeConfig {
            entrypoint: vec!["/docker-entrypoint.sh".into()],
            cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
            env: vec![
                "PATH=/usr/local/sbin:/usr/bin".into(),
                "NGINX_VERSION=1.25.3".into(),
                "EMPTY=".into(),
                "NOVALUE".into(),
                "=bad".into(),
                "EQ=a=b".into(),
            ],
            working_dir: Some(String::new()),
            exposed_ports: vec!["80/tcp".into()],
        }
    }

    fn inputs<'a>(
        image_ref: &'a str,
        cfg: &'a ImageRuntimeConfig,
        overrides: Option<&'a ManifestOverrides>,
    ) -> ManifestInputs<'a> {
        // Tests only: the parsed reference lives as long as the test process.
        let image = Box::leak(Box::new(ImageRef::parse(image_ref).unwrap()));
        ManifestInputs {
            image_ref,
            image,
            image_digest: None,
            image_path: Path::new("/out/nginx.img"),
            image_sha256: SUM,
            fs_type: FsType::Ext4,
            image_format: ImageFormat::Raw,
            image_config: cfg,
            overrides,
        }
    }

    #[test]
    fn derived_manifest_matches_the_seed_example() {
        let cfg = nginx_config();
        let m = build_manifest(&inputs("nginx:alpine", &cfg, None)).unwrap();
        let v: Value = serde_json::from_str(&m.to_json_pretty()).unwrap();
        assert_eq!(
            v,
            json!({
                "$schema": SCHEMA_ID,
                "schema_version": "1.0",
                "name": "nginx",
                "version": "0.1.0",
                "runtime": "nginx",
                "enabled": true,
                "image": "nginx:alpine",
                "resources": {"cpu_cores": 1, "memory_mb": 1024},
                "workload": {
                    "type": "http",
                    "entrypoint": ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"],
                    "env": {
                        "PATH": "/usr/local/sbin:/usr/bin",
                        "NGINX_VERSION": "1.25.3",
                        "EMPTY": "",
                        "EQ": "a=b"
                    },
                    "base_url": "http://127.0.0.1:80"
                },
                "health_check": {"endpoint": "/", "timeout_ms": 10000},
                "rootfs": {
                    "url": "/out/nginx.img",
                    "checksum": format!("sha256:{SUM}"),
                    "format": "ext4"
                }
            })
        );
        // Key order follows the schema: $schema first.
        assert!(m.to_json_pretty().starts_with("{\n  \"$schema\": "));
    }

    #[test]
    fn overrides_win() {
        let text = r##"
name = "web"
version = "2.0.0"
runtime = "nginx-rt"
enabled = false
openapi = "/openapi.json"
labels = { team = "edge" }

[resources]
cpu_cores = 2
memory_mb = 512

[workload]
entrypoint = ["/bin/server", "--port", "9000"]
base_url = "http://127.0.0.1:9000"
workdir = "/srv"
env = { NGINX_VERSION = "override", EXTRA = "1" }

[health_check]
endpoint = "/healthz"
timeout_ms = 500

[actions.reload]
method = "POST"
path = "/reload"
timeout_ms = 1000

[network]
mode = "vsock"

[devices]
allowlist = ["10de:*"]

[cloud_init]
seed_mode = "vfat"
user_data = { inline = true, content = "#cloud-config" }

[[disks]]
name = "data"
source = "/var/data.img"
format = "raw"
readonly = true
"##;
        let o = ManifestOverrides::parse(text, Path::new("manifest.toml")).unwrap();
        let cfg = nginx_config();
        let mut inp = inputs("nginx:1.25", &cfg, Some(&o));
        inp.image_digest = Some("sha256:feed");
        inp.fs_type = FsType::Xfs;
        let m = build_manifest(&inp).unwrap();
        assert_eq!(
            (m.name.as_str(), m.version.as_str(), m.runtime.as_str()),
            ("web", "2.0.0", "nginx-rt")
        );
        assert!(!m.enabled);
        assert_eq!(m.image_digest.as_deref(), Some("sha256:feed"));
        assert_eq!(
            m.resources,
            Resources {
                cpu_cores: 2,
                memory_mb: 512
            }
        );
        assert_eq!(m.workload.entrypoint, ["/bin/server", "--port", "9000"]);
        assert_eq!(m.workload.base_url, "http://127.0.0.1:9000");
        assert_eq!(m.workload.workdir.as_deref(), Some("/srv"));
        assert_eq!(m.workload.env["NGINX_VERSION"], "override");
        assert_eq!(m.workload.env["EXTRA"], "1");
        assert_eq!(m.workload.env["PATH"], "/usr/local/sbin:/usr/bin");
        assert_eq!(
            m.health_check,
            HealthCheck {
                endpoint: "/healthz".into(),
                timeout_ms: 500
            }
        );
        assert_eq!(m.rootfs.as_ref().unwrap().format, "xfs");
        let v: Value = serde_json::from_str(&m.to_json_pretty()).unwrap();
        assert_eq!(v["labels"], json!({"team": "edge"}));
        assert_eq!(
            v["actions"],
            json!({"reload": {"method": "POST", "path": "/reload", "timeout_ms": 1000}})
        );
        assert_eq!(v["network"], json!({"mode": "vsock"}));
        assert_eq!(
            v["cloud_init"],
            json!({"seed_mode": "vfat", "user_data": {"inline": true, "content": "#cloud-config"}})
        );
        assert_eq!(
            v["disks"],
            json!([{"name": "data", "source": "/var/data.img", "format": "raw", "readonly": true}])
        );
        assert_eq!(v["openapi"], "/openapi.json");
    }

    #[test]
    fn port_and_path_rules() {
        let ports: &[(&[&str], Option<u16>)] = &[
            (&[], None),
            (&["8080/tcp", "443/tcp", "53/udp"], Some(443)),
            (&["53/udp"], None),
            (&["9000"], Some(9000)),
            (&["0/tcp", "x/tcp", "70000/tcp", "8081/TCP"], Some(8081)),
        ];
        for (p, want) in ports {
            let v: Vec<String> = p.iter().map(|s| s.to_string()).collect();
            assert_eq!(first_tcp_port(&v), *want, "{p:?}");
        }
        assert_eq!(
            manifest_path_for(Path::new("out/nginx.img")),
            Path::new("out/nginx.manifest.json")
        );
        assert_eq!(
            manifest_path_for(Path::new("rootfs")),
            Path::new("rootfs.manifest.json")
        );
        assert_eq!(
            manifest_path_for(Path::new("/o/nginx.cpio.gz")),
            Path::new("/o/nginx.manifest.json")
        );
        assert_eq!(
            manifest_path_for(Path::new("nginx.cpio.zst")),
            Path::new("nginx.manifest.json")
        );
    }

    #[test]
    fn image_config_fallbacks() {
        // Cmd only, working dir, lowest tcp port, relative image path made absolute.
        let cfg = ImageRuntimeConfig {
            cmd: vec!["python3".into(), "app.py".into()],
            working_dir: Some("/app".into()),
            exposed_ports: vec!["8000/tcp".into(), "5000".into()],
            ..ImageRuntimeConfig::default()
        };
        let mut inp = inputs("docker.io/library/python:3.12-slim", &cfg, None);
        inp.image_path = Path::new("python.img");
        inp.image_sha256 =
            "sha256:ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789";
        let m = build_manifest(&inp).unwrap();
        assert_eq!(m.name, "python");
        assert_eq!(m.version, "3.12-slim");
        assert_eq!(m.workload.entrypoint, ["python3", "app.py"]);
        assert_eq!(m.workload.workdir.as_deref(), Some("/app"));
        assert_eq!(m.workload.base_url, "http://127.0.0.1:5000");
        assert!(m.workload.env.is_empty());
        assert!(Path::new(&m.rootfs.as_ref().unwrap().url).is_absolute());
        assert!(m.rootfs.as_ref().unwrap().url.ends_with("/python.img"));
        assert_eq!(
            m.rootfs.as_ref().unwrap().checksum,
            "sha256:abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
        );
        let v: Value = serde_json::to_value(&m).unwrap();
        assert!(v["workload"].get("env").is_none(), "empty env is omitted");
    }

    #[test]
    fn errors() {
        let empty = ImageRuntimeConfig::default();
        let err = build_manifest(&inputs("scratch-app", &empty, None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "image has no Entrypoint or Cmd; set workload.entrypoint in manifest.toml"
        );
        // manifest.toml supplies what the image lacks.
        let o =
            ManifestOverrides::parse("[workload]\nentrypoint = [\"/app\"]\n", Path::new("m.toml"))
                .unwrap();
        assert!(build_manifest(&inputs("scratch-app", &empty, Some(&o))).is_ok());

        let cfg = nginx_config();
        let mut inp = inputs("nginx", &cfg, None);
        inp.image_sha256 = "abc";
        assert_eq!(
            build_manifest(&inp).unwrap_err().to_string(),
            "image checksum 'abc' is not a sha256 hex digest"
        );

        let cases = [
            (
                "nme = \"x\"\n",
                "m.toml: unknown key 'nme' in the top-level table (did you mean 'name'?)",
            ),
            (
                "[resources]\ncpus = 2\n",
                "m.toml: unknown key 'cpus' in [resources]",
            ),
            (
                "[workload]\nentrypiont = [\"x\"]\n",
                "m.toml: unknown key 'entrypiont' in [workload] (did you mean 'entrypoint'?)",
            ),
            (
                "[actions.restart]\nmethod = \"POST\"\npaht = \"/r\"\n",
                "m.toml: unknown key 'paht' in [actions.restart] (did you mean 'path'?)",
            ),
            (
                "[[disks]]\nname = \"d\"\nsource = \"s\"\nreadonyl = true\n",
                "m.toml: unknown key 'readonyl' in [[disks]] (did you mean 'readonly'?)",
            ),
            (
                "[cloud_init.user_data]\ninlin = true\n",
                "m.toml: unknown key 'inlin' in [cloud_init.user_data] (did you mean 'inline'?)",
            ),
            (
                "[resources]\ncpu_cores = -1\n",
                "m.toml:2:13: invalid value: integer `-1`",
            ),
            ("name = \"\"\n", "m.toml: invalid 'name': must not be empty"),
            (
                "[resources]\ncpu_cores = 0\n",
                "m.toml: invalid 'resources.cpu_cores': must be at least 1",
            ),
            (
                "[resources]\nmemory_mb = 0\n",
                "m.toml: invalid 'resources.memory_mb': must be at least 1",
            ),
            (
                "[workload]\ntype = \"grpc\"\n",
                "m.toml: invalid 'workload.type': must be \"http\"",
            ),
            (
                "[workload]\nentrypoint = []\n",
                "m.toml: invalid 'workload.entrypoint': must not be empty",
            ),
            (
                "[network]\nmode = \"nat\"\n",
                "m.toml: invalid 'network.mode': must be one of: vsock, bridged, dhcp",
            ),
            (
                "[cloud_init]\nseed_mode = \"iso\"\n",
                "m.toml: invalid 'cloud_init.seed_mode': must be \"vfat\"",
            ),
            (
                "[[disks]]\nname = \"d\"\nsource = \"s\"\nformat = \"vmdk\"\n",
                "m.toml: invalid 'disks.d.format': must be one of: raw, qcow2",
            ),
            (
                "[actions.x]\nmethod = \"GET\"\n",
                "m.toml:1:1: missing field `path`",
            ),
        ];
        for (text, want) in cases {
            let err = ManifestOverrides::parse(text, Path::new("m.toml")).unwrap_err();
            assert!(
                err.to_string().starts_with(want),
                "{text:?}: got {err}, want {want}"
            );
        }
    }

    #[test]
    fn load_and_write_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let err = ManifestOverrides::load(&dir.path().join("manifest.toml")).unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");
        std::fs::write(dir.path().join("manifest.toml"), "name = \"n\"\n").unwrap();
        let o = ManifestOverrides::load(&dir.path().join("manifest.toml")).unwrap();
        assert_eq!(o.name.as_deref(), Some("n"));
        let cfg = nginx_config();
        let m = build_manifest(&inputs("nginx", &cfg, Some(&o))).unwrap();
        let out = dir.path().join("n.manifest.json");
        m.write(&out).unwrap();
        let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(v["name"], "n");
        let err = m.write(&dir.path().join("missing/x.json")).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot write manifest "),
            "{err}"
        );
    }

    // ---- schema validation -----------------------------------------------------------------

    /// A validator for the JSON-schema keywords `plugin-manifest-v1.json` uses. Unknown
    /// keywords make it panic, so it can never skip a constraint silently.
    fn validate(root: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        let Some(s) = schema.as_object() else {
            panic!("schema at {at} is not an object");
        };
        for (k, sv) in s {
            match k.as_str() {
                "$schema" | "$id" | "title" | "description" | "definitions" => {}
                "$ref" => {
                    let name = sv
                        .as_str()
                        .and_then(|r| r.strip_prefix("#/definitions/"))
                        .unwrap_or_else(|| panic!("unsupported $ref {sv}"));
                    validate(root, &root["definitions"][name], v, at, errs);
                }
                "type" => {
                    let t = sv.as_str().unwrap();
                    let ok = match t {
                        "object" => v.is_object(),
                        "array" => v.is_array(),
                        "string" => v.is_string(),
                        "boolean" => v.is_boolean(),
                        "integer" => v.is_i64() || v.is_u64(),
                        "number" => v.is_number(),
                        other => panic!("unsupported type {other}"),
                    };
                    if !ok {
                        errs.push(format!("{at}: not of type {t}"));
                    }
                }
                "required" => {
                    if let Some(o) = v.as_object() {
                        for r in sv.as_array().unwrap() {
                            if !o.contains_key(r.as_str().unwrap()) {
                                errs.push(format!("{at}: missing {r}"));
                            }
                        }
                    }
                }
                "properties" => {
                    if let Some(o) = v.as_object() {
                        for (name, ps) in sv.as_object().unwrap() {
                            if let Some(child) = o.get(name) {
                                validate(root, ps, child, &format!("{at}/{name}"), errs);
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    if let Some(o) = v.as_object() {
                        let props = s.get("properties").and_then(Value::as_object);
                        for (name, child) in o {
                            if props.is_some_and(|p| p.contains_key(name)) {
                                continue;
                            }
                            match sv {
                                Value::Bool(false) => {
                                    errs.push(format!("{at}: additional property {name}"))
                                }
                                Value::Bool(true) => {}
                                sub => validate(root, sub, child, &format!("{at}/{name}"), errs),
                            }
                        }
                    }
                }
                "items" => {
                    if let Some(a) = v.as_array() {
                        for (i, child) in a.iter().enumerate() {
                            validate(root, sv, child, &format!("{at}/{i}"), errs);
                        }
                    }
                }
                "enum" => {
                    if !sv.as_array().unwrap().contains(v) {
                        errs.push(format!("{at}: {v} not in {sv}"));
                    }
                }
                "minLength" => {
                    if v.as_str()
                        .is_some_and(|x| (x.chars().count() as u64) < sv.as_u64().unwrap())
                    {
                        errs.push(format!("{at}: shorter than {sv}"));
                    }
                }
                "minItems" => {
                    if v.as_array()
                        .is_some_and(|x| (x.len() as u64) < sv.as_u64().unwrap())
                    {
                        errs.push(format!("{at}: fewer than {sv} items"));
                    }
                }
                "minimum" => {
                    if v.as_f64().is_some_and(|x| x < sv.as_f64().unwrap()) {
                        errs.push(format!("{at}: below {sv}"));
                    }
                }
                "allOf" => {
                    for sub in sv.as_array().unwrap() {
                        validate(root, sub, v, at, errs);
                    }
                }
                "oneOf" => {
                    let passing = sv
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|sub| {
                            let mut e = Vec::new();
                            validate(root, sub, v, at, &mut e);
                            e.is_empty()
                        })
                        .count();
                    if passing != 1 {
                        errs.push(format!("{at}: {passing} oneOf branches match, want 1"));
                    }
                }
                "not" => {
                    let mut e = Vec::new();
                    validate(root, sv, v, at, &mut e);
                    if e.is_empty() {
                        errs.push(format!("{at}: matches a 'not' schema"));
                    }
                }
                other => panic!("validator does not support keyword {other}"),
            }
        }
    }

    /// The schema lives outside the repository: `../shared/spec/` relative to it (as CI lays
    /// it out), or wherever `FLEDGE_MANIFEST_SCHEMA` points.
    fn load_schema() -> Option<Value> {
        let path = std::env::var_os("FLEDGE_MANIFEST_SCHEMA")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/spec/plugin-manifest-v1.json")
            });
        match std::fs::read(&path) {
            Ok(b) => Some(serde_json::from_slice(&b).expect("schema is valid JSON")),
            Err(_) => {
                eprintln!("SKIP: schema not found at {}", path.display());
                None
            }
        }
    }

    fn errors_for(schema: &Value, manifest: &Value) -> Vec<String> {
        let mut errs = Vec::new();
        validate(schema, schema, manifest, "", &mut errs);
        errs
    }

    #[test]
    fn manifests_validate_against_the_schema() {
        let Some(schema) = load_schema() else { return };
        assert_eq!(schema["$id"], SCHEMA_ID);
        let cfg = nginx_config();
        let full = ManifestOverrides::parse(
            "labels = { a = \"b\" }\nopenapi = \"/o\"\n[actions.x]\nmethod = \"GET\"\npath = \"/x\"\n\
             [network]\nmode = \"bridged\"\nauto_assign = true\n[devices]\npci_passthrough = [\"0000:01:00.0\"]\n\
             [cloud_init]\ndatasource = \"NoCloud\"\nmeta_data = { path = \"m\" }\n\
             [[disks]]\nname = \"d\"\nsource = \"/d.img\"\nformat = \"qcow2\"\ntarget = \"vdb\"\n",
            Path::new("m.toml"),
        )
        .unwrap();
        let mut digest_inputs = inputs("nginx:1.25", &cfg, Some(&full));
        digest_inputs.image_digest = Some("sha256:00");
        for (what, inp) in [
            ("derived", inputs("nginx:alpine", &cfg, None)),
            ("with every override", digest_inputs),
        ] {
            for fs in FsType::ALL {
                let mut inp = inp.clone();
                inp.fs_type = fs;
                let m = build_manifest(&inp).unwrap();
                let mut v: Value = serde_json::from_str(&m.to_json_pretty()).unwrap();
                // The seed writes the filesystem type as rootfs.format, which the schema's
                // enum (raw|qcow2) does not list; the reference notes make this the one
                // allowed deviation. Check it is the fs type, then patch it for the schema.
                assert_eq!(v["rootfs"]["format"], fs.as_str());
                let unpatched = errors_for(&schema, &v);
                assert_eq!(unpatched.len(), 1, "{what}/{fs}: {unpatched:?}");
                assert!(unpatched[0].starts_with("/rootfs/format"), "{unpatched:?}");
                v["rootfs"]["format"] = json!("raw");
                let errs = errors_for(&schema, &v);
                assert!(errs.is_empty(), "{what}/{fs}: {errs:?}");
                // A qcow2 image of any type says so, and conforms as written.
                inp.image_format = ImageFormat::Qcow2;
                let m = build_manifest(&inp).unwrap();
                let v: Value = serde_json::from_str(&m.to_json_pretty()).unwrap();
                assert_eq!(v["rootfs"]["format"], "qcow2");
                let errs = errors_for(&schema, &v);
                assert!(errs.is_empty(), "{what}/{fs} qcow2: {errs:?}");
            }
            // An initramfs: `initramfs {url, checksum}` instead of `rootfs`, valid as it is.
            let mut inp = inp.clone();
            inp.fs_type = FsType::Initramfs;
            let m = build_manifest(&inp).unwrap();
            let v: Value = serde_json::from_str(&m.to_json_pretty()).unwrap();
            assert!(v.get("rootfs").is_none(), "{what}: {v}");
            assert_eq!(
                v["initramfs"]["url"],
                v["initramfs"]["url"].as_str().unwrap()
            );
            assert!(v["initramfs"]["checksum"]
                .as_str()
                .unwrap()
                .starts_with("sha256:"));
            let errs = errors_for(&schema, &v);
            assert!(errs.is_empty(), "{what}/initramfs: {errs:?}");
        }
    }

    #[test]
    fn schema_validator_catches_violations() {
        let Some(schema) = load_schema() else { return };
        let cfg = nginx_config();
        let m = build_manifest(&inputs("nginx", &cfg, None)).unwrap();
        let mut good = serde_json::to_value(&m).unwrap();
        good["rootfs"]["format"] = json!("raw");
        assert!(errors_for(&schema, &good).is_empty());
        type Mutation = (&'static str, Box<dyn Fn(&mut Value)>);
        let mutations: Vec<Mutation> = vec![
            (
                "missing workload",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("workload");
                }),
            ),
            ("extra key", Box::new(|v| v["extra"] = json!(1))),
            (
                "empty entrypoint",
                Box::new(|v| v["workload"]["entrypoint"] = json!([])),
            ),
            (
                "zero cpus",
                Box::new(|v| v["resources"]["cpu_cores"] = json!(0)),
            ),
            ("empty name", Box::new(|v| v["name"] = json!(""))),
            (
                "wrong type",
                Box::new(|v| v["workload"]["type"] = json!("grpc")),
            ),
            (
                "env not string",
                Box::new(|v| v["workload"]["env"]["X"] = json!(1)),
            ),
            (
                "both rootfs and initramfs",
                Box::new(|v| v["initramfs"] = json!({"url": "/i"})),
            ),
            (
                "neither rootfs nor initramfs",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("rootfs");
                }),
            ),
        ];
        for (what, mutate) in mutations {
            let mut v = good.clone();
            mutate(&mut v);
            assert!(!errors_for(&schema, &v).is_empty(), "{what} not caught");
        }
    }
}
