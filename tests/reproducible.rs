//! With `SOURCE_DATE_EPOCH` set, two builds of the same image and config give byte-identical
//! ext4 images and the same manifest checksum; another epoch gives another image. Checked for
//! the native writer (what `--backend auto` picks for ext4, root or not) and for the userspace
//! backend; and for the squashfs and EROFS writers (the only backend of those types).

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fledge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fledge"))
}

/// Build in a fresh directory (and a fresh cache) with `backend` (`auto` passes no
/// `--backend`) and return (image sha256, manifest checksum, stderr).
fn build(reference: &str, epoch: &str, backend: &str) -> (String, String, String) {
    build_with(
        reference,
        epoch,
        backend,
        "type = \"ext4\"\nsize_buffer_mb = 32\n",
        "r.img",
    )
}

/// [`build`] with another `[filesystem]` body, written to `out`.
fn build_with(
    reference: &str,
    epoch: &str,
    backend: &str,
    filesystem: &str,
    out_name: &str,
) -> (String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    support::write_build_config(dir.path(), reference, filesystem);
    let mut cmd = Command::new(fledge_bin());
    cmd.current_dir(dir.path())
        .env("FLEDGE_CACHE_DIR", dir.path().join("cache"))
        .env("SOURCE_DATE_EPOCH", epoch)
        .args(["build", "-v", "-o", out_name]);
    if backend != "auto" {
        cmd.args(["--backend", backend]);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{backend} build failed:\n{stderr}");
    let sha = support::sha256_file(&dir.path().join(out_name));
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.path().join("r.manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["rootfs"]["url"],
        dir.path()
            .join(out_name)
            .canonicalize()
            .unwrap()
            .display()
            .to_string()
    );
    let checksum = manifest["rootfs"]["checksum"].as_str().unwrap().to_string();
    assert_eq!(checksum, format!("sha256:{sha}"));
    (sha, checksum, stderr)
}

/// squashfs and EROFS: the same epoch gives the same bytes (squashfs' mkfs_time, EROFS'
/// build time and UUID come from the build's identity), another epoch other bytes, also with
/// EROFS' lz4 and lz4hc (compressed on every core in any order, written in one). zstd keeps
/// the squashfs builds quick; the compressor does not change what is reproducible.
#[test]
fn source_date_epoch_gives_identical_squashfs_and_erofs_images() {
    let test = "source_date_epoch_gives_identical_squashfs_and_erofs_images";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    for (body, out) in [
        (
            "type = \"squashfs\"\ncompression = \"zstd\"\ncompression_level = 3\n",
            "r.squashfs",
        ),
        ("type = \"erofs\"\n", "r.erofs"),
        // (The manifest is named after the image: r.manifest.json.)
        ("type = \"erofs\"\ncompression = \"lz4\"\n", "r.erofs"),
        (
            "type = \"erofs\"\ncompression = \"lz4hc\"\ncompression_level = 12\n",
            "r.erofs",
        ),
    ] {
        let (a, ca, log) = build_with(&img.reference, "1700000000", "auto", body, out);
        assert!(log.contains("backend: native"), "{out}: {log}");
        let (b, cb, _) = build_with(&img.reference, "1700000000", "native", body, out);
        assert_eq!(
            a, b,
            "{body:?}: two builds with the same SOURCE_DATE_EPOCH differ"
        );
        assert_eq!(ca, cb);
        let (c, _, _) = build_with(&img.reference, "1700000001", "auto", body, out);
        assert_ne!(a, c, "{body:?}: the epoch does not reach the image");
        eprintln!("{body:?}: sha256 {a} at epoch 1700000000");
    }
}

/// The userspace backend of the read-only types (mksquashfs / mkfs.erofs over the FUSE
/// view): the build's clock reaches them too (`-mkfs-time`, and mkfs.erofs'
/// SOURCE_DATE_EPOCH; `-U` the derived UUID).
#[test]
fn source_date_epoch_gives_identical_userspace_squashfs_and_erofs_images() {
    let test = "source_date_epoch_gives_identical_userspace_squashfs_and_erofs_images";
    if !Path::new("/dev/fuse").exists() {
        support::skip_unless_setup(test, "needs FUSE (the userspace backend)");
        return;
    }
    let Some(img) = support::debian_image(test) else {
        return;
    };
    // An epoch after every mtime of the image: mkfs.erofs clamps later ones to it, which
    // fledge refuses (below).
    let (e1, e2) = ("2000000000", "2000000001");
    for (body, out, tool) in [
        (
            "type = \"squashfs\"\ncompression = \"zstd\"\ncompression_level = 3\n",
            "r.squashfs",
            "mksquashfs",
        ),
        ("type = \"erofs\"\n", "r.erofs", "mkfs.erofs"),
    ] {
        if !support::have_program(tool) {
            support::skip_unless_setup(test, &format!("{tool} not installed"));
            continue;
        }
        let (a, ca, log) = build_with(&img.reference, e1, "userspace", body, out);
        assert!(log.contains("backend: userspace"), "{out}: {log}");
        let (b, cb, _) = build_with(&img.reference, e1, "userspace", body, out);
        assert_eq!(
            a, b,
            "{out}: two builds with the same SOURCE_DATE_EPOCH differ"
        );
        assert_eq!(ca, cb);
        let (c, _, _) = build_with(&img.reference, e2, "userspace", body, out);
        assert_ne!(a, c, "{out}: the epoch does not reach the image");
    }
    // An epoch older than some of the image's files: mkfs.erofs would change their mtimes,
    // so the build stops and names them (the native writer keeps them).
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("fledge.toml"),
        format!(
            "version = \"1\"\nstrategy = \"oci_rootfs\"\n[source]\nimage = \"{}\"\n\
             [filesystem]\ntype = \"erofs\"\n",
            img.reference
        ),
    )
    .unwrap();
    let out = Command::new(fledge_bin())
        .current_dir(dir.path())
        .env("FLEDGE_CACHE_DIR", dir.path().join("cache"))
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["build", "--backend", "userspace", "-o", "r.erofs"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{test}: clamped build succeeded");
    assert!(
        stderr.contains("mtimes after SOURCE_DATE_EPOCH")
            && stderr.contains("/bin, ")
            && stderr.contains("--backend native"),
        "{test}: {stderr}"
    );
    assert!(!dir.path().join("r.erofs").exists());
}

/// The native writer needs neither root nor FUSE, so this runs everywhere.
#[test]
fn source_date_epoch_gives_identical_native_ext4_images() {
    let test = "source_date_epoch_gives_identical_native_ext4_images";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let (a, ca, log) = build(&img.reference, "1700000000", "native");
    assert!(log.contains("backend: native"), "{log}");
    let (b, cb, _) = build(&img.reference, "1700000000", "native");
    assert_eq!(
        a, b,
        "two native builds with the same SOURCE_DATE_EPOCH differ"
    );
    assert_eq!(ca, cb);
    // auto picks the native writer for ext4 and gives the same bytes.
    let (auto, _, log) = build(&img.reference, "1700000000", "auto");
    assert!(
        log.contains("backend: native"),
        "auto did not pick native:\n{log}"
    );
    assert_eq!(a, auto, "auto (native) differs from --backend native");
    let (c, _, _) = build(&img.reference, "1700000001", "native");
    assert_ne!(a, c, "the epoch does not reach the native image");
}

#[test]
fn source_date_epoch_gives_identical_userspace_ext4_images() {
    let test = "source_date_epoch_gives_identical_userspace_ext4_images";
    if !Path::new("/dev/fuse").exists() {
        support::skip(test, "needs FUSE (the userspace backend)");
        return;
    }
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let (a, ca, log) = build(&img.reference, "1700000000", "userspace");
    assert!(log.contains("backend: userspace"), "{log}");
    let (b, cb, _) = build(&img.reference, "1700000000", "userspace");
    assert_eq!(
        a, b,
        "two userspace builds with the same SOURCE_DATE_EPOCH differ"
    );
    assert_eq!(ca, cb);
    let (c, _, _) = build(&img.reference, "1700000001", "userspace");
    assert_ne!(a, c, "the epoch does not reach the userspace image");
}

/// The ext4 superblock's UUID (`s_uuid`, 16 bytes at 1024 + 0x68).
fn ext4_uuid(image: &Path) -> [u8; 16] {
    use std::os::unix::fs::FileExt;
    let mut uuid = [0u8; 16];
    fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut uuid, 1024 + 0x68)
        .unwrap();
    uuid
}

/// The build identity (UUID, hash seed, clock) is computed per build and passed down, not
/// kept in the process: builds in one process, through the library, each get their own.
/// Two epochs give two UUIDs; the same epoch again gives the first one back; a build
/// without an epoch gets a random one.
#[test]
fn builds_in_one_process_each_get_their_own_identity() {
    let test = "builds_in_one_process_each_get_their_own_identity";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_build_config(
        dir.path(),
        &img.reference,
        "type = \"ext4\"\nsize_buffer_mb = 32\n",
    );
    let ui = fledge::ui::Ui::silent();
    let build = |name: &str, epoch: Option<i64>| {
        let mut req = fledge::output::BuildRequest::new(&config);
        req.output = Some(dir.path().join(format!("{name}.img")));
        req.backend = fledge::output::BackendChoice::Native;
        req.image.cache_dir = Some(dir.path().join("cache"));
        req.source_date_epoch = epoch;
        let outcome = fledge::output::run(&req, &ui).unwrap_or_else(|e| panic!("{name}: {e}"));
        (ext4_uuid(&outcome.image), outcome.sha256)
    };
    let (a, sum_a) = build("a", Some(1_700_000_000));
    let (b, sum_b) = build("b", Some(1_800_000_000));
    let (a2, sum_a2) = build("a2", Some(1_700_000_000));
    let (r, _) = build("r", None);
    assert_ne!(a, b, "two epochs in one process gave one UUID");
    assert_ne!(sum_a, sum_b);
    assert_eq!((a, &sum_a), (a2, &sum_a2), "the same epoch again differs");
    assert!(
        r != a && r != b,
        "a build without an epoch reused a derived UUID"
    );
}

/// squashfs' block cache: after a cold build, a rebuild with one mapped file changed takes
/// nearly every block from the cache and still writes the bytes of a cold build of the
/// changed config (same `SOURCE_DATE_EPOCH`, empty cache); `--no-cache` neither reads nor
/// writes the block cache; `fledge cache prune` empties it.
#[test]
fn warm_squashfs_rebuild_reuses_blocks_and_equals_a_cold_build() {
    let test = "warm_squashfs_rebuild_reuses_blocks_and_equals_a_cold_build";
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fledge.toml");
    fs::write(
        &config,
        format!(
            "version = \"1\"\nstrategy = \"oci_rootfs\"\n[source]\nimage = \"{}\"\n\
             [filesystem]\ntype = \"squashfs\"\ncompression = \"zstd\"\ncompression_level = 3\n\
             [mappings]\n\"app.conf\" = \"/etc/app.conf\"\n",
            img.reference
        ),
    )
    .unwrap();
    let app = dir.path().join("app.conf");
    let ui = fledge::ui::Ui::silent();
    let build = |name: &str, cache: &Path, no_cache: bool| {
        let mut req = fledge::output::BuildRequest::new(&config);
        req.output = Some(dir.path().join(format!("{name}.squashfs")));
        req.image.cache_dir = Some(cache.to_path_buf());
        req.image.no_cache = no_cache;
        req.source_date_epoch = Some(1_700_000_000);
        let outcome = fledge::output::run(&req, &ui).unwrap_or_else(|e| panic!("{name}: {e}"));
        let blocks = outcome
            .report
            .blocks
            .expect("a squashfs build counts its blocks");
        eprintln!(
            "{name}: {} blocks reused, {} compressed, {:.2} s",
            blocks.reused, blocks.compressed, outcome.elapsed_seconds
        );
        (outcome.sha256, blocks)
    };
    let entries = |cache: &Path| -> usize {
        let Ok(subs) = fs::read_dir(cache.join("squashfs").join("blocks-v1")) else {
            return 0;
        };
        subs.map(|s| fs::read_dir(s.unwrap().path()).unwrap().count())
            .sum()
    };
    let warm_cache = dir.path().join("cache");
    fs::write(&app, "setting = 1\n").unwrap();
    let (_, cold) = build("cold", &warm_cache, false);
    // Only blocks that repeat within the image (in files that differ elsewhere), compressed
    // once and then found in the cache.
    assert!(cold.reused * 20 < cold.compressed, "{cold:?}");
    assert!(cold.compressed > 500, "{cold:?}");
    let kept = entries(&warm_cache);
    assert!(kept as u64 >= cold.compressed * 9 / 10, "{kept} entries");

    // The mapping changes (and grows): a few blocks compressed, the rest reused.
    fs::write(
        &app,
        "setting = 2\n# and a longer file than before\n".repeat(40),
    )
    .unwrap();
    let (warm_sha, warm) = build("warm", &warm_cache, false);
    assert!(
        warm.compressed > 0 && warm.compressed * 50 < cold.compressed,
        "{warm:?} after {cold:?}"
    );
    let (cold_sha, fresh) = build("fresh", &dir.path().join("fresh-cache"), false);
    assert!(fresh.compressed > warm.compressed * 50, "{fresh:?}");
    assert_eq!(
        warm_sha, cold_sha,
        "the warm build differs from a cold build of the same config"
    );

    // --no-cache: nothing reused, nothing added.
    fs::write(&app, "setting = 3\n").unwrap();
    let before = entries(&warm_cache);
    let (_, none) = build("none", &warm_cache, true);
    assert!(none.compressed >= fresh.compressed, "{none:?} {fresh:?}");
    assert_eq!(
        entries(&warm_cache),
        before,
        "--no-cache wrote the block cache"
    );

    let out = Command::new(fledge_bin())
        .args(["cache", "prune", "--cache-dir"])
        .arg(&warm_cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !warm_cache.join("squashfs").exists(),
        "prune left the block cache"
    );
}
