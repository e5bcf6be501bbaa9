//! The shell of an initramfs whose image has no `/bin/sh`: fledge's default `/init` is a
//! POSIX shell script, so a static busybox is installed as `/bin/busybox` with `/bin/sh`
//! and the applets the script calls linked to it. It comes from `[source] busybox_url` +
//! `busybox_sha256` (downloaded and verified by [`crate::agent::fetch_verified`]), else
//! from the host (Debian's `busybox-static` at `/bin/busybox`), and must be a static ELF
//! executable for the image's architecture: the initramfs has no dynamic loader to run it.
//!
//! The ELF header is read by hand: three fields (class, byte order, `e_machine`) and the
//! program header types, which no crate of fledge's dependency tree reads; a general ELF
//! crate for that would be the larger part.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::init::InitError;

/// Where the busybox goes in the initramfs.
pub const DEST: &str = "/bin/busybox";
/// Mode of the installed binary.
pub const MODE: u32 = 0o755;
/// The applets fledge's default `/init` runs (`echo`, `[`, `cd`, `export`, `exec` are
/// builtins of busybox's sh); each becomes `/bin/<name>` -> `busybox` where the image has
/// no such file.
pub const APPLETS: [&str; 3] = ["sh", "mkdir", "mount"];
/// Where a host busybox is looked for, in order.
pub const HOST_PATHS: [&str; 2] = ["/bin/busybox", "/usr/bin/busybox"];

/// The first host busybox of [`HOST_PATHS`] that is a file.
pub fn host() -> Option<PathBuf> {
    HOST_PATHS.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The ELF `e_machine` of an OCI architecture (`amd64`, `arm64`, ...).
pub fn elf_machine(arch: &str) -> Option<u16> {
    Some(match arch {
        "amd64" => 62,
        "386" => 3,
        "arm64" => 183,
        "arm" => 40,
        "riscv64" => 243,
        "ppc64le" | "ppc64" => 21,
        "s390x" => 22,
        "loong64" => 258,
        "mips64le" | "mips64" | "mipsle" | "mips" => 8,
        _ => return None,
    })
}

/// Program header type of the dynamic loader's path.
const PT_INTERP: u32 = 3;

/// Why `bytes` (the start of a file: its ELF header and program headers) is not a static
/// executable for `machine`.
pub fn static_elf_problem(bytes: &[u8], machine: u16) -> Option<String> {
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Some("not an ELF file".into());
    }
    let wide = match bytes.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Some("not a 32- or 64-bit ELF file".into()),
    };
    let little = match bytes.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Some("an ELF file of unknown byte order".into()),
    };
    let u16_at = |o: usize| {
        bytes.get(o..o + 2).map(|b| [b[0], b[1]]).map(|b| {
            if little {
                u16::from_le_bytes(b)
            } else {
                u16::from_be_bytes(b)
            }
        })
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| [b[0], b[1], b[2], b[3]])
            .map(|b| {
                if little {
                    u32::from_le_bytes(b)
                } else {
                    u32::from_be_bytes(b)
                }
            })
    };
    let u64_at = |o: usize| {
        bytes.get(o..o + 8).map(|b| {
            let a: [u8; 8] = b.try_into().expect("8 bytes");
            if little {
                u64::from_le_bytes(a)
            } else {
                u64::from_be_bytes(a)
            }
        })
    };
    let short = || Some("a truncated ELF header".to_string());
    let Some(found) = u16_at(18) else {
        return short();
    };
    if found != machine {
        return Some(format!(
            "built for ELF machine {found}, the image needs {machine}"
        ));
    }
    let (phoff, phentsize, phnum) = if wide {
        (u64_at(32), u16_at(54), u16_at(56))
    } else {
        (u32_at(28).map(u64::from), u16_at(42), u16_at(44))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, phentsize, phnum) else {
        return short();
    };
    for i in 0..u64::from(phnum) {
        let at = phoff.saturating_add(i * u64::from(phentsize));
        let Some(p_type) = usize::try_from(at).ok().and_then(u32_at) else {
            return Some("program headers beyond the file's start".into());
        };
        if p_type == PT_INTERP {
            return Some(
                "a dynamically linked executable (it names a loader, PT_INTERP); the \
                 initramfs needs a static one"
                    .into(),
            );
        }
    }
    None
}

/// Check that `path` is a static ELF executable for the OCI architecture `arch`; `from`
/// names where it came from in the error.
pub fn check(path: &Path, arch: &str, from: &str) -> Result<(), InitError> {
    let bad = |reason: String| InitError::BadBusybox {
        from: from.to_string(),
        reason,
    };
    let machine = elf_machine(arch)
        .ok_or_else(|| bad(format!("no ELF machine known for architecture {arch}")))?;
    let mut head = Vec::with_capacity(64 * 1024);
    std::fs::File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
    match static_elf_problem(&head, machine) {
        Some(reason) => Err(bad(reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit little-endian ELF header for `machine` with one program header of `p_type`
    /// (or none).
    pub(crate) fn elf64(machine: u16, p_type: Option<u32>) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        if let Some(t) = p_type {
            b[56..58].copy_from_slice(&2u16.to_le_bytes());
            // PT_LOAD first, then the one under test.
            let mut ph = vec![0u8; 112];
            ph[..4].copy_from_slice(&1u32.to_le_bytes());
            ph[56..60].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    /// A 32-bit big-endian one (s390 style byte order, machine as given).
    fn elf32_be(machine: u16, p_type: u32) -> Vec<u8> {
        let mut b = vec![0u8; 52 + 32];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 1;
        b[5] = 2;
        b[18..20].copy_from_slice(&machine.to_be_bytes());
        b[28..32].copy_from_slice(&52u32.to_be_bytes());
        b[42..44].copy_from_slice(&32u16.to_be_bytes());
        b[44..46].copy_from_slice(&1u16.to_be_bytes());
        b[52..56].copy_from_slice(&p_type.to_be_bytes());
        b
    }

    #[test]
    fn static_of_the_right_machine_passes() {
        assert_eq!(static_elf_problem(&elf64(62, Some(1)), 62), None);
        assert_eq!(static_elf_problem(&elf64(183, None), 183), None);
        assert_eq!(static_elf_problem(&elf32_be(8, 1), 8), None);
    }

    #[test]
    fn dynamic_wrong_machine_and_non_elf_are_refused() {
        let dynamic = static_elf_problem(&elf64(62, Some(PT_INTERP)), 62).unwrap();
        assert!(dynamic.contains("PT_INTERP"), "{dynamic}");
        assert!(static_elf_problem(&elf32_be(8, PT_INTERP), 8).is_some());
        assert_eq!(
            static_elf_problem(&elf64(183, None), 62).unwrap(),
            "built for ELF machine 183, the image needs 62"
        );
        assert_eq!(
            static_elf_problem(b"#!/bin/sh\n", 62).unwrap(),
            "not an ELF file"
        );
        assert!(static_elf_problem(&elf64(62, None)[..20], 62).is_some());
        // Program headers past what was read.
        let mut far = elf64(62, None);
        far[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes());
        far[56..58].copy_from_slice(&1u16.to_le_bytes());
        assert!(static_elf_problem(&far, 62).is_some());
    }

    #[test]
    fn check_reads_the_file_and_names_its_origin() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bb");
        std::fs::write(&p, elf64(62, None)).unwrap();
        assert_eq!(check(&p, "amd64", "x"), Ok(()));
        let err = check(&p, "arm64", "the host's /bin/busybox").unwrap_err();
        assert_eq!(
            err.to_string(),
            "busybox from the host's /bin/busybox cannot run in the initramfs: built for ELF \
             machine 62, the image needs 183"
        );
        assert!(check(&p, "sparc", "x").is_err());
        assert!(check(&dir.path().join("none"), "amd64", "x").is_err());
    }

    #[test]
    fn machines() {
        assert_eq!(elf_machine("amd64"), Some(62));
        assert_eq!(elf_machine("arm64"), Some(183));
        assert_eq!(elf_machine("riscv64"), Some(243));
        assert_eq!(elf_machine("wasm"), None);
    }
}
