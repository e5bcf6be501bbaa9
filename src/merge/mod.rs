//! The merge: apply layer tars in order, with OCI semantics, into a [`crate::tree::Tree`].
//!
//! The result matches what `umoci unpack` run as root leaves on disk, but nothing is unpacked:
//! only headers are read, and regular files become [`Content::Layer`] references (layer index
//! and data offset in the uncompressed tar). Memory grows with the number of entries, never
//! with file bytes.
//!
//! Decisions (where the OCI image spec leaves room, umoci's behaviour as root is followed):
//! - **Names** are raw bytes. Leading `/` and `./` are stripped, `.` components dropped and
//!   `..` applied lexically, clamped at the root (`../../etc/x` is `etc/x`). An entry naming
//!   the root (`./`, `.`, `/`) sets the root directory's metadata; a non-directory entry
//!   naming the root is an error. A component longer than 255 bytes is an error, and so is a
//!   path nesting more than 2048 directories deep (what `PATH_MAX` allows; it also keeps the
//!   tree shallow enough for recursive walks).
//! - **Parents** are resolved inside the image: a symlink among the parent components is
//!   followed within the tree (absolute targets start at the image root, `..` is clamped at
//!   the root), at most 40 symlinks per entry, else an error. Missing parents are created as
//!   implicit directories 0755 root:root with mtime 0; a later header for such a directory
//!   updates its metadata. A parent that resolves to a non-directory (or to a symlink with an
//!   empty target) is replaced by an implicit directory, the way an unpacker that must create
//!   the path removes the obstacle.
//! - **The leaf is never followed**: an entry replaces what is at its path. A directory entry
//!   over an existing directory replaces only the metadata (mode, owner, mtime, xattrs) and
//!   keeps the children; a non-directory over a directory removes the whole subtree.
//! - **Whiteouts** (`.wh.NAME`, opaque `.wh..wh..opq`) apply to lower layers only: in each
//!   layer its whiteouts are applied first, then its other entries in archive order (the
//!   layer's headers are read twice for that rather than held in memory; the first layer,
//!   over an empty tree, once). Whiteout parents are resolved without creating anything;
//!   whiteouts of absent paths are no-ops. Other `.wh..wh.*` names (aufs metadata such as
//!   `.wh..wh.plnk`), and anything below them, are skipped. Whiteouts never appear in the
//!   tree.
//! - **Hard links** resolve their target like an entry name (leaf not followed) in the merged
//!   state at that point (lower layers and earlier entries of the same layer, after this
//!   layer's whiteouts); the new path becomes one more entry of the same node. A missing or
//!   directory target is an error. Entries always create new nodes, so replacing one path of
//!   a link group leaves the other paths with the old node. A hard link onto its own path is
//!   a no-op.
//! - **Types**: regular (`0`, `\0`, `7`), hard link, symlink (raw target kept), char and block
//!   devices, directory, FIFO. An old-style `\0` entry whose name ends in `/` is a directory
//!   (as Go's archive/tar reads it). GNU long names/links, ustar prefixes and PAX
//!   `path`/`linkpath`/`size` are honoured by the header reader in `tarread`, which keeps PAX
//!   values as raw bytes; PAX global headers are ignored; GNU sparse entries (type `S` or PAX
//!   `GNU.sparse.*` records) are rejected; other types are skipped with a warning. The
//!   archive ends at the first all-zero block (or at the end of the file).
//! - **Metadata**: mode `& 0o7777` (setuid/setgid/sticky kept); uid/gid from the header
//!   (octal or base-256), overridden by PAX `uid`/`gid`; mtime from the header (octal or
//!   signed base-256), overridden by PAX `mtime` (decimal, may be negative and fractional:
//!   `-1.25` is sec -2, nsec 750000000). Xattrs from PAX `SCHILY.xattr.NAME` (raw value
//!   bytes) and `LIBARCHIVE.xattr.NAME` (name percent-encoded, value base64); when both name
//!   the same attribute the later record wins. Xattrs are sorted by name. PAX records with
//!   an empty value are ignored (as Go's archive/tar, hence umoci, does), so an xattr with an
//!   empty value is dropped. uid, gid and device
//!   numbers above `u32::MAX` are errors.
//! - **Integrity**: a regular file whose data would extend past the end of the layer file is
//!   an error (truncated layer). A name or link target holding a NUL byte is an error (no
//!   file system can store it). More than [`MAX_ENTRIES`] tar entries over all layers is an
//!   error ([`TreeBuilder::set_max_entries`]).
//!
//! # Hostile layers
//!
//! fledge runs as root and unpacks images from anywhere, so a layer is data, never a path on
//! the host. The merge never touches the file system (it reads headers from the layer file it
//! was given); the tree it builds has only names that are plain components (no `/`, no `.`
//! or `..`, no NUL, at most 255 bytes) below one root; the FUSE view serves that tree
//! (`ro,nosuid,nodev`), and the kernel backend copies it into the freshly made filesystem
//! with `mkdir`/`open(O_CREAT|O_EXCL)`/`symlink`/`mknod`/`link` on paths whose every parent
//! it created itself as a directory, setting metadata without following symlinks. So every
//! entry is either kept inside the image root or the image is refused with an error naming
//! the layer and the entry:
//!
//! | class | example entry | outcome |
//! |---|---|---|
//! | `..` in a name | `../../../tmp/x`, `a/../../etc/x` | kept inside: `..` is applied lexically and clamped at the root (`/tmp/x`, `/etc/x` of the image) |
//! | absolute name | `/etc/passwd` | kept inside: the leading `/` is dropped (`/etc/passwd` of the image) |
//! | write through a symlinked parent, absolute target | `evil -> /tmp/host`, then `evil/f` | kept inside: the symlink is followed within the image (`/tmp/host/f` of the image); the symlink itself is kept as written |
//! | same, relative target | `up -> ../../..`, then `up/tmp/f` | kept inside: `..` in the target is clamped at the image root (`/tmp/f` of the image) |
//! | same, to `/etc` | `sysconf -> /etc`, then `sysconf/x` | kept inside: the image's `/etc/x` |
//! | whiteout or opaque marker through a symlinked parent | `evil/.wh.f`, `evil/.wh..wh..opq` | kept inside: removes the image's entries only (nothing if the image has none) |
//! | hard link to a path outside the root | link `h` -> `../../etc/passwd` | kept inside when the image has that file (`h` joins the image's `/etc/passwd`); else **refused**: `tar entry h: hard link target ...: does not exist`. A host file is never read |
//! | hard link reached through a symlink | `lnk -> /etc`, link `h` -> `lnk/shadow` | the same: resolved within the image, or **refused** naming `h` |
//! | hard link to a directory | link `h` -> `etc` | **refused**: `... is a directory` |
//! | symlink loop among the parents | `a -> b`, `b -> a`, then `a/x` | **refused** after 40 symlinks: `tar entry a/x: too many levels of symbolic links` |
//! | symlink loop nothing walks through | `a -> b`, `b -> a` | kept: two symlinks, as written |
//! | device node naming a host disk | block `dev/sda` 8,0; char `dev/mem` 1,1 | kept inside as a node (mknod in the image); never opened: the view is `nodev`, the copy never opens non-regular files |
//! | header size larger than the data | `f` claims 1 MiB, the layer ends first | **refused**: `tar entry f: data ends at byte ... (truncated layer)` |
//! | NUL byte in a PAX name or link target | `path=etc/a\0b` | **refused**: `name contains a NUL byte` |
//! | component longer than 255 bytes, path deeper than 2048 | | **refused** naming the entry |
//! | `lost+found` as a symlink or directory | `lost+found -> /tmp/host` | kept inside, as the tree says (the kernel backend removes the mkfs one first) |
//! | decompression bomb (blob of a few MiB, layer of GiBs) | gzip of 1 GiB of zeros | see below |
//! | header bomb (millions of empty entries) | | **refused** past [`MAX_ENTRIES`] (8 Mi) entries over all layers; memory is about 160 bytes per entry at its peak (measured: 1 M files, 158 MiB with the freeze), so the cap bounds a merge near 1.3 GiB |
//!
//! Decompression bombs: a layer is streamed, never held in memory (the decoder and the
//! hashing writer exchange 1 MiB buffers, at most a handful in flight), so memory stays flat
//! whatever the layer's size. The compressed blob's size and digest are verified as it
//! streams (a blob longer than its descriptor says is cut off and refused), and the
//! uncompressed output's digest is checked against the config's `diff_id` before the layer
//! enters the cache; a self-consistent image that really is large is accepted, bounded only
//! by the cache disk. When that disk fills, the build fails with the write error naming the
//! cache's temporary file (`No space left on device`), the temporary file is removed, and
//! nothing partial is left in the cache. Only headers are merged, so a huge file costs
//! nothing more than its header.

mod builder;
mod tarread;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::Arc;

use thiserror::Error;

use crate::tree::{Content, Meta, NodeKind, Tree};

use builder::{clean_components, ResolveError, MAX_DEPTH, NAME_MAX};
pub use builder::{implicit_dir_meta, TreeBuilder, MAX_ENTRIES};
use tarread::{RawEntry, ReadError, TarReader};

/// Errors of the merge; every message names the layer index and the tar entry concerned.
#[derive(Debug, Error)]
pub enum MergeError {
    #[error("reading layer {layer}: {source}")]
    Io {
        layer: u32,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: tar entry {entry}: {reason}")]
    BadEntry {
        layer: u32,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: tar entry {entry}: hard link target {target}: {reason}")]
    HardlinkTarget {
        layer: u32,
        entry: String,
        target: String,
        reason: String,
    },
    #[error("layer {layer}: tar entry {entry}: too many levels of symbolic links in its path")]
    SymlinkLoop { layer: u32, entry: String },
    #[error("layer {layer}: tar entry {entry}: sparse tar entries are not supported")]
    Sparse { layer: u32, entry: String },
    #[error("layer {layer}: tar entry {entry}: path component of {len} bytes exceeds {max}")]
    NameTooLong {
        layer: u32,
        entry: String,
        len: usize,
        max: usize,
    },
    #[error(
        "layer {layer}: tar entry {entry}: data ends at byte {end} but the layer has only {file_len} bytes (truncated layer)"
    )]
    Truncated {
        layer: u32,
        entry: String,
        end: u64,
        file_len: u64,
    },
    #[error("injecting {path}: {reason}")]
    Inject { path: String, reason: String },
}

/// Raw bytes for messages.
pub(crate) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Merge uncompressed layer tars (lowest first) into a frozen tree whose
/// [`Tree::layer_files`] are these files, by index.
pub fn merge_layers(layers: Vec<File>) -> Result<Tree, MergeError> {
    let mut builder = TreeBuilder::new();
    for (i, file) in layers.iter().enumerate() {
        let index = u32::try_from(i).map_err(|_| MergeError::Io {
            layer: u32::MAX,
            source: io::Error::other("too many layers"),
        })?;
        builder.apply_layer(index, file)?;
    }
    Ok(builder.freeze(layers.into_iter().map(Arc::new).collect()))
}

/// What one tar entry does to the tree.
#[derive(Debug)]
enum Action {
    /// `.wh.NAME`: remove `NAME` from the parent.
    Whiteout,
    /// `.wh..wh..opq`: empty the parent.
    Opaque,
    Dir,
    /// A non-directory node (file, symlink, device, FIFO).
    Leaf(NodeKind),
    /// A hard link to the raw target path.
    Hardlink(Vec<u8>),
}

/// One entry of a layer, read from its headers.
#[derive(Debug)]
struct Record {
    path: Vec<u8>,
    action: Action,
    meta: Meta,
}

impl TreeBuilder {
    /// Apply one uncompressed layer tar on top of the current state. `index` is the layer's
    /// index in the `layer_files` later passed to [`TreeBuilder::freeze`].
    ///
    /// The layer's records are never all held at once (at a million entries they would
    /// outweigh the tree): whiteouts come first, so a layer over a non-empty tree is read
    /// twice, once to check every entry and apply its whiteouts, once to apply the rest.
    /// Over an empty tree (the first layer) whiteouts have nothing to hide, so one pass
    /// applies the entries as they are read. Either way an unreadable or malformed entry
    /// anywhere in the layer is reported before anything the layer's entries do to the tree.
    pub fn apply_layer(&mut self, index: u32, file: &File) -> Result<(), MergeError> {
        let budget = self.max_entries.saturating_sub(self.entries_read);
        let limit = self.max_entries;
        let is_whiteout = |rec: &Record| matches!(rec.action, Action::Whiteout | Action::Opaque);
        if self.is_empty() {
            let mut failed: Option<MergeError> = None;
            let read = scan_layer(index, file, budget, limit, |rec| {
                if failed.is_none() && !is_whiteout(&rec) {
                    failed = self.apply_record(index, rec).err();
                }
            })?;
            self.entries_read = self.entries_read.saturating_add(read);
            return failed.map_or(Ok(()), Err);
        }
        let mut whiteouts = Vec::new();
        let read = scan_layer(index, file, budget, limit, |rec| {
            if is_whiteout(&rec) {
                whiteouts.push(rec);
            }
        })?;
        self.entries_read = self.entries_read.saturating_add(read);
        for rec in &whiteouts {
            self.apply_whiteout(index, rec)?;
        }
        drop(whiteouts);
        let mut failed: Option<MergeError> = None;
        scan_layer(index, file, budget, limit, |rec| {
            if failed.is_none() && !is_whiteout(&rec) {
                failed = self.apply_record(index, rec).err();
            }
        })?;
        failed.map_or(Ok(()), Err)
    }

    fn apply_whiteout(&mut self, layer: u32, rec: &Record) -> Result<(), MergeError> {
        let comps = clean_components(&rec.path);
        let Some(leaf) = comps.last() else {
            return Ok(());
        };
        let Some(parent) = self
            .resolve_parent(&comps, false)
            .map_err(|e| resolve_err(layer, &rec.path, e))?
        else {
            return Ok(());
        };
        match rec.action {
            Action::Opaque => self.clear_dir(parent),
            _ => {
                let name = leaf.strip_prefix(b".wh.").unwrap_or(leaf);
                self.remove_child(parent, name);
            }
        }
        Ok(())
    }

    fn apply_record(&mut self, layer: u32, rec: Record) -> Result<(), MergeError> {
        if self.is_full() {
            return Err(bad(layer, &rec.path, "too many entries in the image"));
        }
        let comps = clean_components(&rec.path);
        let Some(leaf) = comps.last() else {
            return match rec.action {
                Action::Dir => {
                    self.set_root_meta(rec.meta);
                    Ok(())
                }
                _ => Err(bad(
                    layer,
                    &rec.path,
                    "a non-directory cannot replace the root",
                )),
            };
        };
        // A hard link's target is looked up before the link's own parents are created.
        let link_target = match &rec.action {
            Action::Hardlink(target) => Some(self.hardlink_target(layer, &rec.path, target)?),
            _ => None,
        };
        let parent = self
            .resolve_parent(&comps, true)
            .map_err(|e| resolve_err(layer, &rec.path, e))?
            .ok_or_else(|| bad(layer, &rec.path, "parent directory cannot be created"))?;
        match rec.action {
            Action::Dir => {
                self.put_dir(parent, leaf, rec.meta);
            }
            Action::Leaf(kind) => self.put_leaf(parent, leaf, kind, rec.meta),
            Action::Hardlink(_) => {
                if let Some(target) = link_target {
                    self.link(parent, leaf, target);
                }
            }
            Action::Whiteout | Action::Opaque => {}
        }
        Ok(())
    }

    fn hardlink_target(
        &self,
        layer: u32,
        entry: &[u8],
        target: &[u8],
    ) -> Result<crate::tree::NodeId, MergeError> {
        let link_err = |reason: &str| MergeError::HardlinkTarget {
            layer,
            entry: lossy(entry),
            target: lossy(target),
            reason: reason.to_string(),
        };
        let comps = clean_components(target);
        check_name_lengths(layer, entry, &comps)?;
        let id = self
            .lookup_path(&comps)
            .map_err(|e| {
                link_err(match e {
                    ResolveError::SymlinkLoop => "too many levels of symbolic links",
                    ResolveError::TooDeep => "nests too deep",
                })
            })?
            .ok_or_else(|| link_err("does not exist"))?;
        if self.node_is_dir(id) {
            return Err(link_err("is a directory"));
        }
        Ok(id)
    }
}

fn bad(layer: u32, entry: &[u8], reason: &str) -> MergeError {
    MergeError::BadEntry {
        layer,
        entry: lossy(entry),
        reason: reason.to_string(),
    }
}

fn resolve_err(layer: u32, entry: &[u8], e: ResolveError) -> MergeError {
    match e {
        ResolveError::SymlinkLoop => MergeError::SymlinkLoop {
            layer,
            entry: lossy(entry),
        },
        ResolveError::TooDeep => bad(
            layer,
            entry,
            &format!("path nests deeper than {MAX_DEPTH} directories"),
        ),
    }
}

fn check_name_lengths(layer: u32, entry: &[u8], comps: &[&[u8]]) -> Result<(), MergeError> {
    match comps.iter().find(|c| c.len() > NAME_MAX) {
        Some(c) => Err(MergeError::NameTooLong {
            layer,
            entry: lossy(entry),
            len: c.len(),
            max: NAME_MAX,
        }),
        None => Ok(()),
    }
}

/// Read every header of a layer (no file data is read), passing each entry's record to
/// `each` in archive order; returns the number of tar entries read. More than `budget`
/// entries is an error naming the first one over it (`limit` is the image-wide limit, for
/// the message).
fn scan_layer(
    layer: u32,
    file: &File,
    budget: usize,
    limit: usize,
    mut each: impl FnMut(Record),
) -> Result<usize, MergeError> {
    let io_err = |source| MergeError::Io { layer, source };
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut reader = TarReader::new(file).map_err(io_err)?;
    let mut read = 0usize;
    loop {
        let raw = match reader.next_entry() {
            Ok(Some(raw)) if read >= budget => {
                return Err(bad(
                    layer,
                    &raw.path,
                    &format!("the image has more than {limit} tar entries"),
                ));
            }
            Ok(Some(raw)) => {
                read += 1;
                raw
            }
            Ok(None) => break,
            Err(ReadError::Io(source)) => {
                let last = reader.last_path();
                let source = if last.is_empty() {
                    source
                } else {
                    io::Error::new(
                        source.kind(),
                        format!("{source} (after tar entry {})", lossy(last)),
                    )
                };
                return Err(MergeError::Io { layer, source });
            }
            Err(ReadError::Bad { entry, reason }) => {
                return Err(MergeError::BadEntry {
                    layer,
                    entry: if entry.is_empty() {
                        "(first entry)".to_string()
                    } else {
                        lossy(&entry)
                    },
                    reason,
                })
            }
        };
        if let Some(rec) = read_entry(layer, file_len, raw)? {
            each(rec);
        }
    }
    Ok(read)
}

/// Turn one tar entry into a record; `None` for entries that do not change the tree.
fn read_entry(layer: u32, file_len: u64, raw: RawEntry) -> Result<Option<Record>, MergeError> {
    let RawEntry {
        typeflag,
        path,
        link,
        mode,
        uid,
        gid,
        size,
        mtime,
        devmajor,
        devminor,
        data_offset,
        pax,
    } = raw;
    let sparse = || MergeError::Sparse {
        layer,
        entry: lossy(&path),
    };
    if typeflag == b'S' {
        return Err(sparse());
    }
    let comps = clean_components(&path);
    check_name_lengths(layer, &path, &comps)?;
    // No file system can hold a NUL in a name or a link target: such an entry could not be
    // copied out, so the image is refused here, naming it.
    if path.contains(&0) {
        return Err(bad(layer, &path, "name contains a NUL byte"));
    }
    if link.contains(&0) {
        return Err(bad(layer, &path, "link target contains a NUL byte"));
    }

    let mut xattrs: BTreeMap<Box<[u8]>, Box<[u8]>> = BTreeMap::new();
    for (key, value) in pax {
        if key.starts_with(b"GNU.sparse.") {
            return Err(sparse());
        }
        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            xattrs.insert(name.into(), value.into());
        } else if let Some(name) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
            let name = tarread::percent_decode(name)
                .ok_or_else(|| bad(layer, &path, "invalid LIBARCHIVE.xattr name encoding"))?;
            let value = tarread::base64_decode(&value)
                .ok_or_else(|| bad(layer, &path, "invalid LIBARCHIVE.xattr value encoding"))?;
            xattrs.insert(name.into(), value.into());
        }
    }
    let to_u32 = |v: u64, what: &str| {
        u32::try_from(v).map_err(|_| bad(layer, &path, &format!("{what} {v} out of range")))
    };
    let meta = Meta {
        mode: (mode & 0o7777) as u32,
        uid: to_u32(uid, "uid")?,
        gid: to_u32(gid, "gid")?,
        mtime,
        xattrs: xattrs.into_iter().collect(),
    };

    // Whiteouts and aufs metadata are recognised by name, whatever their type.
    if let Some(leaf) = comps.last() {
        if *leaf == b".wh..wh..opq" {
            return Ok(Some(Record {
                path,
                action: Action::Opaque,
                meta,
            }));
        }
        if comps.iter().any(|c| c.starts_with(b".wh..wh.")) {
            return Ok(None);
        }
        if leaf.starts_with(b".wh.") {
            if leaf.len() == 4 {
                tracing::warn!(layer, entry = %lossy(&path), "skipping whiteout without a name");
                return Ok(None);
            }
            return Ok(Some(Record {
                path,
                action: Action::Whiteout,
                meta,
            }));
        }
    }

    let action = match typeflag {
        0 if path.last() == Some(&b'/') => Action::Dir,
        b'0' | 0 | b'7' => {
            let end = data_offset.saturating_add(size);
            if end > file_len {
                return Err(MergeError::Truncated {
                    layer,
                    entry: lossy(&path),
                    end,
                    file_len,
                });
            }
            Action::Leaf(NodeKind::File {
                size,
                content: Content::Layer {
                    layer,
                    offset: data_offset,
                },
            })
        }
        b'5' => Action::Dir,
        b'2' => Action::Leaf(NodeKind::Symlink {
            target: link.into(),
        }),
        b'1' => {
            if link.is_empty() {
                return Err(bad(layer, &path, "hard link without a target"));
            }
            Action::Hardlink(link)
        }
        b'3' | b'4' => {
            let major = to_u32(devmajor, "device major")?;
            let minor = to_u32(devminor, "device minor")?;
            Action::Leaf(if typeflag == b'3' {
                NodeKind::CharDevice { major, minor }
            } else {
                NodeKind::BlockDevice { major, minor }
            })
        }
        b'6' => Action::Leaf(NodeKind::Fifo),
        other => {
            tracing::warn!(
                layer,
                entry = %lossy(&path),
                kind = %(other as char).escape_default(),
                "skipping tar entry of unsupported type"
            );
            return Ok(None);
        }
    };
    let mut meta = meta;
    if matches!(action, Action::Leaf(NodeKind::Symlink { .. })) {
        // Linux symlinks have no permissions of their own: they are always 0777, whatever
        // the tar header says (umoci and the kernel agree).
        meta.mode = 0o777;
    }
    Ok(Some(Record { path, action, meta }))
}
