//! `[mappings]`: host files and directories copied into the image, with FHS mode rules.
//!
//! [`plan_mappings`] turns the configured mappings into a flat, sorted list of entries
//! ([`PlannedEntry`]) that a backend inserts into the image. Every entry is owned by root:root;
//! its mode comes from [`mapped_mode`]. Missing parent directories of a destination are not
//! listed: the consumer creates them (0755, root) when the image lacks them.

use std::collections::BTreeMap;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

use crate::config::Mapping;
use crate::tree::Timestamp;

/// Directories whose files are executables.
const EXEC_DIRS: &[&str] = &[
    "/bin",
    "/sbin",
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/opt/bin",
    "/opt/sbin",
];

/// Directories whose shared objects get 0755.
const LIB_DIRS: &[&str] = &[
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/usr/local/lib64",
];

/// An error while planning mappings.
#[derive(Debug, Error)]
pub enum MappingError {
    #[error("mapping '{host}' = '{dest}': source {} does not exist", path.display())]
    SourceMissing {
        host: String,
        dest: String,
        path: PathBuf,
    },
    #[error("mapping '{host}' = '{dest}': cannot read {}: {source}", path.display())]
    Io {
        host: String,
        dest: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mapping '{host}' = '{dest}': {} is a {kind}, only files, directories and symlinks can be mapped", path.display())]
    Unsupported {
        host: String,
        dest: String,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("mapping '{host}' = '{dest}': a file cannot replace the root directory")]
    FileOnRoot { host: String, dest: String },
    #[error("mappings '{first}' and '{second}' both write {dest}")]
    Conflict {
        first: String,
        second: String,
        dest: String,
    },
}

/// What a planned entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlannedKind {
    Dir,
    /// Contents are read from `host_path`; `size` is its size when planned.
    File {
        host_path: PathBuf,
        size: u64,
    },
    Symlink {
        target: Vec<u8>,
    },
}

/// One entry to insert into the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEntry {
    /// Absolute destination path, normalised (no `.`, no repeated or trailing `/`).
    pub dest: Vec<u8>,
    pub kind: PlannedKind,
    /// Permission bits (`0o777` at most; never setuid, setgid or sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time of the host file.
    pub mtime: Timestamp,
}

/// The mode a mapped entry gets, by the FHS rules, in this order:
/// 1. directories -> 0755;
/// 2. a file with any execute bit -> every class that can read can also execute
///    (0644|x -> 0755, 0600|x -> 0700, 0640|x -> 0750); write bits are kept;
/// 3. a file under an executable directory (`/bin/`, `/usr/local/sbin/`, ...) -> 0755;
/// 4. a file under a library directory (`/lib/`, `/usr/lib64/`, ...) whose name ends in `.so`
///    or contains `.so.` -> 0755;
/// 5. anything else -> 0644.
///
/// `dest` is the absolute destination; "under" means strictly below, at any depth.
pub fn mapped_mode(host_mode: u32, dest: &str, is_dir: bool) -> u32 {
    if is_dir {
        return 0o755;
    }
    let perm = host_mode & 0o777;
    if perm & 0o111 != 0 {
        let mut m = perm;
        for (read, exec) in [(0o400, 0o100), (0o040, 0o010), (0o004, 0o001)] {
            if perm & read != 0 {
                m |= exec;
            }
        }
        return m;
    }
    let dest = normalize(dest);
    if EXEC_DIRS.iter().any(|d| is_strictly_under(&dest, d)) {
        return 0o755;
    }
    if LIB_DIRS.iter().any(|d| is_strictly_under(&dest, d)) {
        let name = dest.rsplit('/').next().unwrap_or("");
        if name.ends_with(".so") || name.contains(".so.") {
            return 0o755;
        }
    }
    0o644
}

/// `/a//b/./c/` -> `/a/b/c`; the root stays `/`.
fn normalize(dest: &str) -> String {
    let mut out = String::new();
    for c in Path::new(dest).components() {
        if let Component::Normal(n) = c {
            out.push('/');
            out.push_str(&n.to_string_lossy());
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn is_strictly_under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/'))
}

fn normalize_bytes(dest: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for c in Path::new(dest).components() {
        if let Component::Normal(n) = c {
            out.push(b'/');
            out.extend_from_slice(n.as_bytes());
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

fn timestamp(md: &std::fs::Metadata) -> Timestamp {
    // mtime_nsec is always within 0..1e9 for a valid stat.
    Timestamp::new(md.mtime(), u32::try_from(md.mtime_nsec()).unwrap_or(0))
}

fn kind_name(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Expand the mappings into the entries to insert, sorted by destination (parents first).
///
/// Host paths are relative to `config_dir` unless absolute. A mapping's own source is
/// followed if it is a symlink; inside a mapped directory, symlinks are kept as symlinks and
/// never followed. Two mappings that produce the same destination are an error unless both
/// entries are directories.
pub fn plan_mappings(
    config_dir: &Path,
    mappings: &[Mapping],
) -> Result<Vec<PlannedEntry>, MappingError> {
    // dest -> (entry, index of the mapping that produced it)
    let mut planned: BTreeMap<Vec<u8>, (PlannedEntry, usize)> = BTreeMap::new();
    for (idx, m) in mappings.iter().enumerate() {
        let mut entries = Vec::new();
        plan_one(config_dir, m, &mut entries)?;
        for e in entries {
            match planned.get(&e.dest) {
                Some((prev, _)) if prev.kind == PlannedKind::Dir && e.kind == PlannedKind::Dir => {}
                Some((_, prev_idx)) => {
                    return Err(MappingError::Conflict {
                        first: mappings[*prev_idx].host.clone(),
                        second: m.host.clone(),
                        dest: String::from_utf8_lossy(&e.dest).into_owned(),
                    })
                }
                None => {
                    planned.insert(e.dest.clone(), (e, idx));
                }
            }
        }
    }
    let mut out: Vec<PlannedEntry> = planned.into_values().map(|(e, _)| e).collect();
    // Byte order already puts a parent before its children (a prefix sorts first); keep it
    // explicit for readers of the result.
    out.sort_by(|a, b| a.dest.cmp(&b.dest));
    Ok(out)
}

fn plan_one(
    config_dir: &Path,
    m: &Mapping,
    out: &mut Vec<PlannedEntry>,
) -> Result<(), MappingError> {
    let src = config_dir.join(&m.host);
    let io_err = |path: &Path, source: std::io::Error| MappingError::Io {
        host: m.host.clone(),
        dest: m.dest.clone(),
        path: path.to_path_buf(),
        source,
    };
    let md = match std::fs::metadata(&src) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MappingError::SourceMissing {
                host: m.host.clone(),
                dest: m.dest.clone(),
                path: src,
            })
        }
        Err(e) => return Err(io_err(&src, e)),
    };
    let dest = normalize_bytes(&m.dest);
    if md.is_file() {
        if dest == b"/" {
            return Err(MappingError::FileOnRoot {
                host: m.host.clone(),
                dest: m.dest.clone(),
            });
        }
        out.push(file_entry(dest, &m.dest, src, &md));
        return Ok(());
    }
    if !md.is_dir() {
        return Err(MappingError::Unsupported {
            host: m.host.clone(),
            dest: m.dest.clone(),
            path: src,
            kind: kind_name(md.file_type()),
        });
    }
    if dest != b"/" {
        out.push(PlannedEntry {
            dest: dest.clone(),
            kind: PlannedKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: timestamp(&md),
        });
    }
    // Iterative walk; symlinks are never followed below the mapping's own source.
    let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(src, dest)];
    while let Some((dir, dir_dest)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            let path = entry.path();
            let md = std::fs::symlink_metadata(&path).map_err(|e| io_err(&path, e))?;
            let mut child_dest = dir_dest.clone();
            if child_dest != b"/" {
                child_dest.push(b'/');
            }
            child_dest.extend_from_slice(entry.file_name().as_bytes());
            let ft = md.file_type();
            if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| io_err(&path, e))?;
                out.push(PlannedEntry {
                    dest: child_dest,
                    kind: PlannedKind::Symlink {
                        target: target.into_os_string().into_vec(),
                    },
                    mode: 0o777,
                    uid: 0,
                    gid: 0,
                    mtime: timestamp(&md),
                });
            } else if ft.is_dir() {
                out.push(PlannedEntry {
                    dest: child_dest.clone(),
                    kind: PlannedKind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    mtime: timestamp(&md),
                });
                stack.push((path, child_dest));
            } else if ft.is_file() {
                let dest_str = String::from_utf8_lossy(&child_dest).into_owned();
                out.push(file_entry(child_dest, &dest_str, path, &md));
            } else {
                return Err(MappingError::Unsupported {
                    host: m.host.clone(),
                    dest: m.dest.clone(),
                    path,
                    kind: kind_name(ft),
                });
            }
        }
    }
    Ok(())
}

fn file_entry(
    dest: Vec<u8>,
    dest_str: &str,
    host: PathBuf,
    md: &std::fs::Metadata,
) -> PlannedEntry {
    PlannedEntry {
        dest,
        mode: mapped_mode(md.permissions().mode(), dest_str, false),
        kind: PlannedKind::File {
            host_path: host,
            size: md.len(),
        },
        uid: 0,
        gid: 0,
        mtime: timestamp(md),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn mode_rules() {
        // (host mode, dest, is_dir, expected)
        let cases: &[(u32, &str, bool, u32)] = &[
            // 1. directories
            (0o700, "/etc/app", true, 0o755),
            (0o777, "/usr/bin", true, 0o755),
            (0o000, "/opt/x", true, 0o755),
            // 2. executable files: readers become executors, write bits kept
            (0o744, "/etc/x", false, 0o755),
            (0o644 | 0o100, "/srv/run.sh", false, 0o755),
            (0o600 | 0o100, "/etc/x", false, 0o700),
            (0o640 | 0o100, "/etc/x", false, 0o750),
            (0o664 | 0o010, "/etc/x", false, 0o775),
            (0o001, "/etc/x", false, 0o001),
            (0o4755, "/etc/x", false, 0o755), // setuid dropped
            (0o711, "/usr/lib/x.so", false, 0o711),
            // 3. executable directories
            (0o644, "/usr/bin/x", false, 0o755),
            (0o600, "/bin/x", false, 0o755),
            (0o644, "/sbin/x", false, 0o755),
            (0o644, "/usr/sbin/x", false, 0o755),
            (0o644, "/usr/local/bin/x", false, 0o755),
            (0o644, "/usr/local/sbin/x", false, 0o755),
            (0o644, "/opt/bin/x", false, 0o755),
            (0o644, "/opt/sbin/x", false, 0o755),
            (0o644, "/usr/bin/sub/x", false, 0o755),
            (0o644, "/usr//bin/./x", false, 0o755),
            (0o644, "/usr/bin", false, 0o644), // the directory itself is not under it
            (0o644, "/usr/bin/", false, 0o644),
            (0o644, "/usr/binx/y", false, 0o644),
            (0o644, "/usr/libexec/x", false, 0o644),
            (0o644, "/opt/app/bin/x", false, 0o644),
            // 4. shared objects under library directories
            (0o644, "/usr/lib/libfoo.so", false, 0o755),
            (0o644, "/usr/lib/libfoo.so.1", false, 0o755),
            (0o644, "/lib/libfoo.so.1.2.3", false, 0o755),
            (0o644, "/lib64/ld.so", false, 0o755),
            (0o644, "/usr/lib64/libz.so.1", false, 0o755),
            (0o644, "/usr/local/lib/libx.so", false, 0o755),
            (0o644, "/usr/local/lib64/libx.so", false, 0o755),
            (0o644, "/usr/lib/x86_64-linux-gnu/libc.so.6", false, 0o755),
            (0o644, "/usr/lib/libfoo.sox", false, 0o644),
            (0o644, "/usr/lib/libfoo.a", false, 0o644),
            (0o644, "/usr/lib/libfoo.so.d/conf", false, 0o644),
            (0o644, "/usr/libfoo.so", false, 0o644),
            (0o644, "/etc/libfoo.so", false, 0o644),
            (0o644, "/usr/lib", false, 0o644),
            // 5. everything else
            (0o600, "/etc/secret", false, 0o644),
            (0o666, "/etc/x", false, 0o644),
            (0o644, "/x", false, 0o644),
        ];
        for &(host, dest, is_dir, want) in cases {
            assert_eq!(
                mapped_mode(host, dest, is_dir),
                want,
                "mapped_mode({host:o}, {dest}, {is_dir})"
            );
        }
    }

    fn set_mode(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mapping(host: &str, dest: &str) -> Mapping {
        Mapping {
            host: host.into(),
            dest: dest.into(),
        }
    }

    #[test]
    fn plans_files_directories_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::write(root.join("tool"), b"#!/bin/sh\n").unwrap();
        set_mode(&root.join("tool"), 0o644);
        fs::create_dir_all(root.join("tree/sub")).unwrap();
        fs::write(root.join("tree/a.conf"), b"abc").unwrap();
        set_mode(&root.join("tree/a.conf"), 0o600);
        fs::write(root.join("tree/sub/run"), b"x").unwrap();
        set_mode(&root.join("tree/sub/run"), 0o700);
        std::os::unix::fs::symlink("/etc/passwd", root.join("tree/link")).unwrap();
        std::os::unix::fs::symlink("../../tool", root.join("tree/sub/up")).unwrap();
        let mtime = filetime(&root.join("tree/a.conf"));

        let plan = plan_mappings(
            root,
            &[
                mapping("tool", "/usr/local/bin/tool"),
                mapping("tree", "/etc/app/"),
            ],
        )
        .unwrap();
        let summary: Vec<(String, String, u32)> = plan
            .iter()
            .map(|e| {
                let kind = match &e.kind {
                    PlannedKind::Dir => "dir".to_string(),
                    PlannedKind::File { host_path, size } => format!(
                        "file {} {size}",
                        host_path.strip_prefix(root).unwrap().display()
                    ),
                    PlannedKind::Symlink { target } => {
                        format!("link {}", String::from_utf8_lossy(target))
                    }
                };
                (String::from_utf8(e.dest.clone()).unwrap(), kind, e.mode)
            })
            .collect();
        let want: Vec<(String, String, u32)> = [
            ("/etc/app", "dir", 0o755),
            ("/etc/app/a.conf", "file tree/a.conf 3", 0o644),
            ("/etc/app/link", "link /etc/passwd", 0o777),
            ("/etc/app/sub", "dir", 0o755),
            ("/etc/app/sub/run", "file tree/sub/run 1", 0o700),
            ("/etc/app/sub/up", "link ../../tool", 0o777),
            ("/usr/local/bin/tool", "file tool 10", 0o755),
        ]
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), *c))
        .collect();
        assert_eq!(summary, want);
        assert!(plan.iter().all(|e| e.uid == 0 && e.gid == 0));
        let conf = plan.iter().find(|e| e.dest == b"/etc/app/a.conf").unwrap();
        assert_eq!(conf.mtime, mtime);
    }

    fn filetime(p: &Path) -> Timestamp {
        timestamp(&fs::metadata(p).unwrap())
    }

    #[test]
    fn parents_come_first_even_with_tricky_names() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("d/a/b")).unwrap();
        fs::write(root.join("d/a-b"), b"").unwrap();
        fs::write(root.join("d/a/b/c"), b"").unwrap();
        fs::write(root.join("d/a.b"), b"").unwrap();
        let plan = plan_mappings(root, &[mapping("d", "/x")]).unwrap();
        for (i, e) in plan.iter().enumerate() {
            let parent = &e.dest[..e.dest.iter().rposition(|&b| b == b'/').unwrap()];
            if let Some(pi) = plan.iter().position(|p| p.dest == parent) {
                assert!(pi < i, "parent of {:?} after it", e.dest);
            }
        }
        assert_eq!(plan.len(), 6);
    }

    #[test]
    fn directory_onto_root_and_top_level_symlink_source() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir(root.join("overlay")).unwrap();
        fs::write(root.join("overlay/motd"), b"hi").unwrap();
        fs::write(root.join("real"), b"data").unwrap();
        std::os::unix::fs::symlink("real", root.join("alias")).unwrap();
        let plan = plan_mappings(
            root,
            &[mapping("overlay", "/"), mapping("alias", "/etc/alias")],
        )
        .unwrap();
        let dests: Vec<&[u8]> = plan.iter().map(|e| e.dest.as_slice()).collect();
        assert_eq!(dests, vec![&b"/etc/alias"[..], &b"/motd"[..]]);
        // The mapping's own source symlink is followed: a file with the target's size.
        assert!(matches!(&plan[0].kind, PlannedKind::File { size: 4, .. }));
    }

    #[test]
    fn errors_name_the_mapping_and_path() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::write(root.join("f"), b"1").unwrap();
        fs::write(root.join("g"), b"2").unwrap();
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"3").unwrap();
        fs::create_dir(root.join("e")).unwrap();
        fs::create_dir(root.join("e/etc")).unwrap();
        nix::unistd::mkfifo(
            &root.join("d2fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();

        let cases: Vec<(Vec<Mapping>, String)> = vec![
            (
                vec![mapping("nope", "/x")],
                format!(
                    "mapping 'nope' = '/x': source {} does not exist",
                    root.join("nope").display()
                ),
            ),
            (
                vec![mapping("f", "/")],
                "mapping 'f' = '/': a file cannot replace the root directory".into(),
            ),
            (
                vec![mapping("f", "/x/f"), mapping("d", "/x")],
                "mappings 'f' and 'd' both write /x/f".into(),
            ),
            (
                vec![mapping("f", "/y"), mapping("g", "//y")],
                "mappings 'f' and 'g' both write /y".into(),
            ),
            (
                vec![mapping("d2fifo", "/p")],
                format!(
                    "mapping 'd2fifo' = '/p': {} is a fifo, only files, directories and symlinks can be mapped",
                    root.join("d2fifo").display()
                ),
            ),
        ];
        for (maps, want) in cases {
            let err = plan_mappings(root, &maps).unwrap_err();
            assert_eq!(err.to_string(), want);
        }
        // Directories from two mappings merge.
        let plan = plan_mappings(root, &[mapping("e", "/"), mapping("d", "/etc")]).unwrap();
        let dests: Vec<&[u8]> = plan.iter().map(|e| e.dest.as_slice()).collect();
        assert_eq!(dests, vec![&b"/etc"[..], &b"/etc/f"[..]]);
    }
}
