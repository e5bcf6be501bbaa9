//! The one place where `unsafe` code and raw syscalls may live, each with a `// SAFETY:`
//! comment. The crate denies `unsafe_code` everywhere else (see `lib.rs`).
//!
//! Everything else goes through safe wrappers (nix, std, loopdev-3, sys-mount, fuser, xattr);
//! what is here has no safe wrapper in those crates.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>` (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// Attach `backing` to the (free) loop device `dev` in one `LOOP_CONFIGURE` call, with
/// autoclear set. Unlike `LOOP_SET_FD` followed by `LOOP_SET_STATUS64`, this does not freeze
/// the device's queue a second time, which costs 15-25 ms per attach. Kernels older than 5.8
/// answer `EINVAL` or `ENOTTY`; the caller then falls back to the two-step attach.
pub fn loop_configure(dev: &impl AsRawFd, backing: &File) -> io::Result<()> {
    let fd = u32::try_from(backing.as_raw_fd())
        .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let config = LoopConfig {
        fd,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: `dev` owns an open descriptor and is borrowed for the whole call, as is
    // `backing` (whose descriptor the kernel takes its own reference to); LOOP_CONFIGURE reads
    // one `struct loop_config`, which `config` is (same layout: `repr(C)`, fields as in
    // <linux/loop.h>), fully initialised and alive until the call returns. The kernel keeps
    // no pointer to it. On a descriptor that is not a loop device the call fails with ENOTTY
    // and changes nothing.
    let r = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_CONFIGURE as _,
            &config as *const LoopConfig,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layout_matches_the_kernel() {
        // sizeof(struct loop_info64) == 232, sizeof(struct loop_config) == 304 on every
        // Linux architecture.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn a_non_loop_descriptor_is_refused() {
        let f = tempfile::tempfile().unwrap();
        let g = tempfile::tempfile().unwrap();
        let e = loop_configure(&f, &g).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
    }
}
