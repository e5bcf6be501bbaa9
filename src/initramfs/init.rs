//! What the kernel runs as `/init` in an initramfs (`[init]`): fledge's default script, the
//! image's own init, or the entrypoint itself. No compiler on the host and no binary of
//! fledge's own: the default init is a POSIX shell script run by the image's `/bin/sh`, so
//! it works on every platform the image is built for.

use crate::config::InitConfig;

/// Where the kernel looks for the init of an initramfs (`rdinit=` changes it).
pub const INIT_PATH: &str = "/init";

/// The directories the default init's `PATH` holds, in order (also where a relative
/// entrypoint is looked up for `none = true`).
pub const PATH_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// What goes at `/init`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitEntry {
    /// A script (mode 0755).
    Script(String),
    /// A symlink to this path in the image.
    Link(String),
}

/// Why `/init` cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InitError {
    #[error("the image has no /bin/sh for fledge's default /init script")]
    NoShell,
    #[error(
        "the image has no /bin/sh for fledge's default /init script, no [source] busybox_url \
         is set and the host has no busybox (looked in {looked})"
    )]
    NoBusybox { looked: String },
    #[error("busybox from {from} cannot run in the initramfs: {reason}")]
    BadBusybox { from: String, reason: String },
    #[error("[init] path {path}: no such file in the image")]
    MissingInit { path: String },
    #[error("[init] none = true: the image has no Entrypoint or Cmd to run as /init")]
    NoEntrypoint,
    #[error("[init] none = true: the entrypoint has arguments ({argv:?}), which the kernel does not pass to /init")]
    EntrypointArgs { argv: Vec<String> },
    #[error("[init] none = true: the entrypoint program {program} is not in the image (looked in {looked})")]
    MissingEntrypoint { program: String, looked: String },
}

impl InitError {
    pub fn hint(&self) -> &'static str {
        match self {
            InitError::NoShell => {
                "name the image's own init with [init] path = \"...\", or make the entrypoint \
                 PID 1 with [init] none = true"
            }
            InitError::NoBusybox { .. } => {
                "set [source] busybox_url and busybox_sha256 (a static busybox for the \
                 image's architecture), install busybox-static on the host, or name the \
                 image's own init with [init] path = \"...\""
            }
            InitError::BadBusybox { .. } => {
                "the initramfs needs a static busybox built for the image's architecture: \
                 set [source] busybox_url and busybox_sha256 to one, or name the image's own \
                 init with [init] path = \"...\""
            }
            InitError::MissingInit { .. } => "name a file the image has (an absolute path)",
            InitError::NoEntrypoint | InitError::MissingEntrypoint { .. } => {
                "drop [init] for fledge's default init, or name one with [init] path"
            }
            InitError::EntrypointArgs { .. } => {
                "drop [init] (the default init runs the entrypoint with its arguments), or \
                 point [init] path at a program that needs none"
            }
        }
    }
}

/// The image as far as `/init` is concerned: what exists, and its runtime configuration.
pub struct Image<'a> {
    pub exists: &'a dyn Fn(&str) -> bool,
    /// Entrypoint followed by Cmd.
    pub argv: Vec<String>,
    /// `K=V` entries.
    pub env: Vec<String>,
    pub workdir: Option<String>,
}

/// Decide `/init` for `mode`.
pub fn plan(mode: &InitConfig, img: &Image<'_>) -> Result<InitEntry, InitError> {
    match mode {
        InitConfig::Path(p) => {
            if (img.exists)(p) {
                Ok(InitEntry::Link(p.clone()))
            } else {
                Err(InitError::MissingInit { path: p.clone() })
            }
        }
        InitConfig::None => {
            let Some(program) = img.argv.first() else {
                return Err(InitError::NoEntrypoint);
            };
            if img.argv.len() > 1 {
                return Err(InitError::EntrypointArgs {
                    argv: img.argv.clone(),
                });
            }
            if program.starts_with('/') {
                return if (img.exists)(program) {
                    Ok(InitEntry::Link(program.clone()))
                } else {
                    Err(InitError::MissingEntrypoint {
                        program: program.clone(),
                        looked: program.clone(),
                    })
                };
            }
            PATH_DIRS
                .iter()
                .map(|d| format!("{d}/{program}"))
                .find(|p| (img.exists)(p))
                .map(InitEntry::Link)
                .ok_or_else(|| InitError::MissingEntrypoint {
                    program: program.clone(),
                    looked: PATH_DIRS.join(":"),
                })
        }
        InitConfig::Default => {
            if !(img.exists)("/bin/sh") {
                return Err(InitError::NoShell);
            }
            if img.argv.is_empty() {
                return Err(InitError::NoEntrypoint);
            }
            Ok(InitEntry::Script(default_script(img)))
        }
    }
}

/// `'text'` for sh: single quotes, each `'` as `'\''`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// fledge's default `/init`: the pseudo filesystems, then the kestrel agent when the image
/// has one (it reads the workload from /etc/fsify-entrypoint, as on a disk root), else the
/// image's own Entrypoint+Cmd with its environment and working directory, as PID 1.
pub fn default_script(img: &Image<'_>) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # fledge's initramfs /init (strategy = \"initramfs\", no [init]): mounts the pseudo\n\
         # filesystems, then runs the kestrel agent (/bin/kestrel) when the image has one, else\n\
         # the image's Entrypoint+Cmd, as PID 1. The root is the kernel's rootfs (RAM).\n",
    );
    s.push_str(&format!("PATH={}\nexport PATH\n", PATH_DIRS.join(":")));
    s.push_str(
        "m() { mkdir -p \"$3\" 2>/dev/null; mount -t \"$1\" -o \"$2\" \"$1\" \"$3\" 2>/dev/null \\\n\
         \x20   || echo \"fledge /init: cannot mount $1 on $3\" >&2; }\n\
         m proc nosuid,nodev,noexec /proc\n\
         m sysfs nosuid,nodev,noexec /sys\n\
         m devtmpfs nosuid,mode=0755 /dev\n\
         m devpts nosuid,noexec,gid=5,mode=0620 /dev/pts\n\
         mkdir -p /dev/shm\n\
         m tmpfs nosuid,nodev,mode=0755 /run\n\
         if [ -x /bin/kestrel ]; then\n\
         \x20   exec /bin/kestrel \"$@\"\n\
         fi\n",
    );
    for kv in &img.env {
        if let Some((k, v)) = kv.split_once('=') {
            // Names the shell can export (anything else an OCI config may carry is skipped).
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if ok {
                s.push_str(&format!("export {k}={}\n", quote(v)));
            }
        }
    }
    let dir = img
        .workdir
        .as_deref()
        .filter(|d| !d.is_empty())
        .unwrap_or("/");
    s.push_str(&format!("cd {} 2>/dev/null || cd /\n", quote(dir)));
    let argv: Vec<String> = img.argv.iter().map(|a| quote(a)).collect();
    s.push_str(&format!("exec {}\n", argv.join(" ")));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image<'a>(exists: &'a dyn Fn(&str) -> bool, argv: &[&str]) -> Image<'a> {
        Image {
            exists,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![
                "PATH=/x:/y".into(),
                "A_B=it's".into(),
                "1X=no".into(),
                "NOEQ".into(),
            ],
            workdir: Some("/srv".into()),
        }
    }

    #[test]
    fn each_mode_and_its_errors() {
        let has = |p: &str| matches!(p, "/bin/sh" | "/sbin/tini" | "/usr/bin/app");
        let none = |_: &str| false;
        // Default: a script ending in the entrypoint, quoted.
        let InitEntry::Script(s) = plan(
            &InitConfig::Default,
            &image(&has, &["/e.sh", "a b", "it's"]),
        )
        .unwrap() else {
            panic!("a script")
        };
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("exec /bin/kestrel \"$@\"\n"));
        assert!(
            s.ends_with("cd '/srv' 2>/dev/null || cd /\nexec '/e.sh' 'a b' 'it'\\''s'\n"),
            "{s}"
        );
        assert!(s.contains("export A_B='it'\\''s'\n") && s.contains("export PATH='/x:/y'\n"));
        assert!(!s.contains("1X") && !s.contains("NOEQ"));
        assert_eq!(
            plan(&InitConfig::Default, &image(&none, &["/e"])),
            Err(InitError::NoShell)
        );
        assert_eq!(
            plan(&InitConfig::Default, &image(&has, &[])),
            Err(InitError::NoEntrypoint)
        );
        // Path: a link to the image's init, which must exist.
        assert_eq!(
            plan(&InitConfig::Path("/sbin/tini".into()), &image(&none, &[])),
            Err(InitError::MissingInit {
                path: "/sbin/tini".into()
            })
        );
        assert_eq!(
            plan(&InitConfig::Path("/sbin/tini".into()), &image(&has, &[])),
            Ok(InitEntry::Link("/sbin/tini".into()))
        );
        // None: the entrypoint itself, found in PATH when relative, without arguments.
        assert_eq!(
            plan(&InitConfig::None, &image(&has, &["app"])),
            Ok(InitEntry::Link("/usr/bin/app".into()))
        );
        assert_eq!(
            plan(&InitConfig::None, &image(&has, &["/usr/bin/app"])),
            Ok(InitEntry::Link("/usr/bin/app".into()))
        );
        assert!(matches!(
            plan(&InitConfig::None, &image(&has, &["/usr/bin/app", "-x"])),
            Err(InitError::EntrypointArgs { .. })
        ));
        assert!(matches!(
            plan(&InitConfig::None, &image(&has, &["gone"])),
            Err(InitError::MissingEntrypoint { .. })
        ));
        assert_eq!(
            plan(&InitConfig::None, &image(&has, &[])),
            Err(InitError::NoEntrypoint)
        );
    }

    #[test]
    fn the_default_script_runs_in_a_posix_shell() {
        // `sh -n`: dash (Debian's /bin/sh) parses it.
        let has = |p: &str| p == "/bin/sh";
        let InitEntry::Script(s) = plan(&InitConfig::Default, &image(&has, &["/e", "x"])).unwrap()
        else {
            panic!()
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("init");
        std::fs::write(&p, &s).unwrap();
        crate::treetest::run(std::process::Command::new("sh").arg("-n").arg(&p));
    }
}
