//! `fledge build` end to end on the Debian test image: for every filesystem type and every
//! backend that supports it, the mounted image equals `umoci unpack` of the image plus the
//! injected files, passes its filesystem checker, keeps the free-space window, is sparse or
//! preallocated as asked, and comes with a manifest whose checksum is the image's.
//! Rootless builds (the `fledge-test` user: auto, which is the native writer for ext4, and the
//! userspace backend) equal root's builds.
//!
//! Needs root (loop mounts to inspect the results); prints SKIP otherwise.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::treecmp::{self, snapshot, Snapshot};

const MIB: u64 = 1 << 20;
const BUFFER_MB: u64 = 100;

fn fledge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fledge"))
}

fn root_or_skip(test: &str) -> bool {
    if support::is_root() {
        true
    } else {
        support::skip(
            test,
            "needs root (loop-mounts the built images to inspect them)",
        );
        false
    }
}

/// A scratch directory with a fledge.toml for the Debian image.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(reference: &str, fs: &str, extra: &str) -> Project {
        let dir = tempfile::Builder::new()
            .prefix("fledge-build-test-")
            .tempdir()
            .unwrap();
        let toml = format!(
            "version = \"1\"\nstrategy = \"oci_rootfs\"\n\n[source]\nimage = \"{reference}\"\n\n\
             [filesystem]\ntype = \"{fs}\"\nsize_buffer_mb = {BUFFER_MB}\npreallocate = false\n{extra}"
        );
        fs::write(dir.path().join("fledge.toml"), toml).unwrap();
        Project { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn build(&self, out: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(fledge_bin());
        cmd.current_dir(self.path())
            .env("FLEDGE_CACHE_DIR", self.path().join("cache"))
            .arg("build")
            .args(["-c", "fledge.toml", "-o", out])
            .args(args);
        cmd.output().unwrap()
    }
}

/// Make `project` the test user's: a copy of the binary it can run in `bin/`, and the
/// directory, the copy and `fledge.toml` owned by `uid:gid`. Returns the `bin/` directory.
fn give_to_user(project: &Project, uid: u32, gid: u32) -> PathBuf {
    let bin_dir = project.path().join("bin");
    fs::create_dir(&bin_dir).unwrap();
    fs::copy(fledge_bin(), bin_dir.join("fledge")).unwrap();
    for entry in ["", "bin", "bin/fledge", "fledge.toml"] {
        nix::unistd::chown(
            &project.path().join(entry),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .unwrap();
    }
    bin_dir
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn oracle(img: &support::DebianImage) -> Snapshot {
    snapshot(&img.oracle_rootfs).unwrap()
}

/// Compare a mounted image with the oracle; the injected config file is checked apart.
fn assert_matches_oracle(
    oracle: &Snapshot,
    mounted: &Path,
    img: &support::DebianImage,
    what: &str,
) {
    let opts = treecmp::DiffOptions::default().ignore("/etc/fsify-entrypoint");
    support::assert_same_tree(oracle, mounted, &opts, what);
    // /etc/fsify-entrypoint is the image config blob, byte for byte, root-owned 0644.
    let config = image_config_blob(&img.layout);
    let injected = fs::read(mounted.join("etc/fsify-entrypoint")).unwrap();
    assert_eq!(injected, config, "{what}: /etc/fsify-entrypoint differs");
    let md = fs::metadata(mounted.join("etc/fsify-entrypoint")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o644, 0, 0));
}

fn image_config_blob(layout: &Path) -> Vec<u8> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    blob(manifest["config"]["digest"].as_str().unwrap())
}

/// Build one (fs, backend) case and check everything about the result.
fn check_case(fs_type: &str, backend: &str) {
    let test = format!("build_{fs_type}_{backend}");
    if !root_or_skip(&test) {
        return;
    }
    let Some(img) = support::debian_image(&test) else {
        return;
    };
    let project = Project::new(&img.reference, fs_type, "");
    let out = project.build("out/debian.img", &["--backend", backend, "-v"]);
    // -o into a directory that does not exist yet is an error; make it first.
    assert!(
        !out.status.success(),
        "building into a missing directory should fail:\n{}",
        text(&out)
    );
    fs::create_dir(project.path().join("out")).unwrap();
    let out = project.build("out/debian.img", &["--backend", backend, "-v"]);
    assert!(
        out.status.success(),
        "{test}: build failed:\n{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("backend: {backend}")),
        "{test}: -v does not say the backend:\n{stderr}"
    );
    let image = project.path().join("out/debian.img");
    let manifest_path = project.path().join("out/debian.manifest.json");

    // Nothing but the outputs is left beside them.
    let mut left: Vec<String> = fs::read_dir(project.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["debian.img", "debian.manifest.json"]);

    support::assert_fsck_clean(&image, fs_type, &test);

    // Sparse: far fewer blocks allocated than the file's size.
    let md = fs::metadata(&image).unwrap();
    assert!(
        md.blocks() * 512 < md.len(),
        "{test}: image is not sparse ({} allocated of {})",
        md.blocks() * 512,
        md.len()
    );

    // The manifest.
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(
        manifest["rootfs"]["checksum"],
        format!("sha256:{}", support::sha256_file(&image))
    );
    assert_eq!(manifest["rootfs"]["format"], fs_type);
    assert_eq!(
        manifest["rootfs"]["url"],
        image.canonicalize().unwrap().display().to_string()
    );
    assert_eq!(
        manifest["workload"]["entrypoint"],
        serde_json::json!(["/usr/sbin/nginx", "-g", "daemon off;"])
    );
    assert_eq!(manifest["workload"]["base_url"], "http://127.0.0.1:80");

    // Contents equal the oracle.
    let oracle = oracle(&img);
    {
        let m = support::kit::Mount::image(&image, fs_type, "loop,ro");
        assert_matches_oracle(&oracle, m.path(), &img, &test);
    }
    // Free space: at least the buffer, at most buffer + 10% + 16 MiB (measured read-write:
    // btrfs reports less on read-only mounts).
    let m = support::kit::Mount::image(&image, fs_type, "loop");
    let free = m.free_bytes();
    let (min, max) = (
        BUFFER_MB * MIB,
        BUFFER_MB * MIB + BUFFER_MB * MIB / 10 + 16 * MIB,
    );
    eprintln!(
        "{test}: image {} MiB, free {} MiB (window {}..{} MiB)",
        md.len() / MIB,
        free / MIB,
        min / MIB,
        max / MIB
    );
    assert!(free >= min, "{test}: only {} MiB free", free / MIB);
    assert!(
        free <= max || (fs_type, backend) == ("btrfs", "userspace"),
        "{test}: {} MiB free, more than {} MiB",
        free / MIB,
        max / MIB
    );
}

#[test]
fn build_ext4_kernel() {
    check_case("ext4", "kernel");
}

#[test]
fn build_ext4_native() {
    check_case("ext4", "native");
}

#[test]
fn build_ext4_userspace() {
    check_case("ext4", "userspace");
}

#[test]
fn build_xfs_kernel() {
    check_case("xfs", "kernel");
}

#[test]
fn build_btrfs_kernel() {
    check_case("btrfs", "kernel");
}

/// mkfs.btrfs --rootdir cannot write device numbers or sub-second mtimes: on the Debian
/// image (which has /dev nodes and a nanosecond mtime) fledge refuses, naming the paths.
#[test]
fn build_btrfs_userspace_refuses_devices() {
    let test = "build_btrfs_userspace_refuses_devices";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let project = Project::new(&img.reference, "btrfs", "");
    let out = project.build("debian.img", &["--backend", "userspace"]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("device numbers"), "{stderr}");
    assert!(stderr.contains("/dev/console"), "{stderr}");
    assert!(!project.path().join("debian.img").exists());
}

/// On an image without device nodes and sub-second mtimes (like most registry images), the
/// userspace btrfs build equals the kernel build, except the root directory's mtime, which
/// btrfs-progs 6.2 sets to the time of mkfs.
#[test]
fn build_btrfs_userspace_equals_kernel() {
    let test = "build_btrfs_userspace_equals_kernel";
    if !root_or_skip(test) {
        return;
    }
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let derived = tempfile::tempdir().unwrap();
    let reference = support::registry_like_image(&img, derived.path());
    let project = Project::new(&reference, "btrfs", "");
    for (out, backend) in [("k.img", "kernel"), ("u.img", "userspace")] {
        let o = project.build(out, &["--backend", backend]);
        assert!(o.status.success(), "{backend}: {}", text(&o));
        support::assert_fsck_clean(&project.path().join(out), "btrfs", backend);
    }
    let kernel = {
        let m = support::kit::Mount::image(&project.path().join("k.img"), "btrfs", "loop,ro");
        snapshot(m.path()).unwrap()
    };
    let m = support::kit::Mount::image(&project.path().join("u.img"), "btrfs", "loop");
    support::assert_same_tree(
        &kernel,
        m.path(),
        &treecmp::DiffOptions {
            ignore_root_mtime: true,
            ..Default::default()
        },
        "btrfs userspace vs kernel",
    );
    let free = m.free_bytes();
    assert!(free >= BUFFER_MB * MIB, "only {} MiB free", free / MIB);
}

/// The xfs protofile cannot carry this image's xattrs and hard links: fledge says so, listing
/// the paths, and builds nothing.
#[test]
fn build_xfs_userspace_refuses_with_paths() {
    let test = "build_xfs_userspace_refuses_with_paths";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let project = Project::new(&img.reference, "xfs", "");
    let out = project.build("debian.img", &["--backend", "userspace"]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/opt/links/a"), "{stderr}");
    assert!(stderr.contains("/opt/xattr-file"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    assert!(!project.path().join("debian.img").exists());
}

/// `preallocate = true` gives a fully allocated image, whose manifest checksum is still the
/// image's: with auto (the native writer, which hashes as it writes) and the kernel backend.
#[test]
fn build_preallocated() {
    let test = "build_preallocated";
    if !root_or_skip(test) {
        return;
    }
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let project = Project::new(&img.reference, "ext4", "");
    let toml = fs::read_to_string(project.path().join("fledge.toml"))
        .unwrap()
        .replace("preallocate = false", "preallocate = true");
    fs::write(project.path().join("fledge.toml"), toml).unwrap();
    for (args, backend) in [
        (&[][..], "native"),
        (&["--backend", "kernel"][..], "kernel"),
    ] {
        let name = format!("{backend}.img");
        let out = project.build(&name, &[args, &["-v"]].concat());
        assert!(out.status.success(), "{test} {backend}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("backend: {backend} ")),
            "{test}: expected the {backend} backend:\n{stderr}"
        );
        let image = project.path().join(&name);
        let md = fs::metadata(&image).unwrap();
        assert!(
            md.blocks() * 512 >= md.len(),
            "{test} {backend}: preallocated image has holes: {} allocated of {}",
            md.blocks() * 512,
            md.len()
        );
        let manifest: serde_json::Value = serde_json::from_slice(
            &fs::read(project.path().join(format!("{backend}.manifest.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            manifest["rootfs"]["checksum"],
            format!("sha256:{}", support::sha256_file(&image)),
            "{test} {backend}: manifest checksum"
        );
        support::assert_fsck_clean(&image, "ext4", &format!("{test} {backend}"));
    }
}

/// Run fledge as the unprivileged test user with `backend` (`auto`: no `--backend`), which
/// must report `expect`; the result must equal root's kernel build of the same type, entry by
/// entry.
fn rootless_case(fs_type: &str, backend: &str, expect: &str) {
    let test = format!("rootless_{fs_type}_{backend}_equals_root");
    if !root_or_skip(&test) {
        return;
    }
    let Some(img) = support::debian_image(&test) else {
        return;
    };
    // btrfs rootless builds need an image mkfs.btrfs --rootdir can carry (see
    // build_btrfs_userspace_refuses_devices).
    let derived = tempfile::tempdir().unwrap();
    let reference = if fs_type == "btrfs" {
        let r = support::registry_like_image(&img, derived.path());
        make_world_readable(derived.path());
        r
    } else {
        img.reference.clone()
    };
    let (uid, gid) = match support::unprivileged_preconditions() {
        Ok(ids) => ids,
        Err(reason) => {
            if support::setup_wanted() {
                panic!("{test}: {reason}");
            }
            support::skip(&test, &reason);
            return;
        }
    };
    // Root's build.
    let root_project = Project::new(&reference, fs_type, "");
    let out = root_project.build("root.img", &["--backend", "kernel"]);
    assert!(out.status.success(), "{}", text(&out));

    // The user's build, in a directory the user owns, with a copy of the binary it can run.
    let user_project = Project::new(&reference, fs_type, "");
    let bin_dir = give_to_user(&user_project, uid, gid);
    let backend_args: &[&str] = if backend == "auto" {
        &[]
    } else {
        &["--backend", backend]
    };
    let out = Command::new("runuser")
        .args(["-u", support::TEST_USER, "--"])
        .arg(bin_dir.join("fledge"))
        .args(["build", "-v", "-c", "fledge.toml", "-o", "user.img"])
        .args(backend_args)
        .current_dir(user_project.path())
        .env("FLEDGE_CACHE_DIR", user_project.path().join("cache"))
        .env("HOME", user_project.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{test}: rootless build failed:\n{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("backend: {expect} ")),
        "{test}: rootless build did not use the {expect} backend:\n{stderr}"
    );
    let user_image = user_project.path().join("user.img");
    assert_eq!(fs::metadata(&user_image).unwrap().uid(), uid);
    support::assert_fsck_clean(&user_image, fs_type, &test);

    let root_snap = {
        let m =
            support::kit::Mount::image(&root_project.path().join("root.img"), fs_type, "loop,ro");
        snapshot(m.path()).unwrap()
    };
    let m = support::kit::Mount::image(&user_image, fs_type, "loop,ro");
    support::assert_same_tree(
        &root_snap,
        m.path(),
        &treecmp::DiffOptions {
            // btrfs-progs 6.2 gives the root directory the time of mkfs.
            ignore_root_mtime: fs_type == "btrfs",
            ..Default::default()
        },
        &format!("{test}: user's {fs_type} image vs root's"),
    );
}

fn make_world_readable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
}

/// auto picks the native writer for ext4, root or not.
#[test]
fn rootless_ext4_auto_equals_root() {
    rootless_case("ext4", "auto", "native");
}

#[test]
fn rootless_ext4_userspace_equals_root() {
    rootless_case("ext4", "userspace", "userspace");
}

/// btrfs rootless: the userspace backend (the native writer is ext4 only).
#[test]
fn rootless_btrfs_auto_equals_root() {
    rootless_case("btrfs", "auto", "userspace");
}

/// `-q` prints nothing on success; the default prints one summary line.
#[test]
fn quiet_prints_nothing() {
    let test = "quiet_prints_nothing";
    if !root_or_skip(test) {
        return;
    }
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let project = Project::new(&img.reference, "ext4", "");
    let out = project.build("q.img", &["-q"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        text(&out)
    );
    let out = project.build("q2.img", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("built "), "{stderr}");
}

/// A build over an existing image replaces it by rename: a reader of the old image keeps
/// reading the old bytes, the path holds the new image and its manifest names it. The old
/// image (over 64 MiB) is freed by a background process (`sys::close_in_background`):
/// the build's own stdout and stderr pipes are closed when it exits (`output()` returns).
/// Native ext4: no root needed.
#[test]
fn rebuild_replaces_the_image() {
    let test = "rebuild_replaces_the_image";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let project = Project::new(&img.reference, "ext4", "");
    let out = project.build("r.img", &["--backend", "native"]);
    assert!(out.status.success(), "{}", text(&out));
    let path = project.path().join("r.img");
    let first = support::sha256_file(&path);
    assert!(fs::metadata(&path).unwrap().len() >= 64 << 20);
    let old = fs::File::open(&path).unwrap();
    // Another identity (no SOURCE_DATE_EPOCH): other bytes.
    let out = project.build("r.img", &["--backend", "native"]);
    assert!(out.status.success(), "{}", text(&out));
    let second = support::sha256_file(&path);
    assert_ne!(first, second, "the rebuild wrote new bytes");
    let (manifest, _) = support::manifest_without_url(&project.path().join("r.manifest.json"));
    assert!(
        manifest.to_string().contains(&second),
        "the manifest names the new image: {manifest}"
    );
    // The old inode, still open here, was not written to.
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut &old, &mut h).unwrap();
    assert_eq!(hex::encode(h.finalize()), first);
}

/// Without `-o` and manifest.toml, the reference names the outputs and the manifest: the
/// base name and version come from the name inside a docker-archive (not from the
/// transport), from the archive's file name when it names none, and from an oci-archive's
/// file name and tag. Native ext4 builds: no root needed.
#[test]
fn default_names_follow_the_reference() {
    let test = "default_names_follow_the_reference";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    if !support::have_program("skopeo") {
        support::skip(test, "needs skopeo (makes the archives)");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let docker_ar = scratch.path().join("app.tar");
    let oci_ar = scratch.path().join("Tools.tar");
    for dest in [
        format!("docker-archive:{}:myapp:1.2", docker_ar.display()),
        format!("oci-archive:{}:v3.4", oci_ar.display()),
    ] {
        support::run_ok(Command::new("skopeo").args(["copy", "--quiet", &img.reference, &dest]));
    }
    let cases = [
        (
            format!("docker-archive:{}:myapp:1.2", docker_ar.display()),
            "myapp",
            "1.2",
        ),
        (
            format!("docker-archive:{}", docker_ar.display()),
            "app",
            "0.1.0",
        ),
        (
            format!("oci-archive:{}:v3.4", oci_ar.display()),
            "tools",
            "3.4",
        ),
        (img.reference.clone(), "debian", "0.1.0"),
    ];
    let cache = scratch.path().join("cache");
    for (reference, base, version) in cases {
        let p = Project::new(&reference, "ext4", "");
        let out = Command::new(fledge_bin())
            .current_dir(p.path())
            .env("FLEDGE_CACHE_DIR", &cache)
            .args(["build", "-q", "-c", "fledge.toml"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{reference}: {}", text(&out));
        let image = p.path().join(format!("{base}.img"));
        let manifest = p.path().join(format!("{base}.manifest.json"));
        assert!(image.is_file(), "{reference}: no {}", image.display());
        let m: serde_json::Value = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
        assert_eq!(m["name"], base, "{reference}");
        assert_eq!(m["runtime"], base, "{reference}");
        assert_eq!(m["version"], version, "{reference}");
        assert_eq!(m["image"], reference.as_str(), "{reference}");
    }
}

/// The oracle as `fs_type` can hold it: exactly what the format cannot store is adjusted.
/// squashfs keeps whole-second mtimes (the oracle's sub-second ones are truncated); its
/// xattr namespaces (user., trusted., security.) and EROFS's hold everything the test image
/// carries (it has no POSIX ACLs), so nothing else is allowed to differ.
fn oracle_as_stored(oracle: &Snapshot, fs_type: &str) -> Snapshot {
    let mut o = oracle.clone();
    if fs_type == "squashfs" {
        for e in o.entries.values_mut() {
            e.mtime_nsec = 0;
        }
    }
    o
}

/// A read-only type (squashfs, erofs): built as root with the default output name, loop-mounted
/// read-only and compared with the oracle entry by entry; the meaningless writable-image keys
/// warn; the mkfs backends refuse the type clearly. `compression`: a `compression = ...` line
/// (and what else it needs), or empty for the type's default.
fn readonly_case(fs_type: &str, compression: &str) {
    let test = match compression.split('"').nth(1) {
        Some(c) => format!("build_{fs_type}_{c}_native"),
        None => format!("build_{fs_type}_native"),
    };
    if !root_or_skip(&test) {
        return;
    }
    let Some(img) = support::debian_image(&test) else {
        return;
    };
    // Project::new writes size_buffer_mb and preallocate: warnings for a read-only type.
    let project = Project::new(&img.reference, fs_type, compression);
    let started = std::time::Instant::now();
    let out = Command::new(fledge_bin())
        .current_dir(project.path())
        .env("FLEDGE_CACHE_DIR", project.path().join("cache"))
        .args(["build", "-v", "-c", "fledge.toml"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{test}: build failed:\n{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("backend: native "), "{test}:\n{stderr}");
    for key in ["size_buffer_mb", "preallocate"] {
        assert!(
            stderr.contains("warning: ")
                && stderr.contains(&format!(
                    "'filesystem.{key}' has no effect on a read-only {fs_type} image"
                )),
            "{test}: no warning for {key}:\n{stderr}"
        );
    }
    // The default name takes the type's extension.
    let image = project.path().join(format!("debian.{fs_type}"));
    let manifest_path = project.path().join("debian.manifest.json");
    let mut left: Vec<String> = fs::read_dir(project.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want = vec![
        "cache".to_string(),
        format!("debian.{fs_type}"),
        "debian.manifest.json".into(),
        "fledge.toml".into(),
    ];
    want.sort();
    assert_eq!(left, want);
    let md = fs::metadata(&image).unwrap();
    assert_eq!(
        md.len() % 4096,
        0,
        "{test}: not a whole number of 4 KiB blocks"
    );
    let sha = support::sha256_file(&image);
    eprintln!(
        "{test}: image {} bytes ({} MiB), built in {:.1}s, sha256 {sha}",
        md.len(),
        md.len() / MIB,
        took.as_secs_f64()
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["rootfs"]["checksum"], format!("sha256:{sha}"));
    assert_eq!(manifest["rootfs"]["format"], fs_type);
    assert_eq!(
        manifest["rootfs"]["url"],
        image.canonicalize().unwrap().display().to_string()
    );

    let oracle = oracle_as_stored(&oracle(&img), fs_type);
    {
        let m = support::kit::Mount::image(&image, fs_type, "loop,ro");
        assert_eq!(
            support::mount_fstype(m.path()).as_deref(),
            Some(fs_type),
            "{test}: mounted as another type"
        );
        assert_matches_oracle(&oracle, m.path(), &img, &test);
    }

    // The other backends once, for the type's default compression.
    if !compression.is_empty() {
        return;
    }
    // The kernel backend has nothing to mount for a read-only type: a clear error before
    // any work.
    let out = project.build("other.img", &["--backend", "kernel"]);
    assert!(!out.status.success(), "{test}: --backend kernel built");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the kernel backend cannot run here: {fs_type} images are not made by mounting"
        )) && stderr.contains("--backend native"),
        "{test}: --backend kernel:\n{stderr}"
    );
    assert!(!project.path().join("other.img").exists());

    // The userspace backend: mksquashfs / mkfs.erofs over the FUSE view, the same oracle.
    let tool = if fs_type == "squashfs" {
        "mksquashfs"
    } else {
        "mkfs.erofs"
    };
    if !support::have_program(tool) || !Path::new("/dev/fuse").exists() {
        if support::setup_wanted() {
            panic!("{test}: {tool} or /dev/fuse missing for the userspace backend");
        }
        support::skip(
            &test,
            &format!("{tool} or /dev/fuse missing (userspace part)"),
        );
        return;
    }
    let other = format!("other.{fs_type}");
    let out = project.build(&other, &["--backend", "userspace", "-v"]);
    assert!(
        out.status.success(),
        "{test}: --backend userspace failed:\n{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("backend: userspace "), "{test}:\n{stderr}");
    let image = project.path().join(&other);
    let m = support::kit::Mount::image(&image, fs_type, "loop,ro");
    assert_matches_oracle(&oracle, m.path(), &img, &format!("{test} (userspace)"));
}

#[test]
fn build_squashfs_native() {
    readonly_case("squashfs", "");
}

#[test]
fn build_erofs_native() {
    readonly_case("erofs", "");
}

#[test]
fn build_erofs_lz4_native() {
    readonly_case("erofs", "compression = \"lz4\"\n");
}

#[test]
fn build_erofs_lz4hc_native() {
    readonly_case("erofs", "compression = \"lz4hc\"\n");
}

/// squashfs and erofs rootless: the `fledge-test` user's build (no root, FUSE or loop
/// device) is byte-identical to root's under the same SOURCE_DATE_EPOCH.
fn rootless_readonly_case(fs_type: &str) {
    let test = format!("rootless_{fs_type}_equals_root");
    if !root_or_skip(&test) {
        return;
    }
    let Some(img) = support::debian_image(&test) else {
        return;
    };
    let (uid, gid) = match support::unprivileged_preconditions() {
        Ok(ids) => ids,
        Err(reason) => {
            if support::setup_wanted() {
                panic!("{test}: {reason}");
            }
            support::skip(&test, &reason);
            return;
        }
    };
    // zstd keeps the two squashfs builds quick.
    let extra = if fs_type == "squashfs" {
        "compression = \"zstd\"\ncompression_level = 3\n"
    } else {
        ""
    };
    let out_name = format!("r.{fs_type}");
    let root_project = Project::new(&img.reference, fs_type, extra);
    let out = Command::new(fledge_bin())
        .current_dir(root_project.path())
        .env("FLEDGE_CACHE_DIR", root_project.path().join("cache"))
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["build", "-q", "-c", "fledge.toml", "-o", &out_name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let user_project = Project::new(&img.reference, fs_type, extra);
    let bin_dir = give_to_user(&user_project, uid, gid);
    let out = Command::new("runuser")
        .args(["-u", support::TEST_USER, "--"])
        .arg(bin_dir.join("fledge"))
        .args(["build", "-v", "-c", "fledge.toml", "-o", &out_name])
        .current_dir(user_project.path())
        .env("FLEDGE_CACHE_DIR", user_project.path().join("cache"))
        .env("HOME", user_project.path())
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{test}: rootless build failed:\n{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("backend: native "),
        "{test}: rootless build did not use the native backend:\n{stderr}"
    );
    let user_image = user_project.path().join(&out_name);
    assert_eq!(fs::metadata(&user_image).unwrap().uid(), uid);
    assert_eq!(
        support::sha256_file(&user_image),
        support::sha256_file(&root_project.path().join(&out_name)),
        "{test}: the user's image differs from root's"
    );
}

#[test]
fn rootless_squashfs_equals_root() {
    rootless_readonly_case("squashfs");
}

#[test]
fn rootless_erofs_equals_root() {
    rootless_readonly_case("erofs");
}

/// qcow2 output (`--image-format qcow2` over one config, so the raw and the qcow2 build
/// have the same identity): `qemu-img check` clean; the manifest says `qcow2` and carries
/// the file's sha256; `build --json` keeps the filesystem type; the default name is
/// NAME.qcow2. Where the backend is reproducible (native ext4, squashfs, EROFS): `qemu-img
/// compare` identical to the raw build, the file exactly the raw image's data clusters
/// plus the tables (on the host: the raw image's blocks plus the tables), and byte-identical
/// when built again. Where it is not (the kernel backend mounts and copies), the qcow2 is
/// `qemu-img compare` identical to the raw image it was made from (kept by the
/// FLEDGE_TEST_RAW_COPY hook), and read back as raw is fsck-clean and holds the oracle's tree.
fn qcow2_case(fs_type: &str, backend: &str, compression: Option<&str>) {
    let test = match compression {
        None => format!("build_qcow2_{fs_type}_{backend}"),
        Some(c) => format!("build_qcow2_{fs_type}_{c}_{backend}"),
    };
    if !root_or_skip(&test) {
        return;
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        support::skip(&test, "needs qemu-img (apt install qemu-utils)");
        return;
    }
    let Some(img) = support::debian_image(&test) else {
        return;
    };
    let extra = compression.map_or(String::new(), |c| format!("compression = \"{c}\"\n"));
    let project = Project::new(&img.reference, fs_type, &extra);
    // The kernel backend is not reproducible: its qcow2 is compared with the raw image it
    // was made from (kept by a test hook) rather than with another build.
    let kept_raw = project.path().join("kept-raw.img");
    let build = |out: Option<&str>, format: &str| {
        let mut cmd = Command::new(fledge_bin());
        cmd.current_dir(project.path())
            .env("FLEDGE_CACHE_DIR", project.path().join("cache"))
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["build", "--json", "-c", "fledge.toml", "--backend", backend])
            .args(["--image-format", format]);
        if backend == "kernel" && format == "qcow2" {
            cmd.env("FLEDGE_TEST_RAW_COPY", &kept_raw);
        }
        if let Some(out) = out {
            cmd.args(["-o", out]);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{test}: {format}: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v
    };
    let raw_report = build(Some("raw.img"), "raw");
    assert_eq!(raw_report["image_format"], "raw");
    let report = build(None, "qcow2");
    let q = project.path().join("debian.qcow2");
    assert_eq!(report["image"], q.to_str().unwrap(), "{test}: default name");
    assert_eq!(report["image_format"], "qcow2");
    assert_eq!(report["filesystem"], fs_type);
    let raw = project.path().join("raw.img");
    let bytes = fs::read(&q).unwrap();
    let sum = support::kit::sha256_hex(&bytes);
    assert_eq!(report["sha256"], sum.as_str(), "{test}: hashed as written");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(project.path().join("debian.manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["rootfs"]["format"], "qcow2");
    assert_eq!(manifest["rootfs"]["checksum"], format!("sha256:{sum}"));
    assert_eq!(manifest["rootfs"]["url"], q.to_str().unwrap());
    let raw_manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(project.path().join("raw.manifest.json")).unwrap())
            .unwrap();
    assert_eq!(raw_manifest["rootfs"]["format"], fs_type);
    support::kit::assert_qcow2_clean(&q, &test);
    let left: Vec<String> = fs::read_dir(project.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".fledge"))
        .collect();
    assert!(left.is_empty(), "{test}: left behind {left:?}");
    if backend == "kernel" {
        support::kit::assert_qcow2_equals_raw(&q, &kept_raw, &test);
        // Not reproducible: read the qcow2 back as raw and check what it holds.
        let back = project.path().join("back.img");
        support::kit::qcow2_to_raw(&q, &back, &test);
        support::assert_fsck_clean(&back, fs_type, &test);
        let m = support::kit::Mount::image(&back, fs_type, "loop,ro");
        assert_matches_oracle(&oracle(&img), m.path(), &img, &test);
        return;
    }
    support::kit::assert_qcow2_equals_raw(&q, &raw, &test);
    let f = fs::File::open(&raw).unwrap();
    let len = f.metadata().unwrap().len();
    let layout = fledge::qcow2::Layout::new(len, &fledge::qcow2::data_extents(&f, len).unwrap());
    assert_eq!(bytes.len() as u64, layout.file_len(), "{test}: file size");
    // The bytes the host holds as data (SEEK_DATA extents): st_blocks would also count
    // the host filesystem's own extent-tree blocks, which depend on when it allocated.
    let blocks = |p: &Path| {
        let f = fs::File::open(p).unwrap();
        let len = f.metadata().unwrap().len();
        fledge::qcow2::data_extents(&f, len)
            .unwrap()
            .iter()
            .map(|(s, e)| e - s)
            .sum::<u64>()
    };
    assert!(
        blocks(&q) <= blocks(&raw) + layout.table_bytes(),
        "{test}: {} bytes on disk > raw {} + tables {}",
        blocks(&q),
        blocks(&raw),
        layout.table_bytes()
    );
    eprintln!(
        "{test}: raw {} bytes ({} allocated), qcow2 {} bytes ({} allocated, tables {})",
        len,
        blocks(&raw),
        bytes.len(),
        blocks(&q),
        layout.table_bytes()
    );
    let again = build(Some("again.qcow2"), "qcow2");
    assert_eq!(again["sha256"], sum.as_str(), "{test}: reproducible");
}

#[test]
fn build_qcow2_ext4_native() {
    qcow2_case("ext4", "native", None);
}

#[test]
fn build_qcow2_squashfs_native() {
    qcow2_case("squashfs", "native", None);
}

#[test]
fn build_qcow2_erofs_native() {
    qcow2_case("erofs", "native", None);
}

/// Compressed EROFS: the compressed data is written before the metadata that points at it,
/// so the qcow2 stream copies it in from a temporary file.
#[test]
fn build_qcow2_erofs_lz4_native() {
    qcow2_case("erofs", "native", Some("lz4"));
}

#[test]
fn build_qcow2_ext4_kernel() {
    qcow2_case("ext4", "kernel", None);
}

#[test]
fn build_qcow2_xfs_kernel() {
    qcow2_case("xfs", "kernel", None);
}

#[test]
fn build_qcow2_btrfs_kernel() {
    qcow2_case("btrfs", "kernel", None);
}

/// `strategy = "initramfs"` from an image with no shell (one static binary, `/app`): the
/// busybox of `[source] busybox_url` is downloaded, verified and cached, installed as
/// `/bin/busybox` with `/bin/sh`, `mkdir`, `mount` linked to it and the default `/init`
/// running `/app`; the second build takes it from the cache (the server has gone); a wrong
/// sha256 and a dynamically linked busybox are refused, naming the URL. No root needed.
#[test]
fn build_initramfs_busybox() {
    let test = "build_initramfs_busybox";
    let dir = tempfile::Builder::new()
        .prefix("fledge-build-test-")
        .tempdir()
        .unwrap();
    let app = support::kit::static_elf(1000);
    let layer = support::kit::Layer::gzip(support::kit::tar_of(&[("app", &app)]));
    let layout = support::kit::LayoutBuilder::at(&dir.path().join("layout"));
    let cfg = support::kit::host_config("/app", std::slice::from_ref(&layer.diff_id));
    let m = layout.image_with_config(
        &format!("linux/{}", support::kit::host_arch()),
        &[layer],
        &cfg,
        support::kit::OCI_MANIFEST,
    );
    layout.write_index_json(&[(m, Some("test"))]);
    let busybox = support::kit::static_elf(300_000);
    let sum = support::kit::sha256_hex(&busybox);
    let dynamic = support::kit::dynamic_elf();
    let dyn_sum = support::kit::sha256_hex(&dynamic);
    let (base, server) = support::kit::http_serve(
        vec![("/busybox", 200, busybox.clone()), ("/dyn", 200, dynamic)],
        3,
    );
    let build = |url: &str, sha: &str| {
        let toml = format!(
            "version = \"1\"\nstrategy = \"initramfs\"\n\n[source]\nimage = \"{}\"\n\
             busybox_url = \"{url}\"\nbusybox_sha256 = \"{sha}\"\n",
            layout.reference(Some("test"))
        );
        fs::write(dir.path().join("fledge.toml"), toml).unwrap();
        Command::new(fledge_bin())
            .current_dir(dir.path())
            .env("FLEDGE_CACHE_DIR", dir.path().join("cache"))
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["build", "-c", "fledge.toml", "-o", "out.cpio.gz"])
            .output()
            .unwrap()
    };
    let url = format!("{base}/busybox");
    let out = build(&url, &sum);
    assert!(
        out.status.success(),
        "{test}: build failed:\n{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains(&format!(
            "the image has no /bin/sh: the initramfs gets busybox from {url} at /bin/busybox \
             (sh, mkdir, mount linked to it)"
        )),
        "{test}:\n{stderr}"
    );
    let first = fs::read(dir.path().join("out.cpio.gz")).unwrap();
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&first[..]), &mut data).unwrap();
    let x = dir.path().join("x");
    fs::create_dir(&x).unwrap();
    support::kit::cpio_extract(&data, &x);
    assert_eq!(fs::read(x.join("bin/busybox")).unwrap(), busybox, "{test}");
    assert_eq!(
        fs::metadata(x.join("bin/busybox")).unwrap().mode() & 0o7777,
        0o755
    );
    for applet in ["sh", "mkdir", "mount"] {
        assert_eq!(
            fs::read_link(x.join("bin").join(applet)).unwrap(),
            Path::new("busybox"),
            "{test}: /bin/{applet}"
        );
    }
    assert_eq!(
        fs::read(x.join("app")).unwrap(),
        app,
        "{test}: the image's own file"
    );
    let init = fs::read_to_string(x.join("init")).unwrap();
    assert!(init.starts_with("#!/bin/sh\n"), "{test}:\n{init}");
    assert!(init.ends_with("exec '/app'\n"), "{test}:\n{init}");
    // A wrong sha256 is refused, naming the URL (the second request).
    let wrong = "0".repeat(64);
    let out = build(&url, &wrong);
    assert!(!out.status.success(), "{test}: a wrong sha256 built");
    let err = text(&out);
    assert!(
        err.contains(&format!(
            "busybox from {url} has sha256 {sum}, expected {wrong}"
        )),
        "{test}:\n{err}"
    );
    // A dynamically linked one is refused (the third and last request).
    let out = build(&format!("{base}/dyn"), &dyn_sum);
    assert!(!out.status.success(), "{test}: a dynamic busybox built");
    let err = text(&out);
    assert!(
        err.contains(&format!(
            "busybox from {base}/dyn cannot run in the initramfs"
        )) && err.contains("PT_INTERP"),
        "{test}:\n{err}"
    );
    assert_eq!(server.join().unwrap(), vec!["/busybox", "/busybox", "/dyn"]);
    // From the cache now: the server is gone; the same bytes as the first build.
    let out = build(&url, &sum);
    assert!(
        out.status.success(),
        "{test}: cached build failed:\n{}",
        text(&out)
    );
    assert_eq!(
        fs::read(dir.path().join("out.cpio.gz")).unwrap(),
        first,
        "{test}"
    );
    // Without the keys: the host's busybox, or a refusal naming where it looked.
    let toml = format!(
        "version = \"1\"\nstrategy = \"initramfs\"\n\n[source]\nimage = \"{}\"\n",
        layout.reference(Some("test"))
    );
    fs::write(dir.path().join("fledge.toml"), toml).unwrap();
    let out = Command::new(fledge_bin())
        .current_dir(dir.path())
        .env("FLEDGE_CACHE_DIR", dir.path().join("cache"))
        .args(["build", "-c", "fledge.toml", "-o", "host.cpio.gz"])
        .output()
        .unwrap();
    let host = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file());
    let all = text(&out);
    match host {
        None => assert!(
            !out.status.success()
                && all
                    .contains("the host has no busybox (looked in /bin/busybox, /usr/bin/busybox)")
                && all.contains("busybox-static"),
            "{test}:\n{all}"
        ),
        Some(p) => assert!(
            all.contains(&format!("busybox from the host's {p}")),
            "{test}:\n{all}"
        ),
    }
}

/// `strategy = "initramfs"`: the archive, extracted with `cpio -idm` as root, equals the
/// oracle less what newc cannot hold (xattrs, among them the test image's file capabilities,
/// and sub-second mtimes); `/init` is fledge's default script; the manifest carries
/// `initramfs {url, checksum}` and no `rootfs`; a second build under the same
/// `SOURCE_DATE_EPOCH` gives the same bytes, gzip and zstd alike.
#[test]
fn build_initramfs() {
    let test = "build_initramfs";
    if !root_or_skip(test) {
        return;
    }
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("fledge-build-test-")
        .tempdir()
        .unwrap();
    let write_config = |extra: &str| {
        let toml = format!(
            "version = \"1\"\nstrategy = \"initramfs\"\n\n[source]\nimage = \"{}\"\n{extra}",
            img.reference
        );
        fs::write(dir.path().join("fledge.toml"), toml).unwrap();
    };
    let build = |args: &[&str]| {
        let out = Command::new(fledge_bin())
            .current_dir(dir.path())
            .env("FLEDGE_CACHE_DIR", dir.path().join("cache"))
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["build", "-v", "-c", "fledge.toml"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{test}: build failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    write_config("");
    let started = std::time::Instant::now();
    let stderr = build(&[]);
    let took = started.elapsed();
    assert!(stderr.contains("backend: native "), "{test}:\n{stderr}");
    // The lost capabilities are named.
    assert!(
        stderr.contains("cannot hold file capabilities") && stderr.contains("/usr/bin/ping"),
        "{test}: no warning about the capabilities:\n{stderr}"
    );
    let image = dir.path().join("debian.cpio.gz");
    let sha = support::sha256_file(&image);
    eprintln!(
        "{test}: {} bytes, built in {:.1}s, sha256 {sha}",
        fs::metadata(&image).unwrap().len(),
        took.as_secs_f64()
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.path().join("debian.manifest.json")).unwrap())
            .unwrap();
    assert!(manifest.get("rootfs").is_none(), "{test}: {manifest}");
    assert_eq!(manifest["initramfs"]["checksum"], format!("sha256:{sha}"));
    assert_eq!(
        manifest["initramfs"]["url"],
        image.canonicalize().unwrap().display().to_string()
    );

    let gz = fs::read(&image).unwrap();
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut data).unwrap();
    let dest = dir.path().join("x");
    fs::create_dir(&dest).unwrap();
    support::kit::cpio_extract(&data, &dest);
    let mut oracle = oracle(&img);
    for e in oracle.entries.values_mut() {
        e.xattrs.clear();
        e.mtime_nsec = 0;
    }
    let opts = treecmp::DiffOptions::default().ignore("/init");
    let fsify = image_config_blob(&img.layout);
    assert_eq!(fs::read(dest.join("etc/fsify-entrypoint")).unwrap(), fsify);
    support::assert_same_tree(&oracle, &dest, &opts.ignore("/etc/fsify-entrypoint"), test);
    let init = fs::read_to_string(dest.join("init")).unwrap();
    assert!(init.starts_with("#!/bin/sh\n"), "{test}: /init:\n{init}");
    assert!(
        init.ends_with("exec '/usr/sbin/nginx' '-g' 'daemon off;'\n"),
        "{test}: /init:\n{init}"
    );
    let md = fs::metadata(dest.join("init")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o755, 0, 0));

    // Reproducible: the same bytes again (the merged tree from the warm cache), and zstd too.
    fs::remove_file(&image).unwrap();
    build(&[]);
    assert_eq!(
        support::sha256_file(&image),
        sha,
        "{test}: a second build differs"
    );
    write_config("[filesystem]\ncompression = \"zstd\"\ncompression_level = 3\n");
    build(&[]);
    let zst = dir.path().join("debian.cpio.zst");
    let first = support::sha256_file(&zst);
    fs::remove_file(&zst).unwrap();
    build(&[]);
    assert_eq!(support::sha256_file(&zst), first, "{test}: zstd differs");
    let out = Command::new("zstd").arg("-dc").arg(&zst).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        out.stdout, data,
        "{test}: gzip and zstd hold different archives"
    );

    // No other backend builds an initramfs.
    let out = Command::new(fledge_bin())
        .current_dir(dir.path())
        .env("FLEDGE_CACHE_DIR", dir.path().join("cache"))
        .args([
            "build",
            "-c",
            "fledge.toml",
            "-o",
            "o.cpio",
            "--backend",
            "kernel",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("an initramfs is a cpio archive"),
        "{}",
        text(&out)
    );
}
