//! Hostile layers: nothing a layer says may reach the host.
//!
//! Every test builds a tiny OCI layout by hand (tests/support/layout.rs writes raw tar
//! headers, so names with `..`, absolute names and lying sizes are possible), then
//! (a) runs `fledge mount` on it and checks the view, and
//! (b) runs `fledge build` for ext4 with the kernel backend and with the native writer, for
//!     squashfs and EROFS with fledge's own writers, and as an initramfs, and checks each
//!     image (clean for the format's checker: e2fsck, unsquashfs -lls, fsck.erofs; then
//!     mounted `-o loop,ro,nodev,nosuid`; the initramfs: no archive name absolute or with
//!     `..`, then extracted with `cpio -idm` as the kernel unpacks it),
//! and for both checks the host: sentinel files and directories planted where a `..`, an
//! absolute name or a symlink would reach (a directory under /tmp and one beside the work
//! directories) keep their content, mode and mtime, and no entry appears beside them.
//! Where fledge must refuse an image, the error must name the tar entry, and the build must
//! leave nothing at the output path.
//!
//! The behaviour per case is documented in the table of `src/merge/mod.rs`.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use support::kit::{self, Layer, Mount, RawEntry as E};
use support::FledgeMount;

const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

fn fledge_bin() -> PathBuf {
    match std::env::var_os("FLEDGE_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_fledge")),
    }
}

// ---------------------------------------------------------------------------------------
// the host: sentinels and their snapshots
// ---------------------------------------------------------------------------------------

/// What is recorded of every path under a sentinel root.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    mtime: (i64, i64),
    content: Vec<u8>,
}

fn snapshot_host(root: &Path) -> BTreeMap<PathBuf, Seen> {
    fn walk(p: &Path, out: &mut BTreeMap<PathBuf, Seen>) {
        let Ok(m) = fs::symlink_metadata(p) else {
            return;
        };
        let ft = m.file_type();
        let (kind, content) = if ft.is_dir() {
            ("dir", Vec::new())
        } else if ft.is_file() {
            ("file", fs::read(p).unwrap_or_default())
        } else if ft.is_symlink() {
            (
                "symlink",
                fs::read_link(p)
                    .map(|t| t.into_os_string().into_encoded_bytes())
                    .unwrap_or_default(),
            )
        } else {
            ("other", Vec::new())
        };
        out.insert(
            p.to_path_buf(),
            Seen {
                kind,
                mode: m.mode(),
                mtime: (m.mtime(), m.mtime_nsec()),
                content,
            },
        );
        if ft.is_dir() {
            let mut names: Vec<_> = fs::read_dir(p)
                .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default();
            names.sort();
            for n in names {
                walk(&n, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, &mut out);
    out
}

/// Host files a hostile layer aims at: a directory under /tmp (reached by absolute names and
/// absolute symlinks) and one beside fledge's own work directories (reached by `../`).
struct Host {
    /// /tmp/fledge-hostile-XXXX, holding `canary` and `sub/canary`.
    tmp: tempfile::TempDir,
    /// The test's work directory: layout/, cache/, mnt/, out/, and the sentinel `outside/`.
    work: tempfile::TempDir,
    /// /etc entries that a `sysconf -> /etc` symlink would create.
    etc_probe: PathBuf,
    before: Vec<BTreeMap<PathBuf, Seen>>,
}

const OLD: i64 = 1_000_000_000;

fn plant(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    for f in [dir.join("canary"), dir.join("sub/canary")] {
        fs::write(&f, b"host canary\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(OLD as u64);
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
}

impl Host {
    fn new() -> Host {
        let tmp = tempfile::Builder::new()
            .prefix("fledge-hostile-")
            .tempdir_in("/tmp")
            .unwrap();
        plant(tmp.path());
        let work = tempfile::Builder::new()
            .prefix("fledge-hostile-work-")
            .tempdir()
            .unwrap();
        plant(&work.path().join("outside"));
        for d in ["layout", "cache", "mnt", "out", "imgmnt"] {
            fs::create_dir(work.path().join(d)).unwrap();
        }
        let etc_probe = PathBuf::from(format!(
            "/etc/{}",
            tmp.path().file_name().unwrap().to_string_lossy()
        ));
        let mut h = Host {
            tmp,
            work,
            etc_probe,
            before: Vec::new(),
        };
        h.before = h.snapshots();
        h
    }

    /// The absolute sentinel directory, as bytes for entry names.
    fn s(&self) -> Vec<u8> {
        self.tmp.path().as_os_str().as_encoded_bytes().to_vec()
    }

    /// `path` under the sentinel directory, inside the image (root-relative).
    fn in_image(&self, rest: &str) -> String {
        format!(
            "{}/{rest}",
            self.tmp.path().to_string_lossy().trim_start_matches('/')
        )
    }

    fn w(&self) -> &Path {
        self.work.path()
    }

    fn snapshots(&self) -> Vec<BTreeMap<PathBuf, Seen>> {
        // The work directory's own listing (not the fledge-owned subdirectories' contents).
        let mut top = BTreeMap::new();
        for e in fs::read_dir(self.w()).unwrap().filter_map(Result::ok) {
            top.insert(
                e.path(),
                Seen {
                    kind: "entry",
                    mode: 0,
                    mtime: (0, 0),
                    content: Vec::new(),
                },
            );
        }
        vec![
            snapshot_host(self.tmp.path()),
            snapshot_host(&self.w().join("outside")),
            top,
        ]
    }

    /// The sentinels are exactly as planted and nothing appeared beside them.
    fn assert_untouched(&self, what: &str) {
        let now = self.snapshots();
        for (b, a) in self.before.iter().zip(&now) {
            assert_eq!(b, a, "{what}: a host sentinel changed");
        }
        assert!(
            !self.etc_probe.exists(),
            "{what}: {} was created on the host",
            self.etc_probe.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// expectations on the image
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Check {
    File(String, Vec<u8>),
    Dir(String),
    Symlink(String, Vec<u8>),
    Block(String, u32, u32),
    Char(String, u32, u32),
    Absent(String),
    /// Two paths are the same inode (a hard-link group).
    SameInode(String, String),
}

fn file(p: impl Into<String>, c: &[u8]) -> Check {
    Check::File(p.into(), c.to_vec())
}

fn apply_checks(root: &Path, checks: &[Check], what: &str) {
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    for c in checks {
        match c {
            Check::File(p, content) => {
                let m = fs::symlink_metadata(at(p))
                    .unwrap_or_else(|e| panic!("{what}: /{p} missing: {e}"));
                assert!(m.is_file(), "{what}: /{p} is not a regular file");
                assert_eq!(
                    fs::read(at(p)).unwrap(),
                    *content,
                    "{what}: content of /{p}"
                );
            }
            Check::Dir(p) => assert!(
                fs::symlink_metadata(at(p)).is_ok_and(|m| m.is_dir()),
                "{what}: /{p} is not a directory"
            ),
            Check::Symlink(p, target) => {
                let t = fs::read_link(at(p))
                    .unwrap_or_else(|e| panic!("{what}: /{p} is not a symlink: {e}"));
                assert_eq!(
                    t.into_os_string().into_encoded_bytes(),
                    *target,
                    "{what}: target of /{p}"
                );
            }
            Check::Block(p, ma, mi) | Check::Char(p, ma, mi) => {
                let m = fs::symlink_metadata(at(p))
                    .unwrap_or_else(|e| panic!("{what}: /{p} missing: {e}"));
                let ok = match c {
                    Check::Block(..) => m.file_type().is_block_device(),
                    _ => m.file_type().is_char_device(),
                };
                assert!(ok, "{what}: /{p} has the wrong type: {:?}", m.file_type());
                assert_eq!(
                    (
                        nix::sys::stat::major(m.rdev()),
                        nix::sys::stat::minor(m.rdev())
                    ),
                    (u64::from(*ma), u64::from(*mi)),
                    "{what}: device number of /{p}"
                );
            }
            Check::Absent(p) => assert!(
                fs::symlink_metadata(at(p)).is_err(),
                "{what}: /{p} exists but should not"
            ),
            Check::SameInode(a, b) => {
                let (ma, mb) = (
                    fs::symlink_metadata(at(a)).unwrap(),
                    fs::symlink_metadata(at(b)).unwrap(),
                );
                assert_eq!(
                    ma.ino(),
                    mb.ino(),
                    "{what}: /{a} and /{b} are not one inode"
                );
            }
        }
    }
}

enum Expect {
    /// The image is accepted; these hold in the view and in the built image.
    Ok(Vec<Check>),
    /// The image is refused; the error contains every one of these strings.
    Refused(Vec<String>),
}

// ---------------------------------------------------------------------------------------
// running fledge
// ---------------------------------------------------------------------------------------

fn have_fuse() -> bool {
    Path::new("/dev/fuse").exists()
}

/// The (backend, filesystem type) pairs every case is built with: ext4 by the kernel
/// backend and by the native writer, the read-only types by their own writers, and the
/// initramfs (`strategy = "initramfs"`, a newc cpio) by its own.
const TARGETS: [(&str, &str); 5] = [
    ("kernel", "ext4"),
    ("native", "ext4"),
    ("native", "squashfs"),
    ("native", "erofs"),
    ("native", "initramfs"),
];

/// Whether `backend` can build here. The native writers need nothing.
fn can_build(backend: &str) -> Result<(), String> {
    if backend == "native" {
        return Ok(());
    }
    if !support::is_root() {
        return Err("the kernel backend needs root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control".into());
    }
    if !support::have_program("mkfs.ext4") {
        return Err("mkfs.ext4 not installed".into());
    }
    Ok(())
}

/// `fledge mount` the layout and check the view, or check that it fails naming the entry.
fn check_mount(host: &Host, reference: &str, expect: &Expect, test: &str) {
    if !have_fuse() {
        support::skip_unless_setup(test, "/dev/fuse not available (mount part)");
        return;
    }
    let mp = host.w().join("mnt");
    let mut cmd = Command::new(fledge_bin());
    cmd.arg("mount")
        .arg("--cache-dir")
        .arg(host.w().join("cache"))
        .arg(reference)
        .arg(&mp);
    let log = host.w().join("out").join("../mount.log");
    let mut m = FledgeMount::spawn(cmd, &mp, &log).unwrap();
    match expect {
        Expect::Ok(checks) => {
            m.wait_mounted(MOUNT_TIMEOUT)
                .unwrap_or_else(|e| panic!("{test}: {e}"));
            apply_checks(&mp, checks, &format!("{test}: fledge mount"));
            let status = m
                .stop(Signal::SIGTERM, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(status.success(), "{test}: mount exited {status}");
        }
        Expect::Refused(needles) => {
            let deadline = Instant::now() + MOUNT_TIMEOUT;
            let status = loop {
                if let Some(s) = m.try_wait().unwrap() {
                    break s;
                }
                assert!(!m.is_mounted(), "{test}: fledge mounted a refused image");
                assert!(Instant::now() < deadline, "{test}: fledge mount hangs");
                std::thread::sleep(Duration::from_millis(50));
            };
            let text = m.log_text();
            assert!(!status.success(), "{test}: mount succeeded:\n{text}");
            assert_error_names(&text, needles, test);
        }
    }
    fs::remove_file(&log).ok();
}

fn assert_error_names(text: &str, needles: &[String], test: &str) {
    assert!(
        !text.contains("panicked"),
        "{test}: fledge panicked:\n{text}"
    );
    for n in needles {
        assert!(
            text.contains(n.as_str()),
            "{test}: error does not name {n:?}:\n{text}"
        );
    }
}

/// The checker of a filesystem type, if it is installed.
fn checker(fs: &str) -> &'static str {
    match fs {
        "ext4" => "e2fsck",
        "squashfs" => "unsquashfs",
        "initramfs" => "cpio",
        _ => "fsck.erofs",
    }
}

/// An initramfs: every name in the archive is relative and has no `..` component (the
/// kernel's unpacker creates what the names say), and extracted as root (`cpio -idm`, as
/// the kernel unpacks it) it passes the case's checks.
fn check_initramfs(archive: &Path, checks: &[Check], dest: &Path, test: &str) {
    use std::io::Read as _;
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(archive).unwrap())
        .read_to_end(&mut data)
        .unwrap_or_else(|e| panic!("{test}: not a gzip stream: {e}"));
    for (name, _) in kit::newc_entries(&data) {
        let n = String::from_utf8_lossy(&name);
        assert!(
            !n.starts_with('/') && !n.split('/').any(|c| c == ".."),
            "{test}: archive entry {n:?} would reach outside the root"
        );
    }
    if !support::is_root() {
        support::skip_unless_setup(
            test,
            "extracting device nodes needs root (contents not checked)",
        );
        return;
    }
    fs::create_dir(dest).unwrap();
    kit::cpio_extract(&data, dest);
    apply_checks(dest, checks, &format!("{test}: extracted initramfs"));
    fs::remove_dir_all(dest).unwrap();
}

/// `fledge build --backend BACKEND` of type `fs` and check the image, or check that it
/// fails naming the entry and leaves nothing at the output path.
fn check_build(
    host: &Host,
    reference: &str,
    expect: &Expect,
    case: &str,
    (backend, fs): (&str, &str),
) {
    let test = &format!("{case} [{fs}, {backend} backend]");
    if let Err(why) = can_build(backend) {
        support::skip_unless_setup(test, &format!("{why} (build part)"));
        return;
    }
    // zstd keeps the squashfs builds quick; size_buffer_mb means nothing to read-only types.
    let extra = match fs {
        "ext4" => "size_buffer_mb = 8\n",
        "squashfs" => "compression = \"zstd\"\n",
        _ => "",
    };
    let out_dir = host.w().join("out");
    let config = host.w().join("fledge.toml");
    let text = if fs == "initramfs" {
        // The layers have no shell for the default /init: a mapped file is the init.
        format!(
            "version = \"1\"\nstrategy = \"initramfs\"\n[source]\nimage = \"{reference}\"\n\
             [init]\npath = \"/sbin/hostile-init\"\n[mappings]\n\"fledge.toml\" = \"/sbin/hostile-init\"\n"
        )
    } else {
        format!(
            "version = \"1\"\nstrategy = \"oci_rootfs\"\n[source]\nimage = \"{reference}\"\n\
             [filesystem]\ntype = \"{fs}\"\n{extra}"
        )
    };
    fs::write(&config, text).unwrap();
    let image_name = match fs {
        "ext4" => "hostile.img".to_string(),
        "initramfs" => "hostile.cpio.gz".to_string(),
        other => format!("hostile.{other}"),
    };
    let image = out_dir.join(&image_name);
    let out = Command::new(fledge_bin())
        .arg("build")
        .arg("-c")
        .arg(&config)
        .arg("-o")
        .arg(&image)
        .args(["--backend", backend, "--cache-dir"])
        .arg(host.w().join("cache"))
        .output()
        .unwrap();
    fs::remove_file(&config).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut left: Vec<String> = fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    match expect {
        Expect::Ok(checks) => {
            assert!(out.status.success(), "{test}: build failed:\n{text}");
            let mut want = [image_name.as_str(), "hostile.manifest.json"];
            want.sort();
            assert_eq!(
                left, want,
                "{test}: unexpected files in the output directory"
            );
            if fs == "initramfs" {
                check_initramfs(&image, checks, &host.w().join("initramfs-root"), test);
            } else if support::have_program(checker(fs)) {
                support::assert_fsck_clean(&image, fs, test);
            } else {
                support::skip_unless_setup(
                    test,
                    &format!("{} not installed (image check)", checker(fs)),
                );
            }
            if fs == "initramfs" {
                // Checked above, from the archive.
            } else if support::is_root() {
                let mp = host.w().join("imgmnt");
                let guard = Mount::image_at(&image, fs, "loop,ro,nodev,nosuid,noexec", &mp);
                apply_checks(&mp, checks, &format!("{test}: built image"));
                drop(guard);
            } else {
                support::skip_unless_setup(
                    test,
                    "loop-mounting the built image needs root (image contents not checked)",
                );
            }
            fs::remove_file(&image).unwrap();
            fs::remove_file(out_dir.join("hostile.manifest.json")).unwrap();
        }
        Expect::Refused(needles) => {
            assert!(!out.status.success(), "{test}: build succeeded:\n{text}");
            assert_error_names(&text, needles, test);
            assert!(
                left.is_empty(),
                "{test}: a refused build left {left:?} in the output directory"
            );
        }
    }
}

/// The whole protocol for one class of hostile layer.
fn run_case(test: &str, host: &Host, layers: Vec<Layer>, expect: Expect) {
    let reference = kit::write_layout(&host.w().join("layout"), &layers);
    check_mount(host, &reference, &expect, test);
    host.assert_untouched(&format!("{test}: after fledge mount"));
    for target in TARGETS {
        check_build(host, &reference, &expect, test, target);
        let (backend, fs) = target;
        host.assert_untouched(&format!(
            "{test}: after fledge build of {fs} --backend {backend}"
        ));
    }
}

fn plain(entries: &[E]) -> Layer {
    Layer::plain(kit::tar(entries))
}

fn cat(a: &[u8], b: &[u8]) -> Vec<u8> {
    [a, b].concat()
}

// ---------------------------------------------------------------------------------------
// the classes
// ---------------------------------------------------------------------------------------

/// `..` components are applied lexically and clamped at the image root.
#[test]
fn dotdot_names_stay_inside_the_root() {
    let host = Host::new();
    let s = host.s();
    let layers = vec![plain(&[
        E::file(&cat(b"../../../../../../..", &cat(&s, b"/dotdot")), b"dd\n"),
        E::file(b"../outside/canary", b"pwned 1\n"),
        E::file(b"../../../outside/canary", b"pwned 3\n"),
        E::file(b"a/b/../../../../../etc/dotdot-etc", b"etc\n"),
        E::dir(b"../../.."),
        E::file(b"./../x/./y/..//z", b"z\n"),
    ])];
    let expect = Expect::Ok(vec![
        file(host.in_image("dotdot"), b"dd\n"),
        file("outside/canary", b"pwned 3\n"),
        file("etc/dotdot-etc", b"etc\n"),
        Check::Absent("a".into()),
        file("x/z", b"z\n"),
        Check::Absent(host.in_image("canary")),
    ]);
    run_case("dotdot_names_stay_inside_the_root", &host, layers, expect);
}

/// A leading `/` is dropped: absolute names are root-relative.
#[test]
fn absolute_names_stay_inside_the_root() {
    let host = Host::new();
    let s = host.s();
    let probe = host.etc_probe.as_os_str().as_encoded_bytes().to_vec();
    let layers = vec![plain(&[
        E::file(&cat(&s, b"/abs"), b"abs\n"),
        E::file(&cat(&s, b"/canary"), b"image canary\n"),
        E::file(&probe, b"probe\n"),
        E::file(b"//double//slash", b"ds\n"),
    ])];
    let expect = Expect::Ok(vec![
        file(host.in_image("abs"), b"abs\n"),
        file(host.in_image("canary"), b"image canary\n"),
        file(host.etc_probe.to_string_lossy().into_owned(), b"probe\n"),
        file("double/slash", b"ds\n"),
    ]);
    run_case("absolute_names_stay_inside_the_root", &host, layers, expect);
}

/// A symlink among the parents is followed inside the image, whether its target is absolute
/// (a host directory, `/etc`) or relative (`../../..`), in the same layer or a lower one.
#[test]
fn writes_through_symlinked_parents_stay_inside_the_root() {
    let host = Host::new();
    let s = host.s();
    let probe_name = host.etc_probe.file_name().unwrap().as_encoded_bytes();
    let lower = plain(&[
        E::symlink(b"evil", &s),
        E::symlink(b"sysconf", b"/etc"),
        E::dir(b"d"),
        E::dir(b"d/e"),
        E::symlink(b"d/e/up", b"../../../../../.."),
        E::symlink(b"outside-link", b"../../../outside"),
    ]);
    let upper = plain(&[
        E::file(b"evil/through-abs", b"abs\n"),
        E::file(b"evil/canary", b"overwritten in the image only\n"),
        E::file(&cat(b"sysconf/", probe_name), b"probe\n"),
        E::file(&cat(b"d/e/up", &cat(&s, b"/through-rel")), b"rel\n"),
        E::file(b"outside-link/canary", b"pwned\n"),
        // Same layer: the symlink and the write through it.
        E::symlink(b"same", b"/tmp/../../../.."),
        E::file(&cat(b"same", &cat(&s, b"/same-layer")), b"same\n"),
        // A whiteout and an opaque marker through a symlinked parent remove nothing on
        // the host.
        E::file(b"evil/.wh.sub", b""),
        E::file(b"outside-link/sub/.wh..wh..opq", b""),
    ]);
    let expect = Expect::Ok(vec![
        Check::Symlink("evil".into(), s.clone()),
        Check::Symlink("sysconf".into(), b"/etc".to_vec()),
        file(host.in_image("through-abs"), b"abs\n"),
        file(host.in_image("canary"), b"overwritten in the image only\n"),
        file(
            format!("etc/{}", String::from_utf8_lossy(probe_name)),
            b"probe\n",
        ),
        file(host.in_image("through-rel"), b"rel\n"),
        file("outside/canary", b"pwned\n"),
        file(host.in_image("same-layer"), b"same\n"),
        Check::Symlink("outside-link".into(), b"../../../outside".to_vec()),
    ]);
    run_case(
        "writes_through_symlinked_parents_stay_inside_the_root",
        &host,
        vec![lower, upper],
        expect,
    );
}

/// A hard link to a path outside the root is resolved inside the image (clamped): it links
/// to the image's file of that name, never to the host's.
#[test]
fn hard_links_out_of_the_root_link_inside_the_image() {
    let host = Host::new();
    let s = host.s();
    let layers = vec![
        plain(&[
            E::file(b"etc/passwd", b"image passwd\n"),
            E::file(&cat(&s, b"/canary"), b"image canary\n"),
            E::symlink(b"lnk", &s),
        ]),
        plain(&[
            E::hardlink(b"h-dotdot", b"../../../../../etc/passwd"),
            E::hardlink(b"h-abs", &cat(&s, b"/canary")),
            E::hardlink(b"h-via-symlink", b"lnk/canary"),
        ]),
    ];
    let expect = Expect::Ok(vec![
        file("h-dotdot", b"image passwd\n"),
        Check::SameInode("h-dotdot".into(), "etc/passwd".into()),
        file("h-abs", b"image canary\n"),
        file("h-via-symlink", b"image canary\n"),
        Check::SameInode("h-via-symlink".into(), host.in_image("canary")),
    ]);
    run_case(
        "hard_links_out_of_the_root_link_inside_the_image",
        &host,
        layers,
        expect,
    );
}

/// A hard link whose target exists only on the host (reached by `..`, an absolute name or
/// through a symlink) is refused, naming the entry: the host file is never read.
#[test]
fn hard_links_to_host_files_are_refused() {
    for (i, (entry, target)) in [
        (&b"h-dotdot"[..], None),
        (b"h-abs", Some(true)),
        (b"h-via-symlink", Some(false)),
    ]
    .into_iter()
    .enumerate()
    {
        let host = Host::new();
        let s = host.s();
        let target = match target {
            None => cat(b"../../../../../../..", &cat(&s, b"/canary")),
            Some(true) => cat(&s, b"/sub/canary"),
            Some(false) => b"lnk/canary".to_vec(),
        };
        let layers = vec![plain(&[
            E::symlink(b"lnk", &s),
            E::hardlink(entry, &target),
        ])];
        let expect = Expect::Refused(vec![
            String::from_utf8_lossy(entry).into_owned(),
            "does not exist".into(),
        ]);
        run_case(
            &format!("hard_links_to_host_files_are_refused[{i}]"),
            &host,
            layers,
            expect,
        );
    }
}

/// Symlink loops among the parents of an entry are an error naming the entry; loops that
/// nothing walks through are kept as symlinks.
#[test]
fn symlink_loops_are_refused_when_walked() {
    let host = Host::new();
    let layers = vec![plain(&[
        E::symlink(b"loop1", b"loop2"),
        E::symlink(b"loop2", b"/loop1"),
        E::symlink(b"self", b"self"),
    ])];
    let kept = Expect::Ok(vec![
        Check::Symlink("loop1".into(), b"loop2".to_vec()),
        Check::Symlink("loop2".into(), b"/loop1".to_vec()),
        Check::Symlink("self".into(), b"self".to_vec()),
    ]);
    run_case("symlink_loops_kept", &host, layers, kept);

    for entry in [&b"loop1/x"[..], b"self/y/z"] {
        let host = Host::new();
        let layers = vec![
            plain(&[
                E::symlink(b"loop1", b"loop2"),
                E::symlink(b"loop2", b"/loop1"),
                E::symlink(b"self", b"self"),
            ]),
            plain(&[E::file(entry, b"x\n")]),
        ];
        let expect = Expect::Refused(vec![
            String::from_utf8_lossy(entry).into_owned(),
            "too many levels of symbolic links".into(),
        ]);
        run_case(
            "symlink_loops_are_refused_when_walked",
            &host,
            layers,
            expect,
        );
    }
}

/// Device nodes naming host disks stay nodes of the image: created with mknod, never
/// opened (the view is mounted nodev, so they cannot be opened through it either).
#[test]
fn device_nodes_stay_nodes() {
    let host = Host::new();
    let s = host.s();
    let layers = vec![plain(&[
        E::block(b"dev/sda", 8, 0),
        E::block(b"../../dev/vda", 253, 0),
        E::char(b"dev/mem", 1, 1),
        E::char(b"dev/kmsg", 1, 11),
        E::block(&cat(&s, b"/disk"), 8, 0),
        E::block(&cat(&s, b"/canary"), 8, 1),
    ])];
    let expect = Expect::Ok(vec![
        Check::Block("dev/sda".into(), 8, 0),
        Check::Block("dev/vda".into(), 253, 0),
        Check::Char("dev/mem".into(), 1, 1),
        Check::Char("dev/kmsg".into(), 1, 11),
        Check::Block(host.in_image("disk"), 8, 0),
        Check::Block(host.in_image("canary"), 8, 1),
    ]);
    run_case("device_nodes_stay_nodes", &host, layers, expect);
}

/// A header whose size runs past the end of the layer is refused, naming the entry.
#[test]
fn truncated_layers_are_refused() {
    let host = Host::new();
    let mut big = E::file(b"big-file", &[7u8; 100]);
    big.header_size = Some(1 << 20);
    let layers = vec![plain(&[E::file(b"ok", b"ok\n"), big])];
    let expect = Expect::Refused(vec!["big-file".into(), "truncated".into()]);
    run_case("truncated_layers_are_refused", &host, layers, expect);
}

/// `lost+found` is an ordinary name: a symlink there (to a host directory) ends up as a
/// symlink in the image, and nothing is written through it.
#[test]
fn lost_and_found_symlink_is_just_a_symlink() {
    let host = Host::new();
    let s = host.s();
    let layers = vec![plain(&[
        E::symlink(b"lost+found", &s),
        E::file(b"lost+found/written", b"w\n"),
    ])];
    let expect = Expect::Ok(vec![
        Check::Symlink("lost+found".into(), s.clone()),
        file(host.in_image("written"), b"w\n"),
    ]);
    run_case(
        "lost_and_found_symlink_is_just_a_symlink",
        &host,
        layers,
        expect,
    );
}

/// `lost+found` as a directory of the image (some images ship one).
#[test]
fn lost_and_found_directory_of_the_image() {
    let host = Host::new();
    let layers = vec![plain(&[
        E::dir(b"lost+found"),
        E::file(b"lost+found/kept", b"k\n"),
    ])];
    let expect = Expect::Ok(vec![
        Check::Dir("lost+found".into()),
        file("lost+found/kept", b"k\n"),
    ]);
    run_case(
        "lost_and_found_directory_of_the_image",
        &host,
        layers,
        expect,
    );
}

/// A NUL byte cannot be part of a file name; a PAX `path` holding one is refused.
#[test]
fn nul_bytes_in_names_are_refused() {
    let host = Host::new();
    let mut e = E::file(b"placeholder", b"n\n");
    e.pax.push((b"path".to_vec(), b"etc/nul\0byte".to_vec()));
    let layers = vec![plain(&[e])];
    let expect = Expect::Refused(vec!["etc/nul".into(), "NUL".into()]);
    run_case("nul_bytes_in_names_are_refused", &host, layers, expect);
}

// ---------------------------------------------------------------------------------------
// decompression bombs
// ---------------------------------------------------------------------------------------

/// A gzip layer of a few MiB that decompresses to `size` bytes (one file of zeros).
fn bomb_layer(size: u64) -> Layer {
    use sha2::{Digest, Sha256};
    let mut header_entry = E::file(b"zeros", b"");
    header_entry.header_size = Some(size);
    // The header alone (no end blocks: they follow the data).
    let head = {
        let t = kit::tar(&[header_entry]);
        t[..512].to_vec()
    };
    let mut hash = Sha256::new();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut feed = |b: &[u8]| {
        hash.update(b);
        gz.write_all(b).unwrap();
    };
    feed(&head);
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        feed(&chunk[..n]);
        left -= n as u64;
    }
    let tail = (512 - (size % 512) as usize) % 512 + 1024;
    feed(&vec![0u8; tail]);
    Layer::streamed(
        kit::TAR_GZIP,
        gz.finish().unwrap(),
        format!("sha256:{}", hex::encode(hash.finalize())),
    )
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Policy: the compressed blob's digest and size are verified as it streams; decompression
/// is bounded by the cache disk only, streamed in 1 MiB chunks (memory stays flat), and the
/// diff_id of the output is checked before the layer enters the cache. A 1 GiB layer from a
/// ~1 MiB blob is therefore accepted and served without reading it into memory.
#[test]
fn gzip_bomb_is_streamed_with_flat_memory() {
    let test = "gzip_bomb_is_streamed_with_flat_memory";
    if !have_fuse() {
        support::skip_unless_setup(test, "/dev/fuse not available");
        return;
    }
    let host = Host::new();
    const GIB: u64 = 1 << 30;
    let layer = bomb_layer(GIB);
    assert!(
        layer.blob.len() < 8 << 20,
        "bomb blob is {} bytes",
        layer.blob.len()
    );
    let reference = kit::write_layout(&host.w().join("layout"), &[layer]);
    let mp = host.w().join("mnt");
    let mut cmd = Command::new(fledge_bin());
    cmd.arg("mount")
        .arg("--cache-dir")
        .arg(host.w().join("cache"))
        .arg(&reference)
        .arg(&mp);
    let mut m = FledgeMount::spawn(cmd, &mp, &host.w().join("mount.log")).unwrap();
    m.wait_mounted(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    let meta = fs::metadata(mp.join("zeros")).unwrap();
    assert_eq!(meta.len(), GIB);
    let hwm = m.pid().and_then(vm_hwm_kib).expect("VmHWM of fledge mount");
    assert!(
        hwm < 256 * 1024,
        "{test}: fledge used {hwm} KiB of memory for a 1 GiB layer"
    );
    m.stop(Signal::SIGTERM, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    fs::remove_file(host.w().join("mount.log")).unwrap();
    host.assert_untouched(test);
}

/// When the bomb does not fit the cache disk, the error says so and names the cache file,
/// and neither the cache nor the host keeps any of it.
#[test]
fn gzip_bomb_filling_the_cache_disk_is_a_clear_error() {
    let test = "gzip_bomb_filling_the_cache_disk_is_a_clear_error";
    if !support::is_root() {
        support::skip_unless_setup(test, "needs root to mount a small tmpfs as the cache disk");
        return;
    }
    let host = Host::new();
    let layer = bomb_layer(256 << 20);
    let reference = kit::write_layout(&host.w().join("layout"), &[layer]);
    let cache = host.w().join("cache");
    let guard = Mount::tmpfs_at("fledge-hostile", "size=32m,mode=0700", &cache);
    let expect = Expect::Refused(vec![
        "No space left on device".into(),
        cache.to_string_lossy().into_owned(),
    ]);
    check_mount(&host, &reference, &expect, test);
    let leftovers: Vec<_> = walk_files(&cache);
    assert!(
        leftovers.is_empty(),
        "{test}: the cache keeps {leftovers:?} after the failure"
    );
    drop(guard);
    host.assert_untouched(test);
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
