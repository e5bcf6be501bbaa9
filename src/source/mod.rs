//! Image sources: resolve a reference to a manifest, config and layer list, and read blobs
//! with their digests verified.
//!
//! A reference (see [`reference::ImageRef`]) names a transport and a location. [`open`] parses
//! it and returns an [`ImageSource`], which resolves the image for a [`Platform`] into a
//! [`ResolvedImage`] and hands out blob readers that check the sha256 digest and the size of
//! every byte they return ([`VerifyingReader`]).
//!
//! Sources: OCI layouts and their tar archives ([`oci_layout`]), `docker save` archives
//! ([`docker_archive`]), registries speaking the distribution API ([`registry`], with
//! [`auth`]), and the Docker Engine API ([`daemon`]). Docker-style names are normalised in
//! [`normalize`].

pub mod archive;
pub mod auth;
pub mod daemon;
pub mod docker_archive;
pub mod normalize;
pub mod oci_layout;
pub mod reference;
pub mod registry;

use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use thiserror::Error;

pub use daemon::DaemonSource;
pub use docker_archive::DockerArchiveSource;
pub use normalize::DockerRef;
pub use oci_layout::OciLayoutSource;
pub use reference::ImageRef;
pub use registry::RegistrySource;

/// Errors from resolving images and reading their blobs.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error("invalid image reference '{reference}': {reason}")]
    BadReference { reference: String, reason: String },
    #[error(
        "transport '{transport}' is not supported (reference '{reference}'); use docker://, docker-daemon:, oci:, oci-archive: or docker-archive:"
    )]
    UnsupportedTransport {
        transport: String,
        reference: String,
    },
    #[error("{} is not an OCI image layout: {reason}", dir.display())]
    NotALayout { dir: PathBuf, reason: String },
    #[error("the OCI layout {} contains no images", dir.display())]
    EmptyLayout { dir: PathBuf },
    #[error("tag '{tag}' not found in {}; available tags: {}", dir.display(), list_or_none(available))]
    UnknownTag {
        dir: PathBuf,
        tag: String,
        available: Vec<String>,
    },
    #[error("{} holds several images and none is tagged 'latest'; pick one with oci:DIR:TAG (available tags: {})", dir.display(), list_or_none(available))]
    NoDefaultTag {
        dir: PathBuf,
        available: Vec<String>,
    },
    #[error(
        "no image for platform {wanted} in {blob}; platforms present: {}",
        list_or_none(available)
    )]
    PlatformNotFound {
        wanted: String,
        blob: String,
        available: Vec<String>,
    },
    #[error("invalid platform '{platform}': {reason}")]
    BadPlatform { platform: String, reason: String },
    #[error("blob {blob} is corrupt: its content has digest {actual}")]
    DigestMismatch { blob: String, actual: String },
    #[error("blob {blob} has the wrong size: expected {expected} bytes, {actual}")]
    SizeMismatch {
        blob: String,
        expected: u64,
        actual: String,
    },
    #[error("invalid digest '{digest}': {reason}")]
    BadDigest { digest: String, reason: String },
    #[error("unsupported digest algorithm in '{digest}': only sha256 is supported")]
    UnsupportedDigest { digest: String },
    #[error("unsupported media type '{media_type}' for blob {blob}")]
    UnsupportedMediaType { media_type: String, blob: String },
    #[error("blob {blob} is missing from {}", path.display())]
    BlobMissing { blob: String, path: PathBuf },
    #[error("blob {blob} is too large to be read into memory ({size} bytes, limit {limit})")]
    BlobTooLarge { blob: String, size: u64, limit: u64 },
    #[error("image indexes nested too deeply (more than {limit} levels) at {blob}")]
    IndexTooDeep { blob: String, limit: usize },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read blob {blob}: {source}")]
    BlobRead {
        blob: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid JSON in {blob}: {source}")]
    Json {
        blob: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} is not a usable archive: {reason}", path.display())]
    BadArchive { path: PathBuf, reason: String },
    #[error("{} has no image named {wanted}; images present: {}", path.display(), list_or_none(available))]
    ArchiveImageNotFound {
        path: PathBuf,
        wanted: String,
        available: Vec<String>,
    },
    #[error("{} holds several images ({}); name one with docker-archive:FILE:REF", path.display(), list_or_none(available))]
    ArchiveAmbiguous {
        path: PathBuf,
        available: Vec<String>,
    },
    #[error("cannot reach registry {registry}: {reason}")]
    RegistryUnreachable { registry: String, reason: String },
    #[error("registry {registry} refused the credentials{}: {reason}", realm.as_ref().map(|r| format!(" (realm {r})")).unwrap_or_default())]
    RegistryAuth {
        registry: String,
        realm: Option<String>,
        reason: String,
    },
    #[error("repository {repository} not found on registry {registry} (or access denied)")]
    RepositoryNotFound {
        registry: String,
        repository: String,
    },
    #[error("manifest {reference} not found in repository {repository} on registry {registry}; tags present: {}", list_or_none(available))]
    ManifestNotFound {
        registry: String,
        repository: String,
        reference: String,
        available: Vec<String>,
    },
    #[error("registry {registry} answered {status} to {what}: {message}")]
    RegistryHttp {
        registry: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error("cannot read registry credentials from {}: {reason}", path.display())]
    AuthConfig { path: PathBuf, reason: String },
    #[error("credential helper docker-credential-{helper} failed for {registry}: {reason}")]
    CredentialHelper {
        helper: String,
        registry: String,
        reason: String,
    },
    #[error("cannot read the CA certificates {}: {reason}", path.display())]
    BadCaFile { path: PathBuf, reason: String },
    #[error("cannot reach the Docker daemon at {socket}: {reason}")]
    DaemonUnavailable { socket: String, reason: String },
    #[error("the Docker daemon at {socket} has no image {reference}")]
    DaemonImageNotFound { socket: String, reference: String },
    #[error("the Docker daemon at {socket} answered {status} to {what}: {message}")]
    DaemonHttp {
        socket: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error(
        "{reference} is not in the Docker daemon at {socket}, and from the registry: {registry}"
    )]
    NotFoundAnywhere {
        reference: String,
        socket: String,
        registry: Box<SourceError>,
    },
    #[error("image config {config} lists {diff_ids} layer diff_ids but manifest {manifest} has {layers} layers")]
    LayerCountMismatch {
        manifest: String,
        config: String,
        layers: usize,
        diff_ids: usize,
    },
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_string()
    } else {
        items.join(", ")
    }
}

impl SourceError {
    /// Turn an error from reading blob `blob` (typically through a [`VerifyingReader`] or a
    /// [`BlobStream`]) into the matching variant: a [`BlobVerifyError`] becomes
    /// `DigestMismatch` or `SizeMismatch`, a carried `SourceError` is returned as it is,
    /// anything else becomes `BlobRead`.
    pub fn from_blob_read(blob: &str, err: io::Error) -> SourceError {
        match source_error_in(err) {
            Ok(e) => e,
            Err(err) => SourceError::BlobRead {
                blob: blob.to_string(),
                source: err,
            },
        }
    }

    /// Wrap this error in an `io::Error` (for a blob reader to return);
    /// [`source_error_in`] takes it out again. Verification failures get the kind
    /// `InvalidData`.
    pub fn into_io(self) -> io::Error {
        let kind = match self {
            SourceError::DigestMismatch { .. } | SourceError::SizeMismatch { .. } => {
                io::ErrorKind::InvalidData
            }
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// The source's own error inside an error returned by a blob reader: a [`BlobVerifyError`]
/// (as the matching `SourceError`) or a `SourceError` wrapped by [`SourceError::into_io`].
/// Other errors (from a decoder reading the blob, say) are handed back unchanged.
pub fn source_error_in(err: io::Error) -> Result<SourceError, io::Error> {
    if let Some(v) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<BlobVerifyError>())
    {
        return Ok(v.to_source_error());
    }
    err.downcast::<SourceError>()
}

// ---------------------------------------------------------------------------------------------
// Platforms

/// An OCI platform: `os/architecture[/variant]` with OCI (Go) names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parse `os/arch` or `os/arch/variant`.
    pub fn parse(s: &str) -> Result<Platform, SourceError> {
        let bad = |reason: &str| SourceError::BadPlatform {
            platform: s.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() < 2 || parts.len() > 3 {
            return Err(bad("expected os/arch or os/arch/variant, e.g. linux/amd64"));
        }
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("empty component"));
        }
        if parts.iter().any(|p| {
            !p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        }) {
            return Err(bad(
                "components may contain only letters, digits, '_' and '.'",
            ));
        }
        Ok(Platform {
            os: parts[0].to_ascii_lowercase(),
            architecture: parts[1].to_ascii_lowercase(),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }

    /// The platform this program runs on, with OCI architecture names.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            os: "linux".to_string(),
            architecture: architecture.to_string(),
            variant: None,
        }
    }

    /// Whether an image for `candidate` satisfies a request for `self`: os and architecture
    /// are equal and, if `self` names a variant, the candidate has that variant (an arm64
    /// image without a variant counts as `v8`).
    pub fn matches(&self, candidate: &Platform) -> bool {
        if self.os != candidate.os || self.architecture != candidate.architecture {
            return false;
        }
        match (&self.variant, &candidate.variant) {
            (None, _) => true,
            (Some(w), Some(c)) => w == c,
            (Some(w), None) => self.architecture == "arm64" && w == "v8",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = SourceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Resolved images

/// One layer of a resolved image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    pub media_type: String,
    /// Digest of the (possibly compressed) blob, `sha256:<hex>`.
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar, from the config's `rootfs.diff_ids`.
    pub diff_id: String,
}

/// An image resolved down to one platform-specific manifest.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// The reference as the user gave it.
    pub reference: String,
    pub manifest_digest: String,
    pub manifest_media_type: String,
    /// The image's platform (from the index entry that selected it, else from its config).
    pub platform: Platform,
    pub config_digest: String,
    /// The config blob exactly as stored.
    pub config_raw: Vec<u8>,
    pub config: oci_spec::image::ImageConfiguration,
    /// Layers in application order (base first).
    pub layers: Vec<LayerInfo>,
    /// Tags in the source that name the selected top-level descriptor (may be empty).
    pub tags: Vec<String>,
}

/// A blob opened for one pass with [`ImageSource::open_blob_stream`].
///
/// It reads like the reader of [`ImageSource::open_blob`]: at the end of the data it fails
/// (with a [`BlobVerifyError`] or a [`SourceError`] inside the `io::Error`, see
/// [`source_error_in`]) unless the size and digest match. A source that keeps a copy of what
/// passes through (the registry's download cache) keeps it only when [`BlobStream::commit`]
/// is called; dropping the stream uncommitted throws the copy away, except a download cut
/// short by the network, which is kept so the next run can continue it.
pub trait BlobStream: Read + Send {
    /// Make the copy kept while reading permanent (durable first, then visible). Call it
    /// once the reader has returned the end of the data (so the blob was verified) and what
    /// was derived from it checked out; committing before the end is an error.
    fn commit(self: Box<Self>) -> Result<(), SourceError>;
}

/// A [`BlobStream`] over a reader that keeps nothing: committing does nothing.
pub struct PlainBlobStream<R>(pub R);

impl<R: Read> Read for PlainBlobStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read + Send> BlobStream for PlainBlobStream<R> {
    fn commit(self: Box<Self>) -> Result<(), SourceError> {
        Ok(())
    }
}

/// Somewhere images come from.
pub trait ImageSource: Send + Sync {
    /// A short human description, e.g. `OCI layout /srv/img (tag latest)`.
    fn describe(&self) -> String;
    /// Resolve the image for `platform`.
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError>;
    /// Open blob `digest` of `size` bytes; the reader fails with an `InvalidData` error
    /// carrying a [`BlobVerifyError`] at the end if the content does not match.
    fn open_blob(&self, digest: &str, size: u64) -> Result<Box<dyn Read + Send>, SourceError>;
    /// Open blob `digest` of `size` bytes for a single pass that derives something from it
    /// (a decoded layer); see [`BlobStream`]. A source that fetches blobs into a cache may
    /// hand out the bytes as they arrive instead of fetching the whole blob first. The
    /// default is [`ImageSource::open_blob`], with nothing to commit.
    fn open_blob_stream(
        &self,
        digest: &str,
        size: u64,
    ) -> Result<Box<dyn BlobStream + '_>, SourceError> {
        Ok(Box::new(PlainBlobStream(self.open_blob(digest, size)?)))
    }
    /// How many blobs are best fetched at once (network sources gain from more than the
    /// number of CPUs); `None` means one per CPU.
    fn fetch_parallelism(&self) -> Option<usize> {
        None
    }
}

/// Settings for the sources that reach out of the local filesystem.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    /// The cache directory: registry blobs go to `<dir>/blobs/sha256/`, Docker daemon exports
    /// to `<dir>/tmp/`. `None` means the layer store's default directory.
    pub cache_dir: Option<PathBuf>,
    /// Registries (`host[:port]`) reached over plain HTTP; loopback hosts always are.
    pub insecure_registries: Vec<String>,
    /// Extra CA certificates (PEM) trusted for registries, besides the system's.
    pub registry_ca: Option<PathBuf>,
    /// The Docker daemon socket (`unix:///path` or a path); `None` means `$DOCKER_HOST`, else
    /// `/var/run/docker.sock`.
    pub docker_host: Option<String>,
}

impl SourceOptions {
    /// Options from the environment: `FLEDGE_INSECURE_REGISTRIES` (comma- or
    /// space-separated hosts), `FLEDGE_REGISTRY_CA`, `DOCKER_HOST`.
    pub fn from_env() -> SourceOptions {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        SourceOptions {
            cache_dir: None,
            insecure_registries: var("FLEDGE_INSECURE_REGISTRIES")
                .map(|v| {
                    v.split([',', ' '])
                        .filter(|h| !h.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            registry_ca: var("FLEDGE_REGISTRY_CA").map(PathBuf::from),
            docker_host: var("DOCKER_HOST"),
        }
    }

    /// The cache directory to use.
    pub fn cache_dir(&self) -> Result<PathBuf, SourceError> {
        match &self.cache_dir {
            Some(d) => Ok(d.clone()),
            None => crate::cache::default_dir().map_err(|e| SourceError::Io {
                path: PathBuf::from("(cache directory)"),
                source: io::Error::new(io::ErrorKind::NotFound, e.to_string()),
            }),
        }
    }
}

/// Parse `reference` and open the source it names, with options from the environment.
pub fn open(reference: &str) -> Result<Box<dyn ImageSource>, SourceError> {
    open_with(reference, &SourceOptions::from_env())
}

/// Parse `reference` and open the source it names. A bare Docker name is looked up in the
/// Docker daemon first and then in its registry; which one served it is logged and shown by
/// [`ImageSource::describe`].
pub fn open_with(
    reference: &str,
    opts: &SourceOptions,
) -> Result<Box<dyn ImageSource>, SourceError> {
    let src: Box<dyn ImageSource> = match ImageRef::parse(reference)? {
        ImageRef::OciLayout { dir, tag } => {
            Box::new(OciLayoutSource::open(reference.to_string(), dir, tag)?)
        }
        ImageRef::OciArchive { file, tag } => Box::new(OciLayoutSource::open_archive(
            reference.to_string(),
            file,
            tag,
        )?),
        ImageRef::DockerArchive { file, reference: r } => Box::new(DockerArchiveSource::open(
            reference.to_string(),
            &file,
            r.as_ref(),
        )?),
        ImageRef::Registry(r) => Box::new(RegistrySource::open(reference.to_string(), r, opts)?),
        ImageRef::DockerDaemon(r) => Box::new(DaemonSource::open(reference.to_string(), &r, opts)?),
        ImageRef::Bare(r) => open_bare(reference, r, opts)?,
    };
    tracing::info!("{reference}: using {}", src.describe());
    Ok(src)
}

/// The daemon if it is there and has the image, else the registry.
fn open_bare(
    reference: &str,
    r: DockerRef,
    opts: &SourceOptions,
) -> Result<Box<dyn ImageSource>, SourceError> {
    let missing_in = match DaemonSource::open(reference.to_string(), &r, opts) {
        Ok(d) => return Ok(Box::new(d)),
        // No daemon here: the registry is the only place to look.
        Err(e @ SourceError::DaemonUnavailable { .. }) => {
            tracing::debug!("{reference}: {e}; trying the registry");
            None
        }
        Err(SourceError::DaemonImageNotFound { socket, .. }) => {
            tracing::info!(
                "{reference}: not in the Docker daemon at {socket}; trying the registry"
            );
            Some(socket)
        }
        Err(e) => return Err(e),
    };
    match (
        RegistrySource::open(reference.to_string(), r, opts),
        missing_in,
    ) {
        (Ok(s), _) => Ok(Box::new(s)),
        (Err(e), None) => Err(e),
        (Err(e), Some(socket)) => Err(SourceError::NotFoundAnywhere {
            reference: reference.to_string(),
            socket,
            registry: Box::new(e),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Digests and verification

/// Check that `digest` is `sha256:` followed by 64 lowercase hex digits and return the hex
/// part (safe to use as a file name).
pub fn sha256_hex(digest: &str) -> Result<&str, SourceError> {
    let Some((algo, hex)) = digest.split_once(':') else {
        return Err(SourceError::BadDigest {
            digest: digest.to_string(),
            reason: "expected algorithm:hex".to_string(),
        });
    };
    if algo != "sha256" {
        let valid_algo = !algo.is_empty()
            && algo
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
        if valid_algo {
            return Err(SourceError::UnsupportedDigest {
                digest: digest.to_string(),
            });
        }
        return Err(SourceError::BadDigest {
            digest: digest.to_string(),
            reason: "invalid algorithm".to_string(),
        });
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(SourceError::BadDigest {
            digest: digest.to_string(),
            reason: "a sha256 digest is 64 lowercase hex digits".to_string(),
        });
    }
    Ok(hex)
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Why a blob failed verification; carried inside the `io::Error` of a [`VerifyingReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobVerifyError {
    /// The content has the right size but another digest.
    Digest { blob: String, actual: String },
    /// The content ended before `expected` bytes (`actual` read, with digest `actual_digest`).
    Short {
        blob: String,
        expected: u64,
        actual: u64,
        actual_digest: String,
    },
    /// The content goes on past `expected` bytes.
    Long { blob: String, expected: u64 },
}

impl BlobVerifyError {
    pub fn to_source_error(&self) -> SourceError {
        match self {
            BlobVerifyError::Digest { blob, actual } => SourceError::DigestMismatch {
                blob: blob.clone(),
                actual: actual.clone(),
            },
            BlobVerifyError::Short {
                blob,
                expected,
                actual,
                actual_digest,
            } => SourceError::SizeMismatch {
                blob: blob.clone(),
                expected: *expected,
                actual: format!("got only {actual} (digest {actual_digest})"),
            },
            BlobVerifyError::Long { blob, expected } => SourceError::SizeMismatch {
                blob: blob.clone(),
                expected: *expected,
                actual: "got more".to_string(),
            },
        }
    }
}

impl fmt::Display for BlobVerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_source_error())
    }
}

impl std::error::Error for BlobVerifyError {}

/// A reader that hashes and counts what passes through and, at the end of the data, fails
/// with `InvalidData` (wrapping a [`BlobVerifyError`]) unless exactly `size` bytes with digest
/// `digest` were read. Data beyond `size` is an error as soon as it is seen.
pub struct VerifyingReader<R> {
    inner: R,
    digest: String,
    expected_hex: String,
    size: u64,
    read: u64,
    hasher: Sha256,
    verified: bool,
}

impl<R: Read> VerifyingReader<R> {
    /// `digest` must be a valid sha256 digest (see [`sha256_hex`]).
    pub fn new(inner: R, digest: &str, size: u64) -> Result<Self, SourceError> {
        let hex = sha256_hex(digest)?.to_string();
        Ok(VerifyingReader {
            inner,
            digest: digest.to_string(),
            expected_hex: hex,
            size,
            read: 0,
            hasher: Sha256::new(),
            verified: false,
        })
    }

    fn fail(&self, e: BlobVerifyError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    fn finish(&mut self) -> io::Result<()> {
        let actual_hex = hex::encode(self.hasher.clone().finalize());
        if self.read != self.size {
            return Err(self.fail(BlobVerifyError::Short {
                blob: self.digest.clone(),
                expected: self.size,
                actual: self.read,
                actual_digest: format!("sha256:{actual_hex}"),
            }));
        }
        if actual_hex != self.expected_hex {
            return Err(self.fail(BlobVerifyError::Digest {
                blob: self.digest.clone(),
                actual: format!("sha256:{actual_hex}"),
            }));
        }
        self.verified = true;
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.verified || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.finish()?;
            return Ok(0);
        }
        self.read = self.read.saturating_add(n as u64);
        if self.read > self.size {
            return Err(self.fail(BlobVerifyError::Long {
                blob: self.digest.clone(),
                expected: self.size,
            }));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Read a whole verified blob into memory, refusing blobs larger than `limit`.
pub fn read_blob_to_vec(
    src: &dyn ImageSource,
    digest: &str,
    size: u64,
    limit: u64,
) -> Result<Vec<u8>, SourceError> {
    if size > limit {
        return Err(SourceError::BlobTooLarge {
            blob: digest.to_string(),
            size,
            limit,
        });
    }
    let mut reader = src.open_blob(digest, size)?;
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    reader
        .read_to_end(&mut data)
        .map_err(|e| SourceError::from_blob_read(digest, e))?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_parse_display_table() {
        let ok = [
            ("linux/amd64", "linux", "amd64", None),
            ("linux/arm64/v8", "linux", "arm64", Some("v8")),
            ("Linux/ARM/v7", "linux", "arm", Some("v7")),
        ];
        for (s, os, arch, var) in ok {
            let p = Platform::parse(s).unwrap();
            assert_eq!(p.os, os, "{s}");
            assert_eq!(p.architecture, arch, "{s}");
            assert_eq!(p.variant.as_deref(), var, "{s}");
            assert_eq!(p.to_string(), s.to_ascii_lowercase());
        }
        for bad in [
            "",
            "linux",
            "linux/",
            "/amd64",
            "linux/amd64/v8/x",
            "linux/am d64",
        ] {
            let e = Platform::parse(bad).unwrap_err();
            assert!(
                matches!(e, SourceError::BadPlatform { ref platform, .. } if platform == bad),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn platform_host_is_linux_oci_name() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        assert!(!["x86_64", "aarch64", "x86", "powerpc64"].contains(&h.architecture.as_str()));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(h.architecture, "amd64");
        }
    }

    #[test]
    fn platform_matching_table() {
        let p = |s: &str| Platform::parse(s).unwrap();
        let cases = [
            ("linux/amd64", "linux/amd64", true),
            ("linux/amd64", "linux/arm64", false),
            ("linux/amd64", "windows/amd64", false),
            ("linux/arm64", "linux/arm64/v8", true),
            ("linux/arm64/v8", "linux/arm64", true),
            ("linux/arm64/v8", "linux/arm64/v8", true),
            ("linux/arm/v7", "linux/arm/v6", false),
            ("linux/arm/v7", "linux/arm", false),
            ("linux/arm", "linux/arm/v7", true),
        ];
        for (want, cand, expect) in cases {
            assert_eq!(p(want).matches(&p(cand)), expect, "{want} vs {cand}");
        }
    }

    #[test]
    fn digest_validation_table() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(sha256_hex(&good).unwrap(), "a".repeat(64));
        let cases = [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:../../{}", "a".repeat(58)),
            "sha256:".to_string(),
            "nocolon".to_string(),
            format!(":{}", "a".repeat(64)),
        ];
        for c in &cases {
            assert!(
                matches!(sha256_hex(c), Err(SourceError::BadDigest { .. })),
                "{c}"
            );
        }
        let e = sha256_hex(&format!("sha512:{}", "a".repeat(128))).unwrap_err();
        assert!(matches!(e, SourceError::UnsupportedDigest { .. }), "{e}");
        assert!(e.to_string().contains("only sha256"));
    }

    fn read_all(data: &[u8], digest: &str, size: u64) -> io::Result<Vec<u8>> {
        let mut r = VerifyingReader::new(data, digest, size).unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    fn verify_err(e: io::Error) -> BlobVerifyError {
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        e.get_ref()
            .and_then(|e| e.downcast_ref::<BlobVerifyError>())
            .cloned()
            .unwrap()
    }

    #[test]
    fn source_errors_travel_through_io_errors() {
        let blob = sha256_digest(b"x");
        let cases: [(SourceError, io::ErrorKind); 3] = [
            (
                SourceError::DigestMismatch {
                    blob: blob.clone(),
                    actual: sha256_digest(b"y"),
                },
                io::ErrorKind::InvalidData,
            ),
            (
                SourceError::SizeMismatch {
                    blob: blob.clone(),
                    expected: 3,
                    actual: "got more".to_string(),
                },
                io::ErrorKind::InvalidData,
            ),
            (
                SourceError::RegistryUnreachable {
                    registry: "r.example".to_string(),
                    reason: "connection refused".to_string(),
                },
                io::ErrorKind::Other,
            ),
        ];
        for (e, kind) in cases {
            let text = e.to_string();
            let io = e.into_io();
            assert_eq!(io.kind(), kind, "{text}");
            let back = SourceError::from_blob_read(&blob, io);
            assert_eq!(back.to_string(), text);
        }
        // Other errors stay what they are.
        let plain = io::Error::new(io::ErrorKind::UnexpectedEof, "short gzip");
        let e = source_error_in(plain).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(matches!(
            SourceError::from_blob_read(&blob, e),
            SourceError::BlobRead { .. }
        ));
    }

    #[test]
    fn verifying_reader_accepts_and_rejects() {
        let data = b"hello world";
        let d = sha256_digest(data);
        assert_eq!(read_all(data, &d, 11).unwrap(), data);

        let other = sha256_digest(b"other");
        let e = verify_err(read_all(data, &other, 11).unwrap_err());
        assert_eq!(
            e,
            BlobVerifyError::Digest {
                blob: other.clone(),
                actual: d.clone()
            }
        );
        let msg = e.to_string();
        assert!(msg.contains(&other) && msg.contains(&d), "{msg}");

        let e = verify_err(read_all(data, &d, 12).unwrap_err());
        assert!(
            matches!(e, BlobVerifyError::Short { actual: 11, .. }),
            "{e:?}"
        );
        let e = verify_err(read_all(data, &d, 5).unwrap_err());
        assert!(
            matches!(e, BlobVerifyError::Long { expected: 5, .. }),
            "{e:?}"
        );

        let mapped = SourceError::from_blob_read(&other, {
            let mut r = VerifyingReader::new(&data[..], &other, 11).unwrap();
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap_err()
        });
        assert!(
            matches!(mapped, SourceError::DigestMismatch { ref blob, ref actual } if *blob == other && *actual == d)
        );
    }
}
