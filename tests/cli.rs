//! The command line as a user meets it, through the built binary: shell completions and man
//! pages generated from the argument definitions, and `fledge build --json`.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

const SUBCOMMANDS: [&str; 9] = [
    "build",
    "doctor",
    "mount",
    "inspect",
    "pull",
    "cache",
    "completions",
    "man",
    "version",
];
const BACKENDS: [&str; 4] = ["auto", "kernel", "userspace", "native"];

fn fledge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fledge"))
        .args(args)
        .output()
        .expect("run fledge")
}

fn stdout_of(args: &[&str]) -> String {
    let out = fledge(args);
    assert!(
        out.status.success(),
        "fledge {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn bash_completion_names_every_command_and_backend() {
    let script = stdout_of(&["completions", "bash"]);
    assert!(
        script.contains("complete -F"),
        "not a bash completion script"
    );
    for cmd in SUBCOMMANDS {
        assert!(script.contains(cmd), "bash completion lacks {cmd}");
    }
    assert!(script.contains("--backend"));
    let values = BACKENDS.join(" ");
    assert!(
        script.contains(&values),
        "bash completion lacks the backend values {values}"
    );
    // The script is valid bash.
    if support::have_program("bash") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fledge.bash");
        fs::write(&path, &script).unwrap();
        let st = Command::new("bash").arg("-n").arg(&path).status().unwrap();
        assert!(st.success(), "bash -n rejects the completion script");
    }
}

#[test]
fn every_shell_gets_a_completion_script() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&["completions", shell]);
        assert!(script.contains("build"), "{shell}: {script}");
        assert!(script.contains("backend"), "{shell}");
    }
    let out = fledge(&["completions", "tcsh"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
}

/// Render a man page with man(1) or groff when one is installed; returns the text.
fn render(page: &Path) -> Option<String> {
    let out = if support::have_program("man") {
        Command::new("man")
            .args(["-P", "cat", "-l"])
            .arg(page)
            .env("MANWIDTH", "100")
            .output()
    } else if support::have_program("groff") {
        Command::new("groff")
            .args(["-man", "-Tutf8"])
            .arg(page)
            .output()
    } else {
        eprintln!("note: neither man nor groff is installed: checking the roff text only");
        return None;
    }
    .expect("run man");
    assert!(
        out.status.success(),
        "{} does not render: {}",
        page.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn man_page_on_stdout_describes_every_command() {
    let roff = stdout_of(&["man"]);
    assert!(roff.contains(".TH FLEDGE 1"), "{roff}");
    for cmd in SUBCOMMANDS {
        assert!(roff.contains(cmd), "fledge.1 lacks {cmd}");
    }
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("fledge.1");
    fs::write(&page, &roff).unwrap();
    if let Some(text) = render(&page) {
        assert!(
            text.contains("NAME") && text.contains("SUBCOMMANDS"),
            "{text}"
        );
        for cmd in SUBCOMMANDS {
            assert!(text.contains(cmd), "rendered fledge.1 lacks {cmd}");
        }
    }
}

#[test]
fn man_pages_written_per_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = fledge(&["man", "-o", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "man -o printed on stdout");
    let mut pages: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert!(pages.contains(&"fledge.1".to_string()), "{pages:?}");
    assert!(
        pages.contains(&"fledge-cache-prune.1".to_string()),
        "{pages:?}"
    );
    for cmd in SUBCOMMANDS {
        let name = format!("fledge-{cmd}.1");
        assert!(pages.contains(&name), "no {name} in {pages:?}");
        let page = dir.path().join(&name);
        let roff = fs::read_to_string(&page).unwrap();
        let title = format!(".TH FLEDGE-{}", cmd.to_uppercase());
        assert!(roff.contains(&title), "{name} lacks {title}");
        if let Some(text) = render(&page) {
            assert!(text.contains("SYNOPSIS"), "{name}: {text}");
        }
    }
    let build = fs::read_to_string(dir.path().join("fledge-build.1")).unwrap();
    for b in BACKENDS {
        assert!(build.contains(b), "fledge-build.1 lacks the {b} backend");
    }
    // An unwritable directory is an error with the usual error and hint lines.
    let out = fledge(&["man", "-o", "/nonexistent/dir"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: cannot write /nonexistent/dir/fledge.1: ")
            && err.contains("\nhint: "),
        "{err}"
    );
}

#[test]
fn version_prints_the_crate_version() {
    assert_eq!(
        stdout_of(&["version"]),
        format!("fledge {}\n", env!("CARGO_PKG_VERSION"))
    );
}

fn write_config(dir: &Path, image: &str) -> PathBuf {
    let path = dir.join("fledge.toml");
    fs::write(
        &path,
        format!(
            "version = \"1\"\nstrategy = \"oci_rootfs\"\n\n[source]\nimage = \"{image}\"\n\n\
             [filesystem]\ntype = \"ext4\"\nsize_buffer_mb = 10\n"
        ),
    )
    .unwrap();
    path
}

fn sha256_of(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

#[test]
fn build_json_reports_the_outputs() {
    let Some(img) = support::debian_image("build_json_reports_the_outputs") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &img.reference);
    let output = dir.path().join("out/debian.img");
    fs::create_dir(output.parent().unwrap()).unwrap();
    let cache = dir.path().join("cache");
    let out = fledge(&[
        "build",
        "--json",
        "--backend",
        "native",
        "-c",
        config.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    // stdout is one JSON document and nothing else.
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert!(!stderr.contains('{'), "JSON on stderr: {stderr}");

    assert_eq!(report["schema"], "fledge-build/1");
    assert_eq!(report["fledge_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["filesystem"], "ext4");
    assert_eq!(report["backend"], "native");
    assert!(report["backend_reason"]
        .as_str()
        .is_some_and(|r| r.contains("--backend native")));

    let image = PathBuf::from(report["image"].as_str().unwrap());
    let manifest = PathBuf::from(report["manifest"].as_str().unwrap());
    assert_eq!(image, output);
    assert!(image.is_file() && manifest.is_file());
    assert_eq!(report["image_bytes"], fs::metadata(&image).unwrap().len());

    let digest = report["sha256"].as_str().unwrap();
    assert_eq!(
        digest,
        sha256_of(&image),
        "digest is not the image's sha256"
    );
    let m: serde_json::Value = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    let checksum = m["rootfs"]["checksum"].as_str().unwrap();
    assert_eq!(checksum.strip_prefix("sha256:").unwrap_or(checksum), digest);

    let r = &report["report"];
    assert!(r["entries"].as_u64().unwrap() > 100, "{r}");
    assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
    let free = r["free_bytes"]
        .as_u64()
        .expect("native measures free space");
    assert!(free < report["image_bytes"].as_u64().unwrap());

    let timings = report["timings"].as_array().unwrap();
    assert!(timings.len() >= 3, "{timings:?}");
    let mut sum = 0.0;
    for t in timings {
        assert!(!t["name"].as_str().unwrap().is_empty());
        let s = t["seconds"].as_f64().unwrap();
        assert!(s >= 0.0);
        sum += s;
    }
    assert!(timings.iter().any(|t| t["name"] == "config and probes"));
    assert!(sum <= report["elapsed_seconds"].as_f64().unwrap() + 1e-6);
}

#[test]
fn build_json_errors_as_without_it() {
    let dir = tempfile::tempdir().unwrap();
    // No image needed: the reference is refused before anything is read.
    let config = write_config(dir.path(), "oci:/nonexistent/layout:tag");
    let run = |json: bool| {
        let mut args = vec!["build", "-c", config.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fledge"));
        cmd.args(&args)
            .arg("-o")
            .arg(dir.path().join("x.img"))
            .current_dir(dir.path());
        cmd.output().unwrap()
    };
    let plain = run(false);
    let json = run(true);
    assert!(!plain.status.success());
    assert_eq!(plain.status.code(), json.status.code());
    assert_eq!(
        String::from_utf8_lossy(&plain.stderr),
        String::from_utf8_lossy(&json.stderr)
    );
    assert!(json.stdout.is_empty(), "{:?}", json.stdout);
    let err = String::from_utf8_lossy(&json.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("\nhint: "), "{err}");
}
