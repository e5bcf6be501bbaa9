//! `fledge build` with bad input: each case must end with a non-zero exit, one `error:` line
//! naming the cause, a `hint:` line, no panic, and nothing left behind (no output, no work
//! directory, no loop device, no mount).

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

use support::kit::Mount;

fn fledge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fledge"))
}

const GOOD_TOML: &str =
    "version = \"1\"\nstrategy = \"oci_rootfs\"\n\n[source]\nimage = \"IMAGE\"\n\n\
                         [filesystem]\ntype = \"ext4\"\nsize_buffer_mb = 10\n";

/// One bad-input case.
struct Case {
    name: &'static str,
    /// fledge.toml text (IMAGE is replaced by the test image reference); None: no file.
    toml: Option<String>,
    /// Files to create beside fledge.toml.
    files: Vec<(&'static str, &'static [u8])>,
    /// Output path, relative to the project dir.
    output: String,
    /// Substrings the error line must contain.
    expect: Vec<String>,
    /// Needs the Debian test image (the failure comes after reading it).
    needs_image: bool,
    /// Command prefix (e.g. unshare to hide a tool); empty: run fledge directly.
    wrap: Vec<String>,
    /// Extra `fledge build` arguments (e.g. `--backend kernel`).
    args: Vec<&'static str>,
}

fn case(name: &'static str, toml: &str, expect: &[&str]) -> Case {
    Case {
        name,
        toml: Some(toml.to_string()),
        files: Vec::new(),
        output: "out.img".into(),
        expect: expect.iter().map(|s| s.to_string()).collect(),
        needs_image: false,
        wrap: Vec::new(),
        args: Vec::new(),
    }
}

fn with_mapping(extra: &str) -> String {
    format!("{GOOD_TOML}\n[mappings]\n{extra}\n")
}

fn run_case(c: &Case, image_ref: &str) {
    let dir = tempfile::Builder::new()
        .prefix("fledge-bad-input-")
        .tempdir()
        .unwrap();
    let project = dir.path();
    if let Some(t) = &c.toml {
        fs::write(project.join("fledge.toml"), t.replace("IMAGE", image_ref)).unwrap();
    }
    for (name, data) in &c.files {
        fs::write(project.join(name), data).unwrap();
    }
    let before: Vec<_> = fs::read_dir(project)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut cmd = if c.wrap.is_empty() {
        Command::new(fledge_bin())
    } else {
        let mut cmd = Command::new(&c.wrap[0]);
        cmd.args(&c.wrap[1..]).arg(fledge_bin());
        cmd
    };
    let out: Output = cmd
        .current_dir(project)
        .env("FLEDGE_CACHE_DIR", project.join("cache"))
        .env("FLEDGE_RELEASE_BASE_URL", "http://127.0.0.1:9")
        .args(["build", "-c", "fledge.toml", "-o", &c.output])
        .args(&c.args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let name = c.name;
    assert!(!out.status.success(), "{name}: succeeded:\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "{name}: exit status\n{stderr}");
    assert!(!stderr.contains("panicked"), "{name}: panic:\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{name}: want exactly one error line:\n{stderr}"
    );
    for want in &c.expect {
        assert!(
            errors[0].contains(want.as_str()),
            "{name}: error line lacks {want:?}:\n{stderr}"
        );
    }
    assert!(
        stderr.lines().any(|l| l.starts_with("hint: ")),
        "{name}: no hint:\n{stderr}"
    );
    // Nothing left behind: only what the test created (and the layer cache).
    let after: Vec<_> = fs::read_dir(project)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "cache")
        .collect();
    for n in &after {
        assert!(
            before.contains(n),
            "{name}: left {} behind:\n{stderr}",
            n.to_string_lossy()
        );
    }
    let out_path = project.join(&c.output);
    if let Some(parent) = out_path.parent().filter(|p| p.is_dir()) {
        let extra: Vec<_> = fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".fledge") || n.ends_with(".img") || n.ends_with(".json"))
            .collect();
        assert!(extra.is_empty(), "{name}: left {extra:?} in the output dir");
    }
    assert!(
        support::loops_under(project).is_empty(),
        "{name}: loop device left"
    );
    assert!(
        support::mounts_under(project).is_empty(),
        "{name}: mount left"
    );
    eprintln!("{name}: ok: {}", errors[0]);
}

#[test]
fn bad_config_inputs() {
    let cases = vec![
        Case {
            toml: None,
            ..case("missing config", "", &["fledge.toml"])
        },
        case(
            "bad TOML",
            "version = \"1\"\nstrategy = oci_rootfs\n",
            &["fledge.toml", "2:"],
        ),
        case(
            "unknown key",
            &GOOD_TOML.replace("size_buffer_mb", "size_bufer_mb"),
            &["size_bufer_mb", "size_buffer_mb"],
        ),
        case(
            "unknown strategy",
            &GOOD_TOML.replace("oci_rootfs", "tarball"),
            &["tarball"],
        ),
        case(
            "unknown filesystem type",
            &GOOD_TOML.replace("ext4", "zfs"),
            &["zfs", "ext4, xfs, btrfs"],
        ),
        case(
            "compression on ext4",
            &format!("{GOOD_TOML}compression = \"xz\"\n"),
            &[
                "'filesystem.compression' applies to the read-only types",
                "not to type = \"ext4\"",
            ],
        ),
        case(
            "erofs lz4hc level out of range",
            &GOOD_TOML.replace(
                "type = \"ext4\"",
                "type = \"erofs\"\ncompression = \"lz4hc\"\ncompression_level = 15",
            ),
            &["must be from 1 to 12 for lz4hc (liblz4's LZ4HC levels), got 15"],
        ),
        case(
            "erofs has no xz",
            &GOOD_TOML.replace("type = \"ext4\"", "type = \"erofs\"\ncompression = \"xz\""),
            &[
                "invalid 'filesystem.compression' 'xz' for erofs",
                "none, lz4, lz4hc",
            ],
        ),
        case(
            "compression level out of range",
            &GOOD_TOML.replace(
                "type = \"ext4\"",
                "type = \"squashfs\"\ncompression_level = 30",
            ),
            &["compression_level' must be from 1 to 22, got 30"],
        ),
        case(
            "bad overlay size",
            &GOOD_TOML.replace(
                "type = \"ext4\"",
                "type = \"squashfs\"\noverlay_size = \"1.5G\"",
            ),
            &["invalid 'filesystem.overlay_size' '1.5G'"],
        ),
        case(
            "negative buffer",
            &GOOD_TOML.replace("= 10", "= -5"),
            &["size_buffer_mb"],
        ),
        case(
            "missing image",
            &GOOD_TOML.replace("IMAGE", "oci:/nonexistent/fledge-layout:t"),
            &["/nonexistent/fledge-layout"],
        ),
        case(
            "mapping source missing",
            &with_mapping("\"no-such-file\" = \"/etc/x\""),
            &["no-such-file"],
        ),
        case(
            "mapping destination relative",
            &with_mapping("\"fledge.toml\" = \"etc/x\""),
            &["etc/x"],
        ),
        case(
            "mapping destination with ..",
            &with_mapping("\"fledge.toml\" = \"/etc/../x\""),
            &["/etc/../x"],
        ),
    ];
    for c in &cases {
        run_case(c, "oci:/nonexistent:t");
    }
}

#[test]
fn bad_inputs_with_image() {
    let test = "bad_inputs_with_image";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let addr = support::servers::canned_http(support::servers::http_response(
        "200 OK",
        &[],
        b"\x7fELF not really an agent",
    ));
    let url = format!("http://{addr}/kestrel");
    let mut cases = vec![Case {
        needs_image: true,
        ..case(
            "agent checksum mismatch",
            &format!(
                "{GOOD_TOML}\n[agent]\nsource_strategy = \"http\"\nurl = \"{url}\"\nchecksum = \"sha256:{}\"\n",
                "0".repeat(64)
            ),
            &["sha256", "expected", &url],
        )
    }];
    cases.push(Case {
        needs_image: true,
        output: "missing-dir/out.img".into(),
        ..case("output directory missing", GOOD_TOML, &["missing-dir"])
    });
    if support::is_root() {
        // A read-only output directory (root ignores permission bits, so use a ro mount).
        let ro = Mount::tmpfs("fledge-ro", "ro,size=1m");
        cases.push(Case {
            needs_image: true,
            output: ro.path().join("out.img").display().to_string(),
            ..case(
                "unwritable output directory",
                GOOD_TOML,
                &[&ro.path().display().to_string()],
            )
        });
        // Disk full: a 64 MiB tmpfs cannot hold a ~200 MiB image.
        let small = Mount::tmpfs("fledge-small", "size=64m");
        cases.push(Case {
            needs_image: true,
            output: small.path().join("out.img").display().to_string(),
            ..case("disk full", GOOD_TOML, &["not enough space", "MiB"])
        });
        // Room for the raw image but not for its qcow2 copy (the kernel backend fills a raw
        // image; tmpfs cannot move extents, so qcow2 is a copy beside it): refused before
        // the copy starts, not a full disk part way through it.
        let half = Mount::tmpfs("fledge-half", "size=280m");
        cases.push(Case {
            needs_image: true,
            output: half.path().join("out.qcow2").display().to_string(),
            args: vec!["--backend", "kernel", "--image-format", "qcow2"],
            ..case(
                "no room for the qcow2 copy",
                GOOD_TOML,
                &["not enough space", "qcow2 copy", "MiB"],
            )
        });
        // A required tool missing: hide /usr/sbin (mkfs.*, e2fsck, ...) in a private mount
        // namespace. The kernel backend needs mkfs.ext4 (auto would pick the native writer,
        // which needs none: see native_builds_without_any_tool).
        if support::have_program("unshare") {
            cases.push(Case {
                needs_image: true,
                wrap: hide_usr_sbin(),
                args: vec!["--backend", "kernel"],
                ..case("required tool missing", GOOD_TOML, &["mkfs.ext4"])
            });
        }
        for c in &cases {
            assert!(c.needs_image);
            run_case(c, &img.reference);
        }
    } else {
        support::skip(
            test,
            "the read-only, disk-full and missing-tool cases need root",
        );
        for c in &cases {
            run_case(c, &img.reference);
        }
    }
}

/// Run fledge in a private mount namespace where /usr/sbin (mkfs.*, e2fsck, debugfs,
/// resize2fs, ...) is an empty tmpfs.
fn hide_usr_sbin() -> Vec<String> {
    vec![
        "unshare".into(),
        "-m".into(),
        "sh".into(),
        "-c".into(),
        "mount -t tmpfs none /usr/sbin && exec \"$0\" \"$@\"".into(),
    ]
}

/// The native writer needs no e2fsprogs at all: with /usr/sbin hidden, `--backend auto`
/// still builds ext4 (natively), and the image is clean.
#[test]
fn native_builds_without_any_tool() {
    let test = "native_builds_without_any_tool";
    let Some(img) = support::debian_image_as_root(test, "needs root (unshare -m to hide tools)")
    else {
        return;
    };
    if !support::have_program("unshare") || !support::have_program("e2fsck") {
        support::skip(test, "needs unshare and e2fsck");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    fs::write(
        p.join("fledge.toml"),
        GOOD_TOML.replace("IMAGE", &img.reference),
    )
    .unwrap();
    let wrap = hide_usr_sbin();
    let out = Command::new(&wrap[0])
        .args(&wrap[1..])
        .arg(fledge_bin())
        .current_dir(p)
        .env("FLEDGE_CACHE_DIR", p.join("cache"))
        .args(["build", "-v", "-c", "fledge.toml", "-o", "out.img"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{test}: {stderr}");
    assert!(stderr.contains("backend: native "), "{test}: {stderr}");
    support::assert_fsck_clean(&p.join("out.img"), "ext4", test);
}

/// A mapped file that vanishes between planning and copying: a clear error naming it, no
/// image, nothing left behind; once the file is back the same build succeeds.
fn mapping_source_vanishing_mid_build(backend: &str) {
    mapping_source_vanishing_mid_build_as(backend, "type = \"ext4\"", backend);
}

/// [`mapping_source_vanishing_mid_build`] with `fs_line` as the `[filesystem]` type line.
fn mapping_source_vanishing_mid_build_as(backend: &str, fs_line: &str, name: &str) {
    let test = format!("mapping_source_vanishing_mid_build_{name}");
    let img = if backend == "kernel" {
        support::debian_image_as_root(&test, "needs root (kernel backend)")
    } else {
        support::debian_image(&test)
    };
    let Some(img) = img else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    fs::write(p.join("payload.bin"), vec![7u8; 1 << 20]).unwrap();
    fs::write(
        p.join("fledge.toml"),
        format!(
            "{}\n[mappings]\n\"payload.bin\" = \"/opt/payload.bin\"\n",
            GOOD_TOML
                .replace("IMAGE", &img.reference)
                .replace("type = \"ext4\"", fs_line)
        ),
    )
    .unwrap();
    let pause = p.join("pause");
    let run = |with_pause: bool| {
        let mut cmd = Command::new(fledge_bin());
        cmd.current_dir(p)
            .env("FLEDGE_CACHE_DIR", p.join("cache"))
            .args(["build", "--backend", backend, "-o", "out.img"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if with_pause {
            cmd.env("FLEDGE_TEST_PAUSE_FILE", &pause);
        }
        cmd.spawn().unwrap()
    };
    let child = run(true);
    let start = std::time::Instant::now();
    while !pause.exists() {
        assert!(
            start.elapsed().as_secs() < 60,
            "{test}: the build never paused"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    fs::rename(p.join("payload.bin"), p.join("payload.away")).unwrap();
    fs::remove_file(&pause).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{test}: {stderr}");
    assert!(stderr.contains("payload.bin"), "{test}: {stderr}");
    if backend == "native" {
        // Every native writer reports it as the mapped host file (BuildError::HostFile).
        assert!(
            stderr.contains("(mapped into the image)"),
            "{test}: {stderr}"
        );
    }
    assert!(stderr.contains("hint: "), "{test}: {stderr}");
    assert!(!p.join("out.img").exists() && !p.join("out.manifest.json").exists());
    assert!(
        fs::read_dir(p).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".fledge")),
        "{test}: work directory left behind"
    );
    assert!(support::loops_under(p).is_empty() && support::mounts_under(p).is_empty());
    // Retried with the file back: success.
    fs::rename(p.join("payload.away"), p.join("payload.bin")).unwrap();
    let out = run(false).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{test}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(p.join("out.img").exists());
}

#[test]
fn mapping_source_vanishing_mid_build_kernel() {
    mapping_source_vanishing_mid_build("kernel");
}

#[test]
fn mapping_source_vanishing_mid_build_native() {
    mapping_source_vanishing_mid_build("native");
}

#[test]
fn mapping_source_vanishing_mid_build_squashfs() {
    // lz4 keeps it quick; the mapping of the read error does not depend on the compressor.
    mapping_source_vanishing_mid_build_as(
        "native",
        "type = \"squashfs\"\ncompression = \"lz4\"",
        "squashfs",
    );
}

#[test]
fn mapping_source_vanishing_mid_build_erofs() {
    mapping_source_vanishing_mid_build_as("native", "type = \"erofs\"", "erofs");
}
