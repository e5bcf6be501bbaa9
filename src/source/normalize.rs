//! Docker-style image names: `nginx:alpine` is `docker.io/library/nginx:alpine`, `user/app` is
//! `docker.io/user/app:latest`, `host:5000/app@sha256:...` names a registry with a port.
//!
//! The rules are those of Docker's reference grammar: the first path component is a registry
//! host when it contains a `.` or a `:` or is `localhost`; otherwise the image lives on Docker
//! Hub (`docker.io`), where one-component names get the `library/` prefix. Without a tag or a
//! digest the tag is `latest`.

use std::fmt;

use super::{sha256_hex, SourceError};

/// Docker Hub's name in references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A normalised Docker reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DockerRef {
    /// Registry host, with port if any (`docker.io`, `localhost:5000`, `[::1]:5000`).
    pub registry: String,
    /// Repository path (`library/nginx`).
    pub repository: String,
    /// Tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// `sha256:<hex>` when the reference pins a digest.
    pub digest: Option<String>,
}

impl DockerRef {
    /// Parse and normalise `s` the way `docker pull` does.
    pub fn parse(s: &str) -> Result<DockerRef, SourceError> {
        let bad = |reason: String| SourceError::BadReference {
            reference: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(bad("the image name is empty".to_string()));
        }
        if s.len() > 4096 {
            return Err(bad("the reference is too long".to_string()));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                sha256_hex(d).map_err(|e| bad(format!("bad digest: {e}")))?;
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag follows the last ':' that comes after the last '/'.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_tag[..at], Some(name_tag[at + 1..].to_string()))
            }
            None => (name_tag, None),
        };
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(bad(format!(
                    "invalid tag '{t}' (letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')"
                )));
            }
        }
        if name.is_empty() {
            return Err(bad("the image name is empty".to_string()));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if is_registry_host(first) => (first.to_string(), rest),
            _ => (DOCKER_HUB.to_string(), name),
        };
        if !valid_host(&registry) {
            return Err(bad(format!("invalid registry host '{registry}'")));
        }
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        if path.is_empty() {
            return Err(bad("the repository name is empty".to_string()));
        }
        for comp in path.split('/') {
            if !valid_component(comp) {
                let reason = if comp.chars().any(|c| c.is_ascii_uppercase()) {
                    format!("repository names must be lowercase ('{comp}')")
                } else {
                    format!("invalid repository name component '{comp}'")
                };
                return Err(bad(reason));
            }
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if registry.len() + 1 + repository.len() > 255 {
            return Err(bad(
                "the repository name is longer than 255 characters".to_string()
            ));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t,
        };
        Ok(DockerRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host to talk to for the registry API (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to ask the registry's manifest endpoint for: the digest if pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The short form Docker shows (`nginx:alpine`, `user/app:latest`, `host:5000/app:v1`).
    pub fn familiar(&self) -> String {
        let mut name = if self.registry == DOCKER_HUB {
            self.repository
                .strip_prefix("library/")
                .filter(|r| !r.contains('/'))
                .unwrap_or(&self.repository)
                .to_string()
        } else {
            self.name()
        };
        if let Some(t) = &self.tag {
            name.push(':');
            name.push_str(t);
        }
        if let Some(d) = &self.digest {
            name.push('@');
            name.push_str(d);
        }
        name
    }

    /// Whether the registry is on this machine (`localhost`, `127.0.0.0/8`, `::1`), which
    /// Docker reaches over plain HTTP.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.registry)
    }
}

impl fmt::Display for DockerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The host part of `host[:port]` (brackets of IPv6 literals removed).
pub fn host_without_port(hostport: &str) -> &str {
    if let Some(rest) = hostport.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => hostport,
    }
}

/// Whether `hostport` (`host[:port]`) names this machine.
pub fn is_loopback_host(hostport: &str) -> bool {
    let host = host_without_port(hostport);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

fn is_registry_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

fn valid_host(h: &str) -> bool {
    if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port or [v6]
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        return after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    }
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A repository path component: `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_table() {
        let d = format!("sha256:{}", "a".repeat(64));
        type Case<'a> = (String, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "nginx".into(),
                "docker.io",
                "library/nginx",
                Some("latest"),
                None,
            ),
            (
                "nginx:alpine".into(),
                "docker.io",
                "library/nginx",
                Some("alpine"),
                None,
            ),
            (
                "user/app".into(),
                "docker.io",
                "user/app",
                Some("latest"),
                None,
            ),
            (
                "docker.io/nginx".into(),
                "docker.io",
                "library/nginx",
                Some("latest"),
                None,
            ),
            (
                "index.docker.io/user/app:1".into(),
                "docker.io",
                "user/app",
                Some("1"),
                None,
            ),
            (
                "docker.io/library/nginx:1.25".into(),
                "docker.io",
                "library/nginx",
                Some("1.25"),
                None,
            ),
            (
                "localhost/app".into(),
                "localhost",
                "app",
                Some("latest"),
                None,
            ),
            (
                "localhost:5000/a/b:v2".into(),
                "localhost:5000",
                "a/b",
                Some("v2"),
                None,
            ),
            (
                "127.0.0.1:5000/debian:test".into(),
                "127.0.0.1:5000",
                "debian",
                Some("test"),
                None,
            ),
            (
                "[::1]:5000/debian".into(),
                "[::1]:5000",
                "debian",
                Some("latest"),
                None,
            ),
            (
                "ghcr.io/o/r/x".into(),
                "ghcr.io",
                "o/r/x",
                Some("latest"),
                None,
            ),
            (
                format!("nginx@{d}"),
                "docker.io",
                "library/nginx",
                None,
                Some(d.as_str()),
            ),
            (
                format!("host:5000/app:v1@{d}"),
                "host:5000",
                "app",
                Some("v1"),
                Some(d.as_str()),
            ),
            (
                "my-app_x.y__z:t_1.0-rc".into(),
                "docker.io",
                "library/my-app_x.y__z",
                Some("t_1.0-rc"),
                None,
            ),
        ];
        for (input, reg, repo, tag, digest) in cases {
            let r = DockerRef::parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry, reg, "{input}");
            assert_eq!(r.repository, repo, "{input}");
            assert_eq!(r.tag.as_deref(), tag, "{input}");
            assert_eq!(r.digest.as_deref(), digest, "{input}");
            // The full form parses to the same thing.
            assert_eq!(DockerRef::parse(&r.to_string()).unwrap(), r, "{input}");
            assert_eq!(DockerRef::parse(&r.familiar()).unwrap(), r, "{input}");
        }
    }

    #[test]
    fn familiar_and_api_host() {
        let r = DockerRef::parse("nginx:alpine").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/nginx:alpine");
        assert_eq!(r.familiar(), "nginx:alpine");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.manifest_ref(), "alpine");
        let r = DockerRef::parse("user/app").unwrap();
        assert_eq!(r.familiar(), "user/app:latest");
        let r = DockerRef::parse("localhost:5000/app").unwrap();
        assert_eq!(r.api_host(), "localhost:5000");
        assert_eq!(r.familiar(), "localhost:5000/app:latest");
    }

    #[test]
    fn rejected_references() {
        for bad in [
            "",
            "Nginx",
            "user/App",
            "nginx:",
            "nginx:-x",
            "nginx@sha256:abc",
            "nginx@md5:abc",
            "a//b",
            "/a",
            "a/",
            "-a",
            "a-",
            "a...b",
            "host:port:5000/x",
            "host:/x",
            "[zz]:5000/x",
            "a b",
        ] {
            let e = DockerRef::parse(bad).unwrap_err();
            assert!(
                matches!(&e, SourceError::BadReference { reference, .. } if reference == bad),
                "{bad}: {e}"
            );
        }
        let e = DockerRef::parse("Nginx").unwrap_err().to_string();
        assert!(e.contains("lowercase"), "{e}");
    }

    #[test]
    fn loopback_hosts() {
        for (h, want) in [
            ("localhost", true),
            ("localhost:5000", true),
            ("LOCALHOST:1", true),
            ("127.0.0.1:5000", true),
            ("127.1.2.3", true),
            ("[::1]:5000", true),
            ("[::1]", true),
            ("128.0.0.1:5000", false),
            ("docker.io", false),
            ("localhost.example.com", false),
            ("10.0.0.1:5000", false),
        ] {
            assert_eq!(is_loopback_host(h), want, "{h}");
        }
    }
}
