//! Servers the integration tests start: a `docker-registry` child, podman's Docker-API
//! service, canned HTTP answers on loopback, and a port that refuses connections.
//!
//! Tests run in parallel, and other builds share the machine, so a server is never given a
//! port that was free a moment ago (another test's server could take it in between, and a
//! readiness check that only connects would then find that one). Each server here either
//! holds its listening socket from the start (in-process servers bind port 0 and keep the
//! listener) or proves it is the one that was started:
//! - [`Registry`]: `docker-registry` binds port 0 itself and logs the address the kernel gave
//!   it; that port is then asked `GET /v2/`, which must carry the secret response header
//!   written into this start's config. A registry that exits first is reported with its log.
//! - [`PodmanService`]: listens on a socket in the test's own temporary directory, and must
//!   answer the Docker API's `/_ping` while the child still runs.
//! - [`PodmanStorage`] also runs rootless podman as the unprivileged test user, to start
//!   containers (tests/container.rs).
//! - [`ClosedPort`]: a port that refuses connections because this test holds it, bound but
//!   not listening (a port found free and then released could be given to another server).

use std::fs;
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long a server may take to come up (a loaded 2-core machine runs many at once).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The response header through which a registry proves it is the one this start made.
pub const INSTANCE_HEADER: &str = "X-Fledge-Test-Instance";

/// A secret no other server can know: 128 random bits, hex.
pub fn unique_token() -> String {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    hex::encode(b)
}

/// Options for [`Registry::start_with`].
#[derive(Default)]
pub struct RegistryOptions<'a> {
    /// Only this user/password may pull or push (htpasswd auth, realm `fledge-test-realm`).
    pub htpasswd: Option<(&'a str, &'a str)>,
    /// Serve HTTPS with this (certificate, key).
    pub tls: Option<(&'a Path, &'a Path)>,
}

/// A `docker-registry` child on 127.0.0.1 with its own storage; killed on drop.
pub struct Registry {
    child: Child,
    port: u16,
    instance: String,
    tls: bool,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Start a plain-HTTP registry; with `htpasswd`, only that user/password may pull or push.
    pub fn start(htpasswd: Option<(&str, &str)>) -> Registry {
        Registry::start_with(&RegistryOptions {
            htpasswd,
            ..RegistryOptions::default()
        })
    }

    /// [`Registry::try_start`], panicking with the reason when it fails.
    pub fn start_with(opts: &RegistryOptions) -> Registry {
        Registry::try_start(opts).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start a registry and wait until it is proven to be this one: listening on the port
    /// the kernel gave it, and answering with this start's secret header.
    pub fn try_start(opts: &RegistryOptions) -> Result<Registry, String> {
        let dir = tempfile::tempdir().unwrap();
        let instance = unique_token();
        let mut auth = String::new();
        if let Some((user, pass)) = opts.htpasswd {
            let out = super::run_ok(Command::new("htpasswd").args(["-Bbn", user, pass]));
            let file = dir.path().join("htpasswd");
            fs::write(&file, &out.stdout).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: fledge-test-realm\n    path: {}\n",
                file.display()
            );
        }
        let tls = match opts.tls {
            Some((cert, key)) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        // Log level info: the line that names the bound address is an info line. Port 0: the
        // kernel picks a port no other socket holds. The secret also silences the warning
        // about a generated one.
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:0\n  secret: {instance}\n  headers:\n    \
             {INSTANCE_HEADER}: [{instance}]\n{tls}{auth}",
            dir.path().join("storage").display()
        );
        let cfg = dir.path().join("config.yml");
        fs::write(&cfg, config).unwrap();
        let log_path = dir.path().join("registry.log");
        let log = fs::File::create(&log_path).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run docker-registry: {e}"))?;
        let mut reg = Registry {
            child,
            port: 0,
            instance,
            tls: opts.tls.is_some(),
            dir,
        };
        // Dropping `reg` on an error kills the child.
        let deadline = Instant::now() + START_TIMEOUT;
        let port = loop {
            if let Some(status) = reg.exited() {
                return Err(reg.failure(&format!("docker-registry exited with {status}")));
            }
            if let Some(port) = bound_port(&reg.log_text()) {
                break port;
            }
            if Instant::now() > deadline {
                return Err(reg.failure(&format!(
                    "docker-registry logged no listening address within {START_TIMEOUT:?}"
                )));
            }
            sleep(Duration::from_millis(50));
        };
        reg.port = port;
        check_identity(port, reg.tls, &reg.instance).map_err(|e| reg.failure(&e))?;
        if let Some(status) = reg.exited() {
            return Err(reg.failure(&format!("docker-registry exited with {status}")));
        }
        Ok(reg)
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn failure(&self, what: &str) -> String {
        format!(
            "{what} (config {}); its log:\n{}",
            self.dir.path().join("config.yml").display(),
            self.log_text()
        )
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The secret this registry answers with in [`INSTANCE_HEADER`].
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `skopeo copy` `src` to `repo:tag` in this registry (`--all`: every platform).
    pub fn push(&self, src: &str, repo_tag: &str, creds: Option<&str>, all: bool) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if all {
            cmd.arg("--all");
        }
        if let Some(c) = creds {
            cmd.arg(format!("--dest-creds={c}"));
        }
        cmd.arg(src)
            .arg(format!("docker://{}/{repo_tag}", self.host()));
        super::run_ok(&mut cmd);
    }

    /// The registry's data file for blob `digest`.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port of the first `listening on 127.0.0.1:PORT` line in a docker-registry log
/// (`msg="listening on 127.0.0.1:41234"`, with `, tls` appended over HTTPS).
pub fn bound_port(log: &str) -> Option<u16> {
    log.lines().find_map(|line| {
        let rest = &line[line.find("listening on ")? + "listening on ".len()..];
        let addr: String = rest
            .chars()
            .take_while(|c| !matches!(c, '"' | ',' | ' '))
            .collect();
        match addr.parse::<SocketAddr>() {
            Ok(a) if a.ip() == Ipv4Addr::LOCALHOST && a.port() != 0 => Some(a.port()),
            _ => None,
        }
    })
}

/// Ok when `GET /v2/` on 127.0.0.1:`port` (HTTPS with `tls`) answers with `instance` in
/// [`INSTANCE_HEADER`]: the server there is the registry that was configured with it.
/// Retried while the connection fails (until [`START_TIMEOUT`]); any answer without the
/// secret is an error at once, naming what answered instead.
pub fn check_identity(port: u16, tls: bool, instance: &str) -> Result<(), String> {
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{port}/v2/");
    // The certificate is not what is checked here (it may be for another name): the header is.
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .disable_verification(true)
                .build(),
        )
        .build()
        .new_agent();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match agent.get(&url).call() {
            Ok(resp) => {
                let got = resp
                    .headers()
                    .get(INSTANCE_HEADER)
                    .and_then(|v| v.to_str().ok());
                return if got == Some(instance) {
                    Ok(())
                } else {
                    Err(format!(
                        "{url} answered {}, but not as the server just started: {INSTANCE_HEADER} \
                         is {got:?}",
                        resp.status()
                    ))
                };
            }
            Err(e) if Instant::now() > deadline => {
                return Err(format!(
                    "{url} gave no answer within {START_TIMEOUT:?}: {e}"
                ))
            }
            Err(_) => sleep(Duration::from_millis(50)),
        }
    }
}

/// The pids of the processes holding the socket that listens on 127.0.0.1:`port` (from
/// /proc/net/tcp and /proc/*/fd; as root, every process is seen). An independent check of
/// whose server a port is.
pub fn listening_pids(port: u16) -> Vec<u32> {
    let want = format!("0100007F:{port:04X}");
    let inode = fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode
            (f.len() > 9 && f[1] == want && f[3] == "0A").then(|| f[9].to_string())
        });
    let Some(inode) = inode else {
        return Vec::new();
    };
    let target = format!("socket:[{inode}]");
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let holds = fs::read_dir(e.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == &*target));
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// Private podman storage under a test's own directory (`podman-root`, `podman-run`,
/// `--storage-driver vfs`), reset on drop.
pub struct PodmanStorage {
    dir: PathBuf,
    root: PathBuf,
    runroot: PathBuf,
    /// Rootless: the user podman runs as, and its settings ([`PodmanStorage::rootless`]).
    rootless: Option<Rootless>,
}

struct Rootless {
    user: String,
    home: PathBuf,
    runtime_dir: PathBuf,
    conf: PathBuf,
}

/// The podman settings these hosts need to start containers: root podman's default rlimits
/// are refused (`error setting rlimit type 7`), and the (hybrid v1) cgroups are not
/// systemd's to manage. Rootless podman here needs only `--runtime runc` (crun refuses the
/// hybrid cgroups), but gets the same settings, so it does not depend on the host's.
pub const CONTAINERS_CONF: &str =
    "[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = \"cgroupfs\"\n";

impl PodmanStorage {
    /// `dir` must be the test's own (e.g. a temporary directory).
    pub fn new(dir: &Path) -> PodmanStorage {
        PodmanStorage {
            dir: dir.to_path_buf(),
            root: dir.join("podman-root"),
            runroot: dir.join("podman-run"),
            rootless: None,
        }
    }

    /// Rootless podman run by `user` (through runuser; the caller is root), with its storage,
    /// run directory, HOME, XDG_RUNTIME_DIR and a [`CONTAINERS_CONF`] all under `dir`, which
    /// is given to the user. Containers start with `--runtime runc`.
    pub fn rootless(dir: &Path, user: &nix::unistd::User) -> PodmanStorage {
        let mut storage = PodmanStorage::new(dir);
        let r = Rootless {
            user: user.name.clone(),
            home: dir.join("home"),
            runtime_dir: dir.join("xdg-run"),
            conf: dir.join("containers.conf"),
        };
        fs::write(&r.conf, CONTAINERS_CONF).unwrap();
        for d in [dir, &r.home, &r.runtime_dir] {
            fs::create_dir_all(d).unwrap();
            nix::unistd::chown(d, Some(user.uid), Some(user.gid)).unwrap();
        }
        fs::set_permissions(
            &r.runtime_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        storage.rootless = Some(r);
        storage
    }

    /// `podman --root ROOT --runroot RUNROOT --storage-driver vfs ARGS...` (rootless: run by
    /// the user, with `--runtime runc` and its own settings)
    pub fn podman(&self, args: &[&str]) -> Command {
        let mut c = match &self.rootless {
            None => Command::new("podman"),
            Some(r) => {
                // runuser resets HOME, so the settings go through env(1) after it.
                let mut c = Command::new("runuser");
                c.args(["-u", &r.user, "--", "env"])
                    .arg(format!("HOME={}", r.home.display()))
                    .arg(format!("XDG_RUNTIME_DIR={}", r.runtime_dir.display()))
                    .arg(format!("CONTAINERS_CONF={}", r.conf.display()))
                    .args(["podman", "--runtime", "runc"]);
                c
            }
        };
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "vfs"])
            .args(args);
        c
    }

    /// `podman system service` for this storage on `DIR/podman.sock`, once it answers the
    /// Docker API's `/_ping`. Nothing else listens in the test's own directory, so a socket
    /// there that answers while the child runs is this service.
    pub fn serve(&self) -> PodmanService<'_> {
        let socket = self.dir.join("podman.sock");
        let log = self.dir.join("podman-service.log");
        assert!(
            !socket.exists(),
            "{} exists before the service started",
            socket.display()
        );
        let out = fs::File::create(&log).unwrap();
        let child = self
            .podman(&[
                "system",
                "service",
                "--time=0",
                &format!("unix://{}", socket.display()),
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut svc = PodmanService {
            child,
            socket,
            log,
            _storage: self,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = svc.child.try_wait() {
                panic!(
                    "podman system service exited with {status}; its log:\n{}",
                    fs::read_to_string(&svc.log).unwrap_or_default()
                );
            }
            if ping(&svc.socket).is_ok_and(|ok| ok) {
                return svc;
            }
            assert!(
                Instant::now() < deadline,
                "podman system service did not answer /_ping on {} within {START_TIMEOUT:?}; \
                 its log:\n{}",
                svc.socket.display(),
                fs::read_to_string(&svc.log).unwrap_or_default()
            );
            sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PodmanStorage {
    fn drop(&mut self) {
        let _ = self.podman(&["system", "reset", "--force"]).output();
    }
}

/// A running `podman system service` ([`PodmanStorage::serve`]); killed on drop.
pub struct PodmanService<'a> {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _storage: &'a PodmanStorage,
}

impl PodmanService<'_> {
    /// `unix://SOCKET`, for DOCKER_HOST.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for PodmanService<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the Docker API on `socket` answers `GET /_ping` with 200 `OK`.
fn ping(socket: &Path) -> io::Result<bool> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply.starts_with("HTTP/1.") && reply.contains(" 200 ") && reply.ends_with("OK"))
}

/// A raw HTTP response: status line (e.g. `200 OK`), headers, body; `Connection: close`.
pub fn http_response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

/// An HTTP server on 127.0.0.1 that answers every request with `response` (see
/// [`http_response`]), in the background for the rest of the test process. It holds its
/// listener from the bind on, so the address is its own.
pub fn canned_http(response: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let response = Arc::new(response);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            // The request head, up to its blank line, then the answer.
            let mut r = BufReader::new(&s);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && !line.trim_end().is_empty() {
                line.clear();
            }
            let _ = s.write_all(&response);
        }
    });
    addr
}

/// A port on 127.0.0.1 that refuses connections for as long as this value lives: a socket
/// is bound to it but never listens, so no other server can be given it (a port found free
/// and released could be taken by another test's server before it is used).
pub struct ClosedPort {
    _socket: OwnedFd,
    port: u16,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        use nix::sys::socket::{
            bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let any_port = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        bind(fd.as_raw_fd(), &any_port).expect("bind 127.0.0.1:0");
        let bound: SockaddrIn = getsockname(fd.as_raw_fd()).expect("getsockname");
        ClosedPort {
            _socket: fd,
            port: bound.port(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}
