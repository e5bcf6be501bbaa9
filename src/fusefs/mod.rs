//! The read-only FUSE view of a [`crate::tree::Tree`].
//!
//! (stub: filled in by the FUSE work)

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FuseError {
    #[error("{0}")]
    Other(String),
}
