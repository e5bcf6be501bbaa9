//! `fledge inspect`: describe a resolved image.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::error::Error;
use crate::image::{self, OpenOptions};
use crate::source::ResolvedImage;
use crate::ui::Ui;

/// Resolve `reference` and describe it; with `tree`, also fetch and merge its layers and
/// report the merged tree's totals.
pub fn inspect(
    reference: &str,
    opts: &OpenOptions,
    tree: bool,
    ui: &Ui,
) -> Result<InspectReport, Error> {
    if tree {
        let opened = image::open_tree(reference, opts, ui)?;
        let mut report = InspectReport::from_image(&opened.resolved);
        report.tree = Some(opened.tree.stats());
        Ok(report)
    } else {
        let (_source, resolved) = image::resolve(reference, opts)?;
        Ok(InspectReport::from_image(&resolved))
    }
}

/// One layer in an [`InspectReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerReport {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub diff_id: String,
}

/// What `fledge inspect` prints, as text ([`InspectReport::render_text`]) or JSON (serde).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InspectReport {
    pub reference: String,
    pub manifest_digest: String,
    pub media_type: String,
    pub platform: String,
    pub config_digest: String,
    pub tags: Vec<String>,
    pub created: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// Sorted.
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
    pub layers: Vec<LayerReport>,
    pub total_compressed_size: u64,
    /// The merged tree's totals (`fledge inspect --tree`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tree: Option<crate::tree::TreeStats>,
}

impl InspectReport {
    pub fn from_image(img: &ResolvedImage) -> InspectReport {
        let cfg = img.config.config().as_ref();
        let list = |v: Option<&Vec<String>>| v.cloned().unwrap_or_default();
        let mut exposed_ports = list(cfg.and_then(|c| c.exposed_ports().as_ref()));
        exposed_ports.sort();
        let labels: BTreeMap<String, String> = cfg
            .and_then(|c| c.labels().as_ref())
            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let non_empty = |s: Option<&String>| s.filter(|s| !s.is_empty()).cloned();
        let layers: Vec<LayerReport> = img
            .layers
            .iter()
            .map(|l| LayerReport {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
                diff_id: l.diff_id.clone(),
            })
            .collect();
        InspectReport {
            reference: img.reference.clone(),
            manifest_digest: img.manifest_digest.clone(),
            media_type: img.manifest_media_type.clone(),
            platform: img.platform.to_string(),
            config_digest: img.config_digest.clone(),
            tags: img.tags.clone(),
            created: img.config.created().clone(),
            entrypoint: list(cfg.and_then(|c| c.entrypoint().as_ref())),
            cmd: list(cfg.and_then(|c| c.cmd().as_ref())),
            env: list(cfg.and_then(|c| c.env().as_ref())),
            working_dir: non_empty(cfg.and_then(|c| c.working_dir().as_ref())),
            user: non_empty(cfg.and_then(|c| c.user().as_ref())),
            exposed_ports,
            labels,
            stop_signal: non_empty(cfg.and_then(|c| c.stop_signal().as_ref())),
            total_compressed_size: layers.iter().fold(0u64, |a, l| a.saturating_add(l.size)),
            layers,
            tree: None,
        }
    }

    /// A readable, aligned listing.
    pub fn render_text(&self) -> String {
        const W: usize = 15;
        let mut out = String::new();
        let mut field = |name: &str, values: &[String]| {
            let mut first = true;
            for v in values {
                let label = if first {
                    format!("{name}:")
                } else {
                    String::new()
                };
                let _ = writeln!(out, "{label:<W$}{v}");
                first = false;
            }
            if values.is_empty() {
                let _ = writeln!(out, "{:<W$}-", format!("{name}:"));
            }
        };
        let one = |v: &Option<String>| vec![v.clone().unwrap_or_else(|| "-".to_string())];
        field("Reference", std::slice::from_ref(&self.reference));
        if !self.tags.is_empty() {
            field("Tags", &[self.tags.join(", ")]);
        }
        field("Manifest", std::slice::from_ref(&self.manifest_digest));
        field("Media type", std::slice::from_ref(&self.media_type));
        field("Platform", std::slice::from_ref(&self.platform));
        field("Config", std::slice::from_ref(&self.config_digest));
        field("Created", &one(&self.created));
        field("Entrypoint", &json_list(&self.entrypoint));
        field("Cmd", &json_list(&self.cmd));
        field("Env", &self.env);
        field("Working dir", &one(&self.working_dir));
        field("User", &one(&self.user));
        field("Exposed ports", &self.exposed_ports);
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        field("Labels", &labels);
        if self.stop_signal.is_some() {
            field("Stop signal", &one(&self.stop_signal));
        }
        field(
            "Layers",
            &[format!(
                "{} ({} compressed)",
                self.layers.len(),
                human_size(self.total_compressed_size)
            )],
        );
        let size_w = self
            .layers
            .iter()
            .map(|l| human_size(l.size).len())
            .max()
            .unwrap_or(0);
        let num_w = self.layers.len().to_string().len();
        for (i, l) in self.layers.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {:>num_w$}  {}  {:>size_w$}  {}",
                i + 1,
                l.digest,
                human_size(l.size),
                l.media_type
            );
        }
        if let Some(t) = &self.tree {
            let _ = writeln!(
                out,
                "{:<W$}{} entries: {} files ({}), {} directories, {} symlinks, {} devices, {} fifos; {} inodes",
                "Merged tree:",
                t.entries,
                t.files,
                human_size(t.file_bytes),
                t.dirs,
                t.symlinks,
                t.devices,
                t.fifos,
                t.inodes
            );
        }
        out
    }
}

/// Render an argv list unambiguously, as a JSON array; empty lists become nothing.
fn json_list(v: &[String]) -> Vec<String> {
    if v.is_empty() {
        return Vec::new();
    }
    vec![serde_json::to_string(v).unwrap_or_else(|_| v.join(" "))]
}

/// `1234567` -> `1.2 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{open, Platform};
    use crate::testkit::*;

    #[test]
    fn report_from_layout() {
        let b = LayoutBuilder::new();
        let l1 = Layer::gzip(tar_of(&[("a", b"aaaa")]));
        let l2 = Layer::zstd(tar_of(&[("b", b"bbbb")]));
        let total = (l1.blob.len() + l2.blob.len()) as u64;
        let m = b.image("linux/amd64", &[l1, l2]);
        b.write_index_json(&[(m, Some("v1"))]);
        let img = open(&b.reference(Some("v1")))
            .unwrap()
            .resolve(&Platform::host())
            .unwrap();
        let r = InspectReport::from_image(&img);
        assert_eq!(r.platform, "linux/amd64");
        assert_eq!(r.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(r.cmd, ["echo hi"]);
        assert_eq!(r.env, ["PATH=/usr/bin:/bin", "FOO=bar"]);
        assert_eq!(r.working_dir.as_deref(), Some("/work"));
        assert_eq!(r.user.as_deref(), Some("1000:1000"));
        assert_eq!(r.exposed_ports, ["443/tcp", "80/tcp"]);
        assert_eq!(
            r.labels.keys().collect::<Vec<_>>(),
            ["org.example.a", "org.example.b"]
        );
        assert_eq!(r.layers.len(), 2);
        assert_eq!(r.total_compressed_size, total);
        assert_eq!(r.tags, ["v1"]);

        let text = r.render_text();
        assert!(
            text.contains("Entrypoint:    [\"/bin/sh\",\"-c\"]\n"),
            "{text}"
        );
        assert!(
            text.contains("Env:           PATH=/usr/bin:/bin\n               FOO=bar\n"),
            "{text}"
        );
        assert!(text.contains(&img.layers[1].digest), "{text}");
        assert!(text.contains("Layers:        2 ("), "{text}");

        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["config_digest"], img.config_digest);
        assert_eq!(json["layers"][0]["diff_id"], img.layers[0].diff_id);
        assert_eq!(json["labels"]["org.example.b"], "2");
    }

    #[test]
    fn human_sizes() {
        for (n, s) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (5 << 20, "5.0 MiB"),
            (3 << 40, "3.0 TiB"),
            (16 << 50, "16.0 PiB"),
        ] {
            assert_eq!(human_size(n), s);
        }
        // PiB is the largest unit.
        assert!(human_size(u64::MAX).ends_with(" PiB"));
    }
}
