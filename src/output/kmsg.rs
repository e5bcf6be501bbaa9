//! The kernel's own reason for a refusal. mount(2) answers with one errno for many causes
//! (`EINVAL` for a duplicate UUID, a bad superblock or an unknown option alike); the kernel
//! logs which one, naming the device. [`KernelLog`] reads what was logged about a device from
//! `/dev/kmsg` between [`KernelLog::watch`] and the failure, so the error can say it.
//!
//! Reading the kernel log needs root or CAP_SYSLOG where `kernel.dmesg_restrict` is set;
//! without it there is nothing to add and the error carries the errno alone.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

/// At most this many log lines are kept for one error.
const MAX_LINES: usize = 8;

/// `/dev/kmsg`, positioned after the last record at the time of [`KernelLog::watch`].
pub struct KernelLog {
    kmsg: Option<File>,
}

impl KernelLog {
    /// Start watching: the records logged from now on can be read with [`KernelLog::about`].
    pub fn watch() -> KernelLog {
        let opened = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .and_then(|mut f| f.seek(SeekFrom::End(0)).map(|_| f));
        match opened {
            Ok(f) => KernelLog { kmsg: Some(f) },
            Err(e) => {
                tracing::debug!("not reading the kernel log (/dev/kmsg: {e})");
                KernelLog { kmsg: None }
            }
        }
    }

    /// The messages logged since [`KernelLog::watch`] that name `device` (`loop3`): those of
    /// warning level or worse if there are any, else all of them; at most [`MAX_LINES`].
    /// Other builds' devices are left out, so concurrent builds do not mix their reasons.
    pub fn about(&mut self, device: &str) -> Vec<String> {
        let Some(kmsg) = self.kmsg.as_mut() else {
            return Vec::new();
        };
        let mut records = Vec::new();
        // One read returns one record; a record is at most about 8 KiB (text and dictionary).
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match kmsg.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(r) = parse_record(&buf[..n]) {
                        if names_device(&r.text, device) {
                            records.push(r);
                        }
                    }
                }
                // Records were overwritten before we read them: the next read goes on with
                // the oldest one left.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EAGAIN: nothing more was logged.
                Err(_) => break,
            }
        }
        select(records)
    }
}

/// One `/dev/kmsg` record: `PRIORITY,SEQUENCE,TIMESTAMP,FLAGS;TEXT` then dictionary lines.
#[derive(Debug, PartialEq, Eq)]
struct Record {
    /// Syslog level: 0 (emergency) to 7 (debug); 4 is warning.
    level: u8,
    text: String,
}

fn parse_record(raw: &[u8]) -> Option<Record> {
    let raw = String::from_utf8_lossy(raw);
    let (prefix, rest) = raw.split_once(';')?;
    let priority: u32 = prefix.split(',').next()?.trim().parse().ok()?;
    let text = rest.lines().next().unwrap_or("").trim_end().to_string();
    Some(Record {
        level: (priority & 7) as u8,
        text,
    })
}

/// Whether `text` names `device` as a word of its own (`loop1` in `XFS (loop1):` or
/// `/dev/loop1`, but not in `loop10`).
fn names_device(text: &str, device: &str) -> bool {
    if device.is_empty() {
        return false;
    }
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    text.match_indices(device).any(|(at, _)| {
        !word(text[..at].chars().next_back()) && !word(text[at + device.len()..].chars().next())
    })
}

/// Warnings and errors if there are any (the kernel's reason), else everything (notices such
/// as `Mounting V5 Filesystem` only set the scene).
fn select(records: Vec<Record>) -> Vec<String> {
    const WARNING: u8 = 4;
    let serious = records.iter().any(|r| r.level <= WARNING);
    records
        .into_iter()
        .filter(|r| !serious || r.level <= WARNING)
        .map(|r| r.text)
        .take(MAX_LINES)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records() {
        assert_eq!(
            parse_record(
                b"4,1234,5678901,-;XFS (loop1): Filesystem has duplicate UUID 0c14 - can't mount\n"
            ),
            Some(Record {
                level: 4,
                text: "XFS (loop1): Filesystem has duplicate UUID 0c14 - can't mount".into()
            })
        );
        // Facility bits above the level; dictionary lines after the text.
        assert_eq!(
            parse_record(b"11,7,99,-;EXT4-fs (loop2): VFS: Can't find ext4 filesystem\n SUBSYSTEM=block\n DEVICE=b7:2\n"),
            Some(Record {
                level: 3,
                text: "EXT4-fs (loop2): VFS: Can't find ext4 filesystem".into()
            })
        );
        assert_eq!(parse_record(b"no separator"), None);
        assert_eq!(parse_record(b"x,1,2,-;text"), None);
    }

    #[test]
    fn device_names() {
        assert!(names_device("XFS (loop1): Invalid superblock", "loop1"));
        assert!(names_device(
            "BTRFS: device fsid 1 devid 1 transid 9 /dev/loop1 (7:1) scanned by mount",
            "loop1"
        ));
        assert!(names_device(
            "BTRFS error (device loop1): open_ctree failed",
            "loop1"
        ));
        assert!(names_device("loop1: detected capacity change", "loop1"));
        assert!(!names_device("XFS (loop10): Invalid superblock", "loop1"));
        assert!(!names_device("XFS (loop1p2): Invalid superblock", "loop1"));
        assert!(!names_device("XFS (xloop1): Invalid superblock", "loop1"));
        assert!(!names_device("anything", ""));
        // A later mention counts even when an earlier one is part of another name.
        assert!(names_device("loop12 and loop1 too", "loop1"));
    }

    #[test]
    fn warnings_win_over_notices() {
        let r = |level, text: &str| Record {
            level,
            text: text.into(),
        };
        assert_eq!(
            select(vec![
                r(5, "XFS (loop1): Mounting V5 Filesystem"),
                r(
                    4,
                    "XFS (loop1): Filesystem has duplicate UUID - can't mount"
                ),
            ]),
            vec!["XFS (loop1): Filesystem has duplicate UUID - can't mount"]
        );
        assert_eq!(
            select(vec![r(6, "loop1: detected capacity change")]),
            vec!["loop1: detected capacity change"]
        );
        let many: Vec<Record> = (0..20).map(|i| r(3, &format!("e{i}"))).collect();
        assert_eq!(select(many).len(), MAX_LINES);
    }

    /// Root only: a record written to /dev/kmsg after `watch` is found, one written before
    /// is not, and one about another device is left out.
    #[test]
    fn reads_what_was_logged_after_watch() {
        use std::io::Write;
        let test = "reads_what_was_logged_after_watch";
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: {test}: needs root (writes to /dev/kmsg)");
            return;
        }
        let tag = format!("fledgetest{}", std::process::id());
        let write = |line: &str| {
            let mut f = File::options().write(true).open("/dev/kmsg").unwrap();
            f.write_all(line.as_bytes()).unwrap();
        };
        write(&format!("<4>fledge: {tag} before watch\n"));
        let mut log = KernelLog::watch();
        write(&format!("<4>fledge: {tag} after watch\n"));
        write(&format!("<4>fledge: {tag}x other device\n"));
        assert_eq!(log.about(&tag), vec![format!("fledge: {tag} after watch")]);
        // Read once: a second call finds nothing new.
        assert!(log.about(&tag).is_empty());
    }
}
