//! The one place where `unsafe` code and raw syscalls may live, each with a `// SAFETY:`
//! comment. The crate denies `unsafe_code` everywhere else (see `lib.rs`).
//!
//! Almost every syscall fledge makes goes through safe wrappers (nix, std, loopdev-3,
//! sys-mount, fuser, xattr); here is what they lack: `LOOP_CONFIGURE`, to attach a loop
//! device in one step, and `sync_file_range(2)`, to start the writeback of large cache files
//! while they are still being written. And liblz4's "fill this many bytes" compressors
//! (`LZ4_compress_destSize`, `LZ4_compress_HC_destSize`), which EROFS' fixed-size physical
//! clusters need: `lz4-sys` builds and links the bundled liblz4 but declares neither, and
//! `lz4_flex` (pure Rust) has neither a destSize mode nor LZ4HC. And the fork that lets a
//! background process free a replaced image ([`close_in_background`]), which no safe
//! wrapper offers (`std::process` only spawns programs). And [`AlignedBuf`], memory aligned
//! for `O_DIRECT` writes ([`open_direct`]), viewed as bytes.

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

/// Ask the kernel to start writing the dirty pages of `len` bytes of `file` at `offset` to
/// disk, without waiting for them (`sync_file_range(2)` with `SYNC_FILE_RANGE_WRITE`). This
/// makes nothing durable by itself (metadata is not written, and completion is not waited
/// for): it only leaves less for a later `fsync`/`fdatasync` to do.
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "range too large");
    let offset = i64::try_from(offset).map_err(|_| too_big())?;
    let len = i64::try_from(len).map_err(|_| too_big())?;
    // SAFETY: sync_file_range takes only integers: a file descriptor that stays open for the
    // whole call (borrowed from `file`) and a byte range that it checks itself. It reads and
    // writes no memory of this process.
    let r = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Let a short-lived background process drop the last reference to `file` (an image that
/// a rebuild just replaced): the kernel frees a deleted file's page-cache pages and blocks
/// when its last reference goes, synchronously, and for a cached multi-GB image that takes
/// longer than the rename itself (0.6-0.7 s for 2.9 GiB here). A grandchild (the child in
/// between exits at once and is reaped here, so no zombie is left) closes every other
/// descriptor it inherited at once (so a pipe on our stdout or a lock is not held open),
/// waits until this process has closed its own copy of `file`, then closes its copy, the
/// last one. If a fork fails, `file` is simply closed here.
pub fn close_in_background(file: File) {
    let f = file.as_raw_fd();
    let mut p = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the two-element array it is given.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let (r, w) = (p[0], p[1]);
    // SAFETY: fork in a multithreaded process. The children call only async-signal-safe
    // functions (fork, close_range, close, read, _exit) on integers and a one-byte stack
    // buffer: no allocation, no locks another thread could hold, no Rust runtime, and they
    // end with _exit (no destructors, no atexit handlers, no flushing of shared buffers).
    // The parent closes only descriptors it owns (`r`, `w`; `file` by dropping it).
    unsafe {
        match libc::fork() {
            -1 => {
                libc::close(r);
                libc::close(w);
            }
            0 => {
                if libc::fork() == 0 {
                    let (lo, hi) = (f.min(r) as libc::c_uint, f.max(r) as libc::c_uint);
                    let close_range = |a: libc::c_uint, b: libc::c_uint| {
                        if a <= b {
                            libc::syscall(libc::SYS_close_range, a, b, 0);
                        }
                    };
                    if lo > 0 {
                        close_range(0, lo - 1);
                    }
                    close_range(lo + 1, hi.saturating_sub(1));
                    close_range(hi + 1, libc::c_uint::MAX);
                    // End of file once the parent has closed the write end, after `file`.
                    let mut b = 0u8;
                    libc::read(r, (&mut b as *mut u8).cast(), 1);
                    libc::close(f);
                }
                libc::_exit(0);
            }
            child => {
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                libc::close(r);
                drop(file);
                libc::close(w);
            }
        }
    }
}

/// Bytes a [`Writeback`] lets accumulate before it starts writing them out.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts the writeback of a file written front to back every 8 MiB (`WRITEBACK_STEP`), so
/// the disk works while the file is still being produced and the final `sync_data` has only
/// the tail left to wait for. Best effort: if the kernel or the filesystem refuses, it stops
/// trying (durability still comes from the final sync).
#[derive(Debug, Default)]
pub struct Writeback {
    /// Writeback was started for the bytes before this offset.
    started: u64,
    disabled: bool,
}

impl Writeback {
    /// Note that `len` bytes were written to `file` at `offset`.
    pub fn wrote(&mut self, file: &File, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if self.disabled || end < self.started.saturating_add(WRITEBACK_STEP) {
            return;
        }
        match start_writeback(file, self.started, end - self.started) {
            Ok(()) => self.started = end,
            Err(e) => {
                tracing::debug!("starting writeback early: {e}; leaving it to the final sync");
                self.disabled = true;
            }
        }
    }
}

// liblz4 (linked by `lz4-sys`, which builds its bundled copy): the declarations of
// <lz4.h> and <lz4hc.h> that lz4-sys does not make.
use lz4_sys as _;
extern "C" {
    fn LZ4_compress_destSize(
        src: *const libc::c_char,
        dst: *mut libc::c_char,
        src_size: *mut libc::c_int,
        target_dst_size: libc::c_int,
    ) -> libc::c_int;
    fn LZ4_sizeofStateHC() -> libc::c_int;
    fn LZ4_compress_HC_destSize(
        state: *mut libc::c_void,
        src: *const libc::c_char,
        dst: *mut libc::c_char,
        src_size: *mut libc::c_int,
        target_dst_size: libc::c_int,
        level: libc::c_int,
    ) -> libc::c_int;
}

/// An LZ4 compressor that fills a given output size: liblz4's fast mode, or LZ4HC at a
/// level (1 to 12) with its working state kept between calls.
pub struct Lz4DestSize {
    /// LZ4HC's state (`LZ4_streamHC_t`), 8-byte aligned as liblz4 asks; `None`: fast mode.
    hc: Option<(Vec<u64>, i32)>,
}

impl Lz4DestSize {
    pub fn fast() -> Lz4DestSize {
        Lz4DestSize { hc: None }
    }

    pub fn hc(level: u32) -> Lz4DestSize {
        // SAFETY: a pure function returning a constant size.
        let size = unsafe { LZ4_sizeofStateHC() }.max(0) as usize;
        Lz4DestSize {
            hc: Some((vec![0u64; size.div_ceil(8)], level.clamp(1, 12) as i32)),
        }
    }

    /// Compress as much of the start of `src` as fits in `dst` (all of it, if it fits):
    /// returns (input bytes consumed, output bytes written); (0, 0) when nothing fits.
    pub fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> (usize, usize) {
        let mut consumed = src.len().min(i32::MAX as usize / 2) as libc::c_int;
        let cap = dst.len().min(i32::MAX as usize) as libc::c_int;
        let written = match &mut self.hc {
            // SAFETY: `src` holds `consumed` readable bytes and `dst` `cap` writable ones
            // (both checked above to fit an int); liblz4 reads and writes only within them
            // and sets `consumed` to the bytes it took. Neither buffer is aliased.
            None => unsafe {
                LZ4_compress_destSize(
                    src.as_ptr().cast(),
                    dst.as_mut_ptr().cast(),
                    &mut consumed,
                    cap,
                )
            },
            // SAFETY: as above; `state` is an 8-byte-aligned buffer of at least
            // LZ4_sizeofStateHC() bytes, owned by this value and used by one call at a time
            // (`&mut self`), which liblz4 initialises itself on each call.
            Some((state, level)) => unsafe {
                LZ4_compress_HC_destSize(
                    state.as_mut_ptr().cast(),
                    src.as_ptr().cast(),
                    dst.as_mut_ptr().cast(),
                    &mut consumed,
                    cap,
                    *level,
                )
            },
        };
        if written <= 0 || consumed <= 0 {
            (0, 0)
        } else {
            (consumed as usize, written as usize)
        }
    }
}

/// The alignment `O_DIRECT` writes need, of the memory, the file offset and the length: the
/// page size, which covers every logical block size a disk has (512 or 4096 bytes).
pub const DIRECT_ALIGN: usize = 4096;

/// One aligned block of an [`AlignedBuf`].
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Block([u8; DIRECT_ALIGN]);

/// A zeroed byte buffer of whole [`DIRECT_ALIGN`] blocks, at a [`DIRECT_ALIGN`]-aligned
/// address, for `O_DIRECT` writes (`Vec<u8>` promises an alignment of 1 only).
pub struct AlignedBuf {
    blocks: Vec<Block>,
}

impl AlignedBuf {
    /// `len` bytes (rounded up to whole blocks), zeroed.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf {
            blocks: vec![Block([0; DIRECT_ALIGN]); len.div_ceil(DIRECT_ALIGN)],
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len() * DIRECT_ALIGN
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Block` is `repr(C)` around a byte array, so it has no padding and every
        // one of its `len()` bytes is an initialised `u8`; the slice borrows `self.blocks`
        // for its lifetime, and `u8` needs no more alignment than `Block` has.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.len()) }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: as in `as_bytes`; the mutable borrow of `self` makes the slice the only
        // access to the blocks, and any byte value is a valid `u8` (and a valid `Block`).
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// Open the existing file `path` for writing with `O_DIRECT`: writes from [`AlignedBuf`]s at
/// aligned offsets go to the disk without passing through the page cache. Fails where the
/// filesystem does not do direct I/O.
pub fn open_direct(path: &std::path::Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// A file's `O_DIRECT` handle for aligned batches, falling back to the ordinary handle once
/// the filesystem refuses a direct write (`EINVAL`: it accepted the flag at open but not the
/// write). Shared by the image stream and large downloads.
pub struct DirectFile {
    /// `None` once a direct write was refused.
    direct: Option<File>,
}

impl DirectFile {
    /// [`open_direct`] on `path`.
    pub fn open(path: &std::path::Path) -> io::Result<DirectFile> {
        open_direct(path).map(|f| DirectFile { direct: Some(f) })
    }

    /// Write `data` (block-aligned, from an [`AlignedBuf`]) at the aligned offset `at`:
    /// directly, or through `buffered` (the same file) after a refused direct write.
    pub fn write_batch(&mut self, buffered: &File, data: &[u8], at: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if let Some(d) = &self.direct {
            match d.write_all_at(data, at) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!("direct write refused ({e}): writing through the page cache");
                    self.direct = None;
                }
                r => return r,
            }
        }
        buffered.write_all_at(data, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The background close drops the last reference: handed the write end of a pipe (kept
    /// nowhere else), the read end here sees end of file. It would not if this process
    /// kept its copy, or if the grandchild never closed its own.
    #[test]
    fn close_in_background_drops_the_last_reference() {
        use nix::fcntl::OFlag;
        use std::io::Read;
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
        close_in_background(File::from(w));
        let mut r = File::from(r);
        // Generous: the grandchild only waits for this process's copy to be closed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match r.read(&mut [0u8; 16]) {
                Ok(0) => break,
                Ok(n) => panic!("{n} bytes from a pipe nobody wrote to"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the write end is still open somewhere after 30 s"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

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

    #[test]
    fn writeback_of_a_regular_file_and_refusals() {
        let mut f = tempfile::tempfile().unwrap();
        let chunk = vec![7u8; 1 << 20];
        let mut wb = Writeback::default();
        let mut off = 0;
        for _ in 0..20 {
            f.write_all(&chunk).unwrap();
            wb.wrote(&f, off, chunk.len() as u64);
            off += chunk.len() as u64;
        }
        assert!(!wb.disabled);
        assert_eq!(wb.started, 16 << 20);
        start_writeback(&f, 0, 0).unwrap();
        // A pipe has no pages to write back: refused, and the helper gives up quietly.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let pipe = File::from(r);
        assert!(start_writeback(&pipe, 0, 4096).is_err());
        let mut wb = Writeback::default();
        wb.wrote(&pipe, 0, WRITEBACK_STEP);
        assert!(wb.disabled);
        assert_eq!(wb.started, 0);
        let e = start_writeback(&f, u64::MAX, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn lz4_dest_size_fills_the_output_and_round_trips() {
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("line {} of a file\n", i % 977).into_bytes())
            .collect();
        for mut c in [Lz4DestSize::fast(), Lz4DestSize::hc(9), Lz4DestSize::hc(12)] {
            let mut out = vec![0u8; 4096];
            let (took, wrote) = c.compress(&text, &mut out);
            assert!(wrote <= 4096 && wrote > 4000, "{wrote}");
            assert!(took > 3 * 4096, "compressible text: {took}");
            let back = lz4_flex::block::decompress(&out[..wrote], took).unwrap();
            assert_eq!(back, text[..took]);
        }
        // Everything fits: all of it is taken.
        let (took, wrote) = Lz4DestSize::fast().compress(b"hello hello hello", &mut [0; 64]);
        assert_eq!(took, 17);
        assert!(wrote > 0);
        // No room at all.
        assert_eq!(Lz4DestSize::fast().compress(b"abc", &mut []), (0, 0));
    }
}
