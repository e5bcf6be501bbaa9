//! Test helper: build OCI image layouts by hand in a temporary directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::oci_layout::{OCI_INDEX, OCI_MANIFEST, REF_NAME};
use super::sha256_digest;

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// One layer to put in an image: media type, blob bytes, and the uncompressed tar (for the
/// diff_id).
pub struct TestLayer {
    pub media_type: String,
    pub blob: Vec<u8>,
    pub tar: Vec<u8>,
}

impl TestLayer {
    pub fn plain(tar: Vec<u8>) -> TestLayer {
        TestLayer {
            media_type: TAR.to_string(),
            blob: tar.clone(),
            tar,
        }
    }
    pub fn gzip(tar: Vec<u8>) -> TestLayer {
        TestLayer {
            media_type: TAR_GZIP.to_string(),
            blob: gzip(&tar),
            tar,
        }
    }
    pub fn zstd(tar: Vec<u8>) -> TestLayer {
        TestLayer {
            media_type: TAR_ZSTD.to_string(),
            blob: zstd::encode_all(&tar[..], 3).unwrap(),
            tar,
        }
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A tar archive with the given regular files.
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

pub struct LayoutBuilder {
    pub tmp: tempfile::TempDir,
}

impl LayoutBuilder {
    pub fn new() -> LayoutBuilder {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        std::fs::create_dir_all(tmp.path().join("blobs/sha256")).unwrap();
        LayoutBuilder { tmp }
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    pub fn reference(&self, tag: Option<&str>) -> String {
        match tag {
            Some(t) => format!("oci:{}:{t}", self.dir().display()),
            None => format!("oci:{}", self.dir().display()),
        }
    }

    /// Store `data` as a blob; returns (digest, size).
    pub fn blob(&self, data: &[u8]) -> (String, u64) {
        let digest = sha256_digest(data);
        std::fs::write(self.blob_path(&digest), data).unwrap();
        (digest, data.len() as u64)
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// A config for (os, arch, variant) with the given diff_ids and some runtime settings.
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

    /// Store an image (config + layers + manifest) for `platform`; returns the manifest
    /// descriptor with a platform field.
    pub fn image(&self, platform: &str, layers: &[TestLayer]) -> Value {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(&l.tar)).collect();
        let cfg = self.config(platform, &diff_ids);
        self.image_with_config(platform, layers, &cfg, OCI_MANIFEST)
    }

    pub fn image_with_config(
        &self,
        platform: &str,
        layers: &[TestLayer],
        cfg: &Value,
        manifest_type: &str,
    ) -> Value {
        let config_type = if manifest_type == OCI_MANIFEST {
            "application/vnd.oci.image.config.v1+json"
        } else {
            "application/vnd.docker.container.image.v1+json"
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
        std::fs::write(
            self.dir().join("index.json"),
            serde_json::to_vec_pretty(&idx).unwrap(),
        )
        .unwrap();
    }
}

/// A small single-layer image tagged `tag`, with the layer given.
pub fn simple_layout(layer: TestLayer, tag: &str) -> LayoutBuilder {
    let b = LayoutBuilder::new();
    let m = b.image("linux/amd64", &[layer]);
    b.write_index_json(&[(m, Some(tag))]);
    b
}
