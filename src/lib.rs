//! fledge: turn Docker/OCI container images into bootable microVM root filesystem images.
//!
//! Architecture, in the order data flows through it:
//! - [`config`]: fledge.toml, validated; [`mapping`]: `[mappings]` and their FHS modes;
//!   [`agent`]: the kestrel agent (local, http, release).
//! - [`source`]: find an image (OCI layout and archive, docker-archive, registry, Docker
//!   daemon) and read its verified blobs.
//! - [`layer`]: decode layer blobs (tar, gzip, zstd) into an uncompressed, digest-keyed cache,
//!   kept where [`cache`] says.
//! - [`merge`]: apply the layers in order with full OCI semantics into one [`tree::Tree`].
//! - [`tree`]: the frozen, read-only index of the merged image; contents stay in the layer data.
//! - [`image`]: reference -> cached layers -> merged tree.
//! - [`fusefs`]: serve a [`tree::Tree`] read-only through FUSE.
//! - [`probe`]: capability probes; [`output`]: the build pipeline and the output contract
//!   (`output::job`: a `Writer` gets a `Job` and returns `Written`), its writers (native ext4,
//!   kernel, userspace) chosen by the probes, sizing, atomic outputs; [`manifest`]: the plugin
//!   manifest; [`runner`]: the one runner for external tools; [`hostmount`]: the one unmount;
//!   [`interrupt`]: Ctrl-C/SIGTERM turned into errors.
//! - [`squashfs`]: fledge's own squashfs writer (compressed read-only roots), from a tree.
//! - [`erofs`]: fledge's own EROFS writer (uncompressed read-only roots), from a tree.
//! - [`doctor`], [`inspect`]: the reports of those commands; [`ui`]: the output sink (verbosity,
//!   progress bars) every command reports through.
//! - [`cli`]: the command line on top (argument parsing, completions, man pages, printing
//!   reports and errors); nothing below it imports it. `main.rs` only calls [`cli::main`].
//! - [`sys`]: the only place for `unsafe` code and raw syscalls (`LOOP_CONFIGURE` and
//!   `sync_file_range`; every other syscall goes through nix, loopdev, sys-mount or fuser).

#![deny(unsafe_code)]

pub mod agent;
pub mod cache;
pub mod cli;
pub mod config;
pub mod digest;
pub mod doctor;
pub mod erofs;
pub mod error;
pub mod fusefs;
pub mod hostmount;
pub mod image;
pub mod initramfs;
pub mod inspect;
pub mod interrupt;
pub mod layer;
pub mod manifest;
pub mod mapping;
pub mod merge;
pub mod mountinfo;
pub mod output;
pub mod probe;
pub mod qcow2;
pub mod runner;
pub mod sink;
pub mod source;
pub mod squashfs;
#[allow(unsafe_code)]
pub mod sys;
#[cfg(test)]
#[path = "../tests/support/kit.rs"]
pub(crate) mod testkit;
pub mod timing;
pub mod tomlfile;
pub mod tree;
#[cfg(test)]
pub(crate) mod treetest;
pub mod ui;

pub use error::Error;
