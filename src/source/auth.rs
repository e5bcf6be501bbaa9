//! Registry credentials where Docker, podman and skopeo keep them.
//!
//! Files, first match wins: `$REGISTRY_AUTH_FILE`, then `$DOCKER_CONFIG/config.json` (or
//! `~/.docker/config.json`). In each: `credHelpers[registry]` names a helper, else an `auths`
//! entry with a base64 `user:password` `auth` field, else `credsStore` names a helper for all
//! registries. A helper is the program `docker-credential-NAME`, run as `get` with the server
//! URL on stdin (through [`crate::runner`]) and answering `{"Username": ..., "Secret": ...}`;
//! what it answers never goes into an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::normalize::DOCKER_HUB;
use super::SourceError;
use crate::runner::Tool;

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            base64_encode(format!("{}:{}", self.username, self.password).as_bytes())
        )
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The config files to look in, from the environment, in order.
pub fn config_files() -> Vec<PathBuf> {
    let var = |n: &str| std::env::var_os(n).filter(|v| !v.is_empty());
    let mut files = Vec::new();
    if let Some(f) = var("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    if let Some(d) = var("DOCKER_CONFIG") {
        files.push(PathBuf::from(d).join("config.json"));
    } else if let Some(h) = var("HOME") {
        files.push(PathBuf::from(h).join(".docker").join("config.json"));
    }
    files
}

/// Credentials for `registry` (`host[:port]`, `docker.io` for Docker Hub) from the usual
/// files; `Ok(None)` when none is configured.
pub fn lookup(registry: &str) -> Result<Option<Credentials>, SourceError> {
    lookup_in(&config_files(), registry)
}

/// Credentials for `registry` from `files`, first match wins.
pub fn lookup_in(files: &[PathBuf], registry: &str) -> Result<Option<Credentials>, SourceError> {
    for file in files {
        let raw = match std::fs::read(file) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(SourceError::AuthConfig {
                    path: file.clone(),
                    reason: e.to_string(),
                })
            }
        };
        let cfg: ConfigFile =
            serde_json::from_slice(&raw).map_err(|e| SourceError::AuthConfig {
                path: file.clone(),
                reason: format!("invalid JSON: {e}"),
            })?;
        if let Some(c) = from_config(&cfg, file, registry)? {
            tracing::debug!("credentials for {registry} from {}", file.display());
            return Ok(Some(c));
        }
    }
    Ok(None)
}

fn from_config(
    cfg: &ConfigFile,
    file: &Path,
    registry: &str,
) -> Result<Option<Credentials>, SourceError> {
    if let Some(helper) = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| key_matches(k, registry))
        .map(|(_, v)| v)
    {
        return run_helper(helper, registry);
    }
    // Prefer an exact key over a normalised match (`https://host` vs `host`).
    let mut entries: Vec<(&String, &AuthEntry)> = cfg
        .auths
        .iter()
        .filter(|(k, _)| key_matches(k, registry))
        .collect();
    entries.sort_by_key(|(k, _)| k.as_str() != registry);
    for (key, entry) in entries {
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let bad = |reason: &str| SourceError::AuthConfig {
                path: file.to_path_buf(),
                reason: format!("auths entry '{key}': {reason}"),
            };
            let decoded = base64_decode(auth.trim())
                .ok_or_else(|| bad("the auth field is not valid base64"))?;
            let text =
                String::from_utf8(decoded).map_err(|_| bad("the auth field is not UTF-8"))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| bad("the auth field is not user:password"))?;
            return Ok(Some(Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }));
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
    }
    if let Some(store) = cfg.creds_store.as_deref().filter(|s| !s.is_empty()) {
        return run_helper(store, registry);
    }
    Ok(None)
}

/// Whether a config key (`host`, `https://host/v1/`, ...) names `registry`.
fn key_matches(key: &str, registry: &str) -> bool {
    let host = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = host.split('/').next().unwrap_or(host);
    if registry == DOCKER_HUB {
        matches!(
            host,
            "docker.io" | "index.docker.io" | "registry-1.docker.io"
        )
    } else {
        host.eq_ignore_ascii_case(registry)
    }
}

/// The server URL a credential helper is asked about.
fn helper_server(registry: &str) -> String {
    if registry == DOCKER_HUB {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    }
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

fn run_helper(helper: &str, registry: &str) -> Result<Option<Credentials>, SourceError> {
    let fail = |reason: String| SourceError::CredentialHelper {
        helper: helper.to_string(),
        registry: registry.to_string(),
        reason,
    };
    if !helper
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(fail("invalid helper name".to_string()));
    }
    let program = format!("docker-credential-{helper}");
    // The exit status is judged here, not by the runner: a failed helper's message is on its
    // standard output, and the runner's errors would carry its standard error only.
    let out = Tool::new(&program)
        .arg("get")
        .stdin(helper_server(registry))
        .output()
        .map_err(|e| fail(e.cannot_run().unwrap_or_else(|| e.to_string())))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_string()
            + String::from_utf8_lossy(&out.stderr).trim();
        if msg.contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!("{}: {}", out.status, msg)));
    }
    let ans: HelperAnswer =
        serde_json::from_slice(&out.stdout).map_err(|e| fail(format!("unexpected answer: {e}")))?;
    Ok(Some(Credentials {
        username: ans.username,
        password: ans.secret,
    }))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decode standard (or URL-safe) base64, padded or not; `None` if invalid.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bits >= 6 {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("user:pass", "dXNlcjpwYXNz"),
            ("a:b:c", "YTpiOmM="),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), enc);
            assert_eq!(base64_decode(enc).unwrap(), plain.as_bytes());
        }
        assert!(base64_decode("a!b").is_none());
        assert!(base64_decode("a").is_none());
    }

    fn write(dir: &Path, name: &str, v: serde_json::Value) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    #[test]
    fn lookup_table() {
        let d = tempfile::tempdir().unwrap();
        let b = |s: &str| base64_encode(s.as_bytes());
        let a = write(
            d.path(),
            "a.json",
            serde_json::json!({"auths": {
                "127.0.0.1:5000": {"auth": b("alice:pw1")},
                "https://index.docker.io/v1/": {"auth": b("hub:pw2")},
                "http://reg.example:8080/v2/": {"auth": b("bob:pw:3")},
            }}),
        );
        let second = write(
            d.path(),
            "b.json",
            serde_json::json!({"auths": {"127.0.0.1:5000": {"auth": b("other:x")},
                                          "only.example": {"auth": b("carol:pw4")}}}),
        );
        let files = vec![a.clone(), d.path().join("missing.json"), second];
        let get = |r: &str| {
            lookup_in(&files, r)
                .unwrap()
                .map(|c| (c.username, c.password))
        };
        let pair = |u: &str, p: &str| Some((u.to_string(), p.to_string()));
        assert_eq!(get("127.0.0.1:5000"), pair("alice", "pw1"));
        assert_eq!(get("docker.io"), pair("hub", "pw2"));
        assert_eq!(get("reg.example:8080"), pair("bob", "pw:3"));
        assert_eq!(get("only.example"), pair("carol", "pw4"));
        assert_eq!(get("127.0.0.1:5001"), None);

        let broken = write(
            d.path(),
            "c.json",
            serde_json::json!({"auths": {"h": {"auth": "!!!"}}}),
        );
        let e = lookup_in(std::slice::from_ref(&broken), "h").unwrap_err();
        assert!(
            e.to_string().contains(&broken.display().to_string())
                && e.to_string().contains("base64"),
            "{e}"
        );
        std::fs::write(&broken, "{not json").unwrap();
        assert!(matches!(
            lookup_in(&[broken], "h").unwrap_err(),
            SourceError::AuthConfig { .. }
        ));
    }

    #[test]
    fn credential_helpers() {
        let d = tempfile::tempdir().unwrap();
        // A helper that answers for one server and fails like the real ones otherwise.
        let helper = d.path().join("docker-credential-fledgetest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread s\nif [ \"$s\" = \"good.example\" ]; then\n\
             echo '{\"ServerURL\":\"good.example\",\"Username\":\"hu\",\"Secret\":\"hs\"}'\n\
             else echo 'credentials not found in native keychain'; exit 1; fi\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = ConfigFile {
            auths: HashMap::new(),
            cred_helpers: [("good.example".to_string(), "fledgetest".to_string())]
                .into_iter()
                .collect(),
            creds_store: Some("fledgetest".to_string()),
        };
        // PATH is process-wide: run the helper through an absolute PATH entry only in this
        // test by prefixing it (other tests do not run helpers).
        let old = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![d.path().to_path_buf()];
        paths.extend(std::env::split_paths(&old));
        std::env::set_var("PATH", std::env::join_paths(paths).unwrap());
        let f = Path::new("/x");
        let got = from_config(&cfg, f, "good.example").unwrap().unwrap();
        assert_eq!((got.username.as_str(), got.password.as_str()), ("hu", "hs"));
        // credsStore is asked for other registries; "not found" means no credentials.
        assert!(from_config(&cfg, f, "other.example").unwrap().is_none());
        let cfg = ConfigFile {
            creds_store: Some("fledge-missing-helper".to_string()),
            ..ConfigFile::default()
        };
        let e = from_config(&cfg, f, "x.example").unwrap_err();
        assert!(
            e.to_string()
                .contains("docker-credential-fledge-missing-helper"),
            "{e}"
        );
    }
}
