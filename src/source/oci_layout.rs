//! The OCI image-layout source (`oci:DIR[:TAG]`).
//!
//! A layout is a directory with an `oci-layout` file, an `index.json` and content-addressed
//! blobs under `blobs/sha256/`. `index.json` lists top-level descriptors, tagged through the
//! `org.opencontainers.image.ref.name` annotation; each is an image manifest or an image index
//! (OCI or Docker schema 2 flavours), and indexes may nest.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::archive::TarIndex;
use super::{
    read_blob_to_vec, sha256_hex, ImageSource, LayerInfo, Platform, ResolvedImage, SourceError,
    VerifyingReader,
};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The annotation that carries a descriptor's tag in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// How many image indexes may be nested below `index.json`.
const MAX_INDEX_DEPTH: usize = 8;
/// Largest manifest or index blob read into memory.
const MAX_MANIFEST_SIZE: u64 = 8 << 20;
/// Largest config blob read into memory.
const MAX_CONFIG_SIZE: u64 = 64 << 20;
/// Largest `index.json` read into memory.
const MAX_INDEX_JSON_SIZE: u64 = 64 << 20;

#[derive(Debug, Deserialize)]
struct LayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: String,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct DescPlatform {
    pub(crate) os: String,
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) variant: Option<String>,
}

impl DescPlatform {
    pub(crate) fn to_platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: Option<String>,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) platform: Option<DescPlatform>,
    #[serde(default)]
    pub(crate) annotations: Option<HashMap<String, String>>,
}

impl Descriptor {
    pub(crate) fn tag(&self) -> Option<&str> {
        self.annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .map(String::as_str)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexDoc {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Just enough of a blob to tell an index from a manifest when no descriptor says.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    config: Option<serde_json::Value>,
}

pub(crate) enum Kind {
    Index,
    Manifest,
}

pub(crate) fn kind_of(media_type: &str) -> Option<Kind> {
    match media_type {
        OCI_INDEX | DOCKER_MANIFEST_LIST => Some(Kind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Manifest),
        _ => None,
    }
}

/// An opened OCI image layout.
#[derive(Debug)]
pub struct OciLayoutSource {
    reference: String,
    /// The layout directory, or the archive file for `oci-archive:`.
    dir: PathBuf,
    store: LayoutStore,
    tag: Option<String>,
    top: Vec<Descriptor>,
}

/// Where the layout's files are: a directory or a tar archive of one.
#[derive(Debug)]
enum LayoutStore {
    Dir(PathBuf),
    Tar(TarIndex),
}

impl LayoutStore {
    /// Read a small file of the layout (`oci-layout`, `index.json`); `Ok(None)` if absent.
    fn read_small(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, SourceError> {
        match self {
            LayoutStore::Dir(dir) => read_small_file(&dir.join(rel), limit),
            LayoutStore::Tar(t) => t.read_member(rel, limit),
        }
    }

    /// Open a file of the layout; `Ok(None)` if absent.
    fn open(&self, rel: &str) -> Result<Option<Box<dyn Read + Send>>, SourceError> {
        match self {
            LayoutStore::Dir(dir) => {
                let path = dir.join(rel);
                match File::open(&path) {
                    Ok(f) => Ok(Some(Box::new(f))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(SourceError::Io { path, source: e }),
                }
            }
            LayoutStore::Tar(t) => Ok(t
                .open_member(rel)
                .map(|r| Box::new(r) as Box<dyn Read + Send>)),
        }
    }
}

impl OciLayoutSource {
    /// Open the layout in `dir`: checks `oci-layout` and reads `index.json`. `reference` is
    /// what the user typed, kept for reports.
    pub fn open(
        reference: String,
        dir: PathBuf,
        tag: Option<String>,
    ) -> Result<OciLayoutSource, SourceError> {
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(SourceError::NotALayout {
                    dir,
                    reason: "it is not a directory".to_string(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SourceError::NotALayout {
                    dir,
                    reason: "the directory does not exist".to_string(),
                })
            }
            Err(e) => {
                return Err(SourceError::Io {
                    path: dir.clone(),
                    source: e,
                })
            }
        }
        Self::from_store(reference, dir.clone(), LayoutStore::Dir(dir), tag)
    }

    /// Open a tar archive of an OCI layout (`oci-archive:FILE[:TAG]`). The archive is indexed,
    /// not extracted: blobs are read from it by offset.
    pub fn open_archive(
        reference: String,
        file: PathBuf,
        tag: Option<String>,
    ) -> Result<OciLayoutSource, SourceError> {
        let index = TarIndex::open(&file)?;
        Self::from_store(reference, file, LayoutStore::Tar(index), tag)
    }

    fn from_store(
        reference: String,
        dir: PathBuf,
        store: LayoutStore,
        tag: Option<String>,
    ) -> Result<OciLayoutSource, SourceError> {
        let not_layout = |reason: String| SourceError::NotALayout {
            dir: dir.clone(),
            reason,
        };
        let layout_raw = match store.read_small("oci-layout", 1 << 20) {
            Ok(Some(raw)) => raw,
            Ok(None) => return Err(not_layout("the 'oci-layout' file is missing".to_string())),
            Err(e) => return Err(e),
        };
        let layout: LayoutFile = serde_json::from_slice(&layout_raw).map_err(|e| {
            not_layout(format!(
                "the 'oci-layout' file is not valid ({e}); expected {{\"imageLayoutVersion\": \"1.0.0\"}}"
            ))
        })?;
        if layout.image_layout_version != "1.0.0" {
            return Err(not_layout(format!(
                "unsupported imageLayoutVersion '{}' (only 1.0.0 is supported)",
                layout.image_layout_version
            )));
        }
        let index_path = dir.join("index.json");
        let index_raw = match store.read_small("index.json", MAX_INDEX_JSON_SIZE) {
            Ok(Some(raw)) => raw,
            Ok(None) => return Err(not_layout("the 'index.json' file is missing".to_string())),
            Err(e) => return Err(e),
        };
        let index: IndexDoc =
            serde_json::from_slice(&index_raw).map_err(|e| SourceError::Json {
                blob: index_path.display().to_string(),
                source: e,
            })?;
        if let Some(mt) = &index.media_type {
            if mt != OCI_INDEX {
                return Err(SourceError::UnsupportedMediaType {
                    media_type: mt.clone(),
                    blob: index_path.display().to_string(),
                });
            }
        }
        Ok(OciLayoutSource {
            reference,
            dir,
            store,
            tag,
            top: index.manifests.unwrap_or_default(),
        })
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All tags in `index.json`, sorted, without duplicates.
    pub fn tags(&self) -> Vec<String> {
        self.top
            .iter()
            .filter_map(|d| d.tag().map(str::to_string))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// The top-level descriptors the reference selects (several when the tag names one
    /// descriptor per platform, or when an untagged layout lists several images).
    fn select_top(&self) -> Result<Vec<&Descriptor>, SourceError> {
        if self.top.is_empty() {
            return Err(SourceError::EmptyLayout {
                dir: self.dir.clone(),
            });
        }
        if let Some(tag) = &self.tag {
            let found: Vec<&Descriptor> = self
                .top
                .iter()
                .filter(|d| d.tag() == Some(tag.as_str()))
                .collect();
            if found.is_empty() {
                return Err(SourceError::UnknownTag {
                    dir: self.dir.clone(),
                    tag: tag.clone(),
                    available: self.tags(),
                });
            }
            return Ok(found);
        }
        if self.top.len() == 1 {
            return Ok(self.top.iter().collect());
        }
        let latest: Vec<&Descriptor> = self
            .top
            .iter()
            .filter(|d| d.tag() == Some("latest"))
            .collect();
        if !latest.is_empty() {
            return Ok(latest);
        }
        if self.top.iter().all(|d| d.tag().is_none()) {
            // An untagged multi-image layout: index.json acts as a plain image index.
            return Ok(self.top.iter().collect());
        }
        Err(SourceError::NoDefaultTag {
            dir: self.dir.clone(),
            available: self.tags(),
        })
    }

    /// The blob's path inside the layout (`blobs/sha256/<hex>`).
    fn blob_rel(digest: &str) -> Result<String, SourceError> {
        Ok(format!("blobs/sha256/{}", sha256_hex(digest)?))
    }
}

/// Resolution of manifests and indexes down to one image, shared by every source that
/// stores OCI/Docker manifests (layouts, archives, registries). Implementors say how to fetch
/// a verified manifest or config by descriptor.
pub(crate) trait Resolver {
    /// The reference as the user gave it.
    fn reference_for_report(&self) -> String;
    /// The verified content of the manifest, index or config `desc`, refusing more than
    /// `limit` bytes; `what` names it in errors.
    fn read_json_blob(
        &self,
        what: &str,
        desc: &Descriptor,
        limit: u64,
    ) -> Result<Vec<u8>, SourceError>;

    /// The media type of `desc`'s blob: the descriptor's, else the blob's own `mediaType`,
    /// else guessed from its shape. Returns the raw blob too.
    fn load_typed(&self, desc: &Descriptor) -> Result<(String, Vec<u8>), SourceError> {
        sha256_hex(&desc.digest)?;
        let raw = self.read_json_blob("blob", desc, MAX_MANIFEST_SIZE)?;
        let probe: Probe = serde_json::from_slice(&raw).map_err(|e| SourceError::Json {
            blob: desc.digest.clone(),
            source: e,
        })?;
        let media_type = match (&desc.media_type, &probe.media_type) {
            (Some(d), Some(b)) => {
                if d != b {
                    tracing::warn!(
                        blob = %desc.digest,
                        "descriptor media type {d} differs from the blob's own {b}; using {d}"
                    );
                }
                d.clone()
            }
            (Some(d), None) => d.clone(),
            (None, Some(b)) => b.clone(),
            (None, None) => {
                if probe.manifests.is_some() {
                    OCI_INDEX.to_string()
                } else if probe.config.is_some() {
                    OCI_MANIFEST.to_string()
                } else {
                    return Err(SourceError::UnsupportedMediaType {
                        media_type: "(none)".to_string(),
                        blob: desc.digest.clone(),
                    });
                }
            }
        };
        Ok((media_type, raw))
    }

    /// Resolve one descriptor (manifest or index) for `wanted`.
    fn resolve_desc(
        &self,
        desc: &Descriptor,
        wanted: &Platform,
        depth: usize,
    ) -> Result<ResolvedImage, SourceError> {
        let (media_type, raw) = self.load_typed(desc)?;
        match kind_of(&media_type) {
            Some(Kind::Manifest) => self.resolve_manifest(
                desc,
                &media_type,
                &raw,
                desc.platform.as_ref().map(DescPlatform::to_platform),
            ),
            Some(Kind::Index) => {
                if depth >= MAX_INDEX_DEPTH {
                    return Err(SourceError::IndexTooDeep {
                        blob: desc.digest.clone(),
                        limit: MAX_INDEX_DEPTH,
                    });
                }
                let index: IndexDoc =
                    serde_json::from_slice(&raw).map_err(|e| SourceError::Json {
                        blob: format!("index {}", desc.digest),
                        source: e,
                    })?;
                let children = index.manifests.unwrap_or_default();
                let refs: Vec<&Descriptor> = children.iter().collect();
                self.pick(&refs, wanted, depth + 1, &format!("index {}", desc.digest))
            }
            None => Err(SourceError::UnsupportedMediaType {
                media_type,
                blob: desc.digest.clone(),
            }),
        }
    }

    /// Choose among `descs` (the entries of an index) the one for `wanted` and resolve it.
    fn pick(
        &self,
        descs: &[&Descriptor],
        wanted: &Platform,
        depth: usize,
        context: &str,
    ) -> Result<ResolvedImage, SourceError> {
        let mut available: Vec<String> = Vec::new();
        let mut matching: Vec<(&Descriptor, Platform)> = Vec::new();
        let mut unknown: Vec<&Descriptor> = Vec::new();
        for d in descs {
            match &d.platform {
                Some(p) => {
                    let p = p.to_platform();
                    if wanted.matches(&p) {
                        matching.push((d, p));
                    } else if !(p.os == "unknown" && p.architecture == "unknown") {
                        available.push(p.to_string());
                    }
                }
                None => unknown.push(d),
            }
        }
        // Prefer an exact variant match (e.g. arm/v7 over arm/v6 when v7 is asked).
        matching.sort_by_key(|(_, p)| p.variant != wanted.variant);
        if let Some((d, _)) = matching.first() {
            return self.resolve_desc(d, wanted, depth);
        }
        // Entries without a platform: nested indexes are searched, manifests are judged by
        // their config.
        for d in unknown {
            match self.resolve_desc(d, wanted, depth) {
                Ok(img) if wanted.matches(&img.platform) => return Ok(img),
                Ok(img) => available.push(img.platform.to_string()),
                Err(SourceError::PlatformNotFound { available: a, .. }) => available.extend(a),
                Err(e) => return Err(e),
            }
        }
        available.sort();
        available.dedup();
        Err(SourceError::PlatformNotFound {
            wanted: wanted.to_string(),
            blob: context.to_string(),
            available,
        })
    }

    fn resolve_manifest(
        &self,
        desc: &Descriptor,
        media_type: &str,
        raw: &[u8],
        index_platform: Option<Platform>,
    ) -> Result<ResolvedImage, SourceError> {
        let manifest_name = format!("manifest {}", desc.digest);
        let manifest: ManifestDoc = serde_json::from_slice(raw).map_err(|e| SourceError::Json {
            blob: manifest_name.clone(),
            source: e,
        })?;
        if let Some(own) = &manifest.media_type {
            if kind_of(own).is_none() {
                return Err(SourceError::UnsupportedMediaType {
                    media_type: own.clone(),
                    blob: manifest_name,
                });
            }
        }
        let config_desc = &manifest.config;
        sha256_hex(&config_desc.digest)?;
        let config_type = config_desc.media_type.as_deref().unwrap_or(OCI_CONFIG);
        if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
            return Err(SourceError::UnsupportedMediaType {
                media_type: config_type.to_string(),
                blob: format!(
                    "config {} of {manifest_name} (not a container image)",
                    config_desc.digest
                ),
            });
        }
        let config_raw = self.read_json_blob("config", config_desc, MAX_CONFIG_SIZE)?;
        let config: oci_spec::image::ImageConfiguration = serde_json::from_slice(&config_raw)
            .map_err(|e| SourceError::Json {
                blob: format!("config {}", config_desc.digest),
                source: e,
            })?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers.len() {
            return Err(SourceError::LayerCountMismatch {
                manifest: desc.digest.clone(),
                config: config_desc.digest.clone(),
                layers: manifest.layers.len(),
                diff_ids: diff_ids.len(),
            });
        }
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for (l, diff_id) in manifest.layers.iter().zip(diff_ids) {
            sha256_hex(&l.digest)?;
            sha256_hex(diff_id)?;
            let media_type =
                l.media_type
                    .clone()
                    .ok_or_else(|| SourceError::UnsupportedMediaType {
                        media_type: "(none)".to_string(),
                        blob: format!("layer {} of {manifest_name}", l.digest),
                    })?;
            layers.push(LayerInfo {
                media_type,
                digest: l.digest.clone(),
                size: l.size,
                diff_id: diff_id.clone(),
            });
        }
        let config_platform = Platform {
            os: config.os().to_string(),
            architecture: config.architecture().to_string(),
            variant: config.variant().clone().filter(|v| !v.is_empty()),
        };
        Ok(ResolvedImage {
            reference: self.reference_for_report(),
            manifest_digest: desc.digest.clone(),
            manifest_media_type: media_type.to_string(),
            platform: index_platform.unwrap_or(config_platform),
            config_digest: config_desc.digest.clone(),
            config_raw,
            config,
            layers,
            tags: Vec::new(),
        })
    }
}

impl Resolver for OciLayoutSource {
    fn reference_for_report(&self) -> String {
        self.reference.clone()
    }

    fn read_json_blob(
        &self,
        what: &str,
        desc: &Descriptor,
        limit: u64,
    ) -> Result<Vec<u8>, SourceError> {
        read_blob_to_vec(self, &desc.digest, desc.size, limit).map_err(|e| match e {
            SourceError::BlobTooLarge { size, limit, .. } => SourceError::BlobTooLarge {
                blob: format!("{what} {}", desc.digest),
                size,
                limit,
            },
            other => other,
        })
    }
}

impl ImageSource for OciLayoutSource {
    fn describe(&self) -> String {
        let kind = match self.store {
            LayoutStore::Dir(_) => "OCI layout",
            LayoutStore::Tar(_) => "OCI archive",
        };
        match &self.tag {
            Some(t) => format!("{kind} {} (tag {t})", self.dir.display()),
            None => format!("{kind} {}", self.dir.display()),
        }
    }

    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError> {
        let top = self.select_top()?;
        let mut img = if let [only] = top.as_slice() {
            self.resolve_desc(only, platform, 0)?
        } else {
            let context = match &self.tag {
                Some(t) => format!("tag '{t}' of {}", self.dir.display()),
                None => format!("{}/index.json", self.dir.display()),
            };
            self.pick(&top, platform, 0, &context)?
        };
        if !platform.matches(&img.platform) {
            // Only possible when the reference selects a single manifest directly.
            tracing::warn!(
                "image {} is for {}, not the requested {platform}; using it anyway",
                img.manifest_digest,
                img.platform
            );
        }
        // Tags naming the top-level entry the image came through.
        let mut tags: BTreeSet<String> = BTreeSet::new();
        for d in &top {
            let chosen = d.digest == img.manifest_digest
                || top.len() == 1
                || self.tag.as_deref().is_some_and(|t| d.tag() == Some(t));
            if chosen {
                tags.extend(
                    self.top
                        .iter()
                        .filter(|o| o.digest == d.digest)
                        .filter_map(|o| o.tag().map(str::to_string)),
                );
            }
        }
        img.tags = tags.into_iter().collect();
        Ok(img)
    }

    fn open_blob(&self, digest: &str, size: u64) -> Result<Box<dyn Read + Send>, SourceError> {
        let rel = Self::blob_rel(digest)?;
        match self.store.open(&rel)? {
            Some(r) => Ok(Box::new(VerifyingReader::new(r, digest, size)?)),
            None => Err(SourceError::BlobMissing {
                blob: digest.to_string(),
                path: self.dir.join(rel),
            }),
        }
    }
}

/// Read a small file; `Ok(None)` if it does not exist.
fn read_small_file(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, SourceError> {
    let io_err = |e: io::Error| SourceError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let mut data = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(io_err)?;
    if data.len() as u64 > limit {
        return Err(io_err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file is larger than {limit} bytes"),
        )));
    }
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{open, sha256_digest};
    use crate::testkit::{simple_layout, tar_of, Layer, LayoutBuilder, TAR_GZIP};
    use serde_json::json;

    fn amd64() -> Platform {
        Platform::parse("linux/amd64").unwrap()
    }

    fn layer(name: &str) -> Layer {
        Layer::gzip(tar_of(&[(name, b"content")]))
    }

    fn resolve(
        b: &LayoutBuilder,
        tag: Option<&str>,
        p: &Platform,
    ) -> Result<ResolvedImage, SourceError> {
        open(&b.reference(tag))?.resolve(p)
    }

    #[test]
    fn resolves_fields_of_a_simple_image() {
        let l = layer("a");
        let diff_id = l.diff_id.clone();
        let blob_digest = sha256_digest(&l.blob);
        let blob_size = l.blob.len() as u64;
        let b = simple_layout(l, "v1");
        let img = resolve(&b, Some("v1"), &amd64()).unwrap();
        assert_eq!(img.reference, b.reference(Some("v1")));
        assert_eq!(img.manifest_media_type, OCI_MANIFEST);
        assert_eq!(img.platform, amd64());
        assert_eq!(img.tags, vec!["v1".to_string()]);
        assert_eq!(img.config_digest, sha256_digest(&img.config_raw));
        assert_eq!(
            img.layers,
            vec![LayerInfo {
                media_type: TAR_GZIP.to_string(),
                digest: blob_digest,
                size: blob_size,
                diff_id,
            }]
        );
        let cfg = img.config.config().as_ref().unwrap();
        assert_eq!(cfg.working_dir().as_deref(), Some("/work"));
    }

    #[test]
    fn tag_selection() {
        let b = LayoutBuilder::new();
        let m1 = b.image("linux/amd64", &[layer("one")]);
        let m2 = b.image("linux/amd64", &[layer("two")]);
        let m3 = b.image("linux/amd64", &[layer("three")]);
        // Several tags, one of them latest.
        b.write_index_json(&[
            (m1.clone(), Some("one")),
            (m2.clone(), Some("latest")),
            (m3.clone(), Some("three")),
        ]);
        let d = |v: &serde_json::Value| v["digest"].as_str().unwrap().to_string();
        assert_eq!(
            resolve(&b, Some("one"), &amd64()).unwrap().manifest_digest,
            d(&m1)
        );
        assert_eq!(
            resolve(&b, Some("three"), &amd64())
                .unwrap()
                .manifest_digest,
            d(&m3)
        );
        assert_eq!(resolve(&b, None, &amd64()).unwrap().manifest_digest, d(&m2));

        // Unknown tag: the error lists the tags that exist.
        let e = resolve(&b, Some("nope"), &amd64()).unwrap_err();
        match &e {
            SourceError::UnknownTag { tag, available, .. } => {
                assert_eq!(tag, "nope");
                assert_eq!(available, &["latest", "one", "three"]);
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("latest, one, three"), "{e}");

        // No latest among several: error listing tags.
        b.write_index_json(&[(m1.clone(), Some("one")), (m3.clone(), Some("three"))]);
        let e = resolve(&b, None, &amd64()).unwrap_err();
        assert!(
            matches!(&e, SourceError::NoDefaultTag { available, .. } if available == &["one", "three"]),
            "{e}"
        );

        // Exactly one descriptor: used without a tag, whatever its tag.
        b.write_index_json(&[(m3.clone(), Some("three"))]);
        let img = resolve(&b, None, &amd64()).unwrap();
        assert_eq!(img.manifest_digest, d(&m3));
        assert_eq!(img.tags, vec!["three".to_string()]);

        // Empty layout.
        b.write_index_json(&[]);
        let e = resolve(&b, None, &amd64()).unwrap_err();
        assert!(matches!(e, SourceError::EmptyLayout { .. }), "{e}");
    }

    fn multi_platform(b: &LayoutBuilder) -> (serde_json::Value, Vec<serde_json::Value>) {
        let ms = vec![
            b.image("linux/amd64", &[layer("amd64")]),
            b.image("linux/arm64/v8", &[layer("arm64")]),
            b.image("linux/arm/v6", &[layer("armv6")]),
            b.image("linux/arm/v7", &[layer("armv7")]),
        ];
        let idx = b.index(&ms, OCI_INDEX);
        (idx, ms)
    }

    #[test]
    fn multi_platform_index_selection() {
        let b = LayoutBuilder::new();
        let (idx, ms) = multi_platform(&b);
        b.write_index_json(&[(idx, Some("latest"))]);
        let d = |i: usize| ms[i]["digest"].as_str().unwrap().to_string();
        let cases = [
            ("linux/amd64", 0),
            ("linux/arm64", 1),
            ("linux/arm64/v8", 1),
            ("linux/arm/v7", 3),
            ("linux/arm/v6", 2),
        ];
        for (p, i) in cases {
            let want = Platform::parse(p).unwrap();
            let img = resolve(&b, None, &want).unwrap();
            assert_eq!(img.manifest_digest, d(i), "{p}");
            assert!(want.matches(&img.platform), "{p}: {}", img.platform);
            assert_eq!(img.tags, vec!["latest".to_string()]);
        }
        let e = resolve(&b, None, &Platform::parse("linux/s390x").unwrap()).unwrap_err();
        match &e {
            SourceError::PlatformNotFound {
                wanted, available, ..
            } => {
                assert_eq!(wanted, "linux/s390x");
                assert_eq!(
                    available,
                    &[
                        "linux/amd64",
                        "linux/arm/v6",
                        "linux/arm/v7",
                        "linux/arm64/v8"
                    ]
                );
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("linux/arm64/v8"), "{e}");
    }

    #[test]
    fn nested_indexes() {
        let b = LayoutBuilder::new();
        let (inner, ms) = multi_platform(&b);
        let middle = b.index(&[inner], OCI_INDEX);
        let outer = b.index(&[middle], OCI_INDEX);
        b.write_index_json(&[(outer, Some("t"))]);
        let img = resolve(&b, Some("t"), &Platform::parse("linux/arm/v7").unwrap()).unwrap();
        assert_eq!(img.manifest_digest, ms[3]["digest"].as_str().unwrap());
        let e = resolve(&b, Some("t"), &Platform::parse("linux/riscv64").unwrap()).unwrap_err();
        assert!(
            matches!(&e, SourceError::PlatformNotFound { available, .. } if available.len() == 4),
            "{e}"
        );

        // Too deep: a chain longer than the limit.
        let mut d = b.image("linux/amd64", &[layer("deep")]);
        for _ in 0..=MAX_INDEX_DEPTH {
            d = b.index(&[d], OCI_INDEX);
        }
        b.write_index_json(&[(d, Some("deep"))]);
        let e = resolve(&b, Some("deep"), &amd64()).unwrap_err();
        assert!(matches!(e, SourceError::IndexTooDeep { .. }), "{e}");
    }

    #[test]
    fn one_tag_per_platform_and_untagged_images() {
        let b = LayoutBuilder::new();
        let a = b.image("linux/amd64", &[layer("a")]);
        let r = b.image("linux/arm64", &[layer("r")]);
        b.write_index_json(&[(a.clone(), Some("x")), (r.clone(), Some("x"))]);
        let img = resolve(&b, Some("x"), &Platform::parse("linux/arm64").unwrap()).unwrap();
        assert_eq!(img.manifest_digest, r["digest"].as_str().unwrap());
        b.write_index_json(&[(a.clone(), None), (r.clone(), None)]);
        let img = resolve(&b, None, &amd64()).unwrap();
        assert_eq!(img.manifest_digest, a["digest"].as_str().unwrap());
        assert!(img.tags.is_empty());
    }

    #[test]
    fn single_manifest_for_another_platform_is_used() {
        let b = LayoutBuilder::new();
        let m = b.image("linux/arm64", &[layer("a")]);
        b.write_index_json(&[(m.clone(), Some("t"))]);
        let img = resolve(&b, None, &amd64()).unwrap();
        assert_eq!(img.manifest_digest, m["digest"].as_str().unwrap());
        assert_eq!(img.platform.to_string(), "linux/arm64");
    }

    #[test]
    fn index_entries_without_platform_are_judged_by_config() {
        let b = LayoutBuilder::new();
        let mut a = b.image("linux/amd64", &[layer("a")]);
        let mut r = b.image("linux/arm64/v8", &[layer("r")]);
        a.as_object_mut().unwrap().remove("platform");
        r.as_object_mut().unwrap().remove("platform");
        let idx = b.index(&[a, r.clone()], OCI_INDEX);
        b.write_index_json(&[(idx, Some("t"))]);
        let img = resolve(&b, None, &Platform::parse("linux/arm64").unwrap()).unwrap();
        assert_eq!(img.manifest_digest, r["digest"].as_str().unwrap());
        assert_eq!(img.platform.to_string(), "linux/arm64/v8");
        let e = resolve(&b, None, &Platform::parse("linux/ppc64le").unwrap()).unwrap_err();
        assert!(
            matches!(&e, SourceError::PlatformNotFound { available, .. }
                if available == &["linux/amd64", "linux/arm64/v8"]),
            "{e}"
        );
    }

    #[test]
    fn docker_media_types() {
        let b = LayoutBuilder::new();
        let l = Layer {
            media_type: "application/vnd.docker.image.rootfs.diff.tar.gzip".to_string(),
            ..layer("d")
        };
        let diff_ids = vec![l.diff_id.clone()];
        let mut cfg = b.config("linux/amd64", &diff_ids);
        // Real Docker configs carry extra fields and nulls.
        cfg["container_config"] = json!({"Cmd": null});
        cfg["docker_version"] = json!("20.10.7");
        cfg["config"]["Volumes"] = serde_json::Value::Null;
        let m = b.image_with_config("linux/amd64", &[l], &cfg, DOCKER_MANIFEST);
        let list = b.index(std::slice::from_ref(&m), DOCKER_MANIFEST_LIST);
        b.write_index_json(&[(list, Some("latest"))]);
        let img = resolve(&b, None, &amd64()).unwrap();
        assert_eq!(img.manifest_media_type, DOCKER_MANIFEST);
        assert_eq!(img.manifest_digest, m["digest"].as_str().unwrap());
        assert_eq!(
            img.layers[0].media_type,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
    }

    #[test]
    fn unknown_media_types() {
        let b = LayoutBuilder::new();
        let mut m = b.image("linux/amd64", &[layer("a")]);
        m["mediaType"] = json!("application/vnd.example.thing+json");
        b.write_index_json(&[(m.clone(), Some("t"))]);
        let e = resolve(&b, Some("t"), &amd64()).unwrap_err();
        assert!(
            matches!(&e, SourceError::UnsupportedMediaType { media_type, blob }
                if media_type == "application/vnd.example.thing+json" && blob == m["digest"].as_str().unwrap()),
            "{e}"
        );

        // A manifest whose config is not a container image config (an OCI artifact).
        let cfg_blob = b.blob(b"{}");
        let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json",
                       "digest": cfg_blob.0, "size": cfg_blob.1},
            "layers": []});
        let (md, ms) = b.blob(&serde_json::to_vec(&manifest).unwrap());
        b.write_index_json(&[(
            json!({"mediaType": OCI_MANIFEST, "digest": md, "size": ms}),
            Some("t"),
        )]);
        let e = resolve(&b, Some("t"), &amd64()).unwrap_err();
        assert!(
            e.to_string()
                .contains("application/vnd.cncf.helm.config.v1+json"),
            "{e}"
        );
    }

    #[test]
    fn corrupt_and_missing_blobs() {
        let b = LayoutBuilder::new();
        let m = b.image("linux/amd64", &[layer("a")]);
        b.write_index_json(&[(m.clone(), Some("t"))]);
        let digest = m["digest"].as_str().unwrap().to_string();
        let path = b.blob_path(&digest);
        let mut data = std::fs::read(&path).unwrap();
        data[0] ^= 0x20; // same size, different content
        std::fs::write(&path, &data).unwrap();
        let e = resolve(&b, Some("t"), &amd64()).unwrap_err();
        match &e {
            SourceError::DigestMismatch { blob, actual } => {
                assert_eq!(blob, &digest);
                assert_eq!(actual, &sha256_digest(&data));
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains(&digest), "{e}");

        // Truncated blob: size mismatch naming it.
        std::fs::write(&path, &data[..10]).unwrap();
        let e = resolve(&b, Some("t"), &amd64()).unwrap_err();
        assert!(
            matches!(&e, SourceError::SizeMismatch { blob, .. } if blob == &digest),
            "{e}"
        );

        std::fs::remove_file(&path).unwrap();
        let e = resolve(&b, Some("t"), &amd64()).unwrap_err();
        assert!(
            matches!(&e, SourceError::BlobMissing { blob, .. } if blob == &digest),
            "{e}"
        );
    }

    #[test]
    fn bad_digests_never_reach_the_filesystem() {
        let b = simple_layout(layer("a"), "t");
        let src = open(&b.reference(None)).unwrap();
        for d in [
            "sha256:../../etc/passwd",
            "sha256:/etc/passwd",
            "../oci-layout",
        ] {
            let e = src.open_blob(d, 1).err().unwrap();
            assert!(matches!(e, SourceError::BadDigest { .. }), "{d}: {e}");
        }
        let e = src
            .open_blob(&format!("sha512:{}", "0".repeat(128)), 1)
            .err()
            .unwrap();
        assert!(matches!(e, SourceError::UnsupportedDigest { .. }), "{e}");
    }

    #[test]
    fn layer_count_mismatch() {
        let b = LayoutBuilder::new();
        let l = layer("a");
        let cfg = b.config("linux/amd64", &[l.diff_id.clone(), sha256_digest(b"x")]);
        let m = b.image_with_config("linux/amd64", &[l], &cfg, OCI_MANIFEST);
        b.write_index_json(&[(m, Some("t"))]);
        let e = resolve(&b, Some("t"), &amd64()).unwrap_err();
        assert!(
            matches!(
                e,
                SourceError::LayerCountMismatch {
                    layers: 1,
                    diff_ids: 2,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn not_a_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let check = |dir: &Path, needle: &str| {
            let e = open(&format!("oci:{}", dir.display())).err().unwrap();
            assert!(matches!(e, SourceError::NotALayout { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&dir.display().to_string()) && msg.contains(needle),
                "{msg}"
            );
        };
        check(&dir.join("nope"), "does not exist");
        check(&dir, "'oci-layout' file is missing");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"2.0.0"}"#).unwrap();
        check(&dir, "unsupported imageLayoutVersion '2.0.0'");
        std::fs::write(dir.join("oci-layout"), b"garbage").unwrap();
        check(&dir, "not valid");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        check(&dir, "'index.json' file is missing");
        check(&dir.join("oci-layout"), "not a directory");
        std::fs::write(dir.join("index.json"), b"{").unwrap();
        let e = open(&format!("oci:{}", dir.display())).err().unwrap();
        assert!(matches!(e, SourceError::Json { .. }), "{e}");
    }

    #[test]
    fn umoci_built_layout() {
        let have = std::process::Command::new("umoci")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            eprintln!("SKIP: umoci is not installed");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let layout = tmp.path().join("img");
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("hello.txt"), b"hello from umoci\n").unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("umoci")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "umoci {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let l = layout.to_str().unwrap();
        run(&["init", "--layout", l]);
        run(&["new", "--image", &format!("{l}:t")]);
        run(&[
            "insert",
            "--rootless",
            "--image",
            &format!("{l}:t"),
            src.to_str().unwrap(),
            "/data",
        ]);
        let img = open(&format!("oci:{l}:t"))
            .unwrap()
            .resolve(&Platform::host())
            .unwrap();
        assert_eq!(img.tags, vec!["t".to_string()]);
        assert_eq!(img.layers.len(), 1);
        assert_eq!(img.manifest_media_type, OCI_MANIFEST);
        // The layer decodes and matches its diff_id.
        let store = crate::layer::LayerStore::new(tmp.path().join("cache"));
        let src = open(&format!("oci:{l}:t")).unwrap();
        let path = store.uncompressed(src.as_ref(), &img.layers[0]).unwrap();
        // (umoci 0.4 writes layer tars without padding or end blocks, so check the bytes
        // rather than parsing them as a tar.)
        let data = std::fs::read(&path).unwrap();
        assert_eq!(sha256_digest(&data), img.layers[0].diff_id);
        assert!(data.windows(16).any(|w| w == b"hello from umoci"));
        assert!(data.windows(14).any(|w| w == b"data/hello.txt"));
    }
}
