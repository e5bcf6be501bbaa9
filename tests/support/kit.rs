//! The test kit shared by unit tests (`src/lib.rs` includes this file as `crate::testkit`)
//! and integration tests (`tests/support/mod.rs` includes it as `support::kit`): both compile
//! this same source, so it uses only std and crates both can use, never crate items.
//!
//! - [`tar`] writes tar layers from [`RawEntry`]s byte by byte, including entries no
//!   well-behaved tool writes (names with `..` or a leading `/`, headers whose size exceeds
//!   the data, any typeflag); [`tar_of`] is the short form for plain files.
//! - [`LayoutBuilder`] writes OCI image layouts (blobs, images, indexes, `index.json`);
//!   [`write_layout`] and [`derive_with_layer`] are the common one-image layouts.
//! - [`sha256_hex`], [`gzip`], [`host_arch`].
//! - [`Mount`]: a mount made by a test, unmounted on drop (also when the test panics).
//! - [`newc_entries`] reads back a newc cpio archive's headers; [`cpio_extract`] extracts one
//!   with GNU `cpio -idm` and then applies the directory and symlink mtimes as the kernel's
//!   unpacker does (GNU cpio 2.13 sets a directory's before creating what it holds, and
//!   none on symlinks).
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// The annotation that tags a manifest in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

// ---------------------------------------------------------------------------------------
// Hashing and compression

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `sha256:HEX` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).expect("gzip in memory");
    gz.finish().expect("gzip in memory")
}

/// This host's architecture as OCI names it.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A static ELF executable header for this host's machine (64-bit little-endian, no
/// program headers, so no PT_INTERP), padded with `pad` bytes: what a static binary looks
/// like to fledge's checks; it is never run.
pub fn static_elf(pad: usize) -> Vec<u8> {
    let machine: u16 = match std::env::consts::ARCH {
        "x86_64" => 62,
        "aarch64" => 183,
        "riscv64" => 243,
        other => panic!("static_elf: no ELF machine for {other}"),
    };
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little-endian
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&machine.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b.extend((0..pad).map(|i| (i % 251) as u8));
    b
}

/// [`static_elf`] with one program header PT_INTERP: a dynamically linked executable.
pub fn dynamic_elf() -> Vec<u8> {
    let mut b = static_elf(0);
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let mut ph = vec![0u8; 56];
    ph[..4].copy_from_slice(&3u32.to_le_bytes());
    b.extend(ph);
    b
}

/// A plain HTTP/1.1 server on 127.0.0.1 answering `requests` connections by `routes`
/// (path -> status, body; anything else 404), then ending. Returns the base URL and the
/// thread, which yields the paths asked for.
pub fn http_serve(
    routes: Vec<(&'static str, u16, Vec<u8>)>,
    requests: usize,
) -> (String, std::thread::JoinHandle<Vec<String>>) {
    use std::io::BufRead;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for stream in listener.incoming().take(requests) {
            let Ok(mut stream) = stream else { continue };
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let (status, body) = routes
                .iter()
                .find(|(p, _, _)| *p == path)
                .map_or((404, b"not found".to_vec()), |(_, s, b)| (*s, b.clone()));
            seen.push(path);
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&body).unwrap();
        }
        seen
    });
    (base, handle)
}

// ---------------------------------------------------------------------------------------
// Tar

/// Largest value a 7-digit octal uid/gid field holds; larger ones go into PAX records.
pub const OCTAL7_MAX: u64 = 0o7777777;

/// One tar entry, written exactly as described. Nothing validates names: the bytes given are
/// the bytes written.
#[derive(Clone, Debug)]
pub struct RawEntry {
    pub name: Vec<u8>,
    /// Tar typeflag: b'0' file, b'1' hard link, b'2' symlink, b'3' char, b'4' block,
    /// b'5' dir, b'6' fifo; any other byte is written as given.
    pub typeflag: u8,
    pub data: Vec<u8>,
    pub link: Vec<u8>,
    pub mode: u32,
    /// Written in PAX records (and 0 in the header) when above [`OCTAL7_MAX`].
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub dev: (u32, u32),
    /// Size written in the header when it must differ from `data.len()` (truncated layers).
    pub header_size: Option<u64>,
    /// Extra PAX records (key, value) written in an `x` header before this entry.
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawEntry {
    /// An entry of type `typeflag` with no data, owned by 0:0, mtime 1700000000.
    pub fn new(name: &[u8], typeflag: u8, mode: u32) -> RawEntry {
        RawEntry {
            name: name.to_vec(),
            typeflag,
            data: Vec::new(),
            link: Vec::new(),
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            dev: (0, 0),
            header_size: None,
            pax: Vec::new(),
        }
    }
    pub fn file(name: &[u8], data: &[u8]) -> RawEntry {
        RawEntry {
            data: data.to_vec(),
            ..RawEntry::new(name, b'0', 0o644)
        }
    }
    pub fn dir(name: &[u8]) -> RawEntry {
        RawEntry::new(name, b'5', 0o755)
    }
    pub fn symlink(name: &[u8], target: &[u8]) -> RawEntry {
        RawEntry {
            link: target.to_vec(),
            ..RawEntry::new(name, b'2', 0o777)
        }
    }
    pub fn hardlink(name: &[u8], target: &[u8]) -> RawEntry {
        RawEntry {
            link: target.to_vec(),
            ..RawEntry::new(name, b'1', 0o644)
        }
    }
    pub fn block(name: &[u8], major: u32, minor: u32) -> RawEntry {
        RawEntry {
            dev: (major, minor),
            ..RawEntry::new(name, b'4', 0o660)
        }
    }
    pub fn char(name: &[u8], major: u32, minor: u32) -> RawEntry {
        RawEntry {
            dev: (major, minor),
            ..RawEntry::new(name, b'3', 0o660)
        }
    }
}

fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    assert!(
        s.len() <= width,
        "value {value} does not fit a {width}-digit field"
    );
    field[..width].copy_from_slice(s.as_bytes());
    field[width] = 0;
}

fn put(field: &mut [u8], bytes: &[u8]) {
    assert!(bytes.len() <= field.len(), "{:?} too long", bytes);
    field[..bytes.len()].copy_from_slice(bytes);
}

#[allow(clippy::too_many_arguments)]
fn header(
    name: &[u8],
    typeflag: u8,
    e: &RawEntry,
    uid: u64,
    gid: u64,
    size: u64,
    link: &[u8],
) -> [u8; 512] {
    let mut h = [0u8; 512];
    put(&mut h[0..100], name);
    octal(&mut h[100..108], u64::from(e.mode));
    octal(&mut h[108..116], uid);
    octal(&mut h[116..124], gid);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], e.mtime);
    h[156] = typeflag;
    put(&mut h[157..257], link);
    put(&mut h[257..263], b"ustar\0");
    put(&mut h[263..265], b"00");
    octal(&mut h[329..337], u64::from(e.dev.0));
    octal(&mut h[337..345], u64::from(e.dev.1));
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

fn pad(out: &mut Vec<u8>) {
    let rem = out.len() % 512;
    if rem != 0 {
        out.resize(out.len() + 512 - rem, 0);
    }
}

fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    // "LEN key=value\n" where LEN counts itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len += 1;
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// A tar archive of `entries`, with the two zero blocks at the end (left off when the last
/// entry is truncated by `header_size`). Names or link targets that do not fit the ustar
/// fields, and uids/gids above [`OCTAL7_MAX`], go into PAX records (after the entry's own).
pub fn tar(entries: &[RawEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut pax: Vec<u8> = Vec::new();
        for (k, v) in &e.pax {
            pax.extend(pax_record(k, v));
        }
        let name: &[u8] = if e.name.len() > 100 {
            pax.extend(pax_record(b"path", &e.name));
            b"pax-long-name"
        } else {
            &e.name
        };
        let link: &[u8] = if e.link.len() > 100 {
            pax.extend(pax_record(b"linkpath", &e.link));
            b"pax-long-link"
        } else {
            &e.link
        };
        let mut id = |key: &[u8], v: u64| {
            if v > OCTAL7_MAX {
                pax.extend(pax_record(key, v.to_string().as_bytes()));
                0
            } else {
                v
            }
        };
        let (uid, gid) = (id(b"uid", e.uid), id(b"gid", e.gid));
        if !pax.is_empty() {
            let x = RawEntry::new(b"PaxHeaders/x", b'x', 0o644);
            out.extend_from_slice(&header(
                b"PaxHeaders/x",
                b'x',
                &x,
                0,
                0,
                pax.len() as u64,
                b"",
            ));
            out.extend_from_slice(&pax);
            pad(&mut out);
        }
        let size = e.header_size.unwrap_or(e.data.len() as u64);
        out.extend_from_slice(&header(name, e.typeflag, e, uid, gid, size, link));
        out.extend_from_slice(&e.data);
        if e.header_size.is_none() {
            pad(&mut out);
        }
    }
    if entries.last().is_none_or(|e| e.header_size.is_none()) {
        out.extend_from_slice(&[0u8; 1024]);
    }
    out
}

/// A tar archive of regular files (mode 644, mtime 1700000000).
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let entries: Vec<RawEntry> = files
        .iter()
        .map(|(name, data)| RawEntry::file(name.as_bytes(), data))
        .collect();
    tar(&entries)
}

// ---------------------------------------------------------------------------------------
// OCI layouts

/// One layer of an image: media type, blob, and the uncompressed tar's digest
/// (`sha256:HEX`, the diff_id).
pub struct Layer {
    pub media_type: String,
    pub blob: Vec<u8>,
    pub diff_id: String,
    /// The uncompressed tar; `None` for a layer made by streaming ([`Layer::streamed`]).
    pub tar: Option<Vec<u8>>,
}

impl Layer {
    fn of(media_type: &str, blob: Vec<u8>, tar: &[u8]) -> Layer {
        Layer {
            media_type: media_type.to_string(),
            blob,
            diff_id: sha256_digest(tar),
            tar: Some(tar.to_vec()),
        }
    }
    pub fn plain(tar: impl Into<Vec<u8>>) -> Layer {
        let tar = tar.into();
        Layer::of(TAR, tar.clone(), &tar)
    }
    pub fn gzip(tar: impl AsRef<[u8]>) -> Layer {
        let tar = tar.as_ref();
        Layer::of(TAR_GZIP, gzip(tar), tar)
    }
    pub fn zstd(tar: impl AsRef<[u8]>) -> Layer {
        let tar = tar.as_ref();
        Layer::of(
            TAR_ZSTD,
            zstd::encode_all(tar, 3).expect("zstd in memory"),
            tar,
        )
    }
    /// A layer whose tar was compressed and hashed while it was made, never held whole.
    pub fn streamed(media_type: &str, blob: Vec<u8>, diff_id: String) -> Layer {
        Layer {
            media_type: media_type.to_string(),
            blob,
            diff_id,
            tar: None,
        }
    }
    /// The uncompressed tar.
    pub fn tar(&self) -> &[u8] {
        self.tar
            .as_deref()
            .expect("a streamed layer keeps no uncompressed tar")
    }
}

/// Writes an OCI image layout: blobs, images and indexes, then `index.json`.
pub struct LayoutBuilder {
    dir: PathBuf,
    /// The temporary directory holding the layout, if [`LayoutBuilder::new`] made one.
    pub tmp: Option<tempfile::TempDir>,
}

impl Default for LayoutBuilder {
    fn default() -> Self {
        LayoutBuilder::new()
    }
}

impl LayoutBuilder {
    /// A layout in a new temporary directory (removed when the builder is dropped).
    pub fn new() -> LayoutBuilder {
        let tmp = tempfile::tempdir().expect("create temporary directory");
        let mut b = LayoutBuilder::at(tmp.path());
        b.tmp = Some(tmp);
        b
    }

    /// A layout at `dir` (created if missing, kept).
    pub fn at(dir: &Path) -> LayoutBuilder {
        fs::create_dir_all(dir.join("blobs/sha256")).expect("create layout");
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("write oci-layout");
        LayoutBuilder {
            dir: dir.to_path_buf(),
            tmp: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `oci:DIR:TAG`, or `oci:DIR` without a tag.
    pub fn reference(&self, tag: Option<&str>) -> String {
        match tag {
            Some(t) => format!("oci:{}:{t}", self.dir().display()),
            None => format!("oci:{}", self.dir().display()),
        }
    }

    /// Store `data` as a blob; returns (digest, size).
    pub fn blob(&self, data: &[u8]) -> (String, u64) {
        let digest = sha256_digest(data);
        fs::write(self.blob_path(&digest), data).expect("write blob");
        (digest, data.len() as u64)
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// A config for `platform` (os/arch[/variant]) with the given diff_ids and some runtime
    /// settings.
    pub fn config(&self, platform: &str, diff_ids: &[String]) -> Value {
        let parts: Vec<&str> = platform.split('/').collect();
        let mut cfg = json!({
            "architecture": parts[1],
            "os": parts[0],
            "config": {
                "Env": ["PATH=/usr/bin:/bin", "FOO=bar"],
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["echo hi"],
                "WorkingDir": "/work",
                "User": "1000:1000",
                "ExposedPorts": {"80/tcp": {}, "443/tcp": {}},
                "Labels": {"org.example.b": "2", "org.example.a": "1"}
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if let Some(v) = parts.get(2) {
            cfg["variant"] = json!(v);
        }
        cfg
    }

    /// Store an image (config from [`LayoutBuilder::config`], layers, manifest) for
    /// `platform`; returns the manifest descriptor with a platform field.
    pub fn image(&self, platform: &str, layers: &[Layer]) -> Value {
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let cfg = self.config(platform, &diff_ids);
        self.image_with_config(platform, layers, &cfg, OCI_MANIFEST)
    }

    /// Store an image with the config `cfg` and a manifest of type `manifest_type`; returns
    /// the manifest descriptor with a platform field.
    pub fn image_with_config(
        &self,
        platform: &str,
        layers: &[Layer],
        cfg: &Value,
        manifest_type: &str,
    ) -> Value {
        let config_type = if manifest_type == OCI_MANIFEST {
            OCI_CONFIG
        } else {
            DOCKER_CONFIG
        };
        let (cd, cs) = self.blob(&serde_json::to_vec(cfg).unwrap());
        let layer_descs: Vec<Value> = layers
            .iter()
            .map(|l| {
                let (d, s) = self.blob(&l.blob);
                json!({"mediaType": l.media_type, "digest": d, "size": s})
            })
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": cd, "size": cs},
            "layers": layer_descs,
        });
        let (md, ms) = self.blob(&serde_json::to_vec(&manifest).unwrap());
        let parts: Vec<&str> = platform.split('/').collect();
        let mut plat = json!({"os": parts[0], "architecture": parts[1]});
        if let Some(v) = parts.get(2) {
            plat["variant"] = json!(v);
        }
        json!({"mediaType": manifest_type, "digest": md, "size": ms, "platform": plat})
    }

    /// Store an image index of `descs`; returns its descriptor.
    pub fn index(&self, descs: &[Value], media_type: &str) -> Value {
        let idx = json!({"schemaVersion": 2, "mediaType": media_type, "manifests": descs});
        let (d, s) = self.blob(&serde_json::to_vec(&idx).unwrap());
        json!({"mediaType": media_type, "digest": d, "size": s})
    }

    /// Write `index.json` with the descriptors, tagged as given.
    pub fn write_index_json(&self, entries: &[(Value, Option<&str>)]) {
        let manifests: Vec<Value> = entries
            .iter()
            .map(|(d, tag)| {
                let mut d = d.clone();
                if let Some(t) = tag {
                    d["annotations"] = json!({ REF_NAME: t });
                }
                d
            })
            .collect();
        let idx = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        fs::write(
            self.dir().join("index.json"),
            serde_json::to_vec_pretty(&idx).unwrap(),
        )
        .expect("write index.json");
    }
}

/// A small single-layer linux/amd64 image tagged `tag`, with the layer given, in a temporary
/// directory.
pub fn simple_layout(layer: Layer, tag: &str) -> LayoutBuilder {
    let b = LayoutBuilder::new();
    let m = b.image("linux/amd64", &[layer]);
    b.write_index_json(&[(m, Some(tag))]);
    b
}

/// The config of [`write_layout`]'s image: this host's platform, `cmd`, `diff_ids`.
pub fn host_config(cmd: &str, diff_ids: &[String]) -> Value {
    json!({
        "architecture": host_arch(),
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": [cmd]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
}

/// Write an OCI layout at `layout` with one image tagged `test` made of `layers` (lowest
/// first) for this host's platform, running `/bin/sh`. Returns the reference
/// `oci:LAYOUT:test`.
pub fn write_layout(layout: &Path, layers: &[Layer]) -> String {
    let b = LayoutBuilder::at(layout);
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let cfg = host_config("/bin/sh", &diff_ids);
    let m = b.image_with_config(
        &format!("linux/{}", host_arch()),
        layers,
        &cfg,
        OCI_MANIFEST,
    );
    b.write_index_json(&[(m, Some("test"))]);
    b.reference(Some("test"))
}

/// A copy of the OCI layout `src` (blobs hard-linked, nothing rewritten) with one more
/// uncompressed layer `layer` on top of its only image, tagged `tag`, at `dest`. Returns the
/// reference `oci:DEST:TAG`.
pub fn derive_with_layer(src: &Path, dest: &Path, layer: &[u8], tag: &str) -> String {
    let b = LayoutBuilder::at(dest);
    for e in fs::read_dir(src.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        fs::hard_link(e.path(), dest.join("blobs/sha256").join(e.file_name())).unwrap();
    }
    fs::copy(src.join("oci-layout"), dest.join("oci-layout")).unwrap();
    let blob = |d: &str| fs::read(src.join("blobs/sha256").join(&d[7..])).unwrap();
    let index: Value = serde_json::from_slice(&fs::read(src.join("index.json")).unwrap()).unwrap();
    let mut manifest: Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let mut config: Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let (layer_digest, layer_size) = b.blob(layer);
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(layer_digest.clone().into());
    let (config_digest, config_size) = b.blob(&serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config_size.into();
    manifest["layers"].as_array_mut().unwrap().push(json!({
        "mediaType": TAR, "digest": layer_digest, "size": layer_size,
    }));
    let (md, ms) = b.blob(&serde_json::to_vec(&manifest).unwrap());
    b.write_index_json(&[(
        json!({"mediaType": OCI_MANIFEST, "digest": md, "size": ms}),
        Some(tag),
    )]);
    b.reference(Some(tag))
}

// ---------------------------------------------------------------------------------------
// Mounts

/// `mount -t FS -o OPTS SOURCE DIR`, retried while the kernel has no loop device free;
/// panics with mount's output if it fails.
pub fn mount(source: &Path, fs: &str, opts: &str, dir: &Path) {
    let mut attempt = 0;
    loop {
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fs, "-o", opts]).arg(source).arg(dir);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        attempt += 1;
        if attempt < 20 && stderr.contains("failed to setup loop device") {
            sleep(Duration::from_millis(50));
            continue;
        }
        panic!(
            "{cmd:?} failed with {} (attempt {attempt}):\nstdout: {}\nstderr: {stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A mount made by a test, unmounted on drop (also when the test panics); a temporary
/// mount point it made is removed after.
pub struct Mount {
    path: PathBuf,
    tmp: Option<tempfile::TempDir>,
}

impl Mount {
    /// `image` loop-mounted (`opts` must include `loop`, e.g. `loop,ro`) on a new temporary
    /// directory.
    pub fn image(image: &Path, fs: &str, opts: &str) -> Mount {
        let tmp = tempfile::tempdir().expect("create mount point");
        mount(image, fs, opts, tmp.path());
        Mount::on_tmp(tmp)
    }

    /// A tmpfs named `source` with `opts` on a new temporary directory.
    pub fn tmpfs(source: &str, opts: &str) -> Mount {
        let tmp = tempfile::tempdir().expect("create mount point");
        mount(Path::new(source), "tmpfs", opts, tmp.path());
        Mount::on_tmp(tmp)
    }

    /// `image` loop-mounted with `opts` on `dir` (created if missing, kept).
    pub fn image_at(image: &Path, fs: &str, opts: &str, dir: &Path) -> Mount {
        fs::create_dir_all(dir).expect("create mount point");
        mount(image, fs, opts, dir);
        Mount {
            path: dir.to_path_buf(),
            tmp: None,
        }
    }

    /// A tmpfs named `source` with `opts` on `dir` (created if missing, kept).
    pub fn tmpfs_at(source: &str, opts: &str, dir: &Path) -> Mount {
        fs::create_dir_all(dir).expect("create mount point");
        mount(Path::new(source), "tmpfs", opts, dir);
        Mount {
            path: dir.to_path_buf(),
            tmp: None,
        }
    }

    /// Guard a mount on `dir` made some other way.
    pub fn adopt(dir: &Path) -> Mount {
        Mount {
            path: dir.to_path_buf(),
            tmp: None,
        }
    }

    fn on_tmp(tmp: tempfile::TempDir) -> Mount {
        Mount {
            path: tmp.path().to_path_buf(),
            tmp: Some(tmp),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` under the mount point.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Free bytes as an unprivileged process sees them.
    pub fn free_bytes(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(self.path()).unwrap();
        st.blocks_available() * st.fragment_size()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        // Then `tmp` (if any) removes the now empty mount point.
    }
}

// ---------------------------------------------------------------------------------------
// Checkers and prerequisites

/// Whether a missing prerequisite must fail a test instead of skipping it: in CI (`CI` set)
/// or after the project's setup (`FLEDGE_TEST_SETUP=1`, which scripts/test.sh exports).
pub fn setup_wanted() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
        || std::env::var("FLEDGE_TEST_SETUP").is_ok_and(|v| v == "1")
}

/// Print the standard SKIP line for `test`, or fail it when [`setup_wanted`].
pub fn skip_unless_setup(test: &str, reason: &str) {
    assert!(
        !setup_wanted(),
        "{test}: {reason} (required when CI or FLEDGE_TEST_SETUP=1 is set)"
    );
    eprintln!("SKIP: {test}: {reason}");
}

/// `fsck.erofs ARGS IMAGE`: an error when it fails or reports one. fsck.erofs 1.5 exits 0
/// after some errors (a bad superblock checksum among them) and prints them as `<E>`, so
/// its exit status alone proves nothing.
pub fn fsck_erofs(args: &[&str], image: &Path) -> Result<(), String> {
    let out = Command::new("fsck.erofs")
        .args(args)
        .arg(image)
        .output()
        .map_err(|e| format!("fsck.erofs: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !text.contains("<E>") {
        Ok(())
    } else {
        Err(format!("fsck.erofs {args:?} {}: {text}", image.display()))
    }
}

/// A unit test's SKIP line (`what`: the test or part and why), or a failure when
/// [`setup_wanted`]: the library's tests have no other way to learn that CI expects every
/// prerequisite to be there.
pub fn skip_line(what: &str) {
    assert!(
        !setup_wanted(),
        "{what} (required when CI or FLEDGE_TEST_SETUP=1 is set)"
    );
    eprintln!("SKIP {what}");
}

/// The entries of an uncompressed newc archive: name and the 13 header fields (ino, mode,
/// uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize,
/// check), walked header by header up to `TRAILER!!!`, which must end the archive.
pub fn newc_entries(data: &[u8]) -> Vec<(Vec<u8>, [u32; 13])> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let h = &data[at..at + 110];
        assert_eq!(&h[..6], b"070701", "a newc header at {at}");
        let mut f = [0u32; 13];
        for (n, v) in f.iter_mut().enumerate() {
            let hex = std::str::from_utf8(&h[6 + 8 * n..14 + 8 * n]).unwrap();
            *v = u32::from_str_radix(hex, 16).unwrap();
        }
        let name = data[at + 110..at + 110 + f[11] as usize - 1].to_vec();
        let body = (at + 110 + f[11] as usize).next_multiple_of(4);
        at = (body + f[6] as usize).next_multiple_of(4);
        if name == b"TRAILER!!!" {
            assert_eq!(at, data.len(), "the trailer ends the archive");
            return out;
        }
        out.push((name, f));
    }
}

/// Extract the uncompressed newc archive `data` into `dest` with `cpio -idm` (as root it
/// keeps owners), then set directory and symlink mtimes from the headers, as the kernel does.
pub fn cpio_extract(data: &[u8], dest: &Path) {
    let mut child = Command::new("cpio")
        .args(["-idm", "--quiet", "--no-absolute-filenames"])
        .current_dir(dest)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cpio (GNU cpio) installed");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cpio -idm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, f) in newc_entries(data) {
        if matches!(f[1] & 0o170000, 0o040000 | 0o120000) {
            use nix::sys::stat::{utimensat, UtimensatFlags};
            use nix::sys::time::TimeSpec;
            let t = TimeSpec::new(i64::from(f[5]), 0);
            let p = dest.join(std::str::from_utf8(&name).unwrap());
            utimensat(
                nix::fcntl::AT_FDCWD,
                &p,
                &t,
                &t,
                UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------
// qcow2 oracles (qemu-img)

/// `qemu-img ARGS`: (success, stdout + stderr).
pub fn qemu_img(args: &[&str]) -> (bool, String) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// `qemu-img check` finds no error in the qcow2 file `q`.
pub fn assert_qcow2_clean(q: &Path, what: &str) {
    let (ok, out) = qemu_img(&["check", "-f", "qcow2", q.to_str().unwrap()]);
    assert!(ok && out.contains("No errors were found"), "{what}: {out}");
}

/// `qemu-img compare`: the qcow2 file `q` holds exactly the raw image `raw`.
pub fn assert_qcow2_equals_raw(q: &Path, raw: &Path, what: &str) {
    let (ok, out) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("Images are identical"), "{what}: {out}");
}

/// `qemu-img convert` the qcow2 file `q` to the raw file `out`.
pub fn qcow2_to_raw(q: &Path, out: &Path, what: &str) {
    let (ok, text) = qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        q.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{what}: {text}");
}
