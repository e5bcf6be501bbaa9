//! fledge: turn Docker/OCI container images into bootable microVM root filesystem images.
//!
//! Architecture, in the order data flows through it:
//! - [`source`]: find an image (OCI layout, ...) and read its verified blobs.
//! - [`layer`]: decode layer blobs (tar, gzip, zstd) into an uncompressed, digest-keyed cache.
//! - [`merge`]: apply the layers in order with full OCI semantics into one [`tree::Tree`].
//! - [`tree`]: the frozen, read-only index of the merged image; contents stay in the layer data.
//! - [`fusefs`]: serve a [`tree::Tree`] read-only through FUSE.
//! - [`inspect`]: describe an image.
//! - [`cli`]: the command line; `main.rs` only calls [`cli::main`].
//! - [`sys`]: the only module with `unsafe` code and raw syscalls.

pub mod agent;
pub mod build;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod error;
pub mod fusefs;
pub mod image;
pub mod inspect;
pub mod interrupt;
pub mod layer;
pub mod manifest;
pub mod mapping;
pub mod merge;
pub mod probe;
pub mod runner;
pub mod source;
pub mod sys;
pub mod tree;

pub use error::Error;
