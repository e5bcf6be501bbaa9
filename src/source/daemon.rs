//! The Docker Engine API over its unix socket (`docker-daemon:REF`, and bare references).
//!
//! `GET /images/{name}/get` streams the image as a `docker save` archive; it is saved to a
//! temporary file in the cache directory (removed when the source is dropped) and read with
//! [`DockerArchiveSource`]. The socket is `$DOCKER_HOST` (`unix:///path`) or
//! `/var/run/docker.sock`; podman's Docker-compatible service works too. The HTTP/1.1 client
//! here is just enough for that: one request per connection, `Content-Length`, chunked or
//! close-delimited bodies.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::docker_archive::DockerArchiveSource;
use super::normalize::DockerRef;
use super::{ImageSource, Platform, ResolvedImage, SourceError, SourceOptions};

/// The default Docker socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Largest response head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Largest error body read for a message.
const MAX_ERROR_BODY: u64 = 64 << 10;
/// Socket read timeout: the daemon may take a while to start streaming a large image.
const READ_TIMEOUT: Duration = Duration::from_secs(600);

/// The socket path named by `docker_host` (`unix:///path`, or a plain path); other schemes
/// are refused.
pub fn socket_path(docker_host: Option<&str>) -> Result<PathBuf, SourceError> {
    let host = docker_host.unwrap_or(DEFAULT_SOCKET);
    if let Some(p) = host.strip_prefix("unix://") {
        if p.is_empty() {
            return Err(SourceError::DaemonUnavailable {
                socket: host.to_string(),
                reason: "empty socket path".to_string(),
            });
        }
        return Ok(PathBuf::from(p));
    }
    if host.starts_with('/') {
        return Ok(PathBuf::from(host));
    }
    Err(SourceError::DaemonUnavailable {
        socket: host.to_string(),
        reason: "only unix sockets are supported (DOCKER_HOST=unix:///path)".to_string(),
    })
}

/// A response's status and headers; the body is read from the returned reader.
struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
}

fn read_head<R: BufRead>(r: &mut R) -> io::Result<Head> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut total = 0usize;
    let mut line = String::new();
    let mut next_line = |r: &mut R, line: &mut String| -> io::Result<()> {
        line.clear();
        let n = r.take((MAX_HEAD - total) as u64).read_line(line)?;
        total += n;
        if n == 0 || !line.ends_with('\n') {
            return Err(bad("the response head is truncated or too long"));
        }
        Ok(())
    };
    next_line(r, &mut line)?;
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not an HTTP/1.x response"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
    };
    loop {
        next_line(r, &mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(v.parse().map_err(|_| bad("bad Content-Length"))?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = v
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    Ok(head)
}

/// Decodes a chunked body.
struct ChunkedReader<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> ChunkedReader<R> {
    fn new(inner: R) -> Self {
        ChunkedReader {
            inner,
            left: 0,
            done: false,
        }
    }

    fn line(&mut self) -> io::Result<String> {
        let mut l = String::new();
        let n = (&mut self.inner).take(4096).read_line(&mut l)?;
        if n == 0 || !l.ends_with('\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the chunked body ended early",
            ));
        }
        Ok(l)
    }
}

impl<R: BufRead> Read for ChunkedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let l = self.line()?;
            let size = l.trim_end().split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size line"))?;
            if size == 0 {
                // Trailers up to the empty line.
                while !self.line()?.trim_end().is_empty() {}
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the chunked body ended inside a chunk",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            let crlf = self.line()?;
            if !crlf.trim_end().is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "missing CRLF after a chunk",
                ));
            }
        }
        Ok(n)
    }
}

/// GET `path` on the unix socket `socket`: the status and a reader over the body.
pub fn http_get(socket: &Path, path: &str) -> Result<(u16, Box<dyn Read + Send>), SourceError> {
    let sock_name = socket.display().to_string();
    let unavailable = |reason: String| SourceError::DaemonUnavailable {
        socket: sock_name.clone(),
        reason,
    };
    let stream = UnixStream::connect(socket).map_err(|e| {
        unavailable(match e.kind() {
            io::ErrorKind::NotFound => "the socket does not exist (is the daemon running? set DOCKER_HOST=unix:///path to use another)".to_string(),
            io::ErrorKind::ConnectionRefused => "connection refused (the daemon is not listening)".to_string(),
            io::ErrorKind::PermissionDenied => "permission denied (is your user in the docker group?)".to_string(),
            _ => e.to_string(),
        })
    })?;
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| unavailable(e.to_string()))?;
    let mut w = &stream;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: fledge/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    w.write_all(request.as_bytes())
        .map_err(|e| unavailable(format!("sending the request: {e}")))?;
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let head = read_head(&mut reader).map_err(|e| unavailable(format!("bad response: {e}")))?;
    let body: Box<dyn Read + Send> = if head.chunked {
        Box::new(ChunkedReader::new(reader))
    } else if let Some(n) = head.content_length {
        Box::new(LengthReader {
            inner: reader.take(n),
            expected: n,
            got: 0,
        })
    } else {
        Box::new(reader)
    };
    Ok((head.status, body))
}

/// A `Content-Length` body that must not end early.
struct LengthReader<R> {
    inner: io::Take<R>,
    expected: u64,
    got: u64,
}

impl<R: Read> Read for LengthReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && self.got < self.expected {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the body ended after {} of {} bytes",
                    self.got, self.expected
                ),
            ));
        }
        self.got += n as u64;
        Ok(n)
    }
}

/// Percent-encode an image name for a URL path (keeping `/`, `:` and `@`).
fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An image exported by the Docker daemon.
#[derive(Debug)]
pub struct DaemonSource {
    socket: PathBuf,
    name: DockerRef,
    archive: DockerArchiveSource,
    /// The exported archive; deleted when the source is dropped.
    _file: tempfile::NamedTempFile,
}

impl DaemonSource {
    /// Ask the daemon for image `name` and save its export.
    pub fn open(
        reference: String,
        name: &DockerRef,
        opts: &SourceOptions,
    ) -> Result<DaemonSource, SourceError> {
        let socket = socket_path(opts.docker_host.as_deref())?;
        let sock_name = socket.display().to_string();
        let wanted = name.to_string();
        let (status, mut body) =
            http_get(&socket, &format!("/images/{}/get", encode_name(&wanted)))?;
        if status != 200 {
            let mut raw = Vec::new();
            let _ = body.take(MAX_ERROR_BODY).read_to_end(&mut raw);
            if status == 404 {
                return Err(SourceError::DaemonImageNotFound {
                    socket: sock_name,
                    reference: wanted,
                });
            }
            #[derive(serde::Deserialize)]
            struct Msg {
                message: String,
            }
            let message = serde_json::from_slice::<Msg>(&raw)
                .map(|m| m.message)
                .unwrap_or_else(|_| {
                    String::from_utf8_lossy(&raw)
                        .trim()
                        .chars()
                        .take(200)
                        .collect()
                });
            return Err(SourceError::DaemonHttp {
                socket: sock_name,
                what: format!("the export of {wanted}"),
                status,
                message,
            });
        }
        let tmp_dir = opts
            .cache_dir()
            .map(|d| d.join("tmp"))
            .unwrap_or_else(|_| std::env::temp_dir());
        std::fs::create_dir_all(&tmp_dir).map_err(|e| SourceError::Io {
            path: tmp_dir.clone(),
            source: e,
        })?;
        let mut file = tempfile::Builder::new()
            .prefix(".daemon-export-")
            .suffix(".tar")
            .tempfile_in(&tmp_dir)
            .map_err(|e| SourceError::Io {
                path: tmp_dir.clone(),
                source: e,
            })?;
        let copied = io::copy(&mut body, file.as_file_mut());
        if let Err(e) = copied {
            return Err(SourceError::DaemonUnavailable {
                socket: sock_name,
                reason: format!("the export of {wanted} was interrupted: {e}"),
            });
        }
        file.as_file_mut().flush().map_err(|e| SourceError::Io {
            path: file.path().to_path_buf(),
            source: e,
        })?;
        let archive = match DockerArchiveSource::open(reference.clone(), file.path(), None) {
            Err(SourceError::ArchiveAmbiguous { .. }) => {
                DockerArchiveSource::open(reference, file.path(), Some(name))?
            }
            other => other?,
        };
        Ok(DaemonSource {
            socket,
            name: name.clone(),
            archive,
            _file: file,
        })
    }
}

impl ImageSource for DaemonSource {
    fn describe(&self) -> String {
        format!(
            "Docker daemon at unix://{} (image {})",
            self.socket.display(),
            self.name.familiar()
        )
    }

    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError> {
        self.archive.resolve(platform)
    }

    fn open_blob(&self, digest: &str, size: u64) -> Result<Box<dyn Read + Send>, SourceError> {
        self.archive.open_blob(digest, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn socket_paths() {
        assert_eq!(socket_path(None).unwrap(), PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(
            socket_path(Some("unix:///run/podman/podman.sock")).unwrap(),
            PathBuf::from("/run/podman/podman.sock")
        );
        assert_eq!(
            socket_path(Some("/x.sock")).unwrap(),
            PathBuf::from("/x.sock")
        );
        for bad in ["tcp://1.2.3.4:2375", "unix://", "ssh://host"] {
            let e = socket_path(Some(bad)).unwrap_err();
            assert!(
                matches!(e, SourceError::DaemonUnavailable { .. }),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn chunked_bodies() {
        let raw = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: y\r\n\r\n";
        let mut out = String::new();
        ChunkedReader::new(&raw[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "Wikipedia in\r\n\r\nchunks.");
        for bad in [
            &b"4\r\nWik"[..],
            b"zz\r\n",
            b"4\r\nWikiXX",
            b"4\r\nWiki\r\n",
        ] {
            let mut v = Vec::new();
            assert!(
                ChunkedReader::new(bad).read_to_end(&mut v).is_err(),
                "{bad:?}"
            );
        }
    }

    /// Serve one canned response on a fresh socket.
    fn serve(response: Vec<u8>) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(&s);
            let mut req = String::new();
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                req.push_str(&line);
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            (&s).write_all(&response).unwrap();
            req
        });
        (dir, path, h)
    }

    #[test]
    fn http_over_unix_socket() {
        let (_d, path, h) = serve(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
        );
        let (status, mut body) = http_get(&path, "/images/a%2Fb/get").unwrap();
        let mut s = String::new();
        body.read_to_string(&mut s).unwrap();
        assert_eq!((status, s.as_str()), (200, "abc"));
        assert!(h
            .join()
            .unwrap()
            .starts_with("GET /images/a%2Fb/get HTTP/1.1\r\n"));

        let (_d, path, h) = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort".to_vec());
        let (_, mut body) = http_get(&path, "/x").unwrap();
        let mut v = Vec::new();
        let e = body.read_to_end(&mut v).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        h.join().unwrap();
    }

    #[test]
    fn daemon_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.sock");
        let opts = SourceOptions {
            docker_host: Some(format!("unix://{}", missing.display())),
            cache_dir: Some(dir.path().to_path_buf()),
            ..SourceOptions::default()
        };
        let r = DockerRef::parse("debian:test").unwrap();
        let e = DaemonSource::open("debian:test".into(), &r, &opts).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, SourceError::DaemonUnavailable { .. })
                && msg.contains(&missing.display().to_string())
                && msg.contains("does not exist"),
            "{msg}"
        );

        let (_d, path, h) = serve(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 38\r\n\r\n{\"message\":\"no such image: debian:x\"}\n".to_vec(),
        );
        let opts = SourceOptions {
            docker_host: Some(format!("unix://{}", path.display())),
            cache_dir: Some(dir.path().to_path_buf()),
            ..SourceOptions::default()
        };
        let e = DaemonSource::open("debian:x".into(), &r, &opts).unwrap_err();
        assert!(matches!(e, SourceError::DaemonImageNotFound { .. }), "{e}");
        assert!(h
            .join()
            .unwrap()
            .contains("/images/docker.io/library/debian:test/get"));

        let (_d, path, h) = serve(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 20\r\n\r\n{\"message\":\"boom!\"}\n".to_vec(),
        );
        let opts = SourceOptions {
            docker_host: Some(path.display().to_string()),
            cache_dir: Some(dir.path().to_path_buf()),
            ..SourceOptions::default()
        };
        let e = DaemonSource::open("debian:x".into(), &r, &opts).unwrap_err();
        assert!(
            matches!(e, SourceError::DaemonHttp { status: 500, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("boom!"), "{e}");
        h.join().unwrap();
        // No export is left behind.
        let tmp = dir.path().join("tmp");
        assert!(!tmp.exists() || std::fs::read_dir(&tmp).unwrap().next().is_none());
    }

    #[test]
    fn name_encoding() {
        assert_eq!(
            encode_name("docker.io/library/debian:test"),
            "docker.io/library/debian:test"
        );
        assert_eq!(encode_name("a b?c#"), "a%20b%3Fc%23");
    }
}
