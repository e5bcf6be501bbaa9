//! `fledge doctor`: what this host can do, which backend `fledge build` will choose for each
//! filesystem type, and how to fix what is missing.
//!
//! It runs exactly the probes the backend selection runs ([`crate::output::select::Probed`]),
//! so its verdict and `build`'s choice cannot disagree.
//!
//! Exit status: 0 when every filesystem type has a usable backend, 2 when only some do, 1
//! when none does.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::config::FsType;
use crate::output::select::{self, BackendKind, Probed};
use crate::probe::{Probe, Status};

/// What to check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DoctorRequest {
    /// Cache directory to check; `None`: the layer cache's default.
    pub cache_dir: Option<PathBuf>,
    /// Also try to reach the configured registries (docker config `auths`/`credHelpers`, the
    /// registry of ./fledge.toml's image, and FLEDGE_ONLINE_REGISTRIES). Without it, doctor
    /// uses no network.
    pub online: bool,
}

/// Backends for one filesystem type.
#[derive(Debug, Serialize)]
pub struct FsVerdict {
    pub fs: &'static str,
    pub backends: Vec<BackendVerdict>,
    /// What `fledge build --backend auto` will use, if anything.
    pub chosen: Option<BackendKind>,
}

#[derive(Debug, Serialize)]
pub struct BackendVerdict {
    pub backend: BackendKind,
    pub available: bool,
    /// Why not, when unavailable; what it needs otherwise.
    pub detail: String,
}

/// The whole report (`--json` prints it).
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub fledge_version: &'static str,
    pub checks: Vec<Probe>,
    pub filesystems: Vec<FsVerdict>,
    /// `all`, `some` or `none`: which filesystem types can be built.
    pub verdict: &'static str,
    pub exit_code: u8,
    pub elapsed_ms: u64,
}

/// Run the probes and decide.
pub fn report(req: &DoctorRequest) -> Report {
    let started = Instant::now();
    let mut probed = Probed::run(FsType::Ext4);
    probed.probes.extend(env_probes(req.cache_dir.clone()));
    if req.online {
        probed.probes.extend(registry_probes());
    }
    // Every `[filesystem] type`, and the initramfs (`strategy = "initramfs"`).
    let filesystems: Vec<FsVerdict> = FsType::ALL
        .iter()
        .chain(&[FsType::Initramfs])
        .map(|&fs| {
            let backends: Vec<BackendVerdict> = select::availability(fs, &probed)
                .into_iter()
                .map(|(kind, r)| BackendVerdict {
                    backend: kind,
                    available: r.is_ok(),
                    detail: match r {
                        Ok(()) if kind == BackendKind::Userspace && fs == FsType::Xfs => {
                            "mkfs.xfs -p: only with --backend userspace (no timestamps, xattrs \
                             or hard links)"
                                .into()
                        }
                        Ok(()) => "ready".into(),
                        Err(e) => e,
                    },
                })
                .collect();
            let chosen = select::auto_choice(fs, &probed);
            FsVerdict {
                fs: fs.as_str(),
                backends,
                chosen,
            }
        })
        .collect();
    let buildable = filesystems.iter().filter(|f| f.chosen.is_some()).count();
    let (verdict, exit_code) = match buildable {
        n if n == filesystems.len() => ("all", 0),
        0 => ("none", 1),
        _ => ("some", 2),
    };
    Report {
        schema: "fledge-doctor/1",
        fledge_version: env!("CARGO_PKG_VERSION"),
        checks: probed.probes,
        filesystems,
        verdict,
        exit_code,
        elapsed_ms: started.elapsed().as_millis() as u64,
    }
}

/// Checks of the environment around the build: cache and temp directories, Docker daemon
/// socket, registry auth files.
fn env_probes(cache_dir: Option<PathBuf>) -> Vec<Probe> {
    let cache = cache_dir
        .or_else(|| crate::cache::default_dir().ok())
        .unwrap_or_else(std::env::temp_dir);
    vec![
        dir_probe("dirs.cache", &cache),
        dir_probe("dirs.temp", &std::env::temp_dir()),
        docker_socket_probe(),
        auth_file_probe(),
    ]
}

/// Registry hosts fledge would talk to: those with credentials or helpers in the docker config
/// files, the registry of ./fledge.toml's image, and FLEDGE_ONLINE_REGISTRIES (comma-separated).
fn configured_registries() -> Vec<String> {
    let mut hosts = std::collections::BTreeSet::new();
    for file in crate::source::auth::config_files() {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        for key in ["auths", "credHelpers"] {
            if let Some(map) = v.get(key).and_then(|m| m.as_object()) {
                for host in map.keys() {
                    let h = host
                        .trim_start_matches("https://")
                        .trim_start_matches("http://")
                        .split('/')
                        .next()
                        .unwrap_or_default();
                    if !h.is_empty() {
                        hosts.insert(h.to_string());
                    }
                }
            }
        }
    }
    if let Ok(cfg) = crate::config::Config::load(std::path::Path::new("fledge.toml")) {
        let image = cfg.source.image;
        let bare = image.strip_prefix("docker://").unwrap_or(&image);
        if !bare.contains(':')
            || !bare.split(':').next().is_some_and(|t| {
                ["oci", "oci-archive", "docker-archive", "docker-daemon"].contains(&t)
            })
        {
            if let Ok(r) = crate::source::normalize::DockerRef::parse(bare) {
                hosts.insert(r.registry.clone());
            }
        }
    }
    if let Ok(list) = std::env::var("FLEDGE_ONLINE_REGISTRIES") {
        hosts.extend(
            list.split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_string),
        );
    }
    hosts.into_iter().collect()
}

/// `GET /v2/` on every configured registry: 200 or 401 means a registry answers.
fn registry_probes() -> Vec<Probe> {
    let hosts = configured_registries();
    if hosts.is_empty() {
        return vec![Probe::new(
            "online.registries",
            Status::Ok,
            "no registries configured (docker config, ./fledge.toml, FLEDGE_ONLINE_REGISTRIES)",
        )];
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(5)))
        .build()
        .into();
    hosts
        .iter()
        .map(|host| {
            let api = if host == "docker.io" {
                "registry-1.docker.io"
            } else {
                host.as_str()
            };
            let scheme = if crate::source::normalize::is_loopback_host(api) {
                "http"
            } else {
                "https"
            };
            let url = format!("{scheme}://{api}/v2/");
            match agent.get(&url).call() {
                Ok(resp) if matches!(resp.status().as_u16(), 200 | 401) => Probe::new(
                    "online.registry",
                    Status::Ok,
                    format!("{host}: {url} answers (HTTP {})", resp.status().as_u16()),
                ),
                Ok(resp) => Probe::new(
                    "online.registry",
                    Status::Warn,
                    format!("{host}: {url} answered HTTP {}", resp.status().as_u16()),
                )
                .hint("is this a registry (distribution API v2)?"),
                Err(e) => Probe::new(
                    "online.registry",
                    Status::Warn,
                    format!("{host}: {url}: {e}"),
                )
                .hint("check the network, the host name, or --insecure-registry for plain HTTP"),
            }
        })
        .collect()
}

fn dir_probe(id: &'static str, dir: &std::path::Path) -> Probe {
    // The cache may not exist yet: check the nearest existing ancestor.
    let mut probe_dir = dir.to_path_buf();
    while !probe_dir.exists() {
        match probe_dir.parent() {
            Some(p) => probe_dir = p.to_path_buf(),
            None => break,
        }
    }
    let writable = tempfile::Builder::new()
        .prefix(".fledge-doctor-")
        .tempfile_in(&probe_dir)
        .is_ok();
    let free = crate::probe::free_bytes(&probe_dir).unwrap_or(0);
    let detail = format!(
        "{} ({} GiB free{})",
        dir.display(),
        free >> 30,
        if writable { "" } else { ", not writable" }
    );
    if writable {
        Probe::new(id, Status::Ok, detail)
    } else {
        Probe::new(id, Status::Fail, detail)
            .hint("make it writable, or choose another with --cache-dir / TMPDIR")
    }
}

fn docker_socket_probe() -> Probe {
    const ID: &str = "sources.docker_socket";
    let host =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    let Some(path) = host.strip_prefix("unix://") else {
        return Probe::new(
            ID,
            Status::Warn,
            format!("DOCKER_HOST={host} is not a unix socket"),
        );
    };
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Probe::new(ID, Status::Ok, format!("{path} accepts connections")),
        Err(e) => Probe::new(
            ID,
            Status::Warn,
            format!("{path}: {e} (only needed for docker-daemon: images)"),
        ),
    }
}

fn auth_file_probe() -> Probe {
    const ID: &str = "sources.auth_files";
    let mut files = Vec::new();
    if let Ok(dir) = std::env::var("DOCKER_CONFIG") {
        files.push(PathBuf::from(dir).join("config.json"));
    } else if let Some(home) = std::env::var_os("HOME") {
        files.push(PathBuf::from(home).join(".docker/config.json"));
    }
    if let Ok(f) = std::env::var("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    let mut found = Vec::new();
    for f in &files {
        match std::fs::read(f) {
            Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(_) => found.push(format!("{} (readable)", f.display())),
                Err(e) => {
                    return Probe::new(ID, Status::Warn, format!("{}: not JSON: {e}", f.display()))
                        .hint("fix or remove the file")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Probe::new(ID, Status::Warn, format!("{}: {e}", f.display()))
                    .hint("make it readable by this user")
            }
        }
    }
    if found.is_empty() {
        Probe::new(
            ID,
            Status::Ok,
            "no registry credentials configured (anonymous access)",
        )
    } else {
        Probe::new(ID, Status::Ok, found.join(", "))
    }
}

impl Report {
    /// The report as the table `fledge doctor` prints.
    pub fn render_text(&self) -> String {
        render(self)
    }
}

fn render(r: &Report) -> String {
    let mut s = String::from("CHECK                          STATUS  DETAIL\n");
    for p in &r.checks {
        let status = match p.status {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        s.push_str(&format!("{:<30} {:<7} {}\n", p.id, status, p.detail));
        if p.status != Status::Ok {
            if let Some(h) = &p.hint {
                s.push_str(&format!("{:<30} {:<7} fix: {}\n", "", "", h));
            }
        }
    }
    s.push_str("\nFILESYSTEM  NATIVE  KERNEL  USERSPACE  BUILD WILL USE\n");
    for f in &r.filesystems {
        let yes = |k: BackendKind| {
            if f.backends.iter().any(|b| b.backend == k && b.available) {
                "yes"
            } else {
                "no"
            }
        };
        s.push_str(&format!(
            "{:<11} {:<7} {:<7} {:<10} {}\n",
            f.fs,
            yes(BackendKind::Native),
            yes(BackendKind::Kernel),
            yes(BackendKind::Userspace),
            f.chosen
                .map_or("nothing (see the checks above)", BackendKind::name)
        ));
    }
    s.push_str(&format!(
        "\nverdict: {} filesystem types can be built ({} ms)\n",
        r.verdict, r.elapsed_ms
    ));
    s
}
