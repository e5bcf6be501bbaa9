//! Builds at the same time: four different images sharing one layer cache, and two builds of
//! the same image into the same (cold) cache. All must succeed and give the same trees as
//! sequential builds of the same inputs.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::treecmp::{self, snapshot, Snapshot};

fn fledge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fledge"))
}

/// The Debian test image with one more layer adding `/variant` holding `tag`: a different
/// image that shares the lower layers.
fn variant(img: &support::DebianImage, dir: &Path, tag: &str) -> String {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(tag.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "variant", tag.as_bytes()).unwrap();
    let layer = b.into_inner().unwrap();
    support::layout::derive_with_layer(&img.layout, &dir.join(format!("layout-{tag}")), &layer, tag)
}

struct Job {
    dir: PathBuf,
    name: String,
}

fn start(job: &Job, reference: &str, cache: &Path) -> std::process::Child {
    fs::create_dir_all(&job.dir).unwrap();
    fs::write(
        job.dir.join("fledge.toml"),
        format!(
            "version = \"1\"\nstrategy = \"oci_rootfs\"\n[source]\nimage = \"{reference}\"\n\
             [filesystem]\ntype = \"ext4\"\nsize_buffer_mb = 16\n"
        ),
    )
    .unwrap();
    Command::new(fledge_bin())
        .current_dir(&job.dir)
        .args(["build", "-q", "--backend", "kernel", "-o"])
        .arg(format!("{}.img", job.name))
        .arg("--cache-dir")
        .arg(cache)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: std::process::Child, what: &str) {
    let out: Output = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tree_of(image: &Path) -> Snapshot {
    let mnt = support::LoopMount::new(image, "ext4", true);
    snapshot(mnt.path()).unwrap()
}

fn same(a: &Snapshot, b: &Snapshot, what: &str) {
    let lines = treecmp::diff(a, b, &treecmp::DiffOptions::default());
    assert!(
        lines.is_empty(),
        "{what}:\n{}",
        treecmp::report(&lines, support::DIFF_CAP)
    );
}

#[test]
fn four_different_images_at_once_share_a_cache() {
    let test = "four_different_images_at_once_share_a_cache";
    let Some(img) = support::debian_image_as_root(
        test,
        "needs root (kernel backend, loop-mounting the results)",
    ) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let mut refs = vec![img.reference.clone()];
    for tag in ["one", "two", "three"] {
        refs.push(variant(&img, root.path(), tag));
    }
    // Concurrently, one shared cold cache.
    let shared = root.path().join("shared-cache");
    let jobs: Vec<Job> = (0..refs.len())
        .map(|i| Job {
            dir: root.path().join(format!("par-{i}")),
            name: format!("img{i}"),
        })
        .collect();
    let children: Vec<_> = jobs
        .iter()
        .zip(&refs)
        .map(|(j, r)| start(j, r, &shared))
        .collect();
    for (c, j) in children.into_iter().zip(&jobs) {
        finish(c, &j.name);
    }
    // Sequentially, each with its own cache.
    for (i, r) in refs.iter().enumerate() {
        let seq = Job {
            dir: root.path().join(format!("seq-{i}")),
            name: format!("img{i}"),
        };
        finish(start(&seq, r, &seq.dir.join("cache")), &seq.name);
        let a = tree_of(&seq.dir.join(format!("img{i}.img")));
        let b = tree_of(&jobs[i].dir.join(format!("img{i}.img")));
        same(
            &a,
            &b,
            &format!("image {i}: concurrent build vs sequential"),
        );
        if i > 0 {
            assert!(a.get("/variant").is_some(), "variant {i} lacks /variant");
        }
    }
    // The shared cache holds each layer once and no temporary files.
    let layers = shared.join("layers/sha256");
    let names: Vec<String> = fs::read_dir(&layers)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".tar")), "{names:?}");
    assert_eq!(names.len(), 4 + 3, "{names:?}");
}

#[test]
fn same_image_twice_at_once_into_one_cold_cache() {
    let test = "same_image_twice_at_once_into_one_cold_cache";
    let Some(img) = support::debian_image_as_root(
        test,
        "needs root (kernel backend, loop-mounting the results)",
    ) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let a = Job {
        dir: root.path().join("a"),
        name: "a".into(),
    };
    let b = Job {
        dir: root.path().join("b"),
        name: "b".into(),
    };
    let ca = start(&a, &img.reference, &cache);
    let cb = start(&b, &img.reference, &cache);
    finish(ca, "a");
    finish(cb, "b");
    let seq = Job {
        dir: root.path().join("seq"),
        name: "s".into(),
    };
    finish(start(&seq, &img.reference, &cache), "sequential");
    let s = tree_of(&seq.dir.join("s.img"));
    same(&s, &tree_of(&a.dir.join("a.img")), "first concurrent build");
    same(
        &s,
        &tree_of(&b.dir.join("b.img")),
        "second concurrent build",
    );
}
