//! Getting a finished image onto the disk: its writeback started while it is written, and
//! the flush that `output::run` waits for before the image is renamed into place.
//!
//! An image that `build` reports done must be on disk, so `output::run` calls [`durable`]
//! on it (fdatasync) and [`durable_dir`] on the output directory after the renames. Left
//! to itself the kernel starts writing a file back only once the dirty pages pass
//! `dirty_background_ratio` of memory (gigabytes on a big machine), so a multi-GB image
//! would sit in the page cache until the final flush, which then waits for all of it. While
//! the writer runs, [`while_writing`] keeps asking the kernel to write back what is dirty so
//! far (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so the disk works in
//! parallel and the final flush has only the tail left.
//!
//! The writeback thread is writer-agnostic on purpose: the native writers, the loop device of
//! the kernel backend and the external formatters of the userspace backend all fill the same
//! file, and the thread reopens it by path on every round because mkfs tools may replace it.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// How often the writeback of the image's dirty pages is started while it is written. At
/// disk speeds of 0.5-2 GB/s this leaves 5-20 MiB per round for the final flush: with
/// 50 ms rounds the flush of the Debian test image's EROFS image took 25-30 ms after the
/// write, with 10 ms rounds 6 ms (a round costs one `sync_file_range`, which only walks
/// the pages that are dirty).
const ROUND: Duration = Duration::from_millis(10);

/// Run `write` while a second thread starts the writeback of `image` every [`ROUND`].
/// Best effort: the thread gives up quietly when the file cannot be opened or the
/// filesystem refuses `sync_file_range` (durability comes from [`durable`] either way).
pub fn while_writing<T>(image: &Path, write: impl FnOnce() -> T) -> T {
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || loop {
            match stop_rx.recv_timeout(ROUND) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Stopped, or the writer is gone.
                _ => return,
            }
            let Ok(file) = File::open(image) else {
                continue;
            };
            if let Err(e) = crate::sys::start_writeback(&file, 0, 0) {
                tracing::debug!(
                    "{}: starting writeback early: {e}; leaving it to the final flush",
                    image.display()
                );
                return;
            }
        });
        let out = write();
        let _ = stop_tx.send(());
        out
    })
}

/// Flush `path`'s data (and the metadata needed to read it back) to disk.
pub fn durable(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_data()
}

/// Flush the directory `dir`, so that the names renamed into it survive a crash.
pub fn durable_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn while_writing_returns_the_writers_result_and_survives_a_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("image.img");
        // The file appears only after the first rounds, as with a tool that creates it.
        let n = while_writing(&image, || {
            std::thread::sleep(ROUND * 2);
            let mut f = File::create(&image).unwrap();
            for _ in 0..64 {
                f.write_all(&[7u8; 65536]).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            42
        });
        assert_eq!(n, 42);
        durable(&image).unwrap();
        durable_dir(d.path()).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 64 * 65536);
        let e = durable(&d.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
