//! Image references in skopeo/containers-image style: `TRANSPORT:LOCATION`, plus bare Docker
//! names.
//!
//! - `oci:DIR[:TAG]`: an OCI image layout directory.
//! - `oci-archive:FILE[:TAG]`: a tar of an OCI image layout.
//! - `docker-archive:FILE[:REF]`: a `docker save` tar; REF picks one of its `RepoTags`.
//! - `docker://REF`: a registry (distribution API v2).
//! - `docker-daemon:REF`: the local Docker Engine (or a compatible socket).
//! - a bare `REF` (`nginx:alpine`): the Docker daemon if it has the image, else the registry.
//!
//! Docker names are normalised as Docker does (see [`DockerRef`]).

use std::fmt;
use std::path::PathBuf;

use super::normalize::DockerRef;
use super::SourceError;

/// Transports that exist elsewhere (skopeo, podman) but are not implemented here.
const KNOWN_UNSUPPORTED: &[&str] = &["containers-storage:", "dir:", "ostree:", "sif:", "tarball:"];

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// `oci:DIR[:TAG]`: an OCI image layout directory; without a tag the only image (or the
    /// one tagged `latest`) is used.
    OciLayout { dir: PathBuf, tag: Option<String> },
    /// `oci-archive:FILE[:TAG]`: the same, inside a tar file.
    OciArchive { file: PathBuf, tag: Option<String> },
    /// `docker-archive:FILE[:REF]`: a `docker save` archive; without REF the archive must hold
    /// exactly one image.
    DockerArchive {
        file: PathBuf,
        reference: Option<DockerRef>,
    },
    /// `docker://REF`: a registry.
    Registry(DockerRef),
    /// `docker-daemon:REF`: the Docker Engine API.
    DockerDaemon(DockerRef),
    /// A bare `REF`: the Docker daemon first, then the registry.
    Bare(DockerRef),
}

/// Split `rest` into a path and an optional `:TAG` as skopeo's `oci:` does here: the text
/// after the last `:` is the tag only if it contains no `/`.
fn split_path_tag<'a>(
    reference: &str,
    rest: &'a str,
    form: &str,
) -> Result<(&'a str, Option<&'a str>), SourceError> {
    let bad = |reason: String| SourceError::BadReference {
        reference: reference.to_string(),
        reason,
    };
    let (path, tag) = match rest.rfind(':') {
        Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if path.is_empty() {
        return Err(bad(format!("the path is empty; expected {form}")));
    }
    if tag == Some("") {
        return Err(bad(format!("the tag after ':' is empty; expected {form}")));
    }
    Ok((path, tag))
}

impl ImageRef {
    /// Parse a reference.
    pub fn parse(reference: &str) -> Result<ImageRef, SourceError> {
        let bad = |reason: &str| SourceError::BadReference {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = reference.strip_prefix("oci:") {
            let (dir, tag) = split_path_tag(reference, rest, "oci:DIR[:TAG]")?;
            return Ok(ImageRef::OciLayout {
                dir: PathBuf::from(dir),
                tag: tag.map(str::to_string),
            });
        }
        if let Some(rest) = reference.strip_prefix("oci-archive:") {
            let (file, tag) = split_path_tag(reference, rest, "oci-archive:FILE[:TAG]")?;
            return Ok(ImageRef::OciArchive {
                file: PathBuf::from(file),
                tag: tag.map(str::to_string),
            });
        }
        if let Some(rest) = reference.strip_prefix("docker-archive:") {
            // As in containers/image: the path ends at the first ':'; the rest is a name.
            let (file, name) = match rest.split_once(':') {
                Some((f, n)) => (f, Some(n)),
                None => (rest, None),
            };
            if file.is_empty() {
                return Err(bad("the path is empty; expected docker-archive:FILE[:REF]"));
            }
            let reference = match name {
                Some(n) => Some(DockerRef::parse(n)?),
                None => None,
            };
            return Ok(ImageRef::DockerArchive {
                file: PathBuf::from(file),
                reference,
            });
        }
        if let Some(rest) = reference.strip_prefix("docker://") {
            return Ok(ImageRef::Registry(DockerRef::parse(rest)?));
        }
        if let Some(rest) = reference.strip_prefix("docker-daemon:") {
            return Ok(ImageRef::DockerDaemon(DockerRef::parse(rest)?));
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
            return Err(bad("empty reference"));
        }
        if reference.starts_with('/') || reference.starts_with("./") || reference.starts_with("../")
        {
            return Err(bad(
                "this looks like a path; write oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE[:REF]",
            ));
        }
        Ok(ImageRef::Bare(DockerRef::parse(reference)?))
    }

    /// The transport prefix, e.g. `oci:` (empty for a bare reference).
    pub fn transport(&self) -> &'static str {
        match self {
            ImageRef::OciLayout { .. } => "oci:",
            ImageRef::OciArchive { .. } => "oci-archive:",
            ImageRef::DockerArchive { .. } => "docker-archive:",
            ImageRef::Registry(_) => "docker://",
            ImageRef::DockerDaemon(_) => "docker-daemon:",
            ImageRef::Bare(_) => "",
        }
    }
}

/// The version a build gives its manifest when the reference's tag is not a version.
pub const DEFAULT_VERSION: &str = "0.1.0";

impl ImageRef {
    /// The image's base name, which names the default outputs (`<base>.img`) and the
    /// manifest's `name` and `runtime`: the last path component of the repository (of the
    /// directory for `oci:`, of the file without `.tar` for `oci-archive:` and for a
    /// `docker-archive:` without a reference), lower-cased, spaces and slashes turned into
    /// `-`. Never empty (`rootfs`).
    pub fn base_name(&self) -> String {
        let file_stem = |p: &std::path::Path| {
            let name = last_component(&p.to_string_lossy()).to_string();
            name.strip_suffix(".tar")
                .map(str::to_string)
                .unwrap_or(name)
        };
        let raw = match self {
            ImageRef::OciLayout { dir, .. } => last_component(&dir.to_string_lossy()).to_string(),
            ImageRef::OciArchive { file, .. }
            | ImageRef::DockerArchive {
                file,
                reference: None,
            } => file_stem(file),
            ImageRef::DockerArchive {
                reference: Some(r), ..
            }
            | ImageRef::Registry(r)
            | ImageRef::DockerDaemon(r)
            | ImageRef::Bare(r) => last_component(&r.repository).to_string(),
        };
        let name: String = raw
            .to_lowercase()
            .chars()
            .map(|c| if c == ' ' || c == '/' { '-' } else { c })
            .collect();
        if name.is_empty() {
            "rootfs".to_string()
        } else {
            name
        }
    }

    /// The tag the reference names, if any (`oci:DIR:TAG`, `nginx:1.25`; `latest` for a
    /// Docker name with neither tag nor digest; a digest is not a tag).
    pub fn tag(&self) -> Option<&str> {
        match self {
            ImageRef::OciLayout { tag, .. } | ImageRef::OciArchive { tag, .. } => tag.as_deref(),
            ImageRef::DockerArchive { reference, .. } => {
                reference.as_ref().and_then(|r| r.tag.as_deref())
            }
            ImageRef::Registry(r) | ImageRef::DockerDaemon(r) | ImageRef::Bare(r) => {
                r.tag.as_deref()
            }
        }
    }

    /// The manifest version derived from the tag: the tag without a leading `v` when it
    /// starts with a digit and holds only `[0-9A-Za-z.+_-]` (`v2.0.1` -> `2.0.1`,
    /// `1.25-alpine`); else [`DEFAULT_VERSION`].
    pub fn version(&self) -> String {
        self.tag()
            .map(|t| t.strip_prefix('v').unwrap_or(t))
            .filter(|t| {
                t.starts_with(|c: char| c.is_ascii_digit())
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".+_-".contains(&b))
            })
            .map(str::to_owned)
            .unwrap_or_else(|| DEFAULT_VERSION.to_string())
    }
}

/// The last `/`-separated component, trailing slashes ignored.
fn last_component(s: &str) -> &str {
    let s = s.trim_end_matches('/');
    s.rsplit('/').next().unwrap_or(s)
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::OciLayout { dir: p, tag } | ImageRef::OciArchive { file: p, tag } => {
                write!(f, "{}{}", self.transport(), p.display())?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                Ok(())
            }
            ImageRef::DockerArchive { file, reference } => {
                write!(f, "docker-archive:{}", file.display())?;
                if let Some(r) = reference {
                    write!(f, ":{r}")?;
                }
                Ok(())
            }
            ImageRef::Registry(r) | ImageRef::DockerDaemon(r) | ImageRef::Bare(r) => {
                write!(f, "{}{r}", self.transport())
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
    fn transports_table() {
        let d = |s: &str| DockerRef::parse(s).unwrap();
        let cases: Vec<(&str, ImageRef, &str)> = vec![
            (
                "oci-archive:/tmp/x.tar",
                ImageRef::OciArchive {
                    file: "/tmp/x.tar".into(),
                    tag: None,
                },
                "oci-archive:/tmp/x.tar",
            ),
            (
                "oci-archive:/tmp/x.tar:v1",
                ImageRef::OciArchive {
                    file: "/tmp/x.tar".into(),
                    tag: Some("v1".into()),
                },
                "oci-archive:/tmp/x.tar:v1",
            ),
            (
                "docker-archive:/tmp/x.tar",
                ImageRef::DockerArchive {
                    file: "/tmp/x.tar".into(),
                    reference: None,
                },
                "docker-archive:/tmp/x.tar",
            ),
            (
                "docker-archive:/tmp/x.tar:debian:test",
                ImageRef::DockerArchive {
                    file: "/tmp/x.tar".into(),
                    reference: Some(d("debian:test")),
                },
                "docker-archive:/tmp/x.tar:docker.io/library/debian:test",
            ),
            (
                "docker://nginx:alpine",
                ImageRef::Registry(d("nginx:alpine")),
                "docker://docker.io/library/nginx:alpine",
            ),
            (
                "docker://127.0.0.1:5000/debian:test",
                ImageRef::Registry(d("127.0.0.1:5000/debian:test")),
                "docker://127.0.0.1:5000/debian:test",
            ),
            (
                "docker-daemon:user/app",
                ImageRef::DockerDaemon(d("user/app")),
                "docker-daemon:docker.io/user/app:latest",
            ),
            (
                "nginx",
                ImageRef::Bare(d("nginx")),
                "docker.io/library/nginx:latest",
            ),
        ];
        for (input, want, display) in cases {
            let got = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got, want, "{input}");
            assert_eq!(got.to_string(), display, "{input}");
            assert_eq!(ImageRef::parse(display).unwrap(), want, "{display}");
        }
    }

    /// The names a build derives from each kind of reference: (reference, default output,
    /// manifest name, manifest version).
    #[test]
    fn default_names_table() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let cases: Vec<(String, &str, &str)> = vec![
            // bare Docker names
            ("nginx:alpine".into(), "nginx", "0.1.0"),
            ("nginx".into(), "nginx", "0.1.0"),
            ("library/nginx:1.25".into(), "nginx", "1.25"),
            ("docker.io/library/redis:7".into(), "redis", "7"),
            ("app:v2.0.1".into(), "app", "2.0.1"),
            ("app:1.25-alpine".into(), "app", "1.25-alpine"),
            ("app:v".into(), "app", "0.1.0"),
            ("localhost:5000/app".into(), "app", "0.1.0"),
            (format!("registry:5000/team/app@{digest}"), "app", "0.1.0"),
            (format!("registry:5000/team/app:3.1@{digest}"), "app", "3.1"),
            // docker:// and docker-daemon:
            ("docker://quay.io/org/tool:1".into(), "tool", "1"),
            (
                "docker://127.0.0.1:5000/debian:test".into(),
                "debian",
                "0.1.0",
            ),
            (
                format!("docker://127.0.0.1:5000/debian@{digest}"),
                "debian",
                "0.1.0",
            ),
            ("docker-daemon:myapp:dev".into(), "myapp", "0.1.0"),
            ("docker-daemon:myapp:2.4".into(), "myapp", "2.4"),
            // oci: with and without a tag
            ("oci:/x/debian:test".into(), "debian", "0.1.0"),
            ("oci:/x/debian:12.4".into(), "debian", "12.4"),
            ("oci:/x/debian".into(), "debian", "0.1.0"),
            ("oci:/x/debian/".into(), "debian", "0.1.0"),
            ("oci:/x:y/debian".into(), "debian", "0.1.0"),
            ("oci:layouts/My Image:latest".into(), "my-image", "0.1.0"),
            // oci-archive:
            ("oci-archive:/tmp/alpine.tar:3.19".into(), "alpine", "3.19"),
            ("oci-archive:/tmp/alpine.tar".into(), "alpine", "0.1.0"),
            // docker-archive: with and without a reference
            ("docker-archive:app.tar:myapp:1.2".into(), "myapp", "1.2"),
            (
                "docker-archive:/s/app.tar:team/myapp:v3".into(),
                "myapp",
                "3",
            ),
            ("docker-archive:/s/app.tar:myapp".into(), "myapp", "0.1.0"),
            ("docker-archive:/s/app.tar".into(), "app", "0.1.0"),
            ("docker-archive:/s/save".into(), "save", "0.1.0"),
        ];
        for (input, base, version) in cases {
            let r = ImageRef::parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                (r.base_name().as_str(), r.version().as_str()),
                (base, version),
                "{input}"
            );
        }
        let tags = [
            ("nginx", Some("latest")),
            ("oci:/x/debian", None),
            ("docker-archive:/s/app.tar", None),
            ("docker-archive:/s/app.tar:a:b", Some("b")),
        ];
        for (input, tag) in tags {
            assert_eq!(ImageRef::parse(input).unwrap().tag(), tag, "{input}");
        }
        let pinned = ImageRef::parse(&format!("app@{digest}")).unwrap();
        assert_eq!(pinned.tag(), None);
    }

    #[test]
    fn bad_and_unsupported() {
        for input in [
            "docker://",
            "docker://Nginx",
            "docker-daemon:",
            "docker-archive:",
            "docker-archive::x",
            "docker-archive:/x.tar:Bad",
            "oci-archive:",
            "/some/dir",
            "./dir",
            "Upper",
        ] {
            let e = ImageRef::parse(input).unwrap_err();
            assert!(
                matches!(e, SourceError::BadReference { .. }),
                "{input}: {e}"
            );
        }
        let e = ImageRef::parse("containers-storage:x").unwrap_err();
        assert!(
            matches!(&e, SourceError::UnsupportedTransport { transport, .. } if transport == "containers-storage:"),
            "{e}"
        );
    }
}
