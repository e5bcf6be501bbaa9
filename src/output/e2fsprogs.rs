//! ext4 specifics shared by both backends: offline size calibration with `resize2fs`, and the
//! timestamp fix-up that `mkfs.ext4 -d` needs.
//!
//! `mkfs.ext4 -d` (e2fsprogs 1.47.0) stores whole seconds only and drops the epoch bits, so
//! nanoseconds vanish and times after 2038 wrap to 1901-1970. After it ran, every inode whose
//! mtime has a fraction or lies outside the 32-bit range gets its `mtime_extra` field written
//! by `debugfs -w` (nanoseconds << 2 | epoch bits), which makes the result exact.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;

use super::size::{SizePlan, MIB};
use super::{BuildError, Tools};
use crate::tree::{NodeId, Tree};

/// Values from `dumpe2fs -h`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SuperInfo {
    pub block_count: u64,
    pub free_blocks: u64,
    pub reserved_blocks: u64,
    pub block_size: u64,
}

/// Blocks the kernel's ext4 holds back for itself on a filesystem of `block_count` blocks
/// (`s_resv_clusters`: 2%, at most 4096); `statvfs` does not count them as free.
pub fn kernel_reserve_blocks(block_count: u64) -> u64 {
    (block_count / 50).min(4096)
}

impl SuperInfo {
    /// Free bytes as `statvfs` will report them to an unprivileged process once mounted:
    /// ext4 holds back [`kernel_reserve_blocks`] for itself, plus the root reserve.
    pub fn user_free_bytes(&self) -> u64 {
        let resv = kernel_reserve_blocks(self.block_count);
        self.free_blocks
            .saturating_sub(resv)
            .saturating_sub(self.reserved_blocks)
            * self.block_size
    }
}

pub fn parse_dumpe2fs(text: &str) -> Option<SuperInfo> {
    let mut info = SuperInfo::default();
    let mut seen = 0;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().parse::<u64>();
        let slot = match key.trim() {
            "Block count" => &mut info.block_count,
            "Free blocks" => &mut info.free_blocks,
            "Reserved block count" => &mut info.reserved_blocks,
            "Block size" => &mut info.block_size,
            _ => continue,
        };
        *slot = value.ok()?;
        seen += 1;
    }
    (seen == 4 && info.block_size > 0).then_some(info)
}

pub fn super_info(tools: Tools, image: &Path) -> Result<SuperInfo, BuildError> {
    let out = tools.run("dumpe2fs", &["-h".to_string(), image.display().to_string()])?;
    parse_dumpe2fs(&out).ok_or_else(|| BuildError::Unexpected {
        what: format!("dumpe2fs -h {}", image.display()),
        detail: "no block counts in its output".into(),
    })
}

/// Resize the (unmounted) ext4 image until its free space is inside the accepted window.
/// Returns the final free bytes and the number of resizes.
pub fn calibrate(tools: Tools, image: &Path, plan: &SizePlan) -> Result<(u64, u32), BuildError> {
    let mut resizes = 0;
    for _ in 0..5 {
        let info = super_info(tools, image)?;
        let free = info.user_free_bytes();
        if free >= plan.buffer_bytes && free <= plan.max_free() {
            truncate_to(image, info.block_count * info.block_size)?;
            return Ok((free, resizes));
        }
        let delta = plan.target_free() as i64 - free as i64;
        let new_bytes = (info.block_count * info.block_size) as i64 + delta;
        let new_bytes = (new_bytes.max(MIB as i64) as u64).div_ceil(MIB) * MIB;
        let new_blocks = new_bytes / info.block_size;
        if new_bytes > info.block_count * info.block_size {
            truncate_to(image, new_bytes)?;
        }
        // -f: the filesystem was made moments ago by us; skip resize2fs's "fsck first" rule.
        tools.run(
            "resize2fs",
            &[
                "-f".to_string(),
                image.display().to_string(),
                new_blocks.to_string(),
            ],
        )?;
        resizes += 1;
    }
    let info = super_info(tools, image)?;
    let free = info.user_free_bytes();
    truncate_to(image, info.block_count * info.block_size)?;
    if free < plan.buffer_bytes {
        return Err(BuildError::Unexpected {
            what: format!("sizing {}", image.display()),
            detail: format!(
                "free space {} MiB stayed below the {} MiB buffer after resizing",
                free / MIB,
                plan.buffer_bytes / MIB
            ),
        });
    }
    Ok((free, resizes))
}

/// Give the (unmounted) ext4 image made with `-O ^has_journal` its default journal with
/// `tune2fs -O has_journal`, growing the image first if the copy left too little room for it
/// (the size plan counts the journal, so this is the exception).
pub fn add_journal(tools: Tools, image: &Path) -> Result<(), BuildError> {
    let info = super_info(tools, image)?;
    let size = info.block_count * info.block_size;
    let need = super::size::ext4_journal_bytes(size) + 4 * MIB;
    let free = info.free_blocks * info.block_size;
    if free < need {
        let new_bytes = (size + need - free).div_ceil(MIB) * MIB;
        truncate_to(image, new_bytes)?;
        tools.run(
            "resize2fs",
            &[
                "-f".to_string(),
                image.display().to_string(),
                (new_bytes / info.block_size).to_string(),
            ],
        )?;
    }
    tools.run(
        "tune2fs",
        &[
            "-O".to_string(),
            "has_journal".into(),
            image.display().to_string(),
        ],
    )?;
    Ok(())
}

/// Set the image file's length (growing leaves a hole, shrinking cuts).
pub(super) fn truncate_to(image: &Path, bytes: u64) -> Result<(), BuildError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|e| BuildError::Io {
            path: image.to_path_buf(),
            source: e,
        })?;
    f.set_len(bytes).map_err(|e| BuildError::Io {
        path: image.to_path_buf(),
        source: e,
    })
}

/// The `mtime_extra` value for a timestamp: nanoseconds << 2 | epoch bits.
pub fn mtime_extra(sec: i64, nsec: u32) -> u32 {
    let epoch = ((sec - i64::from(sec as i32)) >> 32) & 3;
    (nsec << 2) | epoch as u32
}

/// Whether `mkfs.ext4 -d` stores this mtime exactly by itself.
fn needs_fixup(sec: i64, nsec: u32) -> bool {
    nsec != 0 || sec != i64::from(sec as i32)
}

/// The debugfs script that repairs what `mkfs.ext4 -d` truncated, or an error listing the
/// paths that debugfs cannot address.
pub fn fixup_script(tree: &Tree) -> Result<String, BuildError> {
    let mut script = String::new();
    // mkfs makes /lost+found; the image keeps it only if it had one.
    if tree.resolve(Path::new("/lost+found")).is_none() {
        script.push_str("rmdir /lost+found\n");
    }
    let mut done: HashSet<NodeId> = HashSet::new();
    let mut unaddressable = Vec::new();
    tree.walk(|path, id| {
        let m = &tree.node(id).meta.mtime;
        // The root's mtime is always written: mkfs leaves it at the build time, and removing
        // lost+found changes it again.
        let is_root = path == b"/";
        if !is_root && (!needs_fixup(m.sec, m.nsec) || !done.insert(id)) {
            return;
        }
        match std::str::from_utf8(path) {
            Ok(p) if !p.contains(['"', '\n', '\\']) && !p.chars().any(char::is_control) => {
                if is_root {
                    let _ = writeln!(script, "sif \"/\" mtime @{}", m.sec as i32);
                }
                let _ = writeln!(
                    script,
                    "sif \"{}\" mtime_extra {:#x}",
                    p,
                    mtime_extra(m.sec, m.nsec)
                );
            }
            _ => unaddressable.push(String::from_utf8_lossy(path).escape_debug().to_string()),
        }
    });
    if unaddressable.is_empty() {
        Ok(script)
    } else {
        Err(BuildError::Unrepresentable {
            backend: "userspace ext4 (debugfs)",
            what: "sub-second or post-2038 mtimes on paths debugfs cannot name".into(),
            paths: unaddressable,
        })
    }
}

/// Apply a fix-up script with `debugfs -w -f`.
pub fn apply_fixups(
    tools: Tools,
    image: &Path,
    script: &str,
    work: &Path,
) -> Result<usize, BuildError> {
    let lines = script.lines().count();
    if lines == 0 {
        return Ok(0);
    }
    let file = work.join("debugfs.cmds");
    std::fs::write(&file, script).map_err(|e| BuildError::Io {
        path: file.clone(),
        source: e,
    })?;
    let out = tools.run(
        "debugfs",
        &[
            "-w".to_string(),
            "-f".into(),
            file.display().to_string(),
            image.display().to_string(),
        ],
    )?;
    // debugfs reports per-command failures on its output but still exits 0; its own
    // banner and the echoed commands are the only other lines.
    if let Some(bad) = out
        .lines()
        .find(|l| !l.starts_with("debugfs ") && !l.starts_with("debugfs:") && !l.trim().is_empty())
    {
        return Err(BuildError::Unexpected {
            what: format!("debugfs timestamp fix-up of {}", image.display()),
            detail: bad.trim().to_string(),
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_encoding() {
        assert_eq!(mtime_extra(0, 0), 0);
        assert_eq!(mtime_extra(1, 123_456_789), 123_456_789 << 2);
        // 2100-01-01 needs epoch 1; 1960 needs none.
        assert_eq!(mtime_extra(4_102_444_800, 0), 1);
        assert_eq!(mtime_extra(-315_619_200, 500), 500 << 2);
        assert!(needs_fixup(4_102_444_800, 0));
        assert!(!needs_fixup(-315_619_200, 0));
        assert!(needs_fixup(5, 1));
    }

    #[test]
    fn dumpe2fs_parsing() {
        let text = "Inode count:              16384\nBlock count:              65536\n\
                    Reserved block count:     0\nFree blocks:              56023\n\
                    Block size:               4096\n";
        let info = parse_dumpe2fs(text).unwrap();
        assert_eq!(info.block_count, 65536);
        assert_eq!(info.user_free_bytes(), (56023 - 1310) * 4096);
        assert!(parse_dumpe2fs("Block count: x").is_none());
    }
}
