//! `fledge doctor`: its verdicts as root, as an unprivileged user, and as an unprivileged user
//! without FUSE; its JSON schema and exit codes; and agreement with `fledge build -v`. The
//! native writers (ext4, squashfs, erofs; no requirements) must be listed and chosen for those
//! types everywhere.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

fn fledge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fledge"))
}

fn doctor_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json is not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn check(report: &serde_json::Value, id: &str) -> String {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id}"))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

fn chosen(report: &serde_json::Value, fs: &str) -> Option<String> {
    report["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fs"] == fs)
        .unwrap()["chosen"]
        .as_str()
        .map(str::to_string)
}

fn backend<'a>(report: &'a serde_json::Value, fs: &str, name: &str) -> &'a serde_json::Value {
    report["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fs"] == fs)
        .unwrap()["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"] == name)
        .unwrap_or_else(|| panic!("{fs}: no backend {name}"))
}

/// The stable parts of the schema, documented in the README.
fn assert_schema(r: &serde_json::Value) {
    assert_eq!(r["schema"], "fledge-doctor/1");
    for c in r["checks"].as_array().unwrap() {
        assert!(c["id"].is_string() && c["detail"].is_string(), "{c}");
        assert!(["ok", "warn", "fail"].contains(&c["status"].as_str().unwrap()));
        if c["status"] == "fail" {
            assert!(c["hint"].is_string(), "failing check without a hint: {c}");
        }
    }
    let fss: Vec<&str> = r["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["fs"].as_str().unwrap())
        .collect();
    assert_eq!(
        fss,
        ["ext4", "xfs", "btrfs", "squashfs", "erofs", "initramfs"]
    );
    for f in r["filesystems"].as_array().unwrap() {
        let names: Vec<&str> = f["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["backend"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["native", "kernel", "userspace"], "{f}");
        for b in f["backends"].as_array().unwrap() {
            assert!(b["available"].is_boolean() && b["detail"].is_string());
        }
    }
    // The native writers build ext4, squashfs and erofs anywhere (no root, FUSE, loop device
    // or mkfs) and nothing else; the read-only types have no kernel backend, and their
    // userspace backend (mksquashfs / mkfs.erofs over FUSE) is never what auto picks.
    for fs in ["ext4", "xfs", "btrfs", "squashfs", "erofs", "initramfs"] {
        let native = backend(r, fs, "native");
        let by_native = ["ext4", "squashfs", "erofs", "initramfs"].contains(&fs);
        assert_eq!(native["available"], by_native, "{fs}: {native}");
        if by_native {
            assert_eq!(native["detail"], "ready", "{native}");
            assert_eq!(chosen(r, fs).as_deref(), Some("native"), "{r}");
        } else {
            assert!(
                native["detail"]
                    .as_str()
                    .unwrap()
                    .contains("ext4, squashfs, erofs and the initramfs only"),
                "{fs}: {native}"
            );
        }
        if fs == "initramfs" {
            for other in ["kernel", "userspace"] {
                let b = backend(r, fs, other);
                assert_eq!(b["available"], false, "{fs}: {b}");
                assert!(
                    b["detail"].as_str().unwrap().contains("cpio archive"),
                    "{fs}: {b}"
                );
            }
        }
        if fs == "squashfs" || fs == "erofs" {
            let b = backend(r, fs, "kernel");
            assert_eq!(b["available"], false, "{fs}: {b}");
            assert!(
                b["detail"]
                    .as_str()
                    .unwrap()
                    .contains("not made by mounting a filesystem"),
                "{fs}: {b}"
            );
            let b = backend(r, fs, "userspace");
            let tool = if fs == "squashfs" {
                "tools.mksquashfs"
            } else {
                "tools.mkfs_erofs"
            };
            assert!(
                b["available"] == true
                    || b["detail"].as_str().unwrap().contains("fuse")
                    || b["detail"].as_str().unwrap().contains(tool),
                "{fs}: {b}"
            );
        }
    }
    assert!(["all", "some", "none"].contains(&r["verdict"].as_str().unwrap()));
    assert!(r["elapsed_ms"].is_u64());
}

/// As root: native for ext4 (auto prefers it everywhere), kernel for xfs and btrfs; every
/// backend is available where it can build the type.
#[test]
fn doctor_as_root_agrees_with_build() {
    let test = "doctor_as_root_agrees_with_build";
    if !support::is_root() {
        support::skip(test, "needs root");
        return;
    }
    let out = Command::new(fledge_bin())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let r = doctor_json(&out);
    assert_schema(&r);
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["verdict"], "all");
    assert_eq!(check(&r, "kernel.loop_attach"), "ok");
    assert_eq!(check(&r, "fuse.mount"), "ok");
    assert_eq!(chosen(&r, "ext4").as_deref(), Some("native"));
    for fs in ["xfs", "btrfs"] {
        assert_eq!(chosen(&r, fs).as_deref(), Some("kernel"), "{fs}");
    }
    for fs in ["ext4", "xfs", "btrfs"] {
        for b in ["kernel", "userspace"] {
            assert_eq!(backend(&r, fs, b)["available"], true, "{fs} {b}: {r}");
        }
    }
    eprintln!("doctor (root) took {} ms", r["elapsed_ms"]);

    // The table form carries the same verdict and choices.
    let table = Command::new(fledge_bin()).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("verdict: all"), "{text}");
    assert_eq!(
        table_row(&text, "ext4"),
        ["ext4", "yes", "yes", "yes", "native"],
        "{text}"
    );
    for fs in ["xfs", "btrfs"] {
        assert_eq!(
            table_row(&text, fs),
            [fs, "no", "yes", "yes", "kernel"],
            "{text}"
        );
    }
    // The userspace column: mksquashfs / mkfs.erofs over FUSE (installed by
    // scripts/install-deps.sh). The initramfs has fledge's own writer only.
    assert_eq!(
        table_row(&text, "initramfs"),
        ["initramfs", "yes", "no", "no", "native"],
        "{text}"
    );
    for (fs, tool) in [("squashfs", "mksquashfs"), ("erofs", "mkfs.erofs")] {
        let user = if support::have_program(tool) {
            "yes"
        } else {
            "no"
        };
        assert_eq!(
            table_row(&text, fs),
            [fs, "yes", "no", user, "native"],
            "{text}"
        );
    }

    // build -v reports the backend doctor predicted.
    let Some(img) = support::debian_image(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fledge.toml"),
        format!(
            "version = \"1\"\nstrategy = \"oci_rootfs\"\n[source]\nimage = \"{}\"\n[filesystem]\ntype = \"ext4\"\nsize_buffer_mb = 10\n",
            img.reference
        ),
    )
    .unwrap();
    let out = Command::new(fledge_bin())
        .current_dir(dir.path())
        .env("FLEDGE_CACHE_DIR", dir.path().join("cache"))
        .args(["build", "-v"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let predicted = chosen(&r, "ext4").unwrap();
    assert!(
        stderr.contains(&format!("backend: {predicted} ")),
        "doctor predicted {predicted}, build said:\n{stderr}"
    );
}

/// The words of the table row of `fs` (FILESYSTEM NATIVE KERNEL USERSPACE BUILD-WILL-USE).
fn table_row<'a>(text: &'a str, fs: &str) -> Vec<&'a str> {
    let header = text
        .lines()
        .position(|l| l.starts_with("FILESYSTEM "))
        .unwrap_or_else(|| panic!("no backend table:\n{text}"));
    assert_eq!(
        text.lines()
            .nth(header)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        [
            "FILESYSTEM",
            "NATIVE",
            "KERNEL",
            "USERSPACE",
            "BUILD",
            "WILL",
            "USE"
        ],
        "{text}"
    );
    text.lines()
        .skip(header + 1)
        .find(|l| l.split_whitespace().next() == Some(fs))
        .unwrap_or_else(|| panic!("no table row for {fs}:\n{text}"))
        .split_whitespace()
        .collect()
}

/// Run doctor --json as the test user, optionally with /dev/fuse hidden from it (a private
/// mount namespace binds a root-only file over /dev/fuse).
fn doctor_as_user(hide_fuse: bool) -> Option<(Output, serde_json::Value)> {
    let test = if hide_fuse {
        "doctor_unprivileged_without_fuse"
    } else {
        "doctor_unprivileged"
    };
    if !support::is_root() {
        support::skip(test, "needs root to run as the test user");
        return None;
    }
    if let Err(reason) = support::unprivileged_preconditions() {
        if support::setup_wanted() {
            panic!("{test}: {reason}");
        }
        support::skip(test, &reason);
        return None;
    }
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("fledge");
    std::fs::copy(fledge_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut script = String::new();
    if hide_fuse {
        let blocker = bin_dir.path().join("no-fuse");
        std::fs::write(&blocker, b"").unwrap();
        std::fs::set_permissions(&blocker, std::fs::Permissions::from_mode(0o600)).unwrap();
        script.push_str(&format!("mount --bind {} /dev/fuse && ", blocker.display()));
    }
    script.push_str(&format!(
        "exec runuser -u {} -- env HOME=/tmp {} doctor --json",
        support::TEST_USER,
        bin.display()
    ));
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let r = doctor_json(&out);
    assert_schema(&r);
    Some((out, r))
}

#[test]
fn doctor_unprivileged() {
    let Some((out, r)) = doctor_as_user(false) else {
        return;
    };
    assert_eq!(check(&r, "privileges.euid"), "warn");
    assert_eq!(check(&r, "kernel.loop_attach"), "fail");
    assert_eq!(check(&r, "fuse.mount"), "ok");
    // ext4: the native writer needs no privileges; the userspace backend is there too.
    assert_eq!(chosen(&r, "ext4").as_deref(), Some("native"));
    assert_eq!(backend(&r, "ext4", "userspace")["available"], true, "{r}");
    assert_eq!(backend(&r, "ext4", "kernel")["available"], false, "{r}");
    assert_eq!(chosen(&r, "btrfs").as_deref(), Some("userspace"));
    // xfs has no faithful rootless backend: some types can be built -> exit 2.
    assert_eq!(chosen(&r, "xfs"), None);
    assert_eq!(r["verdict"], "some");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn doctor_unprivileged_without_fuse() {
    let Some((out, r)) = doctor_as_user(true) else {
        return;
    };
    assert_eq!(check(&r, "fuse.dev"), "fail");
    // Without root or FUSE only the native writer is left: ext4 can still be built, xfs and
    // btrfs cannot -> some types can be built, exit 2.
    assert_eq!(chosen(&r, "ext4").as_deref(), Some("native"));
    for fs in ["ext4", "xfs", "btrfs"] {
        for b in ["kernel", "userspace"] {
            assert_eq!(backend(&r, fs, b)["available"], false, "{fs} {b}: {r}");
        }
    }
    for fs in ["xfs", "btrfs"] {
        assert_eq!(chosen(&r, fs), None, "{fs}");
    }
    assert_eq!(r["verdict"], "some");
    assert_eq!(out.status.code(), Some(2));
    let hints: Vec<&str> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .filter_map(|c| c["hint"].as_str())
        .collect();
    assert!(
        hints.iter().any(|h| h.contains("/dev/fuse")),
        "no hint says how to fix FUSE: {hints:?}"
    );
}

/// `--online` asks `GET /v2/` of the configured registries; a registry answering 401 is
/// reachable, a closed port is a warning with a hint. Without `--online` no registry is tried.
#[test]
fn doctor_online_tries_configured_registries() {
    use support::servers::{canned_http, http_response, ClosedPort};
    let port = canned_http(http_response(
        "401 Unauthorized",
        &[("Www-Authenticate", "Basic realm=\"r\"")],
        b"",
    ))
    .port();
    // Held until the test ends: no other server can be given this port meanwhile.
    let closed_port = ClosedPort::new();
    let closed = closed_port.port();
    let registries = format!("127.0.0.1:{port},127.0.0.1:{closed}");
    let dir = tempfile::tempdir().unwrap();
    let run = |online: bool| {
        let mut cmd = Command::new(fledge_bin());
        cmd.current_dir(dir.path())
            .env("FLEDGE_ONLINE_REGISTRIES", &registries)
            .env("HOME", dir.path())
            .args(["doctor", "--json"]);
        if online {
            cmd.arg("--online");
        }
        doctor_json(&cmd.output().unwrap())
    };
    let offline = run(false);
    assert!(
        !offline["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"].as_str().unwrap().starts_with("online.")),
        "doctor went online without --online"
    );
    let r = run(true);
    let online: Vec<&serde_json::Value> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"] == "online.registry")
        .collect();
    assert_eq!(online.len(), 2, "{online:?}");
    let ok = online
        .iter()
        .find(|c| c["detail"].as_str().unwrap().contains(&format!(":{port}")))
        .unwrap();
    assert_eq!(ok["status"], "ok", "{ok}");
    assert!(ok["detail"].as_str().unwrap().contains("401"));
    let down = online
        .iter()
        .find(|c| {
            c["detail"]
                .as_str()
                .unwrap()
                .contains(&format!(":{closed}"))
        })
        .unwrap();
    assert_eq!(down["status"], "warn", "{down}");
    assert!(down["hint"].is_string());
}
