//! Image references in skopeo/containers-image style: `TRANSPORT:LOCATION`.
//!
//! Only `oci:DIR[:TAG]` is implemented. The other well-known transports are recognised so that
//! they get a clear "not supported yet" error rather than being taken for something else, and
//! new variants can be added to [`ImageRef`] as they are implemented.

use std::fmt;
use std::path::PathBuf;

use super::SourceError;

/// Transports that exist elsewhere (skopeo, podman) but are not implemented here yet.
const KNOWN_UNSUPPORTED: &[&str] = &[
    "docker://",
    "docker-daemon:",
    "docker-archive:",
    "oci-archive:",
    "containers-storage:",
    "dir:",
];

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// `oci:DIR[:TAG]`: an OCI image layout directory; without a tag the only image (or the
    /// one tagged `latest`) is used.
    OciLayout { dir: PathBuf, tag: Option<String> },
}

impl ImageRef {
    /// Parse a reference. `oci:DIR[:TAG]` follows skopeo: the text after the last `:` is the
    /// tag only if it contains no `/`.
    pub fn parse(reference: &str) -> Result<ImageRef, SourceError> {
        let bad = |reason: &str| SourceError::BadReference {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = reference.strip_prefix("oci:") {
            let (dir, tag) = match rest.rfind(':') {
                Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(bad("the directory is empty; expected oci:DIR[:TAG]"));
            }
            if tag == Some("") {
                return Err(bad("the tag after ':' is empty; expected oci:DIR[:TAG]"));
            }
            return Ok(ImageRef::OciLayout {
                dir: PathBuf::from(dir),
                tag: tag.map(str::to_string),
            });
        }
        for transport in KNOWN_UNSUPPORTED {
            if reference.starts_with(transport) {
                return Err(SourceError::UnsupportedTransport {
                    transport: transport.to_string(),
                    reference: reference.to_string(),
                });
            }
        }
        if reference.is_empty() {
            return Err(bad("empty reference; expected oci:DIR[:TAG]"));
        }
        Err(bad(
            "no transport given; for a local OCI image layout write oci:DIR[:TAG] \
             (e.g. `skopeo copy docker://nginx:alpine oci:nginx:alpine` then use oci:nginx:alpine)",
        ))
    }

    /// The transport prefix, e.g. `oci:`.
    pub fn transport(&self) -> &'static str {
        match self {
            ImageRef::OciLayout { .. } => "oci:",
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::OciLayout { dir, tag } => {
                write!(f, "oci:{}", dir.display())?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let oci = |d: &str, t: Option<&str>| {
            Ok::<_, ()>(ImageRef::OciLayout {
                dir: PathBuf::from(d),
                tag: t.map(str::to_string),
            })
        };
        let cases: Vec<(&str, Result<ImageRef, ()>)> = vec![
            ("oci:dir", oci("dir", None)),
            ("oci:dir:tag", oci("dir", Some("tag"))),
            ("oci:/a/b:c", oci("/a/b", Some("c"))),
            ("oci:/a/b", oci("/a/b", None)),
            ("oci:rel/dir", oci("rel/dir", None)),
            ("oci:rel/dir:v1.2", oci("rel/dir", Some("v1.2"))),
            ("oci:a:b/c", oci("a:b/c", None)),
            ("oci:a:b:c", oci("a:b", Some("c"))),
            ("oci:", Err(())),
            ("oci::tag", Err(())),
            ("oci:dir:", Err(())),
            ("", Err(())),
        ];
        for (input, want) in cases {
            let got = ImageRef::parse(input);
            match (got, want) {
                (Ok(g), Ok(w)) => {
                    assert_eq!(g, w, "{input}");
                    assert_eq!(g.to_string(), input, "round trip {input}");
                }
                (Err(e), Err(())) => {
                    assert!(
                        matches!(e, SourceError::BadReference { .. }),
                        "{input}: {e}"
                    )
                }
                (g, w) => panic!("{input}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn unsupported_transports_and_bare_names() {
        for (input, transport) in [
            ("docker://nginx:alpine", "docker://"),
            ("docker-daemon:nginx:alpine", "docker-daemon:"),
            ("oci-archive:/tmp/x.tar", "oci-archive:"),
            ("docker-archive:/tmp/x.tar", "docker-archive:"),
        ] {
            let e = ImageRef::parse(input).unwrap_err();
            assert!(
                matches!(&e, SourceError::UnsupportedTransport { transport: t, .. } if t == transport),
                "{input}: {e}"
            );
            assert!(
                e.to_string()
                    .contains(&format!("transport '{transport}' is not supported yet")),
                "{e}"
            );
        }
        for bare in ["nginx:alpine", "nginx", "/some/dir"] {
            let e = ImageRef::parse(bare).unwrap_err();
            assert!(matches!(e, SourceError::BadReference { .. }), "{bare}: {e}");
            assert!(e.to_string().contains("oci:DIR[:TAG]"), "{e}");
        }
    }
}
