//! The one place where `unsafe` code and raw syscalls may live, each with a `// SAFETY:`
//! comment. The crate denies `unsafe_code` everywhere else (see `lib.rs`).
//!
//! Today it is empty: every syscall fledge makes goes through safe wrappers (nix, std,
//! loopdev-3, sys-mount, fuser, xattr).
