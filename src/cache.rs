//! Where fledge keeps its cache (uncompressed layers, downloaded blobs, agents): the one owner
//! of that location. `--cache-dir` wins, then `$FLEDGE_CACHE_DIR`, `$XDG_CACHE_HOME/fledge`,
//! `$HOME/.cache/fledge`. What lives inside it is the layer store's ([`crate::layer`]), but
//! for `squashfs/`, the compressed-block cache of [`crate::squashfs::cache`].

use std::path::{Path, PathBuf};

use thiserror::Error;

/// No cache directory can be derived from the environment.
#[derive(Debug, Error)]
#[error("cannot determine the cache directory: set FLEDGE_CACHE_DIR, XDG_CACHE_HOME or HOME")]
pub struct NoCacheDir;

/// The cache directory: `explicit` (`--cache-dir`) when given, else [`default_dir`].
pub fn dir(explicit: Option<&Path>) -> Result<PathBuf, NoCacheDir> {
    match explicit {
        Some(d) => Ok(d.to_path_buf()),
        None => default_dir(),
    }
}

/// `$FLEDGE_CACHE_DIR`, else `$XDG_CACHE_HOME/fledge`, else `$HOME/.cache/fledge` (empty
/// values count as unset; a relative `XDG_CACHE_HOME` is ignored, as the XDG spec says).
pub fn default_dir() -> Result<PathBuf, NoCacheDir> {
    default_dir_from(|name| std::env::var_os(name))
}

fn default_dir_from(
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<PathBuf, NoCacheDir> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("FLEDGE_CACHE_DIR") {
        return Ok(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return Ok(d.join("fledge"));
    }
    if let Some(h) = var("HOME") {
        return Ok(h.join(".cache").join("fledge"));
    }
    Err(NoCacheDir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dir_order() {
        type Vars<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Vars, Option<&str>); 6] = [
            (
                &[
                    ("FLEDGE_CACHE_DIR", "/c/fledge"),
                    ("XDG_CACHE_HOME", "/x"),
                    ("HOME", "/h"),
                ],
                Some("/c/fledge"),
            ),
            (
                &[
                    ("FLEDGE_CACHE_DIR", ""),
                    ("XDG_CACHE_HOME", "/x"),
                    ("HOME", "/h"),
                ],
                Some("/x/fledge"),
            ),
            (
                &[("XDG_CACHE_HOME", "relative"), ("HOME", "/h")],
                Some("/h/.cache/fledge"),
            ),
            (&[("HOME", "/h")], Some("/h/.cache/fledge")),
            (&[("HOME", "")], None),
            (&[], None),
        ];
        for (vars, want) in cases {
            let got = default_dir_from(|k| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            });
            match want {
                Some(w) => assert_eq!(got.unwrap(), PathBuf::from(w), "{vars:?}"),
                None => assert!(got.is_err(), "{vars:?}"),
            }
        }
    }

    #[test]
    fn explicit_wins() {
        assert_eq!(dir(Some(Path::new("/c"))).unwrap(), PathBuf::from("/c"));
    }
}
