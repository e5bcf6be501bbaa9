//! Image sources end to end: a real `docker-registry` on loopback (anonymous and with
//! htpasswd auth), podman's Docker-compatible socket, OCI and docker archives made by skopeo.
//!
//! Every source must give the same image as the OCI layout it was copied from: the same
//! layer diff_ids and (with FUSE and root) the same mounted tree. Errors must name what
//! failed, and a failed pull must leave nothing in the cache.
//!
//! Needs: docker-registry, skopeo, htpasswd (apache2-utils), podman, and the Debian test
//! image from scripts/make-test-images.sh. Missing ones print `SKIP: ...`, except under
//! `CI`, where that fails.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::kit::{self, Layer, LayoutBuilder};
use support::servers::{ClosedPort, PodmanStorage, Registry, RegistryOptions};
use support::treecmp;
use support::FledgeMount;

fn fledge_bin() -> PathBuf {
    match std::env::var_os("FLEDGE_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_fledge")),
    }
}

/// Whether all of `programs` are installed; SKIP (or, in CI, fail) otherwise.
fn need(test: &str, programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| !support::have_program(p))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!("{} not installed", missing.join(", "));
    assert!(
        !support::setup_wanted(),
        "{test}: {reason} (required in CI)"
    );
    support::skip(test, &reason);
    false
}

/// A fledge command with a private cache, no daemon, and a private docker config.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("docker")).unwrap();
        Env { dir }
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Write a docker config.json with `user:pass` for `host`.
    fn login(&self, host: &str, user: &str, pass: &str) {
        let auth = base64(format!("{user}:{pass}").as_bytes());
        let cfg = serde_json::json!({"auths": {host: {"auth": auth}}});
        fs::write(self.dir.path().join("docker/config.json"), cfg.to_string()).unwrap();
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(fledge_bin());
        c.args(args)
            .arg("--cache-dir")
            .arg(self.cache())
            .env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .env_remove("REGISTRY_AUTH_FILE")
            .env(
                "DOCKER_HOST",
                format!("unix://{}/no-daemon.sock", self.dir.path().display()),
            )
            .env_remove("FLEDGE_INSECURE_REGISTRIES")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> Output {
        support::run_ok(&mut self.cmd(args))
    }

    /// Run expecting failure; returns stderr, checked to be a one-line error (plus hint).
    fn fail(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} succeeded:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "{args:?}: expected one error line:\n{stderr}"
        );
        stderr
    }

    /// Files in the cache other than complete, verified entries: partial downloads and temp
    /// files.
    fn cache_leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for sub in ["layers/sha256", "blobs/sha256", "tmp"] {
            if let Ok(rd) = fs::read_dir(self.cache().join(sub)) {
                for e in rd {
                    let name = e.unwrap().file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') {
                        found.push(format!("{sub}/{name}"));
                    }
                }
            }
        }
        found
    }

    fn cached_blobs(&self) -> Vec<String> {
        match fs::read_dir(self.cache().join("blobs/sha256")) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `fledge inspect --json`: (manifest digest, platform, layer diff_ids).
fn inspect(env: &Env, reference: &str, extra: &[&str]) -> (String, String, Vec<String>) {
    let mut args = vec!["inspect", "--json", reference];
    args.extend_from_slice(extra);
    let out = env.ok(&args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let diff_ids = v["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no layers in {v}"))
        .iter()
        .map(|l| l["diff_id"].as_str().unwrap().to_string())
        .collect();
    (
        v["manifest_digest"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["platform"].as_str().unwrap_or_default().to_string(),
        diff_ids,
    )
}

fn debian(test: &str) -> Option<support::DebianImage> {
    if !need(test, &["docker-registry", "skopeo"]) {
        return None;
    }
    support::debian_image(test)
}

/// Mount `reference` with fledge and snapshot the tree (None without root or FUSE).
fn mounted_snapshot(
    env: &Env,
    reference: &str,
    extra_env: &[(&str, String)],
) -> Option<treecmp::Snapshot> {
    if !support::is_root() || !Path::new("/dev/fuse").exists() {
        return None;
    }
    let mp = env
        .dir
        .path()
        .join(format!("mnt-{}", sha_hex(reference.as_bytes())));
    fs::create_dir_all(&mp).unwrap();
    let mut cmd = env.cmd(&["mount", reference]);
    cmd.arg(&mp);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let log = env
        .dir
        .path()
        .join(format!("mount-{}.log", sha_hex(reference.as_bytes())));
    let mut m = FledgeMount::spawn(cmd, &mp, &log).unwrap();
    m.wait_mounted(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{reference}: {e}"));
    let snap = treecmp::snapshot(&mp).unwrap();
    m.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30))
        .unwrap();
    Some(snap)
}

fn sha_hex(data: &[u8]) -> String {
    kit::sha256_hex(data)[..16].to_string()
}

// ---------------------------------------------------------------------------------------------

/// The registry, both archive formats and the OCI layout give the same layers and the same
/// mounted tree; the second pull comes from the cache.
#[test]
fn registry_and_archives_match_the_oci_layout() {
    let test = "registry_and_archives_match_the_oci_layout";
    let Some(img) = debian(test) else { return };
    let reg = Registry::start(None);
    reg.push(&img.reference, "debian:test", None, false);
    let env = Env::new();
    let oci_ar = env.dir.path().join("debian-oci.tar");
    let docker_ar = env.dir.path().join("debian-docker.tar");
    support::run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &img.reference,
        &format!("oci-archive:{}:test", oci_ar.display()),
    ]));
    support::run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &img.reference,
        &format!("docker-archive:{}:debian:test", docker_ar.display()),
    ]));

    let reference_layers = inspect(&env, &img.reference, &[]).2;
    assert!(reference_layers.len() >= 2, "{reference_layers:?}");
    let sources = [
        format!("docker://{}/debian:test", reg.host()),
        format!("{}/debian:test", reg.host()),
        format!("oci-archive:{}:test", oci_ar.display()),
        format!("oci-archive:{}", oci_ar.display()),
        format!("docker-archive:{}:debian:test", docker_ar.display()),
        format!("docker-archive:{}", docker_ar.display()),
    ];
    for s in &sources {
        let (_, platform, layers) = inspect(&env, s, &[]);
        assert_eq!(layers, reference_layers, "{s}");
        assert!(platform.starts_with("linux/"), "{s}: {platform}");
    }

    // A pull fills the cache with verified blobs and decoded layers; the second is cached.
    let r = format!("docker://{}/debian:test", reg.host());
    let out = env.ok(&["pull", &r]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("from registry 127.0.0.1:"), "{text}");
    assert!(!env.cached_blobs().is_empty());
    assert!(
        env.cache_leftovers().is_empty(),
        "{:?}",
        env.cache_leftovers()
    );
    // With the registry gone, decoded layers still serve a mount-free check: pull again
    // needs only the manifest, so stop here and compare trees instead.
    let oracle = mounted_snapshot(&env, &img.reference, &[]);
    if let Some(oracle) = oracle {
        for s in &sources {
            let snap = mounted_snapshot(&env, s, &[]).unwrap();
            let lines = treecmp::diff(&oracle, &snap, &treecmp::DiffOptions::default());
            assert!(lines.is_empty(), "{s}:\n{}", treecmp::report(&lines, 50));
        }
    } else {
        support::skip(
            test,
            "tree comparison needs root and /dev/fuse (layer diff_ids were compared)",
        );
    }

    // `cache prune` empties the cache and says how much it freed.
    let out = env.ok(&["cache", "prune"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("MiB freed") && !text.contains(" 0 files"),
        "{text}"
    );
    assert!(env.cached_blobs().is_empty());
    assert!(!env.cache().join("layers").exists());

    // --no-cache leaves the cache directory alone.
    let out = support::run_ok(
        Command::new(fledge_bin())
            .args(["pull", "--no-cache", &r])
            .env("FLEDGE_CACHE_DIR", env.cache())
            .env("DOCKER_HOST", "unix:///nonexistent.sock"),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("pulled"));
    assert!(!env.cache().join("layers").exists());
}

/// A multi-platform index: each platform resolves to its own manifest, a missing one lists
/// those present.
#[test]
fn multi_platform_index_from_the_registry() {
    let test = "multi_platform_index_from_the_registry";
    if !need(test, &["docker-registry", "skopeo"]) {
        return;
    }
    let env = Env::new();
    let layout = env.dir.path().join("multi");
    make_multi_platform_layout(&layout);
    let reg = Registry::start(None);
    reg.push(
        &format!("oci:{}:multi", layout.display()),
        "multi:v1",
        None,
        true,
    );
    let r = format!("docker://{}/multi:v1", reg.host());
    let (amd, p_amd, l_amd) = inspect(&env, &r, &["--platform", "linux/amd64"]);
    let (arm, p_arm, l_arm) = inspect(&env, &r, &["--platform", "linux/arm64"]);
    assert_eq!(p_amd, "linux/amd64");
    assert_eq!(p_arm, "linux/arm64");
    assert_ne!(amd, arm);
    assert_ne!(l_amd, l_arm);
    // The same as the layout it came from.
    let local = format!("oci:{}:multi", layout.display());
    assert_eq!(
        inspect(&env, &local, &["--platform", "linux/arm64"]).2,
        l_arm
    );
    let err = env.fail(&["inspect", &r, "--platform", "linux/s390x"]);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/amd64, linux/arm64"),
        "{err}"
    );
    // A digest reference pins one manifest.
    let pinned = format!("docker://{}/multi@{arm}", reg.host());
    let (d, p, l) = inspect(&env, &pinned, &["--platform", "linux/arm64"]);
    assert_eq!((d.as_str(), p.as_str()), (arm.as_str(), "linux/arm64"));
    assert_eq!(l, l_arm);
    // Layers of the arm64 image can be pulled (they are plain data, no exec needed).
    env.ok(&["pull", &r, "--platform", "linux/arm64"]);
    assert!(env.cache_leftovers().is_empty());
}

/// Credentials from a docker config file: none, wrong, right.
#[test]
fn registry_with_htpasswd_auth() {
    let test = "registry_with_htpasswd_auth";
    if !need(test, &["htpasswd"]) {
        return;
    }
    let Some(img) = debian(test) else { return };
    let reg = Registry::start(Some(("fledge", "s3cret")));
    reg.push(&img.reference, "debian:test", Some("fledge:s3cret"), false);
    let r = format!("docker://{}/debian:test", reg.host());
    let env = Env::new();

    let err = env.fail(&["inspect", &r]);
    assert!(
        err.contains(&format!("registry {}", reg.host()))
            && err.contains("no credentials are configured"),
        "{err}"
    );
    env.login(&reg.host(), "fledge", "wrong");
    let err = env.fail(&["inspect", &r]);
    assert!(
        err.contains(&format!("registry {}", reg.host()))
            && err.contains("realm fledge-test-realm")
            && err.contains("user 'fledge' were rejected"),
        "{err}"
    );
    env.login(&reg.host(), "fledge", "s3cret");
    let (_, _, layers) = inspect(&env, &r, &[]);
    let env2 = Env::new();
    assert_eq!(layers, inspect(&env2, &img.reference, &[]).2);
    env.ok(&["pull", &r]);
    assert!(env.cache_leftovers().is_empty());
}

/// Errors name what failed, do not panic, and leave no partial cache entry.
#[test]
fn registry_errors_name_what_failed() {
    let test = "registry_errors_name_what_failed";
    let Some(img) = debian(test) else { return };
    let reg = Registry::start(None);
    reg.push(&img.reference, "debian:test", None, false);
    let env = Env::new();
    let host = reg.host();

    let err = env.fail(&["inspect", &format!("docker://{host}/debian:nope")]);
    assert!(
        err.contains("manifest nope not found in repository debian")
            && err.contains("tags present: test"),
        "{err}"
    );
    let err = env.fail(&["inspect", &format!("docker://{host}/nosuch/repo:x")]);
    assert!(
        err.contains("repository nosuch/repo not found on registry"),
        "{err}"
    );

    // Registry down: a quick, clear, one-line error.
    let closed = ClosedPort::new();
    let down = closed.port();
    let started = Instant::now();
    let err = env.fail(&["inspect", &format!("docker://127.0.0.1:{down}/debian:test")]);
    assert!(
        err.contains(&format!("cannot reach registry 127.0.0.1:{down}"))
            && err.contains("connection refused"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // A corrupted blob in the registry's storage: the digest is named, nothing is cached.
    let manifest = inspect(&env, &format!("docker://{host}/debian:test"), &[]);
    assert!(!manifest.2.is_empty());
    let out = env.ok(&["inspect", "--json", &format!("docker://{host}/debian:test")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = v["layers"].as_array().unwrap();
    let victim = layers
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap_or(0))
        .unwrap();
    let digest = victim["digest"].as_str().unwrap().to_string();
    let data_path = reg.blob_data(&digest);
    let mut data = fs::read(&data_path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&data_path, &data).unwrap();
    let err = env.fail(&["pull", &format!("docker://{host}/debian:test")]);
    assert!(err.contains(&digest) && err.contains("corrupt"), "{err}");
    let hex = digest.trim_start_matches("sha256:");
    assert!(
        !env.cached_blobs().iter().any(|b| b == hex),
        "corrupt blob was cached"
    );
    assert!(
        env.cache_leftovers().is_empty(),
        "{:?}",
        env.cache_leftovers()
    );
    let diff_id = victim["diff_id"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    assert!(!env
        .cache()
        .join(format!("layers/sha256/{diff_id}.tar"))
        .exists());

    // Archives without the requested reference list what they hold.
    let docker_ar = env.dir.path().join("debian-docker.tar");
    support::run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &img.reference,
        &format!("docker-archive:{}:debian:test", docker_ar.display()),
    ]));
    let err = env.fail(&[
        "inspect",
        &format!("docker-archive:{}:debian:other", docker_ar.display()),
    ]);
    assert!(
        err.contains("has no image named debian:other") && err.contains("debian:test"),
        "{err}"
    );

    // The daemon socket is missing.
    let err = env.fail(&["inspect", "docker-daemon:debian:test"]);
    assert!(
        err.contains("cannot reach the Docker daemon") && err.contains("no-daemon.sock"),
        "{err}"
    );
}

/// An interrupted download is continued: a partial file holding the start of a blob is
/// completed with a Range request and the whole blob verified.
#[test]
fn interrupted_download_is_resumed() {
    let test = "interrupted_download_is_resumed";
    let Some(img) = debian(test) else { return };
    let reg = Registry::start(None);
    reg.push(&img.reference, "debian:test", None, false);
    let env = Env::new();
    let r = format!("docker://{}/debian:test", reg.host());
    let out = env.ok(&["inspect", "--json", &r]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let big = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap_or(0))
        .unwrap()
        .clone();
    let digest = big["digest"].as_str().unwrap();
    let hex = digest.trim_start_matches("sha256:");
    let data = fs::read(reg.blob_data(digest)).unwrap();
    let blobs = env.cache().join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(
        blobs.join(format!(".partial-{hex}")),
        &data[..data.len() / 3],
    )
    .unwrap();
    let out = env.ok(&["-v", "pull", &r]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!("resuming the download of {digest}")),
        "{log}"
    );
    assert_eq!(fs::read(blobs.join(hex)).unwrap(), data);
    assert!(env.cache_leftovers().is_empty());

    // A partial file with wrong content is detected by the whole-blob check and dropped.
    let env = Env::new();
    let blobs = env.cache().join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(
        blobs.join(format!(".partial-{hex}")),
        vec![0u8; data.len() / 3],
    )
    .unwrap();
    let err = env.fail(&["pull", &r]);
    assert!(err.contains(digest), "{err}");
    assert!(
        env.cache_leftovers().is_empty(),
        "{:?}",
        env.cache_leftovers()
    );
    // ... and the next pull starts afresh and succeeds.
    env.ok(&["pull", &r]);
}

/// `fledge build` gives images with identical content from the OCI layout, the registry and
/// both archive formats (compared by loop-mounting the ext4 images read-only).
#[test]
fn built_images_are_identical_from_every_source() {
    let test = "built_images_are_identical_from_every_source";
    if !support::is_root() {
        support::skip(test, "building and loop-mounting images needs root");
        return;
    }
    if !need(test, &["mkfs.ext4", "mount", "umount"]) {
        return;
    }
    let Some(img) = debian(test) else { return };
    let reg = Registry::start(None);
    reg.push(&img.reference, "debian:test", None, false);
    let env = Env::new();
    let d = env.dir.path();
    let oci_ar = d.join("debian-oci.tar");
    let docker_ar = d.join("debian-docker.tar");
    for target in [
        format!("oci-archive:{}:test", oci_ar.display()),
        format!("docker-archive:{}:debian:test", docker_ar.display()),
    ] {
        support::run_ok(Command::new("skopeo").args(["copy", "--quiet", &img.reference, &target]));
    }
    let sources = [
        img.reference.clone(),
        format!("docker://{}/debian:test", reg.host()),
        format!("oci-archive:{}:test", oci_ar.display()),
        format!("docker-archive:{}:debian:test", docker_ar.display()),
    ];
    let mut first: Option<treecmp::Snapshot> = None;
    for (i, s) in sources.iter().enumerate() {
        let cfg = d.join(format!("fledge-{i}.toml"));
        fs::write(
            &cfg,
            format!(
                "version = \"1\"\nstrategy = \"oci_rootfs\"\n[source]\nimage = \"{s}\"\n[filesystem]\ntype = \"ext4\"\nsize_buffer_mb = 20\npreallocate = false\n"
            ),
        )
        .unwrap();
        let out_img = d.join(format!("img-{i}.img"));
        let cfg_s = cfg.display().to_string();
        let out_s = out_img.display().to_string();
        support::run_ok(
            env.cmd(&["build", "-c", &cfg_s, "-o", &out_s])
                .env("SOURCE_DATE_EPOCH", "1700000000"),
        );
        let mp = d.join(format!("mnt-img-{i}"));
        fs::create_dir_all(&mp).unwrap();
        support::run_ok(
            Command::new("mount")
                .args(["-o", "loop,ro", &out_s])
                .arg(&mp),
        );
        let snap = treecmp::snapshot(&mp);
        support::run_ok(Command::new("umount").arg(&mp));
        let snap = snap.unwrap();
        assert!(snap.len() > 100, "{s}: built image looks empty");
        match &first {
            None => first = Some(snap),
            Some(f) => {
                let lines = treecmp::diff(f, &snap, &treecmp::DiffOptions::default());
                assert!(
                    lines.is_empty(),
                    "{s} vs {}:\n{}",
                    sources[0],
                    treecmp::report(&lines, 50)
                );
            }
        }
    }
}

/// A name other than `localhost` that resolves to 127.0.0.1 (so fledge uses HTTPS for it).
fn non_loopback_name_for_127() -> Option<String> {
    use std::net::ToSocketAddrs;
    let name = fs::read_to_string("/etc/hostname").ok()?.trim().to_string();
    if name.is_empty() || name == "localhost" || name.contains(' ') {
        return None;
    }
    let addrs: Vec<_> = (name.as_str(), 1).to_socket_addrs().ok()?.collect();
    addrs
        .iter()
        .any(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST)
        .then_some(name)
}

/// HTTPS: a registry whose certificate comes from a private CA is refused until the CA is
/// given with --registry-ca or FLEDGE_REGISTRY_CA.
#[test]
fn https_registry_with_a_private_ca() {
    let test = "https_registry_with_a_private_ca";
    if !need(test, &["openssl"]) {
        return;
    }
    let Some(img) = debian(test) else { return };
    let Some(name) = non_loopback_name_for_127() else {
        support::skip(test, "this host's name does not resolve to 127.0.0.1");
        return;
    };
    let env = Env::new();
    let d = env.dir.path();
    let ssl = |args: &[&str]| {
        support::run_ok(Command::new("openssl").current_dir(d).args(args));
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=fledge test CA",
    ]);
    ssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        &format!("/CN={name}"),
    ]);
    fs::write(
        d.join("ext.cnf"),
        format!(
            "subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
    ssl(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let (cert, key) = (d.join("srv.crt"), d.join("srv.key"));
    let reg = Registry::start_with(&RegistryOptions {
        tls: Some((&cert, &key)),
        ..RegistryOptions::default()
    });
    reg.push(&img.reference, "debian:test", None, false);
    let r = format!("docker://{name}:{}/debian:test", reg.port());

    let err = env.fail(&["inspect", &r]);
    assert!(
        err.contains(&format!("cannot reach registry {name}:{}", reg.port()))
            && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    let ca = d.join("ca.crt").display().to_string();
    let expected = inspect(&env, &img.reference, &[]).2;
    assert_eq!(inspect(&env, &r, &["--registry-ca", &ca]).2, expected);
    let out = support::run_ok(env.cmd(&["pull", &r]).env("FLEDGE_REGISTRY_CA", &ca));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(https://"));
    // Marked insecure, it is spoken to over plain HTTP, which this TLS-only registry refuses.
    let err = env.fail(&[
        "inspect",
        &r,
        "--insecure-registry",
        &format!("{name}:{}", reg.port()),
    ]);
    assert!(
        err.contains(&format!("registry {name}:{}", reg.port())),
        "{err}"
    );
}

/// Several pulls into one empty cache at once all succeed and leave one copy of each blob.
#[test]
fn concurrent_pulls_share_the_cache() {
    let test = "concurrent_pulls_share_the_cache";
    let Some(img) = debian(test) else { return };
    let reg = Registry::start(None);
    reg.push(&img.reference, "debian:test", None, false);
    let env = Env::new();
    let r = format!("docker://{}/debian:test", reg.host());
    let children: Vec<_> = (0..3)
        .map(|_| {
            env.cmd(&["pull", &r])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        env.cache_leftovers().is_empty(),
        "{:?}",
        env.cache_leftovers()
    );
    let layers = inspect(&env, &r, &[]).2;
    for d in &layers {
        let hex = d.trim_start_matches("sha256:");
        assert!(
            env.cache()
                .join(format!("layers/sha256/{hex}.tar"))
                .is_file(),
            "{d}"
        );
    }
}

/// The Docker Engine API (podman's compatible socket): same image as the OCI layout; a bare
/// reference prefers the daemon and falls back to the registry.
#[test]
fn docker_daemon_through_podman() {
    let test = "docker_daemon_through_podman";
    if !need(test, &["podman"]) {
        return;
    }
    if !support::is_root() {
        support::skip(test, "podman with a private storage root needs root here");
        return;
    }
    let Some(img) = debian(test) else { return };
    let env = Env::new();
    let storage = PodmanStorage::new(env.dir.path());
    let ar = env.dir.path().join("debian-docker.tar");
    support::run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &img.reference,
        &format!("docker-archive:{}:localhost/debian:test", ar.display()),
    ]));
    support::run_ok(&mut storage.podman(&["load", "-q", "-i", &ar.display().to_string()]));
    let service = storage.serve();
    let host = service.host();
    let expected = inspect(&env, &img.reference, &[]).2;
    let mut c = env.cmd(&["inspect", "--json", "docker-daemon:localhost/debian:test"]);
    c.env("DOCKER_HOST", &host);
    let out = support::run_ok(&mut c);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<String> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["diff_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, expected);

    // A bare reference is served by the daemon when it has the image.
    let mut c = env.cmd(&["-v", "pull", "localhost/debian:test"]);
    c.env("DOCKER_HOST", &host);
    let out = support::run_ok(&mut c);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("from Docker daemon at unix://"), "{log}");
    assert!(
        env.cache_leftovers().is_empty(),
        "{:?}",
        env.cache_leftovers()
    );

    // Not in the daemon: the registry serves a bare reference; if neither has it, both
    // are named.
    let reg = Registry::start(None);
    reg.push(&img.reference, "debian:test", None, false);
    let bare = format!("{}/debian:test", reg.host());
    let mut c = env.cmd(&["-v", "inspect", "--json", &bare]);
    c.env("DOCKER_HOST", &host);
    let out = support::run_ok(&mut c);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("not in the Docker daemon at") && log.contains("using registry 127.0.0.1:"),
        "{log}"
    );
    let mut c = env.cmd(&["inspect", &format!("{}/debian:none", reg.host())]);
    c.env("DOCKER_HOST", &host);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is not in the Docker daemon at") && err.contains("manifest none not found"),
        "{err}"
    );

    // Unknown image in the daemon, asked explicitly: named.
    let mut c = env.cmd(&["inspect", "docker-daemon:localhost/nothere:x"]);
    c.env("DOCKER_HOST", &host);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("has no image localhost/nothere:x"), "{err}");

    if let Some(oracle) = mounted_snapshot(&env, &img.reference, &[]) {
        let snap = mounted_snapshot(
            &env,
            "docker-daemon:localhost/debian:test",
            &[("DOCKER_HOST", host.clone())],
        )
        .unwrap();
        let lines = treecmp::diff(&oracle, &snap, &treecmp::DiffOptions::default());
        assert!(lines.is_empty(), "daemon:\n{}", treecmp::report(&lines, 50));
    }
}

// ---------------------------------------------------------------------------------------------
// The test kit's servers (tests/support/servers.rs): each registry these tests start must be
// their own, also when many start at once.

/// Registries started at the same moment get distinct ports, and each port is held by its
/// own child (seen in /proc, independently of the kit's own check) and answers with its own
/// secret, which no other one gives. A free port looked up first and handed to the server
/// afterwards fails this: two registries end up told one port, the second cannot bind it and
/// exits, and its port answers for the first.
#[test]
fn registries_started_at_once_are_each_their_own() {
    let test = "registries_started_at_once_are_each_their_own";
    if !need(test, &["docker-registry"]) {
        return;
    }
    const N: usize = 8;
    let barrier = std::sync::Barrier::new(N);
    let regs: Vec<Registry> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    Registry::start(None)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ports: Vec<u16> = regs.iter().map(Registry::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), N, "ports given twice: {ports:?}");
    for (i, reg) in regs.iter().enumerate() {
        assert_eq!(
            support::servers::listening_pids(reg.port()),
            [reg.pid()],
            "the socket listening on {} is not registry {i}'s (pid {})",
            reg.host(),
            reg.pid()
        );
        support::servers::check_identity(reg.port(), false, reg.instance())
            .unwrap_or_else(|e| panic!("registry {i}: {e}"));
        let other = &regs[(i + 1) % N];
        assert!(
            support::servers::check_identity(reg.port(), false, other.instance()).is_err(),
            "registry {i} answers with another registry's secret"
        );
    }
}

/// The identity check refuses whatever else answers on a port: a server with another secret,
/// or with none.
#[test]
fn registry_identity_check_refuses_a_stranger() {
    use support::servers::{canned_http, check_identity, http_response, INSTANCE_HEADER};
    let mine = support::servers::unique_token();
    let theirs = support::servers::unique_token();
    assert_ne!(mine, theirs);
    let stranger = canned_http(http_response(
        "200 OK",
        &[(INSTANCE_HEADER, &theirs)],
        b"{}",
    ));
    let err = check_identity(stranger.port(), false, &mine).unwrap_err();
    assert!(
        err.contains(&format!("127.0.0.1:{}", stranger.port())) && err.contains(&theirs),
        "{err}"
    );
    let plain = canned_http(http_response("401 Unauthorized", &[], b"{}"));
    let err = check_identity(plain.port(), false, &mine).unwrap_err();
    assert!(err.contains("not as the server just started"), "{err}");
    // The same server, asked for its own secret, is accepted.
    check_identity(stranger.port(), false, &theirs).unwrap();
}

/// A registry that exits instead of listening is reported with its log (not waited for until
/// some other server happens to answer).
#[test]
fn a_registry_that_cannot_start_is_reported_with_its_log() {
    let test = "a_registry_that_cannot_start_is_reported_with_its_log";
    if !need(test, &["docker-registry"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("no.crt"), dir.path().join("no.key"));
    let started = Instant::now();
    let err = Registry::try_start(&RegistryOptions {
        tls: Some((&cert, &key)),
        ..RegistryOptions::default()
    })
    .err()
    .expect("a registry without its certificate started");
    assert!(
        err.contains("docker-registry exited with") && err.contains("no.crt"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "{err}");
}

/// A [`ClosedPort`] refuses connections, and no server can be given it while it is held.
#[test]
fn a_closed_port_refuses_and_cannot_be_taken() {
    let closed = ClosedPort::new();
    let e = std::net::TcpStream::connect(("127.0.0.1", closed.port())).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let e = std::net::TcpListener::bind(("127.0.0.1", closed.port())).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
}

// ---------------------------------------------------------------------------------------------
// A hand-made two-platform OCI layout.

/// An OCI layout tagged `multi` whose index holds an amd64 and an arm64 image.
fn make_multi_platform_layout(layout: &Path) {
    let b = LayoutBuilder::at(layout);
    let mut manifests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let layer = Layer::gzip(kit::tar_of(&[("etc/arch", arch.as_bytes())]));
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
            "config": {"Cmd": ["/bin/sh"]}
        });
        manifests.push(b.image_with_config(
            &format!("linux/{arch}"),
            &[layer],
            &config,
            kit::OCI_MANIFEST,
        ));
    }
    let index = b.index(&manifests, kit::OCI_INDEX);
    b.write_index_json(&[(index, Some("multi"))]);
}
