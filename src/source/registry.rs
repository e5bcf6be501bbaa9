//! Registries speaking the distribution API v2 (`docker://REF`).
//!
//! Manifests are asked for with every OCI and Docker schema 2 manifest and index type in
//! `Accept`, then resolved for the platform by the shared [`Resolver`]. Blobs are downloaded
//! into a content cache (`<cache>/blobs/sha256/<hex>`) through a partial file that survives an
//! interruption and is continued with a `Range` request; the whole blob is hashed before it is
//! renamed into place, and a blob that fails verification is deleted. Several processes may
//! fill the cache at once: a blob's partial file is locked (`flock`) while it is written.
//!
//! Layers are decoded while they download: [`ImageSource::open_blob_stream`] hands out the
//! bytes as they arrive (after those of a partial file an earlier run left), appending them
//! to the partial file and hashing them once. The partial file enters the cache only when
//! the stream is committed, i.e. when the decoded layer verified too; a stream dropped
//! uncommitted deletes it, except after a network failure, when it is kept for resuming.
//!
//! Requests are retried with exponential backoff on 5xx, 429 and dropped connections.
//! Authentication: anonymous, Basic, and Bearer tokens from the `WWW-Authenticate` challenge
//! (realm, service, scope), with credentials from [`auth`](super::auth). Loopback registries
//! and those marked insecure are spoken to over plain HTTP, the others over HTTPS with the
//! system's CA bundle plus an optional CA file.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::auth::{self, Credentials};
use super::normalize::{host_without_port, DockerRef};
use super::oci_layout::{
    kind_of, Descriptor, Resolver, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST,
};
use super::{
    sha256_digest, sha256_hex, BlobStream, ImageSource, PlainBlobStream, Platform, ResolvedImage,
    SourceError, SourceOptions, VerifyingReader,
};

/// Attempts per request (first try included) on 5xx, 429 and dropped connections.
const MAX_ATTEMPTS: u32 = 5;
/// Largest manifest or index accepted.
const MAX_MANIFEST_SIZE: u64 = 8 << 20;
/// Largest token response accepted.
const MAX_TOKEN_SIZE: u64 = 1 << 20;
/// Largest error body read for a message.
const MAX_ERROR_BODY: u64 = 64 << 10;
/// Blobs downloaded at once.
const PARALLEL_FETCHES: usize = 4;

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(6)))
}

/// How to authenticate the next request.
#[derive(Clone, Debug)]
enum AuthState {
    Anonymous,
    Basic,
    Bearer(String),
}

/// An HTTP client for one repository of one registry.
struct Client {
    agent: ureq::Agent,
    /// `http://host:port` or `https://host`.
    base: String,
    registry: String,
    repository: String,
    creds: Option<Credentials>,
    auth: Mutex<(AuthState, Option<String>)>,
}

/// Parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: HashMap<String, String>,
}

/// Parse `Scheme k="v", k2=v2`.
fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = match h.split_once(' ') {
        Some((s, r)) => (s, r),
        None => (h, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    let mut rest = rest.trim_start();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
            let mut val = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => val.push(c),
                }
            }
            (val, &q[end?..])
        } else {
            match after.split_once(',') {
                Some((v, r)) => (v.trim().to_string(), r),
                None => (after.trim().to_string(), ""),
            }
        };
        params.insert(key, value);
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// The message of a distribution API error body (`{"errors":[{"code","message"}]}`), else
/// the start of the body.
fn error_message(body: &[u8]) -> (Option<String>, String) {
    #[derive(serde::Deserialize)]
    struct E {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    #[derive(serde::Deserialize)]
    struct Errs {
        errors: Vec<E>,
    }
    if let Ok(e) = serde_json::from_slice::<Errs>(body) {
        if let Some(first) = e.errors.first() {
            let msg = if first.message.is_empty() {
                first.code.to_lowercase().replace('_', " ")
            } else {
                first.message.clone()
            };
            return (Some(first.code.clone()), msg);
        }
    }
    let text = String::from_utf8_lossy(body);
    let line = text.lines().next().unwrap_or("").trim();
    let line: String = line.chars().take(200).collect();
    (
        None,
        if line.is_empty() {
            "(no details)".to_string()
        } else {
            line
        },
    )
}

fn describe_transport_error(e: &ureq::Error) -> (String, bool) {
    match e {
        ureq::Error::Io(io) => {
            let retry = !matches!(
                io.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            );
            let text = match io.kind() {
                io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                _ => io.to_string(),
            };
            (text, retry)
        }
        ureq::Error::HostNotFound => ("host not found".to_string(), false),
        ureq::Error::Timeout(t) => (format!("timed out ({t})"), true),
        ureq::Error::ConnectionFailed => ("connection failed".to_string(), true),
        ureq::Error::Protocol(_) => (e.to_string(), true),
        other => (other.to_string(), false),
    }
}

fn read_limited(body: ureq::Body, limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    body.into_reader().take(limit + 1).read_to_end(&mut out)?;
    Ok(out)
}

/// The TLS roots: the system bundle (`$SSL_CERT_FILE` or the Debian/Red Hat paths) plus
/// `extra`; Mozilla's roots when no bundle is found and no extra file is given.
fn tls_config(extra: Option<&Path>) -> Result<ureq::tls::TlsConfig, SourceError> {
    use ureq::tls::{parse_pem, Certificate, PemItem, RootCerts, TlsConfig};
    let mut certs: Vec<Certificate<'static>> = Vec::new();
    let load = |path: &Path, certs: &mut Vec<Certificate<'static>>| -> Result<(), String> {
        let pem = fs::read(path).map_err(|e| e.to_string())?;
        let before = certs.len();
        for item in parse_pem(&pem) {
            if let PemItem::Certificate(c) = item.map_err(|e| e.to_string())? {
                certs.push(c);
            }
        }
        if certs.len() == before {
            return Err("no PEM certificate in it".to_string());
        }
        Ok(())
    };
    let system: Vec<PathBuf> = match std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()) {
        Some(f) => vec![PathBuf::from(f)],
        None => vec![
            PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            PathBuf::from("/etc/pki/tls/certs/ca-bundle.crt"),
        ],
    };
    for p in system.iter().filter(|p| p.is_file()) {
        if load(p, &mut certs).is_ok() {
            break;
        }
    }
    if let Some(extra) = extra {
        load(extra, &mut certs).map_err(|reason| SourceError::BadCaFile {
            path: extra.to_path_buf(),
            reason,
        })?;
    }
    let roots = if certs.is_empty() {
        RootCerts::WebPki
    } else {
        RootCerts::Specific(Arc::new(certs))
    };
    Ok(TlsConfig::builder().root_certs(roots).build())
}

/// Whether `registry` is to be reached over plain HTTP.
fn plain_http(registry: &str, insecure: &[String]) -> bool {
    if super::normalize::is_loopback_host(registry) {
        return true;
    }
    insecure.iter().any(|h| {
        let h = h
            .trim()
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        h.eq_ignore_ascii_case(registry) || h.eq_ignore_ascii_case(host_without_port(registry))
    })
}

fn make_agent(opts: &SourceOptions) -> Result<ureq::Agent, SourceError> {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        // Redirects to the registry itself keep the credentials; to storage elsewhere (S3,
        // a CDN) they are not sent.
        .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
        .user_agent(concat!("fledge/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .tls_config(tls_config(opts.registry_ca.as_deref())?)
        .build();
    Ok(config.new_agent())
}

impl Client {
    fn new(name: &DockerRef, opts: &SourceOptions) -> Result<Client, SourceError> {
        let host = name.api_host().to_string();
        let scheme = if plain_http(&name.registry, &opts.insecure_registries) {
            "http"
        } else {
            "https"
        };
        let agent = make_agent(opts)?;
        let creds = auth::lookup(&name.registry)?;
        Ok(Client {
            agent,
            base: format!("{scheme}://{host}"),
            registry: name.registry.clone(),
            repository: name.repository.clone(),
            creds,
            auth: Mutex::new((AuthState::Anonymous, None)),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{path}", self.base, self.repository)
    }

    fn unreachable(&self, reason: String) -> SourceError {
        SourceError::RegistryUnreachable {
            registry: self.registry.clone(),
            reason,
        }
    }

    fn auth_state(&self) -> (AuthState, Option<String>) {
        match self.auth.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_auth(&self, state: AuthState, realm: Option<String>) {
        let mut g = match self.auth.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = (state, realm);
    }

    /// GET `url`, authenticating and retrying as needed; any status other than 401 (after
    /// authentication) and retried 5xx/429 is returned to the caller.
    fn get(
        &self,
        url: &str,
        accept: Option<&str>,
        range_from: Option<u64>,
    ) -> Result<ureq::http::Response<ureq::Body>, SourceError> {
        let mut attempt = 0;
        let mut authenticated = false;
        loop {
            let (state, realm) = self.auth_state();
            let mut req = self.agent.get(url);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if let Some(from) = range_from {
                req = req.header("Range", format!("bytes={from}-"));
            }
            match (&state, &self.creds) {
                (AuthState::Basic, Some(c)) => req = req.header("Authorization", c.basic_header()),
                (AuthState::Bearer(t), _) => {
                    req = req.header("Authorization", format!("Bearer {t}"))
                }
                _ => {}
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(e) => {
                    let (reason, retry) = describe_transport_error(&e);
                    if retry && attempt + 1 < MAX_ATTEMPTS {
                        tracing::debug!("{url}: {reason}; retrying");
                        std::thread::sleep(backoff(attempt));
                        attempt += 1;
                        continue;
                    }
                    return Err(self.unreachable(format!("{reason} ({})", self.base)));
                }
            };
            let status = resp.status().as_u16();
            if status == 401 {
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                let challenge_realm = challenge
                    .as_ref()
                    .and_then(|c| c.params.get("realm").cloned())
                    .or(realm);
                if authenticated {
                    let reason = match &self.creds {
                        Some(c) => {
                            format!("the credentials of user '{}' were rejected", c.username)
                        }
                        None => self.no_credentials(),
                    };
                    return Err(SourceError::RegistryAuth {
                        registry: self.registry.clone(),
                        realm: challenge_realm,
                        reason,
                    });
                }
                authenticated = true;
                self.authenticate(challenge, challenge_realm)?;
                continue;
            }
            if (status >= 500 || status == 429) && attempt + 1 < MAX_ATTEMPTS {
                tracing::debug!("{url}: status {status}; retrying");
                std::thread::sleep(backoff(attempt));
                attempt += 1;
                continue;
            }
            return Ok(resp);
        }
    }

    fn no_credentials(&self) -> String {
        format!(
            "authentication required and no credentials are configured for {} (add them to $DOCKER_CONFIG/config.json or $REGISTRY_AUTH_FILE, e.g. with `docker login {}`)",
            self.registry, self.registry
        )
    }

    /// Answer a 401 challenge: Basic uses the credentials directly, Bearer fetches a token.
    fn authenticate(
        &self,
        challenge: Option<Challenge>,
        realm: Option<String>,
    ) -> Result<(), SourceError> {
        let auth_err = |reason: String| SourceError::RegistryAuth {
            registry: self.registry.clone(),
            realm: realm.clone(),
            reason,
        };
        let Some(ch) = challenge else {
            return Err(auth_err(
                "the registry asked for authentication without a WWW-Authenticate challenge"
                    .to_string(),
            ));
        };
        match ch.scheme.as_str() {
            "basic" => {
                if self.creds.is_none() {
                    return Err(auth_err(self.no_credentials()));
                }
                self.set_auth(AuthState::Basic, realm.clone());
                Ok(())
            }
            "bearer" => {
                let token = self.fetch_token(&ch, realm.as_deref())?;
                self.set_auth(AuthState::Bearer(token), realm.clone());
                Ok(())
            }
            other => Err(auth_err(format!(
                "unsupported authentication scheme '{other}'"
            ))),
        }
    }

    fn fetch_token(&self, ch: &Challenge, realm: Option<&str>) -> Result<String, SourceError> {
        let auth_err = |reason: String| SourceError::RegistryAuth {
            registry: self.registry.clone(),
            realm: realm.map(str::to_string),
            reason,
        };
        let Some(realm_url) = realm else {
            return Err(auth_err("the Bearer challenge names no realm".to_string()));
        };
        let scope = ch
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let mut attempt = 0;
        loop {
            let mut req = self.agent.get(realm_url).query("scope", &scope);
            if let Some(service) = ch.params.get("service") {
                req = req.query("service", service);
            }
            if let Some(c) = &self.creds {
                req = req.header("Authorization", c.basic_header());
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(e) => {
                    let (reason, retry) = describe_transport_error(&e);
                    if retry && attempt + 1 < MAX_ATTEMPTS {
                        std::thread::sleep(backoff(attempt));
                        attempt += 1;
                        continue;
                    }
                    return Err(auth_err(format!(
                        "cannot reach the token service: {reason}"
                    )));
                }
            };
            let status = resp.status().as_u16();
            if (status >= 500 || status == 429) && attempt + 1 < MAX_ATTEMPTS {
                std::thread::sleep(backoff(attempt));
                attempt += 1;
                continue;
            }
            let body = read_limited(resp.into_body(), MAX_TOKEN_SIZE)
                .map_err(|e| auth_err(format!("reading the token: {e}")))?;
            if status == 401 || status == 403 {
                let reason = match &self.creds {
                    Some(c) => format!(
                        "the token service rejected the credentials of user '{}'",
                        c.username
                    ),
                    None => self.no_credentials(),
                };
                return Err(auth_err(reason));
            }
            if status != 200 {
                let (_, msg) = error_message(&body);
                return Err(auth_err(format!(
                    "the token service answered {status}: {msg}"
                )));
            }
            #[derive(serde::Deserialize)]
            struct Token {
                #[serde(default)]
                token: Option<String>,
                #[serde(default)]
                access_token: Option<String>,
            }
            let t: Token = serde_json::from_slice(&body)
                .map_err(|e| auth_err(format!("invalid token answer: {e}")))?;
            return t
                .token
                .or(t.access_token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| auth_err("the token answer holds no token".to_string()));
        }
    }

    /// Turn a non-success answer into an error naming `what`.
    fn status_error(&self, what: &str, reference: &str, status: u16, body: &[u8]) -> SourceError {
        let (code, message) = error_message(body);
        match (status, code.as_deref()) {
            (404, Some("NAME_UNKNOWN")) => SourceError::RepositoryNotFound {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
            },
            (404, _) if what == "manifest" => match self.tags() {
                Err(e @ SourceError::RepositoryNotFound { .. }) => e,
                tags => SourceError::ManifestNotFound {
                    registry: self.registry.clone(),
                    repository: self.repository.clone(),
                    reference: reference.to_string(),
                    available: tags.unwrap_or_default(),
                },
            },
            (403, _) => SourceError::RegistryAuth {
                registry: self.registry.clone(),
                realm: None,
                reason: format!("access to {} denied: {message}", self.repository),
            },
            _ => SourceError::RegistryHttp {
                registry: self.registry.clone(),
                what: format!("{what} {reference} of {}", self.repository),
                status,
                message,
            },
        }
    }

    /// The repository's tags (at most the first page), for error messages.
    fn tags(&self) -> Result<Vec<String>, SourceError> {
        let resp = self.get(&self.url("tags/list?n=50"), None, None)?;
        let status = resp.status().as_u16();
        let body = read_limited(resp.into_body(), MAX_MANIFEST_SIZE)
            .map_err(|e| self.unreachable(format!("reading the tag list: {e}")))?;
        if status != 200 {
            let (code, message) = error_message(&body);
            if code.as_deref() == Some("NAME_UNKNOWN") {
                return Err(SourceError::RepositoryNotFound {
                    registry: self.registry.clone(),
                    repository: self.repository.clone(),
                });
            }
            return Err(SourceError::RegistryHttp {
                registry: self.registry.clone(),
                what: format!("the tag list of {}", self.repository),
                status,
                message,
            });
        }
        #[derive(serde::Deserialize)]
        struct Tags {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let t: Tags = serde_json::from_slice(&body).map_err(|e| SourceError::Json {
            blob: format!("tag list of {}", self.repository),
            source: e,
        })?;
        let mut tags = t.tags.unwrap_or_default();
        tags.sort();
        Ok(tags)
    }

    /// Fetch manifest `reference` (tag or digest): media type, raw bytes, digest.
    fn manifest(&self, reference: &str) -> Result<(Option<String>, Vec<u8>, String), SourceError> {
        let resp = self.get(
            &self.url(&format!("manifests/{reference}")),
            Some(MANIFEST_ACCEPT),
            None,
        )?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_limited(resp.into_body(), MAX_MANIFEST_SIZE)
            .map_err(|e| self.unreachable(format!("reading manifest {reference}: {e}")))?;
        if status != 200 {
            return Err(self.status_error("manifest", reference, status, &body));
        }
        if body.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(SourceError::BlobTooLarge {
                blob: format!("manifest {reference}"),
                size: body.len() as u64,
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let digest = sha256_digest(&body);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(SourceError::DigestMismatch {
                blob: reference.to_string(),
                actual: digest,
            });
        }
        if let Some(h) = header_digest.filter(|h| h.starts_with("sha256:") && *h != digest) {
            tracing::warn!(
                "registry {} says manifest {reference} has digest {h}, its content has {digest}",
                self.registry
            );
        }
        let media_type = content_type.filter(|c| kind_of(c).is_some());
        Ok((media_type, body, digest))
    }
}

/// The on-disk cache of compressed blobs.
#[derive(Clone, Debug)]
pub struct BlobCache {
    dir: PathBuf,
    /// Downloads of at least this many bytes are written with `O_DIRECT` ([`BlobDirect`]).
    direct_min: u64,
}

impl BlobCache {
    /// The blob cache under cache directory `cache_dir`.
    pub fn new(cache_dir: &Path) -> BlobCache {
        BlobCache {
            dir: cache_dir.join("blobs").join("sha256"),
            direct_min: DIRECT_BLOB_MIN,
        }
    }

    /// Where blob `digest` is kept once complete and verified.
    pub fn path(&self, digest: &str) -> Result<PathBuf, SourceError> {
        Ok(self.dir.join(sha256_hex(digest)?))
    }

    /// Where an unfinished download of `digest` is kept.
    pub fn partial_path(&self, digest: &str) -> Result<PathBuf, SourceError> {
        Ok(self.dir.join(format!(".partial-{}", sha256_hex(digest)?)))
    }

    fn io(&self, path: &Path, e: io::Error) -> SourceError {
        SourceError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }

    /// Open (creating it) and lock the partial file of `digest`; `None` if the complete blob
    /// is in the cache (already, or once another process holding the lock finished it).
    fn lock_partial(&self, digest: &str) -> Result<Option<Flock<File>>, SourceError> {
        let final_path = self.path(digest)?;
        if final_path.is_file() {
            return Ok(None);
        }
        fs::create_dir_all(&self.dir).map_err(|e| self.io(&self.dir, e))?;
        let part_path = self.partial_path(digest)?;
        // Lock the partial file; if it was renamed or removed while we waited, start over.
        loop {
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&part_path)
                .map_err(|e| self.io(&part_path, e))?;
            let locked = Flock::lock(f, FlockArg::LockExclusive)
                .map_err(|(_, errno)| self.io(&part_path, io::Error::from(errno)))?;
            let ours = locked.metadata().map_err(|e| self.io(&part_path, e))?;
            let current = match fs::metadata(&part_path) {
                Ok(m) => m.ino() == ours.ino() && m.dev() == ours.dev(),
                Err(_) => false,
            };
            if final_path.is_file() {
                // Opening created an empty partial file after the blob was completed: it is
                // of no use (removed while locked, like any abandoned partial file).
                if current && ours.len() == 0 {
                    let _ = fs::remove_file(&part_path);
                }
                return Ok(None);
            }
            if current {
                return Ok(Some(locked));
            }
        }
    }

    /// The verified blob's path, downloading it with `client` unless already cached.
    fn fetch(&self, client: &Client, digest: &str, size: u64) -> Result<PathBuf, SourceError> {
        let final_path = self.path(digest)?;
        if final_path.is_file() {
            return Ok(final_path);
        }
        let mut stream = self.open_stream(client, digest, size)?;
        io::copy(&mut stream, &mut io::sink())
            .map_err(|e| SourceError::from_blob_read(digest, e))?;
        stream.commit()?;
        Ok(final_path)
    }

    /// Blob `digest` for one pass: from the cache if it is complete there, else downloaded
    /// as it is read (continuing a partial file an earlier run left, which is read back
    /// first). The bytes go to the partial file and are hashed once on the way; the stream
    /// renames the partial file into place only when committed.
    fn open_stream<'a>(
        &'a self,
        client: &'a Client,
        digest: &str,
        size: u64,
    ) -> Result<Box<dyn BlobStream + 'a>, SourceError> {
        let final_path = self.path(digest)?;
        let part_path = self.partial_path(digest)?;
        let Some(file) = self.lock_partial(digest)? else {
            let file = File::open(&final_path).map_err(|e| self.io(&final_path, e))?;
            return Ok(Box::new(PlainBlobStream(VerifyingReader::new(
                file, digest, size,
            )?)));
        };
        let mut on_disk = file.metadata().map_err(|e| self.io(&part_path, e))?.len();
        if on_disk > size {
            file.set_len(0).map_err(|e| self.io(&part_path, e))?;
            on_disk = 0;
        }
        if on_disk > 0 {
            tracing::info!("resuming the download of {digest} at byte {on_disk} of {size}");
        }
        let direct = (size >= self.direct_min)
            .then(|| crate::sys::DirectFile::open(&part_path).ok())
            .flatten()
            .map(|file| BlobDirect {
                file,
                buf: crate::sys::AlignedBuf::new(DIRECT_BLOB_BATCH),
                len: 0,
            });
        Ok(Box::new(DownloadStream {
            client,
            url: client.url(&format!("blobs/{digest}")),
            digest: digest.to_string(),
            size,
            part_path,
            final_path,
            file,
            on_disk,
            read: 0,
            hasher: Sha256::new(),
            body: None,
            skip: 0,
            use_range: true,
            attempt: 0,
            state: StreamState::Reading,
            writeback: crate::sys::Writeback::default(),
            direct,
        }))
    }
}

/// Where a [`DownloadStream`] stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamState {
    Reading,
    /// Read to the end, size and digest checked.
    Verified,
    /// Failed; `keep` says whether the partial file is worth continuing later.
    Failed {
        keep: bool,
    },
    /// Renamed into place.
    Committed,
}

/// A blob download read as it arrives (see [`BlobCache::open_stream`]).
///
/// `on_disk` bytes of the blob were received and stored: the partial file holds exactly the
/// first of them, the rest (at most one batch of a large blob, [`BlobDirect`]) are written
/// before the file is committed or kept; the first `read` of them were handed out and
/// hashed. Bytes an earlier run left are handed out first (read back from the file), then
/// the download continues from `on_disk` with a `Range` request; a dropped connection is
/// continued the same way, up to [`MAX_ATTEMPTS`] times.
struct DownloadStream<'a> {
    client: &'a Client,
    url: String,
    digest: String,
    size: u64,
    part_path: PathBuf,
    final_path: PathBuf,
    /// The locked partial file.
    file: Flock<File>,
    on_disk: u64,
    read: u64,
    hasher: Sha256,
    body: Option<ureq::BodyReader<'static>>,
    /// Bytes to drop from the start of `body` (a server that ignored the `Range`).
    skip: u64,
    use_range: bool,
    attempt: u32,
    state: StreamState,
    writeback: crate::sys::Writeback,
    direct: Option<BlobDirect>,
}

/// A large blob's bytes go to its partial file with `O_DIRECT`, in batches: the build reads
/// the blob once, as it arrives, and never from the file again, so copying 1.2 GiB of
/// compressed layers into the page cache only pushed the decoded layers out of it (and cost
/// fresh cache pages: see `sink`).
struct BlobDirect {
    /// The partial file opened again with `O_DIRECT`.
    file: crate::sys::DirectFile,
    buf: crate::sys::AlignedBuf,
    /// Bytes gathered in `buf`, the last ones of `on_disk`.
    len: usize,
}

/// Blobs of at least this many bytes are written with `O_DIRECT` ([`BlobDirect`]).
const DIRECT_BLOB_MIN: u64 = 64 << 20;
/// Bytes per direct write.
const DIRECT_BLOB_BATCH: usize = 4 << 20;

impl DownloadStream<'_> {
    /// Store received bytes `data` at `on_disk` (and count them there).
    fn store(&mut self, mut data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let align = crate::sys::DIRECT_ALIGN as u64;
        while !data.is_empty() {
            let Some(d) = self.direct.as_mut() else {
                self.file.write_all_at(data, self.on_disk)?;
                self.writeback
                    .wrote(&self.file, self.on_disk, data.len() as u64);
                self.on_disk += data.len() as u64;
                return Ok(());
            };
            if d.len == 0 && self.on_disk % align != 0 {
                // Continuing an odd-sized partial file: up to the next block boundary
                // through the page cache.
                let k = ((align - self.on_disk % align) as usize).min(data.len());
                self.file.write_all_at(&data[..k], self.on_disk)?;
                self.on_disk += k as u64;
                data = &data[k..];
                continue;
            }
            let k = (d.buf.len() - d.len).min(data.len());
            d.buf.as_bytes_mut()[d.len..d.len + k].copy_from_slice(&data[..k]);
            d.len += k;
            self.on_disk += k as u64;
            data = &data[k..];
            if d.len == d.buf.len() {
                let at = self.on_disk - d.len as u64;
                d.file.write_batch(&self.file, d.buf.as_bytes(), at)?;
                d.len = 0;
            }
        }
        Ok(())
    }

    /// Write the bytes still gathered for a direct write, so the partial file holds all
    /// `on_disk` bytes.
    fn store_pending(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if let Some(d) = self.direct.as_mut().filter(|d| d.len > 0) {
            let at = self.on_disk - d.len as u64;
            self.file.write_all_at(&d.buf.as_bytes()[..d.len], at)?;
            d.len = 0;
        }
        Ok(())
    }

    fn io_err(&self, e: io::Error) -> SourceError {
        SourceError::Io {
            path: self.part_path.clone(),
            source: e,
        }
    }

    /// Record the failure and turn it into the error `read` returns.
    fn fail(&mut self, e: SourceError, keep: bool) -> io::Error {
        self.body = None;
        self.state = StreamState::Failed { keep };
        e.into_io()
    }

    /// Start (or restart) the download at byte `on_disk`.
    fn connect(&mut self) -> io::Result<()> {
        loop {
            let from = self.on_disk;
            let range = (self.use_range && from > 0).then_some(from);
            let resp = match self.client.get(&self.url, None, range) {
                Ok(r) => r,
                // Unreachable after the client's own retries: keep what we have.
                Err(SourceError::RegistryUnreachable { registry, reason }) if from > 0 => {
                    let e = SourceError::RegistryUnreachable {
                        registry,
                        reason: self.kept(&reason),
                    };
                    return Err(self.fail(e, true));
                }
                Err(e) => return Err(self.fail(e, true)),
            };
            let status = resp.status().as_u16();
            match status {
                // The whole blob (asked for, or the server ignored the range): the first
                // `from` bytes are on disk already.
                200 => self.skip = from,
                206 => {
                    let start = resp
                        .headers()
                        .get("content-range")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes "))
                        .and_then(|v| v.split('-').next())
                        .and_then(|v| v.parse::<u64>().ok());
                    if start != Some(from) {
                        self.use_range = false;
                        continue;
                    }
                    self.skip = 0;
                }
                416 if range.is_some() => {
                    self.use_range = false;
                    continue;
                }
                _ => {
                    let body = read_limited(resp.into_body(), MAX_ERROR_BODY).unwrap_or_default();
                    let e = self
                        .client
                        .status_error("blob", &self.digest, status, &body);
                    return Err(self.fail(e, false));
                }
            }
            self.body = Some(resp.into_body().into_reader());
            return Ok(());
        }
    }

    /// The connection broke (or closed early): wait and continue, or give up keeping the
    /// partial file.
    fn interrupted(&mut self, reason: String) -> io::Result<()> {
        self.body = None;
        if self.attempt + 1 >= MAX_ATTEMPTS {
            let e = self.client.unreachable(self.kept(&reason));
            return Err(self.fail(e, true));
        }
        tracing::debug!(
            "blob {}: {reason}; continuing at byte {}",
            self.digest,
            self.on_disk
        );
        std::thread::sleep(backoff(self.attempt));
        self.attempt += 1;
        Ok(())
    }

    /// Why the download stopped, and what is kept of it.
    fn kept(&self, reason: &str) -> String {
        format!(
            "downloading blob {} failed ({reason}); {} of {} bytes are kept and the next run continues from there",
            self.digest, self.on_disk, self.size
        )
    }

    /// All `size` bytes were read: check the digest.
    fn finish(&mut self) -> io::Result<()> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if actual != self.digest {
            let e = SourceError::DigestMismatch {
                blob: self.digest.clone(),
                actual,
            };
            return Err(self.fail(e, false));
        }
        self.state = StreamState::Verified;
        Ok(())
    }
}

impl Read for DownloadStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        loop {
            match self.state {
                StreamState::Reading => {}
                StreamState::Verified | StreamState::Committed => return Ok(0),
                StreamState::Failed { .. } => {
                    return Err(io::Error::other(format!(
                        "reading blob {} failed before",
                        self.digest
                    )))
                }
            }
            if buf.is_empty() {
                return Ok(0);
            }
            // What an earlier run downloaded.
            if self.read < self.on_disk {
                let want = usize::try_from(self.on_disk - self.read)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let n = match self.file.read_at(&mut buf[..want], self.read) {
                    Ok(0) => {
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the partial file shrank while locked",
                        );
                        let e = self.io_err(e);
                        return Err(self.fail(e, false));
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let e = self.io_err(e);
                        return Err(self.fail(e, false));
                    }
                };
                self.hasher.update(&buf[..n]);
                self.read += n as u64;
                return Ok(n);
            }
            if self.read == self.size {
                self.finish()?;
                return Ok(0);
            }
            if self.body.is_none() {
                self.connect()?;
            }
            let Some(body) = self.body.as_mut() else {
                continue;
            };
            let mut n = match body.read(buf) {
                Ok(0) => {
                    let reason = format!(
                        "the connection closed after {} of {} bytes",
                        self.on_disk, self.size
                    );
                    self.interrupted(reason)?;
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.interrupted(e.to_string())?;
                    continue;
                }
            };
            if self.skip > 0 {
                let k = usize::try_from(self.skip).unwrap_or(usize::MAX).min(n);
                self.skip -= k as u64;
                if k == n {
                    continue;
                }
                buf.copy_within(k..n, 0);
                n -= k;
            }
            if self.on_disk + n as u64 > self.size {
                let e = SourceError::SizeMismatch {
                    blob: self.digest.clone(),
                    expected: self.size,
                    actual: "got more".to_string(),
                };
                return Err(self.fail(e, false));
            }
            if let Err(e) = self.store(&buf[..n]) {
                let e = self.io_err(e);
                return Err(self.fail(e, false));
            }
            self.hasher.update(&buf[..n]);
            self.read = self.on_disk;
            return Ok(n);
        }
    }
}

impl BlobStream for DownloadStream<'_> {
    fn commit(mut self: Box<Self>) -> Result<(), SourceError> {
        if self.state != StreamState::Verified {
            return Err(SourceError::BlobRead {
                blob: self.digest.clone(),
                source: io::Error::other("the blob was not read to its verified end"),
            });
        }
        self.store_pending().map_err(|e| self.io_err(e))?;
        self.file.sync_data().map_err(|e| self.io_err(e))?;
        fs::rename(&self.part_path, &self.final_path).map_err(|e| SourceError::Io {
            path: self.final_path.clone(),
            source: e,
        })?;
        self.state = StreamState::Committed;
        Ok(())
    }
}

impl Drop for DownloadStream<'_> {
    fn drop(&mut self) {
        // Uncommitted: nothing of it is trusted, unless the network cut it short. The file
        // is removed while still locked, so a process waiting for the lock starts afresh.
        match self.state {
            StreamState::Committed => {}
            StreamState::Failed { keep: true } => {
                if let Err(e) = self.store_pending() {
                    tracing::warn!("cannot write {}: {e}", self.part_path.display());
                }
            }
            StreamState::Reading | StreamState::Verified | StreamState::Failed { keep: false } => {
                if let Err(e) = fs::remove_file(&self.part_path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!("cannot remove {}: {e}", self.part_path.display());
                    }
                }
            }
        }
    }
}

/// An image in a registry.
pub struct RegistrySource {
    reference: String,
    name: DockerRef,
    client: Client,
    cache: BlobCache,
    /// The top-level manifest or index, fetched when the source is opened.
    top: Descriptor,
    /// Manifests fetched so far, by digest.
    manifests: Mutex<HashMap<String, Vec<u8>>>,
}

impl std::fmt::Debug for RegistrySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySource")
            .field("reference", &self.reference)
            .field("name", &self.name)
            .finish()
    }
}

impl RegistrySource {
    /// Connect to `name`'s registry and fetch its top-level manifest or index (so that an
    /// unknown repository or tag, bad credentials or an unreachable registry show here).
    pub fn open(
        reference: String,
        name: DockerRef,
        opts: &SourceOptions,
    ) -> Result<RegistrySource, SourceError> {
        let client = Client::new(&name, opts)?;
        let cache = BlobCache::new(&opts.cache_dir()?);
        let (media_type, raw, digest) = client.manifest(name.manifest_ref())?;
        let top = Descriptor {
            media_type,
            digest: digest.clone(),
            size: raw.len() as u64,
            platform: None,
            annotations: None,
        };
        let mut manifests = HashMap::new();
        manifests.insert(digest, raw);
        Ok(RegistrySource {
            reference,
            name,
            client,
            cache,
            top,
            manifests: Mutex::new(manifests),
        })
    }

    /// The normalised name.
    pub fn name(&self) -> &DockerRef {
        &self.name
    }

    /// The digest of the top-level manifest or index the reference names.
    pub fn top_digest(&self) -> &str {
        &self.top.digest
    }

    /// The blob cache this source downloads into.
    pub fn cache(&self) -> &BlobCache {
        &self.cache
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        match self.manifests.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Resolver for RegistrySource {
    fn reference_for_report(&self) -> String {
        self.reference.clone()
    }

    fn read_json_blob(
        &self,
        what: &str,
        desc: &Descriptor,
        limit: u64,
    ) -> Result<Vec<u8>, SourceError> {
        sha256_hex(&desc.digest)?;
        if desc.size > limit {
            return Err(SourceError::BlobTooLarge {
                blob: format!("{what} {}", desc.digest),
                size: desc.size,
                limit,
            });
        }
        if what == "config" {
            return super::read_blob_to_vec(self, &desc.digest, desc.size, limit);
        }
        if let Some(raw) = self.memo().get(&desc.digest) {
            return Ok(raw.clone());
        }
        let (_, raw, _) = self.client.manifest(&desc.digest)?;
        if raw.len() as u64 != desc.size {
            return Err(SourceError::SizeMismatch {
                blob: desc.digest.clone(),
                expected: desc.size,
                actual: format!("got {}", raw.len()),
            });
        }
        self.memo().insert(desc.digest.clone(), raw.clone());
        Ok(raw)
    }
}

impl ImageSource for RegistrySource {
    fn describe(&self) -> String {
        format!(
            "registry {} ({}://, repository {}, {})",
            self.name.registry,
            self.client.base.split("://").next().unwrap_or("https"),
            self.name.repository,
            match (&self.name.tag, &self.name.digest) {
                (_, Some(d)) => format!("digest {d}"),
                (Some(t), None) => format!("tag {t}"),
                (None, None) => "tag latest".to_string(),
            }
        )
    }

    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError> {
        let mut img = self.resolve_desc(&self.top, platform, 0)?;
        if !platform.matches(&img.platform) {
            tracing::warn!(
                "image {} is for {}, not the requested {platform}; using it anyway",
                img.manifest_digest,
                img.platform
            );
        }
        img.tags = self.name.tag.iter().cloned().collect();
        Ok(img)
    }

    fn open_blob(&self, digest: &str, size: u64) -> Result<Box<dyn Read + Send>, SourceError> {
        let path = self.cache.fetch(&self.client, digest, size)?;
        let file = File::open(&path).map_err(|e| SourceError::Io {
            path: path.clone(),
            source: e,
        })?;
        Ok(Box::new(VerifyingReader::new(file, digest, size)?))
    }

    fn open_blob_stream(
        &self,
        digest: &str,
        size: u64,
    ) -> Result<Box<dyn BlobStream + '_>, SourceError> {
        self.cache.open_stream(&self.client, digest, size)
    }

    fn fetch_parallelism(&self) -> Option<usize> {
        Some(PARALLEL_FETCHES)
    }
}

/// The media types asked for, for tests and reports.
pub const ACCEPTED_MANIFEST_TYPES: [&str; 4] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_lists_every_type() {
        for t in ACCEPTED_MANIFEST_TYPES {
            assert!(MANIFEST_ACCEPT.contains(t), "{t}");
        }
    }

    #[test]
    fn challenge_parsing_table() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/nginx:pull");
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
        let c =
            parse_challenge(r#"Bearer realm=http://x/t, service = svc , error="a\"b""#).unwrap();
        assert_eq!(c.params["realm"], "http://x/t");
        assert_eq!(c.params["service"], "svc");
        assert_eq!(c.params["error"], "a\"b");
        assert_eq!(parse_challenge("Basic").unwrap().params.len(), 0);
        assert!(parse_challenge("").is_none());
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
    }

    #[test]
    fn error_bodies() {
        let (code, msg) = error_message(
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#,
        );
        assert_eq!(code.as_deref(), Some("MANIFEST_UNKNOWN"));
        assert_eq!(msg, "manifest unknown");
        let (code, msg) = error_message(b"<html>\nbad gateway");
        assert!(code.is_none());
        assert_eq!(msg, "<html>");
        assert_eq!(error_message(b"").1, "(no details)");
    }

    #[test]
    fn plain_http_hosts() {
        let insecure = vec!["reg.lan:5000".to_string(), "http://other.lan/".to_string()];
        for (h, want) in [
            ("127.0.0.1:5000", true),
            ("localhost", true),
            ("[::1]:5000", true),
            ("reg.lan:5000", true),
            ("reg.lan:6000", false),
            ("other.lan", true),
            ("other.lan:443", true),
            ("docker.io", false),
        ] {
            assert_eq!(plain_http(h, &insecure), want, "{h}");
        }
    }

    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// One request as the mock saw it: request line, Authorization and Range headers.
    #[derive(Clone, Debug)]
    struct Seen {
        line: String,
        authorization: Option<String>,
        range: Option<String>,
    }

    type Handler = dyn Fn(&Seen, usize, &mut dyn Write) + Send + Sync;

    /// A one-request-per-connection HTTP server on loopback; the handler writes the raw
    /// response (and may stop half-way to simulate a dropped connection).
    struct Mock {
        addr: String,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    fn mock(handler: Box<Handler>) -> Mock {
        mock_limited(handler, usize::MAX)
    }

    /// A mock that answers `limit` connections and then closes its socket (later attempts
    /// to connect are refused).
    fn mock_limited(handler: Box<Handler>, limit: usize) -> Mock {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        let count = AtomicUsize::new(0);
        std::thread::spawn(move || {
            for conn in l.incoming().take(limit) {
                let Ok(mut conn) = conn else { break };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut req = Seen {
                    line: String::new(),
                    authorization: None,
                    range: None,
                };
                r.read_line(&mut req.line).unwrap_or(0);
                req.line = req.line.trim_end().to_string();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim_end().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.trim_end().split_once(':') {
                        match k.to_ascii_lowercase().as_str() {
                            "authorization" => req.authorization = Some(v.trim().to_string()),
                            "range" => req.range = Some(v.trim().to_string()),
                            _ => {}
                        }
                    }
                }
                seen2.lock().unwrap().push(req.clone());
                let n = count.fetch_add(1, Ordering::SeqCst);
                handler(&req, n, &mut conn);
                let _ = conn.flush();
            }
        });
        Mock { addr, seen }
    }

    fn respond(w: &mut dyn Write, status: &str, headers: &[(&str, String)], body: &[u8]) {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = w.write_all(head.as_bytes());
        let _ = w.write_all(body);
    }

    fn client(addr: &str, creds: Option<(&str, &str)>) -> Client {
        Client {
            agent: make_agent(&SourceOptions::default()).unwrap(),
            base: format!("http://{addr}"),
            registry: addr.to_string(),
            repository: "repo".to_string(),
            creds: creds.map(|(u, p)| Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }),
            auth: Mutex::new((AuthState::Anonymous, None)),
        }
    }

    #[test]
    fn bearer_token_flow_and_retries_on_5xx() {
        let manifest = br#"{"schemaVersion":2,"config":{},"layers":[]}"#.to_vec();
        let addr_cell: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
        let a2 = Arc::clone(&addr_cell);
        let m2 = manifest.clone();
        let good = format!("Basic {}", auth::base64_encode(b"u:p"));
        let m = mock(Box::new(move |req, n, w| {
            let addr = a2.lock().unwrap().clone();
            if req.line.starts_with("GET /token?") {
                if req.authorization.as_deref() == Some(good.as_str()) {
                    respond(w, "200 OK", &[], br#"{"token":"tok123"}"#);
                } else {
                    respond(w, "401 Unauthorized", &[], b"{}");
                }
            } else if n == 0 {
                respond(w, "503 Service Unavailable", &[], b"busy");
            } else if req.authorization.as_deref() != Some("Bearer tok123") {
                let ch = format!(
                    r#"Bearer realm="http://{addr}/token",service="mock",scope="repository:repo:pull""#
                );
                respond(w, "401 Unauthorized", &[("WWW-Authenticate", ch)], b"{}");
            } else {
                respond(
                    w,
                    "200 OK",
                    &[("Content-Type", OCI_MANIFEST.to_string())],
                    &m2,
                );
            }
        }));
        *addr_cell.lock().unwrap() = m.addr.clone();
        let c = client(&m.addr, Some(("u", "p")));
        let (mt, raw, digest) = c.manifest("t").unwrap();
        assert_eq!(mt.as_deref(), Some(OCI_MANIFEST));
        assert_eq!(raw, manifest);
        assert_eq!(digest, sha256_digest(&manifest));
        let seen = m.seen.lock().unwrap().clone();
        let lines: Vec<&str> = seen.iter().map(|s| s.line.as_str()).collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[0].starts_with("GET /v2/repo/manifests/t "),
            "{lines:?}"
        );
        assert!(
            lines[2].contains("scope=repository%3Arepo%3Apull")
                && lines[2].contains("service=mock"),
            "{lines:?}"
        );

        // Wrong credentials: the token service says no; the realm is named.
        let c = client(&m.addr, Some(("u", "wrong")));
        let e = c.manifest("t").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SourceError::RegistryAuth { .. }), "{msg}");
        assert!(
            msg.contains(&format!("realm http://{}/token", m.addr)) && msg.contains("user 'u'"),
            "{msg}"
        );
    }

    #[test]
    fn dropped_download_continues_with_a_range_request() {
        let data: Vec<u8> = (0..400_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let digest = sha256_digest(&data);
        let d2 = data.clone();
        let m = mock(Box::new(move |req, _n, w| {
            match req.range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                None => {
                    // Promise everything, deliver a third, drop the connection.
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        d2.len()
                    );
                    let _ = w.write_all(head.as_bytes());
                    let _ = w.write_all(&d2[..d2.len() / 3]);
                }
                Some(r) => {
                    let from: usize = r.trim_end_matches('-').parse().unwrap();
                    let range = format!("bytes {from}-{}/{}", d2.len() - 1, d2.len());
                    respond(
                        w,
                        "206 Partial Content",
                        &[("Content-Range", range)],
                        &d2[from..],
                    );
                }
            }
        }));
        let c = client(&m.addr, None);
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path());
        let path = cache.fetch(&c, &digest, data.len() as u64).unwrap();
        assert_eq!(fs::read(&path).unwrap(), data);
        assert!(!cache.partial_path(&digest).unwrap().exists());
        let seen = m.seen.lock().unwrap().clone();
        assert!(seen.len() >= 2, "{seen:?}");
        let range = seen[1].range.clone().unwrap_or_default();
        let from: u64 = range
            .trim_start_matches("bytes=")
            .trim_end_matches('-')
            .parse()
            .unwrap_or(0);
        assert!(from > 0 && from <= data.len() as u64 / 3, "{range}");
    }

    #[test]
    fn blob_redirects_are_followed() {
        let data = b"redirected blob content".to_vec();
        let digest = sha256_digest(&data);
        let d2 = data.clone();
        let port_cell: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
        let p2 = Arc::clone(&port_cell);
        let m = mock(Box::new(move |req, _n, w| {
            let port = p2.lock().unwrap().clone();
            if req.line.starts_with("GET /v2/repo/blobs/") {
                // First to the registry itself, then to "another host" (same server,
                // reached as localhost instead of 127.0.0.1).
                respond(
                    w,
                    "307 Temporary Redirect",
                    &[("Location", "/v2/redirected".to_string())],
                    b"",
                );
            } else if req.line.starts_with("GET /v2/redirected ") {
                respond(
                    w,
                    "302 Found",
                    &[(
                        "Location",
                        format!("http://localhost:{port}/storage/abc?sig=1"),
                    )],
                    b"",
                );
            } else if req.line.starts_with("GET /storage/abc?sig=1 ") {
                respond(w, "200 OK", &[], &d2);
            } else {
                respond(w, "404 Not Found", &[], b"");
            }
        }));
        *port_cell.lock().unwrap() = m.addr.rsplit(':').next().unwrap().to_string();
        let c = client(&m.addr, Some(("u", "p")));
        c.set_auth(AuthState::Basic, None);
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path());
        let path = cache.fetch(&c, &digest, data.len() as u64).unwrap();
        assert_eq!(fs::read(path).unwrap(), data);
        let seen = m.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen[0].authorization.is_some() && seen[1].authorization.is_some(),
            "{seen:?}"
        );
        // The other host does not get the registry credentials.
        assert!(seen[2].authorization.is_none(), "{seen:?}");
    }

    #[test]
    fn blob_with_wrong_content_is_not_kept() {
        let data = vec![42u8; 50_000];
        let digest = sha256_digest(b"something else entirely");
        let d2 = data.clone();
        let m = mock(Box::new(move |_req, _n, w| respond(w, "200 OK", &[], &d2)));
        let c = client(&m.addr, None);
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path());
        let e = cache.fetch(&c, &digest, data.len() as u64).unwrap_err();
        assert!(
            matches!(&e, SourceError::DigestMismatch { blob, actual } if *blob == digest && *actual == sha256_digest(&data)),
            "{e}"
        );
        assert!(!cache.path(&digest).unwrap().exists());
        assert!(!cache.partial_path(&digest).unwrap().exists());
        // Too long for the descriptor: a size error, nothing kept either.
        let e = cache.fetch(&c, &digest, 100).unwrap_err();
        assert!(matches!(e, SourceError::SizeMismatch { .. }), "{e}");
        assert!(!cache.partial_path(&digest).unwrap().exists());
    }

    // -----------------------------------------------------------------------------------------
    // Layers decoded while their blob downloads (`open_blob_stream`).

    use crate::layer::{LayerError, LayerStore};
    use crate::source::LayerInfo;
    use crate::testkit::{tar_of, Layer};

    /// A tar of a few MiB that compresses badly, so the blob spans many reads.
    fn noisy_tar() -> Vec<u8> {
        let mut data = Vec::with_capacity(3 << 20);
        let mut x: u32 = 7;
        while data.len() < (3 << 20) {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            data.extend_from_slice(&x.to_le_bytes());
            if x % 7 == 0 {
                data.extend_from_slice(b"repeated text ");
            }
        }
        tar_of(&[("noise", &data), ("small", b"small")])
    }

    /// A registry source on the mock at `addr` (no manifest fetched) caching in `cache`.
    fn stream_source(addr: &str, cache: &Path) -> RegistrySource {
        let name = DockerRef::parse(&format!("{addr}/repo:t")).unwrap();
        RegistrySource {
            reference: format!("docker://{addr}/repo:t"),
            name,
            client: client(addr, None),
            cache: BlobCache::new(cache),
            top: Descriptor {
                media_type: None,
                digest: sha256_digest(b"unused"),
                size: 6,
                platform: None,
                annotations: None,
            },
            manifests: Mutex::new(HashMap::new()),
        }
    }

    fn layer_info(l: &Layer) -> LayerInfo {
        LayerInfo {
            media_type: l.media_type.clone(),
            digest: sha256_digest(&l.blob),
            size: l.blob.len() as u64,
            diff_id: l.diff_id.clone(),
        }
    }

    /// Every file in the blob and layer caches (complete, partial and temporary).
    fn cache_files(cache: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for sub in ["blobs/sha256", "layers/sha256"] {
            if let Ok(rd) = fs::read_dir(cache.join(sub)) {
                for e in rd {
                    found.push(format!(
                        "{sub}/{}",
                        e.unwrap().file_name().to_string_lossy()
                    ));
                }
            }
        }
        found.sort();
        found
    }

    /// Promise the whole `blob`, send its first `cut` bytes, close the connection.
    fn serve_cut_off(blob: Vec<u8>, cut: usize) -> Box<Handler> {
        Box::new(move |_req, _n, w| {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                blob.len()
            );
            let _ = w.write_all(head.as_bytes());
            let _ = w.write_all(&blob[..cut]);
        })
    }

    /// A handler serving `blob` for every blob request, honouring `Range`.
    fn serve_blob(blob: Vec<u8>) -> Box<Handler> {
        Box::new(move |req, _n, w| {
            match req.range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                None => respond(w, "200 OK", &[], &blob),
                Some(r) => {
                    let from: usize = r.trim_end_matches('-').parse().unwrap();
                    let range = format!("bytes {from}-{}/{}", blob.len() - 1, blob.len());
                    respond(
                        w,
                        "206 Partial Content",
                        &[("Content-Range", range)],
                        &blob[from..],
                    );
                }
            }
        })
    }

    #[test]
    fn layer_decodes_while_its_blob_downloads() {
        for layer in [Layer::gzip(noisy_tar()), Layer::zstd(noisy_tar())] {
            let info = layer_info(&layer);
            assert!(layer.blob.len() > 2 << 20, "{}", layer.blob.len());
            let blob = layer.blob.clone();
            // The first answer breaks off after a third; the download continues with a
            // Range request, unnoticed by the decoder.
            let m = mock(Box::new(move |req, n, w| {
                if n == 0 {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        blob.len()
                    );
                    let _ = w.write_all(head.as_bytes());
                    let _ = w.write_all(&blob[..blob.len() / 3]);
                } else {
                    serve_blob(blob.clone())(req, n, w);
                }
            }));
            let dir = tempfile::tempdir().unwrap();
            let src = stream_source(&m.addr, dir.path());
            let store = LayerStore::new(dir.path());
            let path = store.uncompressed(&src, &info).unwrap();
            assert_eq!(
                fs::read(&path).unwrap(),
                layer.tar(),
                "{}",
                layer.media_type
            );
            assert_eq!(
                fs::read(src.cache.path(&info.digest).unwrap()).unwrap(),
                layer.blob
            );
            let hex = info.digest.trim_start_matches("sha256:");
            let diff_hex = info.diff_id.trim_start_matches("sha256:");
            assert_eq!(
                cache_files(dir.path()),
                [
                    format!("blobs/sha256/{hex}"),
                    format!("layers/sha256/{diff_hex}.tar")
                ]
            );
            let seen = m.seen.lock().unwrap().clone();
            assert_eq!(seen.len(), 2, "{seen:?}");
            let from = seen[1].range.clone().unwrap_or_default();
            assert!(from.starts_with("bytes=") && from != "bytes=0-", "{from}");

            // A second layer from the same (now cached) blob needs no download.
            fs::remove_file(&path).unwrap();
            assert_eq!(store.uncompressed(&src, &info).unwrap(), path);
            assert_eq!(m.seen.lock().unwrap().len(), 2);
        }
    }

    #[test]
    fn corrupt_blob_or_wrong_diff_id_leaves_nothing_in_the_cache() {
        let tar = noisy_tar();
        // (layer, blob the registry serves, wrong diff_id?)
        let gz = Layer::gzip(tar.clone());
        let plain = Layer::plain(tar.clone());
        let mut flipped_gz = gz.blob.clone();
        let n = flipped_gz.len();
        flipped_gz[n / 2] ^= 0xff;
        let mut flipped_plain = plain.blob.clone();
        flipped_plain[600] ^= 0xff;
        let cases = [
            ("gzip with a flipped byte", &gz, flipped_gz, false),
            ("plain with a flipped byte", &plain, flipped_plain, false),
            ("wrong diff_id", &gz, gz.blob.clone(), true),
        ];
        for (name, layer, served, wrong_diff_id) in cases {
            let mut info = layer_info(layer);
            if wrong_diff_id {
                info.diff_id = sha256_digest(b"another tar");
            }
            let m = mock(serve_blob(served.clone()));
            let dir = tempfile::tempdir().unwrap();
            let src = stream_source(&m.addr, dir.path());
            let e = LayerStore::new(dir.path())
                .uncompressed(&src, &info)
                .unwrap_err();
            assert!(e.to_string().contains(&info.digest), "{name}: {e}");
            match (name, &e) {
                (
                    "plain with a flipped byte",
                    LayerError::Source {
                        source: SourceError::DigestMismatch { blob, actual },
                        ..
                    },
                ) => {
                    assert_eq!(blob, &info.digest);
                    assert_eq!(actual, &sha256_digest(&served));
                }
                // The decoder may trip over the damage before the digest check.
                (
                    "gzip with a flipped byte",
                    LayerError::Corrupt { .. }
                    | LayerError::Source {
                        source: SourceError::DigestMismatch { .. },
                        ..
                    },
                ) => {}
                ("wrong diff_id", LayerError::DiffIdMismatch { expected, .. }) => {
                    assert_eq!(expected, &info.diff_id);
                }
                _ => panic!("{name}: unexpected error {e:?}"),
            }
            assert_eq!(cache_files(dir.path()), Vec::<String>::new(), "{name}");
        }
    }

    #[test]
    fn interrupted_streaming_download_is_kept_and_resumed() {
        let layer = Layer::gzip(noisy_tar());
        let info = layer_info(&layer);
        let half = layer.blob.len() / 2;
        // One connection that breaks off half-way; then the registry is gone.
        let m = mock_limited(serve_cut_off(layer.blob.clone(), half), 1);
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::new(dir.path());
        let src = stream_source(&m.addr, dir.path());
        let e = store.uncompressed(&src, &info).unwrap_err();
        assert!(
            matches!(
                &e,
                LayerError::Source {
                    source: SourceError::RegistryUnreachable { .. },
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&info.digest) && msg.contains(&format!("{half} of ")),
            "{msg}"
        );
        let part = src.cache.partial_path(&info.digest).unwrap();
        assert_eq!(fs::read(&part).unwrap(), &layer.blob[..half]);
        let hex = info.digest.trim_start_matches("sha256:");
        assert_eq!(
            cache_files(dir.path()),
            [format!("blobs/sha256/.partial-{hex}")]
        );

        // The next run reads the kept half back and asks only for the rest.
        let m = mock(serve_blob(layer.blob.clone()));
        let src = stream_source(&m.addr, dir.path());
        let path = store.uncompressed(&src, &info).unwrap();
        assert_eq!(fs::read(&path).unwrap(), layer.tar());
        let seen = m.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].range.as_deref(), Some(&*format!("bytes={half}-")));
        assert!(!part.exists());
        assert_eq!(
            fs::read(src.cache.path(&info.digest).unwrap()).unwrap(),
            layer.blob
        );
        assert_eq!(cache_files(dir.path()).len(), 2);
    }

    /// A large download (written with `O_DIRECT` in batches, here from any size) broken off
    /// at an odd offset keeps exactly the bytes received, batch not yet written included; the
    /// next run continues there (off a block boundary) and the blob is whole.
    #[test]
    fn direct_written_download_is_kept_exactly_and_resumed() {
        let data: Vec<u8> = (0..(10 << 20) + 1234u32)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let digest = sha256_digest(&data);
        let cut = (5 << 20) + 777;
        let m = mock_limited(serve_cut_off(data.clone(), cut), 1);
        let dir = tempfile::tempdir().unwrap();
        let probe = dir.path().join("probe");
        fs::write(&probe, b"").unwrap();
        if let Err(e) = crate::sys::open_direct(&probe) {
            eprintln!(
                "SKIP direct_written_download_is_kept_exactly_and_resumed: no O_DIRECT in {} ({e})",
                dir.path().display()
            );
            return;
        }
        let mut cache = BlobCache::new(dir.path());
        cache.direct_min = 0;
        let c = client(&m.addr, None);
        let e = cache.fetch(&c, &digest, data.len() as u64).unwrap_err();
        assert!(e.to_string().contains(&format!("{cut} of ")), "{e}");
        let part = cache.partial_path(&digest).unwrap();
        assert!(
            fs::read(&part).unwrap() == data[..cut],
            "the partial file is not the bytes received"
        );

        let m = mock(serve_blob(data.clone()));
        let c = client(&m.addr, None);
        let path = cache.fetch(&c, &digest, data.len() as u64).unwrap();
        assert!(fs::read(&path).unwrap() == data, "the blob is not whole");
        assert!(!part.exists());
        let seen = m.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].range.as_deref(), Some(&*format!("bytes={cut}-")));
    }

    #[test]
    fn server_ignoring_the_range_is_handled_while_streaming() {
        // A partial file from an earlier run; the server answers the Range with the whole
        // blob, whose first part is skipped.
        let layer = Layer::zstd(noisy_tar());
        let info = layer_info(&layer);
        let third = layer.blob.len() / 3;
        let dir = tempfile::tempdir().unwrap();
        let blob = layer.blob.clone();
        let m = mock(Box::new(move |_req, _n, w| {
            respond(w, "200 OK", &[], &blob)
        }));
        let src = stream_source(&m.addr, dir.path());
        let part = src.cache.partial_path(&info.digest).unwrap();
        fs::create_dir_all(part.parent().unwrap()).unwrap();
        fs::write(&part, &layer.blob[..third]).unwrap();
        let path = LayerStore::new(dir.path())
            .uncompressed(&src, &info)
            .unwrap();
        assert_eq!(fs::read(&path).unwrap(), layer.tar());
        assert_eq!(
            fs::read(src.cache.path(&info.digest).unwrap()).unwrap(),
            layer.blob
        );
        assert!(!part.exists());
        let seen = m.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].range.as_deref(), Some(&*format!("bytes={third}-")));

        // A partial file with garbage: the damage is found, nothing is kept.
        let dir = tempfile::tempdir().unwrap();
        let src = stream_source(&m.addr, dir.path());
        let part = src.cache.partial_path(&info.digest).unwrap();
        fs::create_dir_all(part.parent().unwrap()).unwrap();
        fs::write(&part, vec![0u8; third]).unwrap();
        let e = LayerStore::new(dir.path())
            .uncompressed(&src, &info)
            .unwrap_err();
        assert!(e.to_string().contains(&info.digest), "{e}");
        assert_eq!(cache_files(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn committing_a_stream_before_its_end_is_refused() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let digest = sha256_digest(&data);
        let m = mock(serve_blob(data.clone()));
        let c = client(&m.addr, None);
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path());
        let mut stream = cache.open_stream(&c, &digest, data.len() as u64).unwrap();
        let mut start = vec![0u8; 1000];
        stream.read_exact(&mut start).unwrap();
        assert_eq!(start, data[..1000]);
        let e = stream.commit().unwrap_err();
        assert!(
            matches!(&e, SourceError::BlobRead { blob, .. } if *blob == digest),
            "{e}"
        );
        // Nothing verified, nothing kept.
        assert_eq!(cache_files(dir.path()), Vec::<String>::new());

        // Read to the end, committed: in the cache, and later opens read it from there.
        let mut stream = cache.open_stream(&c, &digest, data.len() as u64).unwrap();
        let mut all = Vec::new();
        stream.read_to_end(&mut all).unwrap();
        assert_eq!(all, data);
        stream.commit().unwrap();
        assert_eq!(fs::read(cache.path(&digest).unwrap()).unwrap(), data);
        let requests = m.seen.lock().unwrap().len();
        let mut stream = cache.open_stream(&c, &digest, data.len() as u64).unwrap();
        all.clear();
        stream.read_to_end(&mut all).unwrap();
        assert_eq!(all, data);
        stream.commit().unwrap();
        assert_eq!(m.seen.lock().unwrap().len(), requests);
    }

    #[test]
    fn bad_ca_file_is_reported() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "not a certificate").unwrap();
        let e = tls_config(Some(f.path())).unwrap_err();
        assert!(matches!(e, SourceError::BadCaFile { .. }), "{e}");
        assert!(e.to_string().contains(&f.path().display().to_string()));
    }
}
