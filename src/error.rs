//! The crate-wide error: one variant per module error, so the CLI can print the whole chain.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Layer(#[from] crate::layer::LayerError),
    #[error(transparent)]
    Merge(#[from] crate::merge::MergeError),
    #[error(transparent)]
    Fuse(#[from] crate::fusefs::FuseError),
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// A one-line hint for the user, when the error has an obvious remedy.
    pub fn hint(&self) -> Option<String> {
        None
    }
}
