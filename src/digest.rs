//! Image digests: sha256 over an image's pieces (data, and holes hashed from zeros without
//! being read), fed by a writer as it writes ([`PieceHasher`]) or read back from a finished,
//! possibly sparse file ([`sha256_file`]). Shared by every image writer.

use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The size of the pieces a hashing thread is handed, and how many are queued for it. Small
/// on purpose: the hasher then reads each piece while it is still in the caches of the core
/// that filled it. With 2 MiB or more in flight sha256 ran at 1.2-1.4 GB/s here (the
/// 2.9 GiB image of `bench.sh big`: hashing busy 2.36 s, the build 2.75 s); with 128 KiB
/// pieces two deep at 1.7-1.9 GB/s (1.75 s, the build 2.1-2.3 s). Larger pieces did not
/// make the syscalls that fill them measurably cheaper.
pub const PIECE: usize = 1 << 17;
/// Pieces queued for a hashing thread (see [`PIECE`]).
pub const QUEUE: usize = 2;

/// One piece of an image for a hashing thread: bytes, or the length of a hole (zeros that
/// need not be read or written). Also used by the EROFS writer, which hashes as it writes.
pub enum Piece {
    Data(Vec<u8>),
    Zeros(u64),
}

/// sha256 over an image's pieces, in order; holes are hashed from a small zero buffer.
pub struct PieceHasher {
    h: Sha256,
    zeros: Vec<u8>,
}

impl PieceHasher {
    pub(crate) fn new() -> PieceHasher {
        PieceHasher {
            h: Sha256::new(),
            zeros: vec![0u8; 1 << 16],
        }
    }

    /// Hash `piece`; gives its buffer back for reuse.
    pub(crate) fn update(&mut self, piece: Piece) -> Option<Vec<u8>> {
        match piece {
            Piece::Data(buf) => {
                self.h.update(&buf);
                Some(buf)
            }
            Piece::Zeros(mut n) => {
                while n > 0 {
                    let k = n.min(self.zeros.len() as u64) as usize;
                    self.h.update(&self.zeros[..k]);
                    n -= k as u64;
                }
                None
            }
        }
    }

    /// The digest, as lower-case hex.
    pub(crate) fn finish(self) -> String {
        hex::encode(self.h.finalize())
    }
}

/// The sha256 of the finished image. A second thread reads the data extents while this one
/// hashes, and holes (the sparse free space, often a third of the image) are hashed from a
/// zero buffer without being read.
/// `stop` is polled between pieces: when it says so, hashing ends with
/// [`io::ErrorKind::Interrupted`].
pub fn sha256_file(path: &Path, stop: &(dyn Fn() -> bool + Sync)) -> io::Result<String> {
    use std::sync::mpsc;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let (tx, rx) = mpsc::sync_channel::<std::io::Result<Piece>>(QUEUE);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        s.spawn(move || {
            let r = read_pieces(&f, len, &tx, &back_rx);
            if let Err(e) = r {
                let _ = tx.send(Err(e));
            }
        });
        let mut h = PieceHasher::new();
        for piece in rx {
            if stop() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
            }
            if let Some(buf) = h.update(piece?) {
                let _ = back_tx.send(buf);
            }
        }
        Ok(h.finish())
    })
}

/// Send `f`'s first `len` bytes as pieces, in order; stops quietly when the receiver is gone.
fn read_pieces(
    f: &std::fs::File,
    len: u64,
    tx: &std::sync::mpsc::SyncSender<std::io::Result<Piece>>,
    spare: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    use nix::unistd::{lseek, Whence};
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = PIECE;
    let mut pos = 0u64;
    while pos < len {
        // Where the next data starts; filesystems without SEEK_DATA report all data.
        let data = match lseek(f, pos as i64, Whence::SeekData) {
            Ok(o) => (o as u64).min(len),
            Err(nix::Error::ENXIO) => len,
            Err(_) => pos,
        };
        if data > pos {
            if tx.send(Ok(Piece::Zeros(data - pos))).is_err() {
                return Ok(());
            }
            pos = data;
            continue;
        }
        let hole = match lseek(f, pos as i64, Whence::SeekHole) {
            Ok(o) => (o as u64).clamp(pos + 1, len),
            Err(_) => len,
        };
        while pos < hole {
            let mut buf = spare.try_recv().unwrap_or_default();
            let want = (hole - pos).min(CHUNK as u64) as usize;
            buf.resize(want, 0);
            let mut filled = 0;
            while filled < want {
                match f.read_at(&mut buf[filled..], pos + filled as u64) {
                    Ok(0) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the image shrank while it was hashed",
                        ))
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            pos += want as u64;
            if tx.send(Ok(Piece::Data(buf))).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_sparse_and_dense_files() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        // (data runs as (offset, length), total length): holes before, between and after
        // data, runs longer than one read chunk, and a file of data only.
        let cases: [(&[(u64, usize)], u64); 5] = [
            (&[], 0),
            (&[], 5 << 20),
            (&[(0, 3 << 20)], 3 << 20),
            (&[(4096, 100), (3 << 20, (1 << 20) + 7)], 9 << 20),
            (&[(0, 10), (8 << 20, 4096)], (8 << 20) + 4096),
        ];
        for (i, (runs, len)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("f{i}"));
            let mut f = std::fs::File::create(&path).unwrap();
            let mut expect = vec![0u8; *len as usize];
            for (k, (off, n)) in runs.iter().enumerate() {
                let bytes: Vec<u8> = (0..*n).map(|j| (j * 7 + k) as u8 | 1).collect();
                f.seek(SeekFrom::Start(*off)).unwrap();
                f.write_all(&bytes).unwrap();
                expect[*off as usize..*off as usize + n].copy_from_slice(&bytes);
            }
            f.set_len(*len).unwrap();
            drop(f);
            assert_eq!(
                sha256_file(&path, &|| false).unwrap(),
                hex::encode(Sha256::digest(&expect)),
                "case {i}"
            );
        }
    }
}
