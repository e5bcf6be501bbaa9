//! Layer decoding (tar, gzip, zstd) into an uncompressed, digest-keyed cache.
//!
//! [`LayerStore`] keeps one uncompressed tar per layer at
//! `<dir>/layers/sha256/<diff_id hex>.tar`. A layer is decoded by streaming its blob (from
//! [`ImageSource::open_blob_stream`]: for a registry, the download itself, kept and hashed
//! once on the way) through the decompressor into a temporary file in the same directory
//! while hashing the output. Reading the blob, decoding, and hashing+writing the output run
//! on three threads. Only once both the compressed digest and the diff_id check out is the
//! blob stream committed (a downloaded blob enters the blob cache) and the layer file made
//! durable and renamed into place, so the final paths never hold partial or unverified data,
//! even with several processes filling the cache at once. The writeback of the layer file
//! is started while it is written ([`crate::sys::Writeback`]), so the final `fsync` finds
//! little left to do.

use std::fs::{self, File};
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::source::{
    sha256_hex, source_error_in, BlobStream, ImageSource, LayerInfo, ResolvedImage, SourceError,
};

/// Buffer size for reading blobs and writing layer files.
const BUF_SIZE: usize = 1 << 20;
/// Decoded chunks queued between the decoder and the hashing writer.
const PIPE_DEPTH: usize = 4;
/// Temporary files older than this are leftovers of interrupted runs.
const STALE_TEMP_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Error)]
pub enum LayerError {
    #[error("unsupported layer media type '{media_type}' for layer {digest}")]
    UnsupportedMediaType { media_type: String, digest: String },
    #[error("layer {digest}: {source}")]
    Source {
        digest: String,
        #[source]
        source: SourceError,
    },
    #[error("layer {digest} is truncated or corrupt: {source}")]
    Corrupt {
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {digest} decompresses to content with digest {actual}, but the image config says {expected}")]
    DiffIdMismatch {
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("cannot write layer cache file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot determine the cache directory: set FLEDGE_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("layer decoding worker panicked for layer {digest}")]
    WorkerPanicked { digest: String },
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression of a layer from its media type; `digest` names the layer in the error.
pub fn compression_for(media_type: &str, digest: &str) -> Result<Compression, LayerError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
        _ => Err(LayerError::UnsupportedMediaType {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
        }),
    }
}

/// The cache of uncompressed layer tars.
#[derive(Clone, Debug)]
pub struct LayerStore {
    dir: PathBuf,
}

impl LayerStore {
    /// A store rooted at `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> LayerStore {
        LayerStore { dir: dir.into() }
    }

    /// The store's root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the uncompressed tar with this diff_id lives (whether or not it exists yet).
    pub fn path_for(&self, diff_id: &str) -> Result<PathBuf, SourceError> {
        let hex = sha256_hex(diff_id)?;
        Ok(self.layers_dir().join(format!("{hex}.tar")))
    }

    fn layers_dir(&self) -> PathBuf {
        self.dir.join("layers").join("sha256")
    }

    /// The uncompressed tar of `layer`, decoding it from `src` into the cache if needed.
    pub fn uncompressed(
        &self,
        src: &dyn ImageSource,
        layer: &LayerInfo,
    ) -> Result<PathBuf, LayerError> {
        let source_err = |e| LayerError::Source {
            digest: layer.digest.clone(),
            source: e,
        };
        let compression = compression_for(&layer.media_type, &layer.digest)?;
        sha256_hex(&layer.digest).map_err(source_err)?;
        let final_path = self.path_for(&layer.diff_id).map_err(source_err)?;
        match fs::metadata(&final_path) {
            Ok(m) if m.is_file() => return Ok(final_path),
            Ok(_) => {
                return Err(LayerError::Io {
                    path: final_path,
                    source: io::Error::new(io::ErrorKind::AlreadyExists, "not a regular file"),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(LayerError::Io {
                    path: final_path,
                    source: e,
                })
            }
        }
        let dir = self.layers_dir();
        fs::create_dir_all(&dir).map_err(|e| LayerError::Io {
            path: dir.clone(),
            source: e,
        })?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .suffix(".tar")
            .tempfile_in(&dir)
            .map_err(|e| LayerError::Io {
                path: dir.clone(),
                source: e,
            })?;
        let tmp_path = tmp.path().to_path_buf();
        let write_err = |e| LayerError::Io {
            path: tmp_path.clone(),
            source: e,
        };

        let mut sw = crate::timing::Stopwatch::start();
        // A network source may still be downloading while we decode: the blob is verified
        // (and, when it was downloaded into a cache, kept) only at the end.
        let blob = src
            .open_blob_stream(&layer.digest, layer.size)
            .map_err(source_err)?;
        sw.mark(&format!("{} opened", layer.digest));
        let file = tmp.as_file();
        let (actual, blob) = decode_into(compression, blob, file, layer, &tmp_path)?;
        if actual != layer.diff_id {
            return Err(LayerError::DiffIdMismatch {
                digest: layer.digest.clone(),
                expected: layer.diff_id.clone(),
                actual,
            });
        }
        sw.mark(&format!("{} fetched and decoded", layer.digest));
        // Both digests check out: keep the blob (if the source caches it), then the layer.
        blob.commit().map_err(source_err)?;
        file.sync_data().map_err(write_err)?;
        sw.mark(&format!("{} synced", layer.digest));
        // Atomic rename; if another process finished first, ours replaces an identical file.
        tmp.persist(&final_path).map_err(|e| LayerError::Io {
            path: final_path.clone(),
            source: e.error,
        })?;
        Ok(final_path)
    }

    /// Remove temporary files (`.tmp-*`) older than `max_age` that interrupted runs left in
    /// the cache; returns how many were removed. Fresh ones may belong to a running process
    /// and are kept.
    pub fn remove_stale_temp_files(&self, max_age: Duration) -> Result<usize, LayerError> {
        let dir = self.layers_dir();
        let io_err = |path: &Path, e| LayerError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let entries = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(&dir, e)),
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            if !entry.file_name().as_encoded_bytes().starts_with(b".tmp-") {
                continue;
            }
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if meta.is_file() && age > max_age {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&path, e)),
                }
            }
        }
        Ok(removed)
    }

    /// The uncompressed tars of all layers of `image`, in layer order, decoded in parallel.
    pub fn uncompressed_all(
        &self,
        src: &dyn ImageSource,
        image: &ResolvedImage,
    ) -> Result<Vec<PathBuf>, LayerError> {
        let layers = &image.layers;
        if layers.is_empty() {
            return Ok(Vec::new());
        }
        if let Err(e) = self.remove_stale_temp_files(STALE_TEMP_AGE) {
            tracing::debug!("cleaning the layer cache: {e}");
        }
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        // Network sources overlap downloads beyond the CPU count.
        let workers = src
            .fetch_parallelism()
            .map_or(cpus, |n| n.max(cpus))
            .min(layers.len());
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<PathBuf, LayerError>>>> =
            Mutex::new((0..layers.len()).map(|_| None).collect());
        let failed = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(layer) = layers.get(i) else { break };
                    let r = self.uncompressed(src, layer);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    if let Ok(mut res) = results.lock() {
                        if let Some(slot) = res.get_mut(i) {
                            *slot = Some(r);
                        }
                    }
                });
            }
        });
        let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut paths = Vec::with_capacity(layers.len());
        let mut first_missing = None;
        for (slot, layer) in results.into_iter().zip(layers) {
            match slot {
                Some(Ok(p)) => paths.push(p),
                Some(Err(e)) => return Err(e),
                None => {
                    first_missing.get_or_insert_with(|| layer.digest.clone());
                }
            }
        }
        // A slot is only empty if a worker stopped early after another failed (that error
        // was returned above) or panicked.
        if let Some(digest) = first_missing {
            return Err(LayerError::WorkerPanicked { digest });
        }
        Ok(paths)
    }
}

/// What [`LayerStore::prune`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub files: u64,
    pub bytes: u64,
}

/// The cache subdirectories [`LayerStore::prune`] empties: decoded layers, downloaded blobs,
/// daemon exports.
pub const CACHE_SUBDIRS: [&str; 3] = ["layers", "blobs", "tmp"];

impl LayerStore {
    /// Delete everything fledge keeps in the cache directory (decoded layers, downloaded
    /// blobs, partial downloads, daemon exports) and say how much was freed. Other files in
    /// the directory are left alone. Files in use by a running process stay readable by it
    /// (they are unlinked, not truncated).
    pub fn prune(&self) -> Result<PruneReport, LayerError> {
        let mut report = PruneReport::default();
        for sub in CACHE_SUBDIRS {
            prune_dir(&self.dir.join(sub), &mut report)?;
        }
        Ok(report)
    }
}

/// Delete the directory `dir` and everything in it (nothing when it does not exist), adding
/// what was freed to `report`; for `fledge cache prune`, also of the cache subdirectories
/// other modules own (squashfs' block cache).
pub fn prune_dir(dir: &Path, report: &mut PruneReport) -> Result<(), LayerError> {
    prune_tree(dir, report)?;
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LayerError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

fn prune_tree(dir: &Path, report: &mut PruneReport) -> Result<(), LayerError> {
    let io_err = |path: &Path, e| LayerError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| io_err(&path, e))?;
        if meta.is_dir() {
            prune_tree(&path, report)?;
            match fs::remove_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
        } else {
            match fs::remove_file(&path) {
                Ok(()) => {
                    report.files += 1;
                    report.bytes += meta.len();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
        }
    }
    Ok(())
}

/// Map a read error during decoding: blob verification failures stay source errors, the rest
/// means the compressed stream is bad.
fn read_error(layer: &LayerInfo, e: io::Error) -> LayerError {
    match source_error_in(e) {
        Ok(source) => LayerError::Source {
            digest: layer.digest.clone(),
            source,
        },
        Err(e) => LayerError::Corrupt {
            digest: layer.digest.clone(),
            source: e,
        },
    }
}

/// Decode `blob` into `file` and return the `sha256:<hex>` of the decoded bytes, and the
/// blob stream (read to its verified end) for the caller to commit. Three threads overlap:
/// one reads the blob (for a download: receiving, keeping and hashing the compressed bytes),
/// this one decodes, and one hashes and writes the output; they pass large buffers through
/// small queues. On any failure the blob stream is dropped uncommitted.
fn decode_into<'s>(
    compression: Compression,
    blob: Box<dyn BlobStream + 's>,
    file: &File,
    layer: &LayerInfo,
    out_path: &Path,
) -> Result<(String, Box<dyn BlobStream + 's>), LayerError> {
    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(PIPE_DEPTH);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    let (in_tx, in_rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(PIPE_DEPTH);
    let (in_empty_tx, in_empty_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let reader = s.spawn(move || read_ahead(blob, &in_tx, &in_empty_rx));
        let writer = s.spawn(move || -> io::Result<String> {
            let mut hasher = Sha256::new();
            let mut out = file;
            let mut written = 0u64;
            let mut writeback = crate::sys::Writeback::default();
            for chunk in full_rx {
                hasher.update(&chunk);
                out.write_all(&chunk)?;
                writeback.wrote(file, written, chunk.len() as u64);
                written += chunk.len() as u64;
                // The producer may be done already; then the buffer is simply dropped.
                let _ = empty_tx.send(chunk);
            }
            Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
        });
        let input = QueueReader {
            rx: in_rx,
            empties: in_empty_tx,
            buf: Vec::new(),
            pos: 0,
            state: QueueState::Open,
        };
        // Dropping the input (when `produce` returns) stops the reader if it is not done.
        let produced = produce(compression, input, layer, &full_tx, &empty_rx);
        drop(full_tx);
        let written = writer.join();
        let blob = reader.join();
        match (produced, written, blob) {
            (_, Err(_), _) | (_, _, Err(_)) => Err(LayerError::WorkerPanicked {
                digest: layer.digest.clone(),
            }),
            // A write failure makes the producer stop early: report the write failure.
            (_, Ok(Err(e)), _) => Err(LayerError::Io {
                path: out_path.to_path_buf(),
                source: e,
            }),
            (Err(e), Ok(Ok(_)), _) => Err(e),
            (Ok(()), Ok(Ok(digest)), Ok(blob)) => Ok((digest, blob)),
        }
    })
}

/// Read `blob` to its end in `BUF_SIZE` chunks and queue them, then an empty chunk for
/// the end; a read error is queued instead and ends the reading. Stops early when the
/// receiving side goes away. Hands the stream back.
fn read_ahead<'s>(
    mut blob: Box<dyn BlobStream + 's>,
    tx: &mpsc::SyncSender<io::Result<Vec<u8>>>,
    empties: &mpsc::Receiver<Vec<u8>>,
) -> Box<dyn BlobStream + 's> {
    loop {
        let (buf, failed) = next_chunk(&mut blob, empties);
        let at_end = buf.len() < BUF_SIZE;
        // Data first, then the error or the end marker.
        if !buf.is_empty() && tx.send(Ok(buf)).is_err() {
            return blob;
        }
        if let Some(e) = failed {
            let _ = tx.send(Err(e));
            return blob;
        }
        if at_end {
            let _ = tx.send(Ok(Vec::new()));
            return blob;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QueueState {
    Open,
    /// The end marker came.
    Ended,
    /// An error came (and was returned); nothing more follows.
    Failed,
}

/// The decoder's side of [`read_ahead`]: a `BufRead` over the queued chunks, handing used
/// buffers back.
struct QueueReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    empties: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    state: QueueState,
}

impl Read for QueueReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for QueueReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos >= self.buf.len() {
            match self.state {
                QueueState::Open => {}
                QueueState::Ended => return Ok(&[]),
                QueueState::Failed => {
                    return Err(io::Error::other("reading the blob failed earlier"))
                }
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => self.state = QueueState::Ended,
                Ok(Ok(chunk)) => {
                    let used = std::mem::replace(&mut self.buf, chunk);
                    self.pos = 0;
                    // The reader may be done already; then the buffer is simply dropped.
                    let _ = self.empties.send(used);
                }
                Ok(Err(e)) => {
                    self.state = QueueState::Failed;
                    return Err(e);
                }
                // The reader went away without the end marker: it panicked (and the join
                // reports it); never take this for the end of the blob.
                Err(_) => {
                    self.state = QueueState::Failed;
                    return Err(io::Error::other("the blob reader stopped"));
                }
            }
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = self.pos.saturating_add(amt).min(self.buf.len());
    }
}

/// Run the decoder for `compression` over `blob`, sending the output in chunks.
fn produce<R: BufRead>(
    compression: Compression,
    blob: R,
    layer: &LayerInfo,
    tx: &mpsc::SyncSender<Vec<u8>>,
    empties: &mpsc::Receiver<Vec<u8>>,
) -> Result<(), LayerError> {
    match compression {
        Compression::None => {
            let mut r = blob;
            pump(&mut r, layer, tx, empties)?;
        }
        Compression::Gzip => {
            // Both decoders take concatenated gzip members as one stream and refuse
            // truncation, bad checksums and trailing garbage.
            #[cfg(feature = "isal")]
            let mut d = isal::read::GzipDecoder::new(blob);
            #[cfg(not(feature = "isal"))]
            let mut d = flate2::bufread::MultiGzDecoder::new(blob);
            if pump(&mut d, layer, tx, empties)? {
                #[cfg(feature = "isal")]
                drain(d.get_ref_mut(), layer)?;
                #[cfg(not(feature = "isal"))]
                drain(d.into_inner(), layer)?;
            }
        }
        Compression::Zstd => {
            let mut d =
                zstd::stream::read::Decoder::with_buffer(blob).map_err(|e| read_error(layer, e))?;
            if pump(&mut d, layer, tx, empties)? {
                drain(d.finish(), layer)?;
            }
        }
    }
    Ok(())
}

/// Read `r` to the end in `BUF_SIZE` chunks and send them; `Ok(false)` if the receiving side
/// went away (it failed, and reports why).
fn pump<R: Read>(
    r: &mut R,
    layer: &LayerInfo,
    tx: &mpsc::SyncSender<Vec<u8>>,
    empties: &mpsc::Receiver<Vec<u8>>,
) -> Result<bool, LayerError> {
    loop {
        let (buf, failed) = next_chunk(r, empties);
        if let Some(e) = failed {
            return Err(read_error(layer, e));
        }
        if buf.is_empty() {
            return Ok(true);
        }
        let at_end = buf.len() < BUF_SIZE;
        if tx.send(buf).is_err() {
            return Ok(false);
        }
        if at_end {
            return Ok(true);
        }
    }
}

/// Fill one chunk of up to `BUF_SIZE` bytes from `r`, in a buffer handed back through
/// `empties` when there is one. The chunk is cut to what was read: shorter than `BUF_SIZE`
/// only at the end of `r` or when a read failed, and then the error comes with it.
fn next_chunk<R: Read + ?Sized>(
    r: &mut R,
    empties: &mpsc::Receiver<Vec<u8>>,
) -> (Vec<u8>, Option<io::Error>) {
    let mut buf = empties.try_recv().unwrap_or_default();
    buf.resize(BUF_SIZE, 0);
    let mut filled = 0;
    let mut failed = None;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    buf.truncate(filled);
    (buf, failed)
}

/// Read what the decompressor left of the blob so the verifying reader checks the digest.
fn drain<R: BufRead>(mut r: R, layer: &LayerInfo) -> Result<(), LayerError> {
    loop {
        let n = match r.fill_buf() {
            Ok(b) => b.len(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(layer, e)),
        };
        if n == 0 {
            return Ok(());
        }
        r.consume(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{open, sha256_digest, Platform};
    use crate::testkit::*;

    fn big_tar() -> Vec<u8> {
        // Several MiB of varied content so the buffers go round more than once.
        let mut data = Vec::with_capacity(3 << 20);
        let mut x: u32 = 12345;
        while data.len() < (3 << 20) {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.extend_from_slice(&(x >> 16).to_le_bytes()[..2]);
            data.extend_from_slice(b"some text ");
        }
        tar_of(&[("big", &data), ("small", b"small")])
    }

    fn resolve(b: &LayoutBuilder) -> (Box<dyn ImageSource>, ResolvedImage) {
        let src = open(&b.reference(None)).unwrap();
        let img = src.resolve(&Platform::host()).unwrap();
        (src, img)
    }

    fn temp_files(store: &LayerStore) -> Vec<String> {
        match fs::read_dir(store.layers_dir()) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".tmp-"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    #[test]
    fn compression_table() {
        let cases = [
            ("application/vnd.oci.image.layer.v1.tar", Compression::None),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Compression::Zstd,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar",
                Compression::None,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                Compression::Zstd,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                Compression::None,
            ),
        ];
        for (mt, c) in cases {
            assert_eq!(compression_for(mt, "sha256:x").unwrap(), c, "{mt}");
        }
        let e = compression_for("application/vnd.oci.image.layer.v1.tar+bzip2", "sha256:abc")
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("tar+bzip2") && msg.contains("sha256:abc"),
            "{msg}"
        );
    }

    #[test]
    fn decodes_plain_gzip_zstd_and_docker_layers() {
        let tars = [
            big_tar(),
            tar_of(&[("g", b"gzip")]),
            tar_of(&[("z", b"zstd")]),
            tar_of(&[("d", b"docker")]),
        ];
        let mut docker = Layer::gzip(tars[3].clone());
        docker.media_type = "application/vnd.docker.image.rootfs.diff.tar.gzip".to_string();
        // A multi-member gzip stream, as some tools write.
        let mut multi = Layer::gzip(tars[1].clone());
        let half = tars[1].len() / 2;
        multi.blob = [gzip(&tars[1][..half]), gzip(&tars[1][half..])].concat();
        let b = LayoutBuilder::new();
        let m = b.image(
            "linux/amd64",
            &[
                Layer::plain(tars[0].clone()),
                multi,
                Layer::zstd(tars[2].clone()),
                docker,
            ],
        );
        b.write_index_json(&[(m, Some("latest"))]);
        let (src, img) = resolve(&b);
        let cache = tempfile::tempdir().unwrap();
        let store = LayerStore::new(cache.path());
        let paths = store.uncompressed_all(src.as_ref(), &img).unwrap();
        assert_eq!(paths.len(), 4);
        for (i, (p, t)) in paths.iter().zip(&tars).enumerate() {
            assert_eq!(&fs::read(p).unwrap(), t, "layer {i}");
            let expect = store.path_for(&sha256_digest(t)).unwrap();
            assert_eq!(p, &expect);
            assert!(p.starts_with(cache.path().join("layers/sha256")));
        }
        // Cached: a second call does not need the blobs any more.
        for l in &img.layers {
            fs::remove_file(b.blob_path(&l.digest)).unwrap();
        }
        assert_eq!(store.uncompressed_all(src.as_ref(), &img).unwrap(), paths);
        assert!(temp_files(&store).is_empty());
    }

    #[test]
    fn truncated_gzip_and_zstd_are_corrupt() {
        for (name, mut layer) in [
            ("gzip", Layer::gzip(big_tar())),
            ("zstd", Layer::zstd(big_tar())),
        ] {
            // The blob itself is consistent (digest of the truncated data), the stream is not.
            let cut = layer.blob.len() / 2;
            layer.blob.truncate(cut);
            let (e, digest) = expect_corrupt(layer, name);
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("layer {digest} is truncated or corrupt")),
                "{name}: {msg}"
            );
        }
    }

    /// Decode `layer` into an empty cache: it must fail as corrupt and leave nothing behind.
    /// Returns the error and the layer's digest.
    fn expect_corrupt(layer: Layer, name: &str) -> (LayerError, String) {
        let b = simple_layout(layer, "latest");
        let (src, img) = resolve(&b);
        let cache = tempfile::tempdir().unwrap();
        let store = LayerStore::new(cache.path());
        let e = store
            .uncompressed(src.as_ref(), &img.layers[0])
            .unwrap_err();
        assert!(matches!(e, LayerError::Corrupt { .. }), "{name}: {e}");
        assert!(!store.path_for(&img.layers[0].diff_id).unwrap().exists());
        assert!(temp_files(&store).is_empty(), "{name}");
        (e, img.layers[0].digest.clone())
    }

    #[test]
    fn gzip_members_concatenated_and_trailing_garbage() {
        use crate::testkit::gzip;
        // A blob of two gzip members (as pigz or appending writers make) is one layer.
        let tar = big_tar();
        let mid = tar.len() / 3;
        let mut layer = Layer::gzip(tar.clone());
        layer.blob = [gzip(&tar[..mid]), gzip(&tar[mid..])].concat();
        let b = simple_layout(layer, "latest");
        let (src, img) = resolve(&b);
        let cache = tempfile::tempdir().unwrap();
        let store = LayerStore::new(cache.path());
        let path = store.uncompressed(src.as_ref(), &img.layers[0]).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), tar);
        // Bytes after the last member that are not a gzip member: corrupt, nothing cached.
        for (name, tail) in [
            ("garbage", &b"trailing garbage"[..]),
            ("zeros", &[0u8; 64][..]),
        ] {
            let mut layer = Layer::gzip(tar.clone());
            layer.blob.extend_from_slice(tail);
            expect_corrupt(layer, name);
        }
    }

    #[test]
    fn compressed_digest_mismatch_is_reported() {
        let layer = Layer::gzip(big_tar());
        let b = simple_layout(layer, "latest");
        let (src, img) = resolve(&b);
        let l = &img.layers[0];
        // Corrupt the stored blob after resolving: flip a byte near the end (in the gzip
        // trailer area the decoder may or may not notice first).
        let path = b.blob_path(&l.digest);
        let mut data = fs::read(&path).unwrap();
        let n = data.len();
        data[n / 2] ^= 0xff;
        fs::write(&path, &data).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let store = LayerStore::new(cache.path());
        let e = store.uncompressed(src.as_ref(), l).unwrap_err();
        // Either the decoder trips over the damage or the digest check does; both name the
        // layer, and nothing is cached.
        assert!(e.to_string().contains(&l.digest), "{e}");
        assert!(
            matches!(
                e,
                LayerError::Corrupt { .. }
                    | LayerError::Source {
                        source: SourceError::DigestMismatch { .. },
                        ..
                    }
            ),
            "{e}"
        );
        assert!(!store.path_for(&l.diff_id).unwrap().exists());
        assert!(temp_files(&store).is_empty());

        // A plain layer with a wrong byte always reaches the digest check.
        let layer = Layer::plain(big_tar());
        let b = simple_layout(layer, "latest");
        let (src, img) = resolve(&b);
        let l = &img.layers[0];
        let path = b.blob_path(&l.digest);
        let mut data = fs::read(&path).unwrap();
        data[100] ^= 0xff;
        fs::write(&path, &data).unwrap();
        let e = store.uncompressed(src.as_ref(), l).unwrap_err();
        match &e {
            LayerError::Source {
                source: SourceError::DigestMismatch { blob, actual },
                ..
            } => {
                assert_eq!(blob, &l.digest);
                assert_eq!(actual, &sha256_digest(&data));
            }
            other => panic!("{other}"),
        }
        assert!(temp_files(&store).is_empty());
    }

    #[test]
    fn diff_id_mismatch() {
        let b = LayoutBuilder::new();
        let l = Layer::zstd(tar_of(&[("a", b"a")]));
        let wrong = sha256_digest(b"something else");
        let cfg = b.config("linux/amd64", std::slice::from_ref(&wrong));
        let m = b.image_with_config(
            "linux/amd64",
            &[l],
            &cfg,
            crate::source::oci_layout::OCI_MANIFEST,
        );
        b.write_index_json(&[(m, None)]);
        let (src, img) = resolve(&b);
        let cache = tempfile::tempdir().unwrap();
        let store = LayerStore::new(cache.path());
        let e = store
            .uncompressed(src.as_ref(), &img.layers[0])
            .unwrap_err();
        match &e {
            LayerError::DiffIdMismatch {
                digest,
                expected,
                actual,
            } => {
                assert_eq!(digest, &img.layers[0].digest);
                assert_eq!(expected, &wrong);
                assert_ne!(actual, &wrong);
            }
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&wrong) && msg.contains(&img.layers[0].digest),
            "{msg}"
        );
        assert!(!store.path_for(&wrong).unwrap().exists());
        assert!(temp_files(&store).is_empty());
    }

    #[test]
    fn unknown_layer_media_type() {
        let mut l = Layer::gzip(tar_of(&[("a", b"a")]));
        l.media_type = "application/vnd.example.layer".to_string();
        let b = simple_layout(l, "latest");
        let (src, img) = resolve(&b);
        let cache = tempfile::tempdir().unwrap();
        let e = LayerStore::new(cache.path())
            .uncompressed_all(src.as_ref(), &img)
            .unwrap_err();
        assert!(
            matches!(&e, LayerError::UnsupportedMediaType { media_type, digest }
                if media_type == "application/vnd.example.layer" && digest == &img.layers[0].digest),
            "{e}"
        );
    }

    #[test]
    fn concurrent_decoding_of_one_layer() {
        let tar = big_tar();
        let b = simple_layout(Layer::gzip(tar.clone()), "latest");
        let (src, img) = resolve(&b);
        let cache = tempfile::tempdir().unwrap();
        let store = LayerStore::new(cache.path());
        let results: Vec<PathBuf> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| store.uncompressed(src.as_ref(), &img.layers[0]).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|p| p == &results[0]));
        assert_eq!(fs::read(&results[0]).unwrap(), tar);
        let names: Vec<_> = fs::read_dir(store.layers_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn queue_reader_ends_only_at_the_end_marker() {
        let queue = |msgs: Vec<io::Result<Vec<u8>>>| {
            let (tx, rx) = mpsc::sync_channel(msgs.len() + 1);
            for m in msgs {
                tx.send(m).unwrap();
            }
            let (empties, _) = mpsc::channel();
            QueueReader {
                rx,
                empties,
                buf: Vec::new(),
                pos: 0,
                state: QueueState::Open,
            }
        };
        let mut out = Vec::new();
        queue(vec![Ok(b"ab".to_vec()), Ok(b"cd".to_vec()), Ok(Vec::new())])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abcd");
        // The reader vanished (panicked) without the end marker: an error, never an end.
        let mut r = queue(vec![Ok(b"ab".to_vec())]);
        out.clear();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert!(e.to_string().contains("stopped"), "{e}");
        assert!(r.read(&mut [0u8; 4]).is_err());
        // A read error is passed on once, and reading stays failed.
        let mut r = queue(vec![
            Ok(b"ab".to_vec()),
            Err(io::Error::new(io::ErrorKind::TimedOut, "slow")),
        ]);
        out.clear();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(out, b"ab");
        assert!(r.fill_buf().is_err());
    }

    #[test]
    fn stale_temp_files_are_removed() {
        let cache = tempfile::tempdir().unwrap();
        let store = LayerStore::new(cache.path());
        assert_eq!(store.remove_stale_temp_files(STALE_TEMP_AGE).unwrap(), 0);
        let dir = store.layers_dir();
        fs::create_dir_all(&dir).unwrap();
        let old = dir.join(".tmp-old.tar");
        let fresh = dir.join(".tmp-fresh.tar");
        let done = dir.join(format!("{}.tar", "a".repeat(64)));
        for p in [&old, &fresh, &done] {
            fs::write(p, b"x").unwrap();
        }
        let long_ago = SystemTime::now() - Duration::from_secs(3 * 24 * 3600);
        for p in [&old, &done] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        assert_eq!(store.remove_stale_temp_files(STALE_TEMP_AGE).unwrap(), 1);
        assert!(!old.exists() && fresh.exists() && done.exists());
    }

    #[test]
    fn prune_removes_cache_contents_only() {
        let cache = tempfile::tempdir().unwrap();
        let store = LayerStore::new(cache.path());
        let files = [
            ("layers/sha256/a.tar", 10usize),
            ("blobs/sha256/b", 20),
            ("blobs/sha256/.partial-c", 5),
            ("tmp/.daemon-export-x.tar", 7),
        ];
        for (p, n) in files {
            let path = cache.path().join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, vec![0u8; n]).unwrap();
        }
        fs::write(cache.path().join("keep.txt"), b"mine").unwrap();
        let r = store.prune().unwrap();
        assert_eq!(
            r,
            PruneReport {
                files: 4,
                bytes: 42
            }
        );
        for sub in CACHE_SUBDIRS {
            assert!(!cache.path().join(sub).exists(), "{sub}");
        }
        assert!(cache.path().join("keep.txt").exists());
        assert_eq!(store.prune().unwrap(), PruneReport::default());
        // A missing cache directory is an empty one.
        let gone = LayerStore::new(cache.path().join("nope"));
        assert_eq!(gone.prune().unwrap(), PruneReport::default());
    }
}
