//! fledge in an unprivileged container (issue 16): rootless podman, run by the unprivileged
//! `fledge-test` user, with every capability dropped, `no-new-privileges`, no `--privileged`,
//! no `--device` (so no /dev/fuse and no loop devices) and no network, builds ext4, squashfs
//! and EROFS images that are byte-identical to root's builds on the host with the same config
//! and `SOURCE_DATE_EPOCH`; the manifests are equal except for `rootfs.url` (where each image
//! was written). This is how fledge runs as a CI step or a Kubernetes job: it needs nothing
//! but a writable directory.
//!
//! Why rootless podman and not root podman with `--user`: rootless is the stricter case (the
//! container's "root" is the unprivileged host user, and the build runs as that user's uid,
//! `--userns=keep-id`, so even the user namespace grants nothing), and it works on these hosts
//! given subordinate ids for the user (scripts/setup-test-host.sh) and `newuidmap` (uidmap).
//! Podman starts containers on these hosts only with `--runtime runc` (crun refuses the hybrid
//! cgroups), and gets [`support::servers::CONTAINERS_CONF`] (no default rlimits, which root
//! podman needs here, and cgroupfs).
//!
//! The container is checked from the inside so the test cannot pass vacuously: no /dev/fuse,
//! no /dev/loop*, all capability sets empty, no-new-privs set, a non-root uid; and the images
//! it wrote are owned by the test user on the host.
//!
//! Both sides read one `fledge.toml` text: the OCI layout is mounted at its host path, since a
//! reproducible build's identity (UUID, hash seed) is derived from the config file's bytes, so
//! a config naming the layout by another path gives other images (README, "Running in a
//! container").
//!
//! Its base image is `podman import` of the debootstrap minbase tree that
//! scripts/make-test-images.sh keeps ([`support::container_base_tar`]), into podman storage
//! private to this test. Needs root (runuser, and root's own builds), podman, runc, newuidmap:
//! a SKIP without them, a failure when `CI` or `FLEDGE_TEST_SETUP=1` is set.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use support::servers::PodmanStorage;

const EPOCH: &str = "1700000000";
const BASE_IMAGE: &str = "localhost/fledge-test-base:minbase";
/// Where the fledge binary and the output directory appear inside the container.
const FLEDGE_IN_CONTAINER: &str = "/usr/local/bin/fledge";
const OUT_IN_CONTAINER: &str = "/out";

/// (directory and image name, `[filesystem]` body). zstd keeps the squashfs builds quick.
const CASES: [(&str, &str); 3] = [
    ("ext4", "type = \"ext4\"\nsize_buffer_mb = 32\n"),
    (
        "squashfs",
        "type = \"squashfs\"\ncompression = \"zstd\"\ncompression_level = 3\n",
    ),
    ("erofs", "type = \"erofs\"\n"),
];

fn fledge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fledge"))
}

/// The container's own view of its privileges, written by the build script inside.
const PROBE: &str =
    "cat /proc/self/status > probe-status; ls -A /dev > probe-dev; id -u > probe-uid";

/// Panic unless the probe files in `out` show a container without privileges.
fn assert_unprivileged(out: &Path) {
    let status = fs::read_to_string(out.join("probe-status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in the container's /proc/self/status"))
            .trim()
            .to_string()
    };
    for cap in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
        assert_eq!(
            u64::from_str_radix(&field(cap), 16).unwrap(),
            0,
            "the container has capabilities ({cap} {}):\n{status}",
            field(cap)
        );
    }
    assert_eq!(field("NoNewPrivs"), "1", "no-new-privileges is not set");
    let devs = fs::read_to_string(out.join("probe-dev")).unwrap();
    for dev in devs.lines() {
        assert!(
            dev != "fuse" && !dev.starts_with("loop") && dev != "mapper",
            "the container has /dev/{dev}; its /dev:\n{devs}"
        );
    }
    let uid = fs::read_to_string(out.join("probe-uid")).unwrap();
    assert_ne!(uid.trim(), "0", "the build in the container ran as uid 0");
}

/// What is missing for this test, if anything; else the test user.
fn preconditions() -> Result<nix::unistd::User, String> {
    if !support::is_root() {
        return Err("needs root (runs podman as the test user, and root's own builds)".into());
    }
    let missing: Vec<&str> = ["podman", "runc", "runuser", "newuidmap", "newgidmap"]
        .into_iter()
        .filter(|p| !support::have_program(p))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} not installed (scripts/install-deps.sh)",
            missing.join(", ")
        ));
    }
    let user = nix::unistd::User::from_name(support::TEST_USER)
        .ok()
        .flatten()
        .ok_or_else(|| {
            format!(
                "user {} missing (scripts/setup-test-host.sh)",
                support::TEST_USER
            )
        })?;
    for f in ["/etc/subuid", "/etc/subgid"] {
        let has = fs::read_to_string(f).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with(&format!("{}:", support::TEST_USER)))
        });
        if !has {
            return Err(format!(
                "{f} has no range for {} (scripts/setup-test-host.sh)",
                support::TEST_USER
            ));
        }
    }
    let base = support::container_base_tar();
    if !base.is_file() {
        return Err(format!(
            "{} missing (scripts/make-test-images.sh)",
            base.display()
        ));
    }
    Ok(user)
}

#[test]
fn unprivileged_podman_builds_equal_roots() {
    let test = "unprivileged_podman_builds_equal_roots";
    let user = match preconditions() {
        Ok(user) => user,
        Err(reason) => return support::skip_unless_setup(test, &reason),
    };
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let started = Instant::now();

    // Podman's storage, and the container's output directory, owned by the test user; on
    // /var/tmp (a disk, world-traversable), as the vfs storage holds a copy of the base tree.
    let podman_dir = tempfile::Builder::new()
        .prefix("fledge-container-podman-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let podman = PodmanStorage::rootless(podman_dir.path(), &user);
    let out = podman_dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let root_dir = tempfile::Builder::new()
        .prefix("fledge-container-root-")
        .tempdir()
        .unwrap();
    for (name, body) in CASES {
        for base in [&out, &root_dir.path().to_path_buf()] {
            let dir = base.join(name);
            fs::create_dir(&dir).unwrap();
            // The layout is mounted at its host path, so the config is the same file.
            support::write_build_config(&dir, &img.reference, body);
        }
    }
    for entry in fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()) {
        for p in [entry.clone(), entry.join("fledge.toml")] {
            nix::unistd::chown(&p, Some(user.uid), Some(user.gid)).unwrap();
        }
    }
    nix::unistd::chown(&out, Some(user.uid), Some(user.gid)).unwrap();

    support::run_ok(&mut podman.podman(&[
        "import",
        "--quiet",
        &support::container_base_tar().to_string_lossy(),
        BASE_IMAGE,
    ]));
    let imported = started.elapsed();

    let mut script = format!("set -eu\ncd {OUT_IN_CONTAINER}\n{PROBE}\n");
    for (name, _) in CASES {
        script.push_str(&format!(
            "(cd {name} && FLEDGE_CACHE_DIR=$PWD/cache fledge build -v -o r.{name}) 2> {name}/log \
             || {{ cat {name}/log >&2; exit 1; }}\n"
        ));
    }
    let layout = img.layout.to_string_lossy();
    let run = support::run_ok(&mut podman.podman(&[
        "run",
        "--rm",
        "--network=none",
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        "--userns=keep-id",
        "-v",
        &format!("{}:{FLEDGE_IN_CONTAINER}:ro", fledge_bin().display()),
        "-v",
        &format!("{layout}:{layout}:ro"),
        "-v",
        &format!("{}:{OUT_IN_CONTAINER}:rw", out.display()),
        "-e",
        &format!("SOURCE_DATE_EPOCH={EPOCH}"),
        BASE_IMAGE,
        "sh",
        "-c",
        &script,
    ]));
    let in_container = started.elapsed() - imported;
    assert_unprivileged(&out);

    for (name, _) in CASES {
        let dir = root_dir.path().join(name);
        let image = format!("r.{name}");
        let root_out = support::run_ok(
            Command::new(fledge_bin())
                .current_dir(&dir)
                .env("FLEDGE_CACHE_DIR", dir.join("cache"))
                .env("SOURCE_DATE_EPOCH", EPOCH)
                .args(["build", "-v", "-o", &image]),
        );
        let user_image = out.join(name).join(&image);
        let log = fs::read_to_string(out.join(name).join("log")).unwrap();
        assert!(
            log.contains("backend: native "),
            "{name} in the container:\n{log}"
        );
        let root_log = String::from_utf8_lossy(&root_out.stderr);
        assert!(
            root_log.contains("backend: native "),
            "{name} as root:\n{root_log}"
        );
        assert_eq!(
            fs::metadata(&user_image).unwrap().uid(),
            user.uid.as_raw(),
            "{name}: the container's image is not the test user's"
        );
        let (user_sha, root_sha) = (
            support::sha256_file(&user_image),
            support::sha256_file(&dir.join(&image)),
        );
        assert_eq!(
            user_sha, root_sha,
            "{name}: the unprivileged container's image differs from root's"
        );
        let (user_manifest, user_url) =
            support::manifest_without_url(&out.join(name).join("r.manifest.json"));
        let (root_manifest, root_url) = support::manifest_without_url(&dir.join("r.manifest.json"));
        assert_eq!(user_url, format!("{OUT_IN_CONTAINER}/{name}/{image}"));
        assert_eq!(root_url, dir.join(&image).display().to_string());
        assert_eq!(
            user_manifest, root_manifest,
            "{name}: the manifests differ beyond rootfs.url"
        );
        eprintln!("{name}: sha256 {user_sha} (container and root)");
    }
    eprintln!(
        "{test}: podman import {:.1}s, container builds {:.1}s, total {:.1}s",
        imported.as_secs_f64(),
        in_container.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    let podman_stderr = String::from_utf8_lossy(&run.stderr);
    if !podman_stderr.trim().is_empty() {
        eprintln!("podman run stderr:\n{podman_stderr}");
    }
}
