//! `mkfs.xfs -p` protofiles generated from the merged tree.
//!
//! A protofile is whitespace-tokenised and line-based: each entry is
//! `name mode uid gid [source | target | major minor]`, directories are closed by `$`. The
//! mode token is a type letter, `u`/`-` (setuid), `g`/`-` (setgid) and three octal digits.
//! What that cannot carry, xfsprogs 6.1 cannot add afterwards either:
//! - xattrs and hard links (every file line is a new inode): such trees are refused, with the
//!   paths listed;
//! - names or symlink targets with whitespace, non-UTF-8 bytes, or the name `$`: refused;
//! - the sticky bit: repaired after mkfs with `xfs_db -x` (`write core.mode`);
//! - timestamps: every inode gets the build time (xfs_db 6.1 cannot write them correctly). This
//!   is why `auto` never picks this backend; `--backend userspace` uses it with a warning.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use super::{BuildError, Tools};
use crate::tree::{Meta, NodeKind, Tree, ROOT};

fn token_ok(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes != b"$"
        && std::str::from_utf8(bytes)
            .is_ok_and(|s| !s.chars().any(|c| c.is_whitespace() || c.is_control()))
}

/// What a protofile cannot express for this tree, with the affected paths.
pub fn unrepresentable(tree: &Tree) -> Option<(String, Vec<String>)> {
    let mut reasons = std::collections::BTreeSet::new();
    let mut paths = Vec::new();
    tree.walk(|path, id| {
        let node = tree.node(id);
        let mut bad = None;
        if !node.meta.xattrs.is_empty() {
            bad = Some("xattrs");
        } else if !matches!(node.kind, NodeKind::Dir { .. }) && node.nlink > 1 {
            bad = Some("hard links");
        } else if id != ROOT {
            let name = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
            if !token_ok(name) {
                bad = Some("names with whitespace or non-UTF-8 bytes");
            } else if let NodeKind::Symlink { target } = &node.kind {
                if !token_ok(target) {
                    bad = Some("symlink targets with whitespace or non-UTF-8 bytes");
                }
            }
        }
        if let Some(reason) = bad {
            reasons.insert(reason);
            if paths.len() < 10_000 {
                paths.push(String::from_utf8_lossy(path).escape_debug().to_string());
            }
        }
    });
    if paths.is_empty() {
        None
    } else {
        Some((
            format!(
                "{} (mkfs.xfs protofiles cannot express them)",
                reasons.into_iter().collect::<Vec<_>>().join(", ")
            ),
            paths,
        ))
    }
}

fn mode_token(type_char: char, meta: &Meta) -> String {
    format!(
        "{}{}{}{:03o}",
        type_char,
        if meta.mode & 0o4000 != 0 { 'u' } else { '-' },
        if meta.mode & 0o2000 != 0 { 'g' } else { '-' },
        meta.mode & 0o777
    )
}

/// Write the protofile for `tree`, whose file contents are read from `view` (the FUSE
/// mount of the same tree). Call [`unrepresentable`] first.
pub fn write(tree: &Tree, view: &Path, out: &Path) -> Result<(), BuildError> {
    let view = view
        .to_str()
        .filter(|v| token_ok(v.as_bytes()))
        .ok_or_else(|| BuildError::Unexpected {
            what: "writing the xfs protofile".into(),
            detail: format!(
                "work directory {} has whitespace in its path",
                view.display()
            ),
        })?;
    let mut text = String::from("fledge\n0 0\n");
    let root = tree.node(ROOT);
    let _ = writeln!(
        text,
        "{} {} {}",
        mode_token('d', &root.meta),
        root.meta.uid,
        root.meta.gid
    );
    write_dir(tree, ROOT, view, "", &mut text, 1);
    text.push_str("$\n");
    let mut f = std::fs::File::create(out).map_err(|e| BuildError::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    f.write_all(text.as_bytes()).map_err(|e| BuildError::Io {
        path: out.to_path_buf(),
        source: e,
    })
}

fn write_dir(tree: &Tree, dir: u32, view: &str, prefix: &str, text: &mut String, depth: usize) {
    let NodeKind::Dir { entries } = &tree.node(dir).kind else {
        return;
    };
    let indent = " ".repeat(depth.min(32));
    for (name, id) in entries {
        // unrepresentable() rejected every non-UTF-8 name before we get here.
        let name = String::from_utf8_lossy(name);
        let node = tree.node(*id);
        let m = &node.meta;
        let path = format!("{prefix}/{name}");
        match &node.kind {
            NodeKind::Dir { .. } => {
                let _ = writeln!(
                    text,
                    "{indent}{name} {} {} {}",
                    mode_token('d', m),
                    m.uid,
                    m.gid
                );
                write_dir(tree, *id, view, &path, text, depth + 1);
                let _ = writeln!(text, "{indent}$");
            }
            NodeKind::File { .. } => {
                let _ = writeln!(
                    text,
                    "{indent}{name} {} {} {} {view}{path}",
                    mode_token('-', m),
                    m.uid,
                    m.gid
                );
            }
            NodeKind::Symlink { target } => {
                let _ = writeln!(
                    text,
                    "{indent}{name} {} {} {} {}",
                    mode_token('l', m),
                    m.uid,
                    m.gid,
                    String::from_utf8_lossy(target)
                );
            }
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                let t = if matches!(node.kind, NodeKind::CharDevice { .. }) {
                    'c'
                } else {
                    'b'
                };
                let _ = writeln!(
                    text,
                    "{indent}{name} {} {} {} {major} {minor}",
                    mode_token(t, m),
                    m.uid,
                    m.gid
                );
            }
            NodeKind::Fifo => {
                let _ = writeln!(
                    text,
                    "{indent}{name} {} {} {}",
                    mode_token('p', m),
                    m.uid,
                    m.gid
                );
            }
        }
    }
}

/// Restore sticky bits, which the protofile mode token cannot carry, with `xfs_db -x`.
pub fn fix_sticky(tools: Tools, tree: &Tree, image: &Path) -> Result<usize, BuildError> {
    let mut args = vec!["-x".to_string()];
    let mut n = 0;
    tree.walk(|path, id| {
        let node = tree.node(id);
        if node.meta.mode & 0o1000 != 0 {
            if let Ok(p) = std::str::from_utf8(path) {
                args.push("-c".into());
                args.push(format!("path {p}"));
                args.push("-c".into());
                args.push(format!("write core.mode {:#o}", node.st_mode()));
                n += 1;
            }
        }
    });
    if n > 0 {
        args.push(image.display().to_string());
        tools.run("xfs_db", &args)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_tokens() {
        let m = |mode| Meta {
            mode,
            ..Meta::default()
        };
        assert_eq!(mode_token('-', &m(0o644)), "---644");
        assert_eq!(mode_token('-', &m(0o4755)), "-u-755");
        assert_eq!(mode_token('d', &m(0o2775)), "d-g775");
        assert_eq!(mode_token('d', &m(0o1777)), "d--777");
    }

    #[test]
    fn tokens() {
        assert!(token_ok(b"usr"));
        assert!(!token_ok(b"a b"));
        assert!(!token_ok(b"$"));
        assert!(!token_ok(b"\xff"));
        assert!(!token_ok(b"a\nb"));
    }
}
