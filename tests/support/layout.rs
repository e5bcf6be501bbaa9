//! A raw tar writer and OCI layout writer for tests that need layers no well-behaved tool
//! writes: names with `..` or a leading `/`, headers whose size exceeds the data, device
//! nodes, and so on. Nothing here validates names: the bytes given are the bytes written.

use std::fs;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// One tar entry, written exactly as described.
#[derive(Clone, Debug)]
pub struct RawEntry {
    pub name: Vec<u8>,
    /// Tar typeflag: b'0' file, b'1' hard link, b'2' symlink, b'3' char, b'4' block,
    /// b'5' dir, b'6' fifo.
    pub typeflag: u8,
    pub data: Vec<u8>,
    pub link: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub dev: (u32, u32),
    /// Size written in the header when it must differ from `data.len()` (truncated layers).
    pub header_size: Option<u64>,
    /// Extra PAX records (key, value) written in an `x` header before this entry.
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawEntry {
    fn new(name: &[u8], typeflag: u8, mode: u32) -> RawEntry {
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

fn header(name: &[u8], typeflag: u8, e: &RawEntry, size: u64, link: &[u8]) -> [u8; 512] {
    let mut h = [0u8; 512];
    put(&mut h[0..100], name);
    octal(&mut h[100..108], u64::from(e.mode));
    octal(&mut h[108..116], u64::from(e.uid));
    octal(&mut h[116..124], u64::from(e.gid));
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

/// A tar archive of `entries`, with the two zero blocks at the end. Names or link targets
/// that do not fit the ustar fields go into PAX records.
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
        if !pax.is_empty() {
            let x = RawEntry::new(b"PaxHeaders/x", b'x', 0o644);
            out.extend_from_slice(&header(b"PaxHeaders/x", b'x', &x, pax.len() as u64, b""));
            out.extend_from_slice(&pax);
            pad(&mut out);
        }
        let size = e.header_size.unwrap_or(e.data.len() as u64);
        out.extend_from_slice(&header(name, e.typeflag, e, size, link));
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

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).expect("gzip in memory");
    gz.finish().expect("gzip in memory")
}

/// One layer of a layout: media type, blob, and the uncompressed tar's digest (diff_id hex).
pub struct Layer {
    pub media_type: &'static str,
    pub blob: Vec<u8>,
    pub diff_id_hex: String,
}

impl Layer {
    pub fn plain(tar: Vec<u8>) -> Layer {
        Layer {
            media_type: TAR,
            diff_id_hex: sha256_hex(&tar),
            blob: tar,
        }
    }
    pub fn gzip(tar: &[u8]) -> Layer {
        Layer {
            media_type: TAR_GZIP,
            diff_id_hex: sha256_hex(tar),
            blob: gzip(tar),
        }
    }
}

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

fn put_blob(layout: &Path, data: &[u8]) -> (String, usize) {
    let hexd = sha256_hex(data);
    fs::write(layout.join("blobs/sha256").join(&hexd), data).expect("write blob");
    (hexd, data.len())
}

/// Write an OCI layout at `layout` with one image tagged `test` made of `layers` (lowest
/// first) for this host's platform. Returns the reference `oci:LAYOUT:test`.
pub fn write_layout(layout: &Path, layers: &[Layer]) -> String {
    fs::create_dir_all(layout.join("blobs/sha256")).expect("create layout");
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("write oci-layout");
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let (hexd, size) = put_blob(layout, &l.blob);
        descs.push(serde_json::json!({
            "mediaType": l.media_type,
            "digest": format!("sha256:{hexd}"),
            "size": size,
        }));
        diff_ids.push(format!("sha256:{}", l.diff_id_hex));
    }
    let config = serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_hex, config_size) = put_blob(layout, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_hex}"),
            "size": config_size,
        },
        "layers": descs,
    });
    let (manifest_hex, manifest_size) = put_blob(layout, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_hex}"),
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "test"},
        }],
    });
    fs::write(layout.join("index.json"), index.to_string()).expect("write index.json");
    format!("oci:{}:test", layout.display())
}

/// A copy of the OCI layout `src` (blobs hard-linked, nothing rewritten) with one more
/// uncompressed layer `layer` on top of its only image, tagged `tag`, at `dest`. Returns the
/// reference `oci:DEST:TAG`.
pub fn derive_with_layer(src: &Path, dest: &Path, layer: &[u8], tag: &str) -> String {
    fs::create_dir_all(dest.join("blobs/sha256")).unwrap();
    for e in fs::read_dir(src.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        fs::hard_link(e.path(), dest.join("blobs/sha256").join(e.file_name())).unwrap();
    }
    fs::copy(src.join("oci-layout"), dest.join("oci-layout")).unwrap();
    let put = |data: &[u8]| -> String {
        let hex = sha256_hex(data);
        fs::write(dest.join("blobs/sha256").join(&hex), data).unwrap();
        format!("sha256:{hex}")
    };
    let blob = |d: &str| fs::read(src.join("blobs/sha256").join(&d[7..])).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(src.join("index.json")).unwrap()).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let layer_digest = put(layer);
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(layer_digest.clone().into());
    let config_bytes = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = put(&config_bytes).into();
    manifest["config"]["size"] = config_bytes.len().into();
    manifest["layers"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": TAR, "digest": layer_digest, "size": layer.len(),
        }));
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(&manifest_bytes), "size": manifest_bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]});
    fs::write(dest.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    format!("oci:{}:{tag}", dest.display())
}
