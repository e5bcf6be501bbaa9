//! The crate-wide error: one variant per module error, so the CLI can print the whole chain
//! once, plus a hint where there is an obvious remedy.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Layer(#[from] crate::layer::LayerError),
    #[error(transparent)]
    Merge(#[from] crate::merge::MergeError),
    #[error(transparent)]
    Fuse(#[from] crate::fusefs::FuseError),
    #[error(transparent)]
    Mapping(#[from] crate::mapping::MappingError),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error(transparent)]
    Run(#[from] crate::runner::RunError),
    #[error(transparent)]
    Build(#[from] crate::output::BuildError),
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// A one-line hint for the user, when the error has an obvious remedy.
    pub fn hint(&self) -> Option<String> {
        use crate::source::SourceError as S;
        match self {
            Error::Config(e) => e.hint().map(str::to_string),
            Error::Source(e) | Error::Layer(crate::layer::LayerError::Source { source: e, .. }) => {
                match e {
                    S::BadReference { .. } | S::UnsupportedTransport { .. } => Some(
                        "name images as Docker does (nginx:alpine, host:5000/app:tag) or with a transport: docker://REF, docker-daemon:REF, oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:REF]".into(),
                    ),
                    S::UnknownTag { .. } | S::NoDefaultTag { .. } => {
                        Some("pick one of the listed tags: oci:DIR:TAG".into())
                    }
                    S::ManifestNotFound { .. } => Some("pick one of the listed tags".into()),
                    S::ArchiveImageNotFound { .. } | S::ArchiveAmbiguous { .. } => {
                        Some("name one of the listed images: docker-archive:FILE:REF".into())
                    }
                    S::RegistryUnreachable { .. } => Some(
                        "check that the registry is running and the host and port are right; a registry without TLS needs --insecure-registry HOST:PORT unless it is on loopback".into(),
                    ),
                    S::RegistryAuth { .. } => Some(
                        "check the credentials in $DOCKER_CONFIG/config.json (or ~/.docker/config.json, $REGISTRY_AUTH_FILE), e.g. with `docker login` or `skopeo login`".into(),
                    ),
                    S::DaemonUnavailable { .. } => Some(
                        "start the Docker daemon (or `podman system service`) or point DOCKER_HOST=unix:///path at its socket".into(),
                    ),
                    S::BadCaFile { .. } => {
                        Some("--registry-ca / FLEDGE_REGISTRY_CA must name a PEM file of certificates".into())
                    }
                    S::PlatformNotFound { .. } => {
                        Some("choose one of the listed platforms with --platform OS/ARCH".into())
                    }
                    S::DigestMismatch { .. } | S::SizeMismatch { .. } => Some(
                        "the image is corrupt: copy or pull it again; a registry blob that fails verification is never cached"
                            .into(),
                    ),
                    S::NotALayout { .. } | S::EmptyLayout { .. } => Some(
                        "point at a directory holding oci-layout and index.json (skopeo copy docker://IMG oci:DIR:TAG makes one)"
                            .into(),
                    ),
                    _ => None,
                }
            }
            Error::Layer(crate::layer::LayerError::Corrupt { .. }) => {
                Some("the layer blob is damaged: copy or pull the image again".into())
            }
            Error::Layer(crate::layer::LayerError::UnsupportedMediaType { .. }) => Some(
                "fledge reads tar, tar+gzip and tar+zstd layers (OCI and Docker media types)"
                    .into(),
            ),
            Error::Layer(crate::layer::LayerError::DiffIdMismatch { .. }) => Some(
                "the image's config does not match its layers: rebuild or re-pull it".into(),
            ),
            Error::Layer(crate::layer::LayerError::Io { .. } | crate::layer::LayerError::NoCacheDir) => {
                Some("check the cache directory (--cache-dir or FLEDGE_CACHE_DIR) is writable and has space".into())
            }
            Error::Merge(_) => Some(
                "the image's layers are malformed; `fledge inspect` shows which layer is which".into(),
            ),
            Error::Mapping(_) => Some(
                "in [mappings], host paths are relative to fledge.toml's directory and must exist".into(),
            ),
            Error::Manifest(crate::manifest::ManifestError::UnknownKey { .. }) => Some(
                "remove or rename the key; README 'Manifest' lists every key".into(),
            ),
            Error::Manifest(_) => Some("check manifest.toml (README 'Manifest')".into()),
            Error::Fuse(e) => e.hint().map(str::to_string),
            Error::Agent(e) => e.hint().map(str::to_string),
            Error::Run(e) => e.hint(),
            Error::Build(e) => e.hint(),
            _ => None,
        }
    }
}
