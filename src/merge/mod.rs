//! The merge: apply layer tars in order, with OCI semantics, into a [`crate::tree::Tree`].
//!
//! (stub: filled in by the merge work)

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MergeError {
    #[error("{0}")]
    Other(String),
}
