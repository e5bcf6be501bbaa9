//! `docker save` archives (`docker-archive:FILE[:REF]`).
//!
//! The archive's `manifest.json` lists images as `{Config, RepoTags, Layers}` with paths of
//! members inside the tar: the config JSON and one tar per layer (uncompressed in what Docker
//! and skopeo write, but gzip and zstd members are accepted). There is no registry manifest, so
//! one is synthesised (Docker schema 2, the blobs being the members as stored): its digest
//! identifies the image in reports. Members are read in place through [`TarIndex`].

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::archive::TarIndex;
use super::normalize::DockerRef;
use super::oci_layout::{DOCKER_CONFIG, DOCKER_MANIFEST};
use super::{
    sha256_digest, sha256_hex, ImageSource, LayerInfo, Platform, ResolvedImage, SourceError,
    VerifyingReader,
};

const MAX_MANIFEST_JSON: u64 = 16 << 20;
const MAX_CONFIG: u64 = 64 << 20;

const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// An opened docker-archive, resolved to the one image the reference selects.
#[derive(Debug)]
pub struct DockerArchiveSource {
    path: PathBuf,
    index: TarIndex,
    image: ResolvedImage,
    /// Archive member holding each blob (config and layers), by digest.
    members: HashMap<String, String>,
    selected: Option<String>,
}

impl DockerArchiveSource {
    /// Open `path` and select the image named `wanted` (compared after normalisation with
    /// each `RepoTags` entry), or the only image when `wanted` is `None`.
    pub fn open(
        reference: String,
        path: &Path,
        wanted: Option<&DockerRef>,
    ) -> Result<DockerArchiveSource, SourceError> {
        let index = TarIndex::open(path)?;
        let bad = |reason: String| SourceError::BadArchive {
            path: path.to_path_buf(),
            reason,
        };
        let raw = index
            .read_member("manifest.json", MAX_MANIFEST_JSON)?
            .ok_or_else(|| {
                let hint = if index.contains("oci-layout") {
                    " (it is an OCI archive: use oci-archive:FILE)"
                } else {
                    ""
                };
                bad(format!(
                    "it has no manifest.json, so it is not a docker save archive{hint}"
                ))
            })?;
        let entries: Vec<ArchiveEntry> = serde_json::from_slice(&raw)
            .map_err(|e| bad(format!("manifest.json is not valid: {e}")))?;
        let all_tags: Vec<String> = entries
            .iter()
            .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
            .collect();
        let entry = match wanted {
            Some(w) => entries
                .iter()
                .find(|e| {
                    e.repo_tags.iter().flatten().any(|t| {
                        DockerRef::parse(t).is_ok_and(|t| {
                            t.registry == w.registry
                                && t.repository == w.repository
                                && (w.tag.is_none() || t.tag == w.tag)
                        })
                    })
                })
                .ok_or_else(|| SourceError::ArchiveImageNotFound {
                    path: path.to_path_buf(),
                    wanted: w.familiar(),
                    available: all_tags.clone(),
                })?,
            None => match entries.as_slice() {
                [only] => only,
                [] => return Err(bad("manifest.json lists no images".to_string())),
                _ => {
                    let available = entries
                        .iter()
                        .enumerate()
                        .map(|(i, e)| match &e.repo_tags {
                            Some(t) if !t.is_empty() => t.join(" "),
                            _ => format!("untagged image #{i}"),
                        })
                        .collect();
                    return Err(SourceError::ArchiveAmbiguous {
                        path: path.to_path_buf(),
                        available,
                    });
                }
            },
        };

        let config_raw = index
            .read_member(&entry.config, MAX_CONFIG)?
            .ok_or_else(|| bad(format!("config member '{}' is missing", entry.config)))?;
        let config_digest = sha256_digest(&config_raw);
        let config: oci_spec::image::ImageConfiguration = serde_json::from_slice(&config_raw)
            .map_err(|e| SourceError::Json {
                blob: format!("config {} in {}", entry.config, path.display()),
                source: e,
            })?;
        let diff_ids = config.rootfs().diff_ids();
        let mut members = HashMap::new();
        members.insert(config_digest.clone(), entry.config.clone());
        let mut layers = Vec::with_capacity(entry.layers.len());
        if diff_ids.len() != entry.layers.len() {
            return Err(SourceError::LayerCountMismatch {
                manifest: format!("{}/manifest.json", path.display()),
                config: config_digest,
                layers: entry.layers.len(),
                diff_ids: diff_ids.len(),
            });
        }
        for (member, diff_id) in entry.layers.iter().zip(diff_ids) {
            sha256_hex(diff_id)?;
            let size = index
                .member_size(member)
                .ok_or_else(|| bad(format!("layer member '{member}' is missing")))?;
            let mut magic = [0u8; 4];
            let got = read_prefix(&index, member, &mut magic, path)?;
            let (media_type, digest) = match &magic[..got] {
                [0x1f, 0x8b, ..] => (DOCKER_LAYER_GZIP, hash_member(&index, member, path)?),
                [0x28, 0xb5, 0x2f, 0xfd] => (OCI_LAYER_ZSTD, hash_member(&index, member, path)?),
                // An uncompressed layer is its own diff: the reader checks it against the
                // diff_id while it is decoded.
                _ => (DOCKER_LAYER_TAR, diff_id.clone()),
            };
            members.insert(digest.clone(), member.clone());
            layers.push(LayerInfo {
                media_type: media_type.to_string(),
                digest,
                size,
                diff_id: diff_id.clone(),
            });
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": DOCKER_CONFIG,
                "size": config_raw.len(),
                "digest": config_digest,
            },
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type,
                "size": l.size,
                "digest": l.digest,
            })).collect::<Vec<_>>(),
        });
        let manifest_digest = sha256_digest(manifest.to_string().as_bytes());
        let platform = Platform {
            os: config.os().to_string(),
            architecture: config.architecture().to_string(),
            variant: config.variant().clone().filter(|v| !v.is_empty()),
        };
        let image = ResolvedImage {
            reference,
            manifest_digest,
            manifest_media_type: DOCKER_MANIFEST.to_string(),
            platform,
            config_digest,
            config_raw,
            config,
            layers,
            tags: entry.repo_tags.clone().unwrap_or_default(),
        };
        Ok(DockerArchiveSource {
            path: path.to_path_buf(),
            index,
            image,
            members,
            selected: wanted.map(DockerRef::familiar),
        })
    }

    /// The `RepoTags` of the selected image.
    pub fn repo_tags(&self) -> &[String] {
        &self.image.tags
    }
}

fn read_prefix(
    index: &TarIndex,
    member: &str,
    buf: &mut [u8],
    path: &Path,
) -> Result<usize, SourceError> {
    let mut r = index
        .open_member(member)
        .ok_or_else(|| SourceError::BadArchive {
            path: path.to_path_buf(),
            reason: format!("layer member '{member}' is missing"),
        })?;
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => {
                return Err(SourceError::Io {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        }
    }
    Ok(got)
}

fn hash_member(index: &TarIndex, member: &str, path: &Path) -> Result<String, SourceError> {
    let mut r = index
        .open_member(member)
        .ok_or_else(|| SourceError::BadArchive {
            path: path.to_path_buf(),
            reason: format!("layer member '{member}' is missing"),
        })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(|e| SourceError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

impl ImageSource for DockerArchiveSource {
    fn describe(&self) -> String {
        match &self.selected {
            Some(s) => format!("docker archive {} (image {s})", self.path.display()),
            None => format!("docker archive {}", self.path.display()),
        }
    }

    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError> {
        if !platform.matches(&self.image.platform) {
            tracing::warn!(
                "image in {} is for {}, not the requested {platform}; using it anyway",
                self.path.display(),
                self.image.platform
            );
        }
        Ok(self.image.clone())
    }

    fn open_blob(&self, digest: &str, size: u64) -> Result<Box<dyn Read + Send>, SourceError> {
        sha256_hex(digest)?;
        let member = self
            .members
            .get(digest)
            .ok_or_else(|| SourceError::BlobMissing {
                blob: digest.to_string(),
                path: self.path.clone(),
            })?;
        let r = self
            .index
            .open_member(member)
            .ok_or_else(|| SourceError::BlobMissing {
                blob: digest.to_string(),
                path: self.path.join(member),
            })?;
        Ok(Box::new(VerifyingReader::new(r, digest, size)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{gzip, tar_of};

    struct Built {
        file: tempfile::NamedTempFile,
        tars: Vec<Vec<u8>>,
    }

    /// A docker-archive with one image per `(tags, gzip?)`; each image has two layers.
    fn build(images: &[(&[&str], bool)], corrupt_first_layer: bool) -> Built {
        let mut b = tar::Builder::new(Vec::new());
        let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data).unwrap();
        };
        let mut manifest = Vec::new();
        let mut all_tars = Vec::new();
        for (n, (tags, gz)) in images.iter().enumerate() {
            let tars = vec![
                tar_of(&[("etc/base", format!("base {n}").as_bytes())]),
                tar_of(&[("etc/top", b"top")]),
            ];
            let diff_ids: Vec<String> = tars.iter().map(|t| sha256_digest(t)).collect();
            let config = serde_json::json!({
                "architecture": "amd64", "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "config": {}
            })
            .to_string();
            let cfg_name = format!("{}.json", &sha256_digest(config.as_bytes())[7..]);
            add(&mut b, &cfg_name, config.as_bytes());
            let mut layer_names = Vec::new();
            for (i, t) in tars.iter().enumerate() {
                let name = format!("img{n}/layer{i}.tar");
                let mut data = if *gz { gzip(t) } else { t.clone() };
                if corrupt_first_layer && i == 0 {
                    let mid = data.len() / 2;
                    data[mid] ^= 0x55;
                }
                add(&mut b, &name, &data);
                layer_names.push(name);
            }
            manifest.push(serde_json::json!({
                "Config": cfg_name, "RepoTags": tags, "Layers": layer_names
            }));
            all_tars.extend(tars);
        }
        add(
            &mut b,
            "manifest.json",
            serde_json::Value::Array(manifest).to_string().as_bytes(),
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b.into_inner().unwrap()).unwrap();
        Built {
            file,
            tars: all_tars,
        }
    }

    fn read_all(src: &DockerArchiveSource, l: &LayerInfo) -> Result<Vec<u8>, SourceError> {
        let mut v = Vec::new();
        src.open_blob(&l.digest, l.size)?
            .read_to_end(&mut v)
            .map_err(|e| SourceError::from_blob_read(&l.digest, e))?;
        Ok(v)
    }

    #[test]
    fn selects_by_reference_and_reads_layers() {
        let built = build(
            &[(&["debian:test"], false), (&["localhost/app:v1"], true)],
            false,
        );
        let amd64 = Platform::parse("linux/amd64").unwrap();
        for (wanted, first_tar, media) in [
            ("debian:test", 0, DOCKER_LAYER_TAR),
            ("docker.io/library/debian:test", 0, DOCKER_LAYER_TAR),
            ("localhost/app:v1", 2, DOCKER_LAYER_GZIP),
        ] {
            let r = DockerRef::parse(wanted).unwrap();
            let src = DockerArchiveSource::open("x".into(), built.file.path(), Some(&r)).unwrap();
            let img = src.resolve(&amd64).unwrap();
            assert_eq!(img.layers.len(), 2, "{wanted}");
            assert_eq!(img.layers[0].media_type, media);
            assert_eq!(img.layers[0].diff_id, sha256_digest(&built.tars[first_tar]));
            assert_eq!(img.platform, amd64);
            assert_eq!(img.config_digest, sha256_digest(&img.config_raw));
            let data = read_all(&src, &img.layers[0]).unwrap();
            if media == DOCKER_LAYER_TAR {
                assert_eq!(data, built.tars[first_tar]);
            } else {
                assert_eq!(data, gzip(&built.tars[first_tar]));
            }
            let mut cfg = Vec::new();
            src.open_blob(&img.config_digest, img.config_raw.len() as u64)
                .unwrap()
                .read_to_end(&mut cfg)
                .unwrap();
            assert_eq!(cfg, img.config_raw);
        }
    }

    #[test]
    fn missing_reference_lists_the_tags() {
        let built = build(
            &[(&["debian:test"], false), (&["localhost/app:v1"], false)],
            false,
        );
        let r = DockerRef::parse("debian:other").unwrap();
        let e = DockerArchiveSource::open("x".into(), built.file.path(), Some(&r)).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, SourceError::ArchiveImageNotFound { .. }),
            "{msg}"
        );
        assert!(
            msg.contains("debian:other")
                && msg.contains("debian:test, localhost/app:v1")
                && msg.contains(&built.file.path().display().to_string()),
            "{msg}"
        );
        let e = DockerArchiveSource::open("x".into(), built.file.path(), None).unwrap_err();
        assert!(matches!(e, SourceError::ArchiveAmbiguous { .. }), "{e}");
        // A single image needs no reference.
        let one = build(&[(&[], false)], false);
        let src = DockerArchiveSource::open("x".into(), one.file.path(), None).unwrap();
        assert!(src.repo_tags().is_empty());
    }

    #[test]
    fn corrupt_layer_is_a_digest_mismatch() {
        let built = build(&[(&["a:b"], false)], true);
        let src = DockerArchiveSource::open("x".into(), built.file.path(), None).unwrap();
        let img = src.resolve(&Platform::host()).unwrap();
        let e = read_all(&src, &img.layers[0]).unwrap_err();
        assert!(
            matches!(&e, SourceError::DigestMismatch { blob, .. } if *blob == img.layers[0].diff_id),
            "{e}"
        );
        assert!(read_all(&src, &img.layers[1]).is_ok());
    }

    #[test]
    fn not_a_docker_archive() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        b.append_data(&mut h, "oci-layout", &b"{}"[..]).unwrap();
        std::fs::write(f.path(), b.into_inner().unwrap()).unwrap();
        let e = DockerArchiveSource::open("x".into(), f.path(), None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("no manifest.json") && msg.contains("oci-archive:"),
            "{msg}"
        );
    }
}
