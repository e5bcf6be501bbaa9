//! The kestrel agent: find or download the binary that is installed at `/bin/kestrel`.
//!
//! - `local`: a file on the host (relative to the config directory unless absolute).
//! - `http`: downloaded into the cache directory, SHA-256 verified when a checksum is given.
//! - `release`: the `kestrel` asset of a volantvm/volant GitHub release; the base URL
//!   (`https://github.com`) can be replaced with the `FLEDGE_RELEASE_BASE_URL` environment
//!   variable (mirrors, tests).
//!
//! [`fetch_verified`] is the same download for other binaries (the busybox of an initramfs).
//!
//! Downloads are streamed to a temporary file in the cache directory while hashed, checked
//! (status, size limit, ELF magic, checksum) and only then renamed to
//! `kestrel-<sha256 prefix>`, mode 0755.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::config::AgentConfig;

/// Where the binary goes in the image.
pub const AGENT_DEST: &str = "/bin/kestrel";
/// Mode of the installed binary.
pub const AGENT_MODE: u32 = 0o755;
/// Environment variable replacing [`DEFAULT_RELEASE_BASE_URL`].
pub const RELEASE_BASE_ENV: &str = "FLEDGE_RELEASE_BASE_URL";
pub const DEFAULT_RELEASE_BASE_URL: &str = "https://github.com";
/// Largest agent accepted from a download.
pub const MAX_AGENT_BYTES: u64 = 512 * 1024 * 1024;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const TOTAL_TIMEOUT: Duration = Duration::from_secs(600);

/// An error while obtaining the agent binary.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("agent binary {} not found", path.display())]
    LocalMissing { path: PathBuf },
    #[error("agent binary {} is not a regular file", path.display())]
    LocalNotFile { path: PathBuf },
    #[error("cannot read agent binary {}: {source}", path.display())]
    LocalIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot download {what} from {url}: {reason}")]
    Download {
        /// What was downloaded (`agent`, `busybox`).
        what: &'static str,
        url: String,
        reason: String,
        /// The URL came from `source_strategy = "release"`.
        release: bool,
    },
    #[error("downloading {what} from {url} failed: HTTP {status}")]
    HttpStatus {
        what: &'static str,
        url: String,
        status: u16,
        release: bool,
    },
    #[error("{what} from {url} is larger than {limit} bytes")]
    TooLarge {
        what: &'static str,
        url: String,
        limit: u64,
    },
    #[error("{what} from {url} is not an ELF executable")]
    NotElf { what: &'static str, url: String },
    #[error("{what} from {url} has sha256 {actual}, expected {expected}")]
    ChecksumMismatch {
        what: &'static str,
        url: String,
        expected: String,
        actual: String,
    },
    #[error("cannot write {what} to cache {}: {source}", path.display())]
    Cache {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AgentError {
    pub fn hint(&self) -> Option<&str> {
        match self {
            AgentError::Download { release: true, .. }
            | AgentError::HttpStatus { release: true, .. } => {
                Some("use source_strategy = \"local\" or \"http\"")
            }
            AgentError::ChecksumMismatch {
                what: "busybox", ..
            } => Some("check source.busybox_sha256, or the URL serves a different build"),
            AgentError::ChecksumMismatch { .. } => {
                Some("check agent.checksum, or the URL serves a different build")
            }
            AgentError::LocalMissing { .. } => {
                Some("agent.path is relative to the directory of fledge.toml")
            }
            _ => None,
        }
    }
}

/// The download URL of a release's `kestrel` asset. `version` is `latest` or a version with
/// or without a leading `v`.
pub fn release_url(base: &str, version: &str) -> String {
    let base = base.trim_end_matches('/');
    if version == "latest" {
        format!("{base}/volantvm/volant/releases/latest/download/kestrel")
    } else {
        let v = version.strip_prefix('v').unwrap_or(version);
        format!("{base}/volantvm/volant/releases/download/v{v}/kestrel")
    }
}

/// The release base URL: `FLEDGE_RELEASE_BASE_URL` when set and non-empty, else GitHub.
pub fn release_base_url() -> String {
    std::env::var(RELEASE_BASE_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_RELEASE_BASE_URL.to_string())
}

/// Obtain the agent binary described by `cfg` and return its host path.
pub fn fetch_agent(
    cfg: &AgentConfig,
    config_dir: &Path,
    cache_dir: &Path,
) -> Result<PathBuf, AgentError> {
    fetch_agent_with_base(cfg, config_dir, cache_dir, &release_base_url())
}

/// [`fetch_agent`] with an explicit release base URL.
pub fn fetch_agent_with_base(
    cfg: &AgentConfig,
    config_dir: &Path,
    cache_dir: &Path,
    release_base: &str,
) -> Result<PathBuf, AgentError> {
    match cfg {
        AgentConfig::Local { path } => {
            let path = config_dir.join(path);
            match std::fs::metadata(&path) {
                Ok(md) if md.is_file() => Ok(path),
                Ok(_) => Err(AgentError::LocalNotFile { path }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(AgentError::LocalMissing { path })
                }
                Err(source) => Err(AgentError::LocalIo { path, source }),
            }
        }
        AgentConfig::Http { url, checksum } => {
            if let Some(path) = checksum
                .as_deref()
                .and_then(|c| cached(&AGENT, cache_dir, c))
            {
                tracing::debug!(url, path = %path.display(), "agent already in cache");
                return Ok(path);
            }
            download(&AGENT, url, cache_dir, checksum.as_deref(), false)
        }
        AgentConfig::Release { version } => download(
            &AGENT,
            &release_url(release_base, version),
            cache_dir,
            None,
            true,
        ),
    }
}

/// What a download is, for messages and cache file names.
pub struct Download {
    /// In messages: `agent`, `busybox`.
    pub what: &'static str,
    /// The cache file is `<prefix>-<sha256 prefix>`.
    pub prefix: &'static str,
}

const AGENT: Download = Download {
    what: "agent",
    prefix: "kestrel",
};

/// The busybox of an initramfs without a shell (`[source] busybox_url`).
pub const BUSYBOX: Download = Download {
    what: "busybox",
    prefix: "busybox",
};

/// A static ELF binary from `url` whose SHA-256 must be `sha256`: the cached copy when its
/// hash matches (no network), else downloaded, checked and cached as the agent is.
pub fn fetch_verified(
    kind: &Download,
    url: &str,
    sha256: &str,
    cache_dir: &Path,
) -> Result<PathBuf, AgentError> {
    if let Some(path) = cached(kind, cache_dir, sha256) {
        tracing::debug!(url, path = %path.display(), "{} already in cache", kind.what);
        return Ok(path);
    }
    download(kind, url, cache_dir, Some(sha256), false)
}

/// The cache file name of a download whose SHA-256 is `hex`.
fn cache_name(kind: &Download, hex: &str) -> String {
    format!("{}-{}", kind.prefix, hex.get(..16).unwrap_or(hex))
}

/// A cached download whose full SHA-256 equals `expected` (so a known checksum needs no
/// network on later builds).
fn cached(kind: &Download, cache_dir: &Path, expected: &str) -> Option<PathBuf> {
    let expected = expected.strip_prefix("sha256:").unwrap_or(expected);
    let path = cache_dir.join(cache_name(kind, &expected.to_ascii_lowercase()));
    let mut file = std::fs::File::open(&path).ok()?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).ok()?;
    hex::encode(hasher.finalize())
        .eq_ignore_ascii_case(expected)
        .then_some(path)
}

/// Download `url` into `cache_dir`, verify it, and return the cached file.
fn download(
    kind: &Download,
    url: &str,
    cache_dir: &Path,
    expected_sha256: Option<&str>,
    release: bool,
) -> Result<PathBuf, AgentError> {
    let what = kind.what;
    let cache_err = |path: &Path, source| AgentError::Cache {
        what,
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(cache_dir).map_err(|e| cache_err(cache_dir, e))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(TOTAL_TIMEOUT))
        .build()
        .into();
    tracing::debug!(url, "downloading {what}");
    let net_err = |reason: String| AgentError::Download {
        what,
        url: url.to_string(),
        reason,
        release,
    };
    let response = agent.get(url).call().map_err(|e| net_err(e.to_string()))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(AgentError::HttpStatus {
            what,
            url: url.to_string(),
            status,
            release,
        });
    }
    // No body limit from ureq: the loop below enforces MAX_AGENT_BYTES itself.
    let mut reader = response.into_body().into_reader();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}-download-", kind.prefix))
        .tempfile_in(cache_dir)
        .map_err(|e| cache_err(cache_dir, e))?;
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut head = Vec::with_capacity(4);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(net_err(e.to_string())),
        };
        let chunk = &buf[..n];
        total += n as u64;
        if total > MAX_AGENT_BYTES {
            return Err(AgentError::TooLarge {
                what,
                url: url.to_string(),
                limit: MAX_AGENT_BYTES,
            });
        }
        if head.len() < 4 {
            let want = (4 - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..want]);
        }
        hasher.update(chunk);
        tmp.write_all(chunk).map_err(|e| cache_err(tmp.path(), e))?;
    }
    let actual = hex::encode(hasher.finalize());
    if let Some(expected) = expected_sha256 {
        let expected = expected.strip_prefix("sha256:").unwrap_or(expected);
        if !expected.eq_ignore_ascii_case(&actual) {
            return Err(AgentError::ChecksumMismatch {
                what,
                url: url.to_string(),
                expected: expected.to_ascii_lowercase(),
                actual,
            });
        }
    }
    if head != b"\x7fELF" {
        return Err(AgentError::NotElf {
            what,
            url: url.to_string(),
        });
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| cache_err(tmp.path(), e))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(AGENT_MODE))
        .map_err(|e| cache_err(tmp.path(), e))?;
    let dest = cache_dir.join(cache_name(kind, &actual));
    tmp.persist(&dest).map_err(|e| cache_err(&dest, e.error))?;
    tracing::debug!(url, path = %dest.display(), bytes = total, "{what} downloaded");
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::http_serve;

    fn elf_body() -> Vec<u8> {
        let mut b = b"\x7fELF".to_vec();
        b.extend((0..200_000u32).map(|i| (i % 251) as u8));
        b
    }

    #[test]
    fn http_download_verifies_checksum_and_caches() {
        let body = elf_body();
        let sum = hex::encode(Sha256::digest(&body));
        let (base, server) = http_serve(vec![("/kestrel", 200, body.clone())], 2);
        let cache = tempfile::tempdir().unwrap();
        let cfg = AgentConfig::Http {
            url: format!("{base}/kestrel"),
            checksum: Some(sum.clone()),
        };
        let path = fetch_agent(&cfg, Path::new("/nonexistent"), cache.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), body);
        assert_eq!(path, cache.path().join(format!("kestrel-{}", &sum[..16])));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        // Without a checksum, and into a cache directory that does not exist yet.
        let nested = cache.path().join("a/b");
        let cfg = AgentConfig::Http {
            url: format!("{base}/kestrel"),
            checksum: None,
        };
        let path2 = fetch_agent(&cfg, Path::new("/"), &nested).unwrap();
        assert_eq!(std::fs::read(&path2).unwrap(), body);
        assert_eq!(server.join().unwrap(), vec!["/kestrel", "/kestrel"]);
        // With a checksum, the cached copy is used: the server is gone now.
        let cfg = AgentConfig::Http {
            url: format!("{base}/kestrel"),
            checksum: Some(format!("sha256:{}", sum.to_uppercase())),
        };
        assert_eq!(
            fetch_agent(&cfg, Path::new("/"), cache.path()).unwrap(),
            path
        );
        // A corrupted cache entry is not trusted: it is fetched again, which fails as the
        // server is gone (were the port reused, the answer would still not match).
        std::fs::write(&path, b"\x7fELF tampered").unwrap();
        assert!(fetch_agent(&cfg, Path::new("/"), cache.path()).is_err());
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(".kestrel")),
            "{names:?}"
        );
    }

    #[test]
    fn checksum_mismatch_names_url_expected_and_actual() {
        let body = elf_body();
        let actual = hex::encode(Sha256::digest(&body));
        let (base, server) = http_serve(vec![("/k", 200, body)], 1);
        let cache = tempfile::tempdir().unwrap();
        let expected = "ab".repeat(32);
        let cfg = AgentConfig::Http {
            url: format!("{base}/k"),
            checksum: Some(expected.clone()),
        };
        let err = fetch_agent(&cfg, Path::new("/"), cache.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("agent from {base}/k has sha256 {actual}, expected {expected}")
        );
        assert!(err.hint().is_some());
        server.join().unwrap();
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[test]
    fn http_404_and_non_elf_bodies_fail() {
        let (base, server) = http_serve(vec![("/page", 200, b"<html>login</html>".to_vec())], 2);
        let cache = tempfile::tempdir().unwrap();
        let cfg = AgentConfig::Http {
            url: format!("{base}/missing"),
            checksum: None,
        };
        let err = fetch_agent(&cfg, Path::new("/"), cache.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("downloading agent from {base}/missing failed: HTTP 404")
        );
        assert_eq!(err.hint(), None);
        let cfg = AgentConfig::Http {
            url: format!("{base}/page"),
            checksum: None,
        };
        let err = fetch_agent(&cfg, Path::new("/"), cache.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("agent from {base}/page is not an ELF executable")
        );
        server.join().unwrap();
    }

    #[test]
    fn release_downloads_from_the_release_path() {
        let body = elf_body();
        let (base, server) = http_serve(
            vec![
                (
                    "/volantvm/volant/releases/download/v0.4.1/kestrel",
                    200,
                    body.clone(),
                ),
                (
                    "/volantvm/volant/releases/latest/download/kestrel",
                    200,
                    body.clone(),
                ),
            ],
            3,
        );
        let cache = tempfile::tempdir().unwrap();
        for version in ["0.4.1", "latest"] {
            let cfg = AgentConfig::Release {
                version: version.into(),
            };
            let p = fetch_agent_with_base(&cfg, Path::new("/"), cache.path(), &base).unwrap();
            assert_eq!(std::fs::read(p).unwrap(), body);
        }
        let cfg = AgentConfig::Release {
            version: "9.9.9".into(),
        };
        let err = fetch_agent_with_base(&cfg, Path::new("/"), cache.path(), &base).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "downloading agent from {base}/volantvm/volant/releases/download/v9.9.9/kestrel failed: HTTP 404"
            )
        );
        assert_eq!(
            err.hint(),
            Some("use source_strategy = \"local\" or \"http\"")
        );
        server.join().unwrap();
    }

    #[test]
    fn offline_release_names_the_url_and_hints() {
        // Port 1 on loopback is closed: the connection is refused at once.
        let cache = tempfile::tempdir().unwrap();
        let cfg = AgentConfig::Release {
            version: "latest".into(),
        };
        let err = fetch_agent_with_base(&cfg, Path::new("/"), cache.path(), "http://127.0.0.1:1")
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "cannot download agent from http://127.0.0.1:1/volantvm/volant/releases/latest/download/kestrel: "
            ),
            "{msg}"
        );
        assert_eq!(
            err.hint(),
            Some("use source_strategy = \"local\" or \"http\"")
        );
    }

    #[test]
    fn release_urls() {
        let cases = [
            (
                "https://github.com",
                "latest",
                "https://github.com/volantvm/volant/releases/latest/download/kestrel",
            ),
            (
                "https://github.com/",
                "0.4.1",
                "https://github.com/volantvm/volant/releases/download/v0.4.1/kestrel",
            ),
            (
                "http://mirror",
                "v1.0.0",
                "http://mirror/volantvm/volant/releases/download/v1.0.0/kestrel",
            ),
        ];
        for (base, v, want) in cases {
            assert_eq!(release_url(base, v), want);
        }
    }

    #[test]
    fn local_agent_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kestrel"), b"\x7fELF").unwrap();
        std::fs::create_dir(dir.path().join("adir")).unwrap();
        let cache = dir.path().join("cache");
        let local = |p: &str| AgentConfig::Local { path: p.into() };
        let p = fetch_agent(&local("kestrel"), dir.path(), &cache).unwrap();
        assert_eq!(p, dir.path().join("kestrel"));
        let abs = dir.path().join("kestrel");
        let p = fetch_agent(
            &local(abs.to_str().unwrap()),
            Path::new("/elsewhere"),
            &cache,
        )
        .unwrap();
        assert_eq!(p, abs);
        let err = fetch_agent(&local("missing"), dir.path(), &cache).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "agent binary {} not found",
                dir.path().join("missing").display()
            )
        );
        assert!(err.hint().is_some());
        let err = fetch_agent(&local("adir"), dir.path(), &cache).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "agent binary {} is not a regular file",
                dir.path().join("adir").display()
            )
        );
        assert!(!cache.exists(), "local agents need no cache");
    }
}
