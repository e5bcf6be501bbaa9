//! Reading `/proc/self/mountinfo`: is a path a mountpoint, and which device is mounted there;
//! which mounts are a build's own (under a work directory named [`WORK_DIR_PREFIX`]...). Shared
//! by the FUSE view, the one unmount, the runner and the kernel backend.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// How every build's private work directory next to its output starts
/// (`.fledge-build-XXXXXX`): mounts below one are a build's own.
pub const WORK_DIR_PREFIX: &str = ".fledge-build-";

/// One line of `/proc/self/mountinfo` (the fields fledge and its tests need).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub major: u32,
    pub minor: u32,
    pub mount_point: PathBuf,
    /// Per-mount options (e.g. `ro,nosuid,nodev`).
    pub mount_options: String,
    pub fstype: String,
    /// Per-superblock options (e.g. `ro,user_id=0,group_id=0,default_permissions`).
    pub super_options: String,
}

/// Parse one mountinfo line; `None` when it is malformed.
pub fn parse_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let _id = fields.next()?;
    let _parent = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let _root = fields.next()?;
    let mount_point = PathBuf::from(OsString::from_vec(unescape(fields.next()?)));
    let mount_options = fields.next()?.to_string();
    // Skip the optional fields up to the `-` separator.
    let mut fields = fields.skip_while(|f| *f != "-");
    fields.next()?;
    let fstype = fields.next()?.to_string();
    let _source = fields.next()?;
    let super_options = fields.next().unwrap_or("").to_string();
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point,
        mount_options,
        fstype,
        super_options,
    })
}

/// Undo the kernel's octal escapes (`\040` for a space, `\012` newline, `\134` backslash...).
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// All mounts of this process's mount namespace (empty when mountinfo cannot be read).
pub fn entries() -> Vec<MountEntry> {
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => text.lines().filter_map(parse_line).collect(),
        Err(e) => {
            tracing::debug!("cannot read /proc/self/mountinfo: {e}");
            Vec::new()
        }
    }
}

/// Whether something is mounted at `path` (compared as given: pass a canonical path).
pub(crate) fn is_mounted(path: &Path) -> bool {
    entries().iter().any(|e| e.mount_point == path)
}

/// The kernel device number of the fuse mount at `path` (the topmost one), which names its
/// directory in the fuse control filesystem.
pub(crate) fn fuse_connection(path: &Path) -> Option<u64> {
    entries()
        .iter()
        .rev()
        .find(|e| e.mount_point == path && e.fstype.starts_with("fuse"))
        .map(|e| (u64::from(e.major) << 20) | u64::from(e.minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_escapes() {
        type Expected<'a> = Option<(u32, u32, &'a [u8], &'a str)>;
        let cases: &[(&str, Expected)] = &[
            (
                "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue",
                Some((98, 0, b"/mnt2", "ext3")),
            ),
            (
                "100 29 0:57 / /tmp/a\\040b\\012c\\134d ro,nosuid,nodev - fuse.fledge fledge ro",
                Some((0, 57, b"/tmp/a b\nc\\d", "fuse.fledge")),
            ),
            (
                "100 29 0:57 / /x ro shared:2 master:3 - tmpfs t rw",
                Some((0, 57, b"/x", "tmpfs")),
            ),
            ("garbage", None),
            ("1 2 3 / /x ro - ", None),
        ];
        for (line, want) in cases {
            let got = parse_line(line).map(|e| {
                (
                    e.major,
                    e.minor,
                    e.mount_point.into_os_string().into_vec(),
                    e.fstype,
                )
            });
            let want = want.map(|(a, b, p, f)| (a, b, p.to_vec(), f.to_string()));
            assert_eq!(got, want, "{line}");
        }
    }

    #[test]
    fn keeps_super_options() {
        let line = "36 35 98:0 / /m rw - fuse.fledge img rw,user_id=0,default_permissions";
        let entry = parse_line(line).unwrap();
        assert_eq!(entry.super_options, "rw,user_id=0,default_permissions");
    }

    #[test]
    fn unescape_keeps_incomplete_sequences() {
        assert_eq!(unescape("a\\04"), b"a\\04");
        assert_eq!(unescape("\\999"), b"\\999");
        assert_eq!(unescape("end\\"), b"end\\");
    }

    #[test]
    fn proc_root_is_mounted() {
        assert!(is_mounted(Path::new("/")) || entries().is_empty());
    }
}
