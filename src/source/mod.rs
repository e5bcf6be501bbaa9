//! Image sources: resolve a reference to a manifest, config and layer list, and read blobs
//! with their digests verified.
//!
//! (stub: filled in by the source work)

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("{0}")]
    Other(String),
}
