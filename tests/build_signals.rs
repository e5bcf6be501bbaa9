//! Interrupting `fledge build` (kernel, userspace and native backends): SIGINT or SIGTERM at
//! any point leaves no loop device, mount, FUSE mount or temporary file, and the output path
//! untouched; after SIGKILL, the next build in the same directory releases exactly what the
//! killed build held.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn fledge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fledge"))
}

fn project(reference: &str, fs_type: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("fledge-signal-test-")
        .tempdir()
        .unwrap();
    fs::write(
        dir.path().join("fledge.toml"),
        format!(
            "version = \"1\"\nstrategy = \"oci_rootfs\"\n[source]\nimage = \"{reference}\"\n\
             [filesystem]\ntype = \"{fs_type}\"\nsize_buffer_mb = 20\n"
        ),
    )
    .unwrap();
    dir
}

fn spawn_build(dir: &Path, backend: &str) -> Child {
    Command::new(fledge_bin())
        .current_dir(dir)
        .env("FLEDGE_CACHE_DIR", dir.join("cache"))
        .args(["build", "-q", "-o", "out.img", "--backend", backend])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".fledge"))
        .collect()
}

const OLD_OUTPUT: &[u8] = b"the previous image, which an interrupted build must not touch";

/// Interrupt builds at a spread of moments; every run must end clean.
fn interrupt_at_many_points(backend: &str, fs_type: &str) {
    let test = format!("interrupt_{backend}_{fs_type}");
    // The native writer needs no root; the others do (and loop devices are only inspected).
    let img = if backend == "native" {
        support::debian_image(&test)
    } else {
        support::debian_image_as_root(
            &test,
            "needs root (kernel backend, inspecting loop devices)",
        )
    };
    let Some(img) = img else {
        return;
    };
    let dir = project(&img.reference, fs_type);
    // Warm the cache so that the interesting steps (mkfs, copy, resize) take the time.
    let warm = spawn_build(dir.path(), backend).wait_with_output().unwrap();
    assert!(warm.status.success());
    let full = {
        let t = Instant::now();
        let st = spawn_build(dir.path(), backend).wait().unwrap();
        assert!(st.success());
        t.elapsed()
    };
    let mut interrupted = 0;
    for (i, frac) in [0.02, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9]
        .iter()
        .enumerate()
    {
        let sig = if i % 2 == 0 {
            Signal::SIGTERM
        } else {
            Signal::SIGINT
        };
        fs::write(dir.path().join("out.img"), OLD_OUTPUT).unwrap();
        let _ = fs::remove_file(dir.path().join("out.manifest.json"));
        let mut child = spawn_build(dir.path(), backend);
        std::thread::sleep(full.mul_f64(*frac));
        let _ = kill(Pid::from_raw(child.id() as i32), sig);
        let status = child.wait().unwrap();
        let what = format!(
            "{test}: {sig:?} at {:.0}% ({:?})",
            frac * 100.0,
            full.mul_f64(*frac)
        );
        if status.success() {
            // The build finished before the signal arrived: then the output is complete.
            assert!(fs::metadata(dir.path().join("out.img")).unwrap().len() > 1 << 20);
            eprintln!("{what}: finished before the signal");
        } else {
            interrupted += 1;
            assert_eq!(
                fs::read(dir.path().join("out.img")).unwrap(),
                OLD_OUTPUT,
                "{what}: the existing output was changed"
            );
            assert!(
                !dir.path().join("out.manifest.json").exists(),
                "{what}: a manifest appeared"
            );
            eprintln!("{what}: interrupted, exit {status}");
        }
        assert!(
            leftovers(dir.path()).is_empty(),
            "{what}: {:?}",
            leftovers(dir.path())
        );
        assert!(
            support::mounts_under(dir.path()).is_empty(),
            "{what}: {:?}",
            support::mounts_under(dir.path())
        );
        assert!(
            support::loops_under(dir.path()).is_empty(),
            "{what}: {:?}",
            support::loops_under(dir.path())
        );
    }
    assert!(
        interrupted >= 4,
        "{test}: only {interrupted} runs were interrupted"
    );
}

#[test]
fn interrupt_kernel_ext4() {
    interrupt_at_many_points("kernel", "ext4");
}

#[test]
fn interrupt_kernel_btrfs() {
    interrupt_at_many_points("kernel", "btrfs");
}

#[test]
fn interrupt_userspace_ext4() {
    interrupt_at_many_points("userspace", "ext4");
}

#[test]
fn interrupt_native_ext4() {
    interrupt_at_many_points("native", "ext4");
}

/// SIGKILL leaves the work directory, its mount and its loop device behind; the next build in
/// that directory releases them, and leaves a live build's and unrelated mounts alone.
#[test]
fn sigkill_then_next_build_recovers() {
    let test = "sigkill_then_next_build_recovers";
    let Some(img) = support::debian_image_as_root(test, "needs root") else {
        return;
    };
    let dir = project(&img.reference, "ext4");
    let warm = spawn_build(dir.path(), "kernel").wait().unwrap();
    assert!(warm.success());
    // An unrelated mount in the same directory must survive the recovery.
    let bystander = dir.path().join("bystander");
    fs::create_dir(&bystander).unwrap();
    support::run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "fledge-bystander"])
            .arg(&bystander),
    );
    // Kill builds until one dies holding a mount (the copy phase).
    let mut caught = false;
    for attempt in 0..40 {
        let mut child = spawn_build(dir.path(), "kernel");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let held = support::mounts_under(dir.path())
                .iter()
                .any(|l| l.contains(".fledge-build-"));
            if held || child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        if support::mounts_under(dir.path())
            .iter()
            .any(|l| l.contains(".fledge-build-"))
        {
            eprintln!("{test}: killed a build holding its mount on attempt {attempt}");
            caught = true;
            break;
        }
        // It finished or died before mounting: clean up its work dir for the next try.
        let out = spawn_build(dir.path(), "kernel").wait().unwrap();
        assert!(out.success());
    }
    assert!(caught, "{test}: never caught a build holding its mount");
    assert!(
        !support::loops_under(dir.path()).is_empty(),
        "the killed build's loop device is gone already"
    );

    let out = Command::new(fledge_bin())
        .current_dir(dir.path())
        .env("FLEDGE_CACHE_DIR", dir.path().join("cache"))
        .args(["build", "-o", "out.img", "--backend", "kernel"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("left by 1 killed build"), "{stderr}");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    let remaining = support::mounts_under(dir.path());
    assert_eq!(remaining.len(), 1, "{remaining:?}");
    assert!(remaining[0].contains("bystander"), "{remaining:?}");
    assert!(
        support::loops_under(dir.path()).is_empty(),
        "{:?}",
        support::loops_under(dir.path())
    );
    let _ = Command::new("umount").arg(&bystander).status();
}
