//! Layer decoding (tar, gzip, zstd) into an uncompressed, digest-keyed cache.
//!
//! (stub: filled in by the source work)

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LayerError {
    #[error("{0}")]
    Other(String),
}
