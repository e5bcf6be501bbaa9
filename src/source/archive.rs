//! Reading files out of a tar archive in place: [`TarIndex`] walks the archive's headers once
//! and records where each member's data starts, so members are later read by offset (`pread`)
//! without extracting anything. Used by `oci-archive:` and `docker-archive:` (and the Docker
//! daemon, whose export is a docker-archive).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::SourceError;

/// How many symbolic links are followed when looking a member up.
const MAX_LINK_DEPTH: usize = 16;

#[derive(Clone, Debug)]
enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symbolic or hard link, with its target as a normalised archive path.
    Link(String),
}

/// An index of a tar archive's regular files (and links between them).
#[derive(Debug)]
pub struct TarIndex {
    path: PathBuf,
    file: Arc<File>,
    members: HashMap<String, Member>,
}

/// Normalise an archive path: no leading `./` or `/`, no `.` components, `..` resolved
/// (never above the root).
pub fn normalize_member(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

impl TarIndex {
    /// Index the tar file at `path`.
    pub fn open(path: &Path) -> Result<TarIndex, SourceError> {
        let io_err = |e: io::Error| SourceError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(SourceError::BadArchive {
                path: path.to_path_buf(),
                reason: "not a regular file".to_string(),
            });
        }
        let mut members = HashMap::new();
        {
            let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 16, &file));
            let entries = archive.entries().map_err(|e| SourceError::BadArchive {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            for entry in entries {
                let entry = entry.map_err(|e| SourceError::BadArchive {
                    path: path.to_path_buf(),
                    reason: format!("cannot read a tar header: {e}"),
                })?;
                let name = entry.path().map_err(|e| SourceError::BadArchive {
                    path: path.to_path_buf(),
                    reason: format!("bad member name: {e}"),
                })?;
                let name = normalize_member(&name.to_string_lossy());
                let kind = entry.header().entry_type();
                if kind.is_file() || kind == tar::EntryType::Continuous {
                    let offset = entry.raw_file_position();
                    let size = entry.size();
                    let end = offset.checked_add(size);
                    if end.is_none_or(|end| end > meta.len()) {
                        return Err(SourceError::BadArchive {
                            path: path.to_path_buf(),
                            reason: format!("member '{name}' runs past the end of the file"),
                        });
                    }
                    members.insert(name, Member::File { offset, size });
                } else if kind.is_symlink() || kind.is_hard_link() {
                    let Ok(Some(target)) = entry.link_name() else {
                        continue;
                    };
                    let target = target.to_string_lossy();
                    let resolved = if kind.is_hard_link() || target.starts_with('/') {
                        normalize_member(&target)
                    } else {
                        let parent = name.rsplit_once('/').map_or("", |(p, _)| p);
                        normalize_member(&format!("{parent}/{target}"))
                    };
                    members.insert(name, Member::Link(resolved));
                }
            }
        }
        Ok(TarIndex {
            path: path.to_path_buf(),
            file: Arc::new(file),
            members,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Offset and size of member `name`, following links; `None` if absent.
    pub fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = normalize_member(name);
        for _ in 0..MAX_LINK_DEPTH {
            match self.members.get(&name)? {
                Member::File { offset, size } => return Some((*offset, *size)),
                Member::Link(target) => name = target.clone(),
            }
        }
        None
    }

    /// Whether `name` is a regular file in the archive.
    pub fn contains(&self, name: &str) -> bool {
        self.locate(name).is_some()
    }

    /// A reader over member `name`; `None` if absent.
    pub fn open_member(&self, name: &str) -> Option<MemberReader> {
        let (offset, size) = self.locate(name)?;
        Some(MemberReader {
            file: Arc::clone(&self.file),
            pos: offset,
            remaining: size,
        })
    }

    /// Size of member `name`.
    pub fn member_size(&self, name: &str) -> Option<u64> {
        self.locate(name).map(|(_, s)| s)
    }

    /// Read member `name` into memory, refusing more than `limit` bytes; `Ok(None)` if absent.
    pub fn read_member(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, SourceError> {
        let Some(size) = self.member_size(name) else {
            return Ok(None);
        };
        if size > limit {
            return Err(SourceError::BlobTooLarge {
                blob: format!("{} in {}", name, self.path.display()),
                size,
                limit,
            });
        }
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let Some(mut r) = self.open_member(name) else {
            return Ok(None);
        };
        r.read_to_end(&mut data).map_err(|e| SourceError::Io {
            path: self.path.clone(),
            source: e,
        })?;
        Ok(Some(data))
    }
}

/// Reads one tar member by offset; independent readers can run on several threads at once.
pub struct MemberReader {
    file: Arc<File>,
    pos: u64,
    remaining: u64,
}

impl Read for MemberReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ended inside a member (was it truncated?)",
            ));
        }
        self.pos += n as u64;
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, file content, symlink target); neither content nor target means a directory.
    type Spec<'a> = (&'a str, Option<&'a [u8]>, Option<&'a str>);

    fn tar_with(entries: &[Spec]) -> tempfile::NamedTempFile {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            match (data, link) {
                (Some(d), _) => {
                    h.set_size(d.len() as u64);
                    h.set_entry_type(tar::EntryType::Regular);
                    b.append_data(&mut h, name, &d[..]).unwrap();
                }
                (None, Some(l)) => {
                    h.set_size(0);
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, name, l).unwrap();
                }
                (None, None) => {
                    h.set_size(0);
                    h.set_entry_type(tar::EntryType::Directory);
                    b.append_data(&mut h, name, &[][..]).unwrap();
                }
            }
        }
        let data = b.into_inner().unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), data).unwrap();
        f
    }

    #[test]
    fn members_links_and_paths() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let f = tar_with(&[
            ("./dir/", None, None),
            ("./dir/a", Some(b"alpha"), None),
            ("big", Some(&big), None),
            ("dir/link", None, Some("a")),
            ("abs", None, Some("/dir/link")),
            ("loop1", None, Some("loop2")),
            ("loop2", None, Some("loop1")),
        ]);
        let idx = TarIndex::open(f.path()).unwrap();
        assert_eq!(idx.read_member("dir/a", 100).unwrap().unwrap(), b"alpha");
        assert_eq!(idx.read_member("./dir/a", 100).unwrap().unwrap(), b"alpha");
        assert_eq!(idx.read_member("dir/link", 100).unwrap().unwrap(), b"alpha");
        assert_eq!(idx.read_member("abs", 100).unwrap().unwrap(), b"alpha");
        assert_eq!(idx.read_member("big", 1 << 20).unwrap().unwrap(), big);
        assert!(idx.read_member("missing", 10).unwrap().is_none());
        assert!(idx.read_member("loop1", 10).unwrap().is_none());
        assert!(!idx.contains("dir"));
        let e = idx.read_member("big", 10).unwrap_err();
        assert!(matches!(e, SourceError::BlobTooLarge { .. }), "{e}");
    }

    #[test]
    fn truncated_and_bad_archives() {
        let big = vec![7u8; 100_000];
        let f = tar_with(&[("big", Some(&big), None)]);
        let data = std::fs::read(f.path()).unwrap();
        std::fs::write(f.path(), &data[..50_000]).unwrap();
        let e = TarIndex::open(f.path()).unwrap_err();
        assert!(matches!(e, SourceError::BadArchive { .. }), "{e}");
        assert!(
            e.to_string().contains(&f.path().display().to_string()),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let e = TarIndex::open(dir.path()).unwrap_err();
        assert!(
            matches!(e, SourceError::BadArchive { .. } | SourceError::Io { .. }),
            "{e}"
        );
        let e = TarIndex::open(&dir.path().join("nope.tar")).unwrap_err();
        assert!(matches!(e, SourceError::Io { .. }), "{e}");
    }

    #[test]
    fn normalize_table() {
        for (i, o) in [
            ("./a/b", "a/b"),
            ("/a//b/", "a/b"),
            ("a/./b", "a/b"),
            ("a/../b", "b"),
            ("../../x", "x"),
            ("", ""),
        ] {
            assert_eq!(normalize_member(i), o, "{i}");
        }
    }
}
