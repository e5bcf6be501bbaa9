//! The output contract: what every image writer is given ([`Job`]) and what it gives back
//! ([`Written`]). `output::run` prepares the tree, the size plan and the build's [`Identity`]
//! once, picks a [`Writer`] ([`super::select`]), and has no per-format branch beyond that.
//!
//! A new output format is one module implementing [`Writer`], plus its entry in
//! [`super::select::BackendKind::writer`] (and its probes, when it needs anything from the host).

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::size::SizePlan;
use super::{BuildError, BuildReport};
use crate::config::{FilesystemConfig, FsType, ImageFormat};
use crate::runner::Tool;
use crate::timing::Stopwatch;
use crate::tree::Tree;

/// Who the image is: its filesystem UUID, directory hash seed and clock. Derived from the
/// inputs for a reproducible build (`SOURCE_DATE_EPOCH`), else drawn at random with the
/// current time. Computed once per build and passed down: nothing keeps it globally, so two
/// builds in one process each have their own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uuid: [u8; 16],
    pub hash_seed: [u8; 16],
    /// Seconds since the epoch the filesystem's own times (superblock, lost+found) carry.
    pub epoch: i64,
    /// Derived from the inputs (the same inputs give the same identity).
    pub reproducible: bool,
}

impl Identity {
    /// The identity of a reproducible build at `epoch`, from its `inputs` (hashed as one
    /// length-framed run after a label; the same derivation as earlier releases, so their
    /// reproducible images stay byte-identical).
    pub fn derived(epoch: i64, inputs: &[&[u8]]) -> Identity {
        let all = inputs.concat();
        let hash = |label: &[u8]| {
            let mut h = Sha256::new();
            for part in [label, &all] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
            let d = h.finalize();
            let mut b = [0u8; 16];
            b.copy_from_slice(&d[..16]);
            uuid_v4(b)
        };
        Identity {
            uuid: hash(b"uuid"),
            hash_seed: hash(b"hash_seed"),
            epoch,
            reproducible: true,
        }
    }

    /// A fresh random identity, timed now.
    pub fn random() -> Identity {
        use std::io::Read;
        let mut rnd = [0u8; 32];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            let _ = f.read_exact(&mut rnd);
        }
        let mut uuid = [0u8; 16];
        let mut hash_seed = [0u8; 16];
        uuid.copy_from_slice(&rnd[..16]);
        hash_seed.copy_from_slice(&rnd[16..]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Identity {
            uuid: uuid_v4(uuid),
            hash_seed,
            epoch: now,
            reproducible: false,
        }
    }

    /// How this build's external tools run: e2fsprogs reads its clock from
    /// `E2FSPROGS_FAKE_TIME` (superblock and inode times it sets itself).
    pub fn tools(&self) -> Tools {
        Tools {
            fake_time: self.reproducible.then_some(self.epoch),
        }
    }

    /// The UUID for mkfs when the build is reproducible; `None` lets mkfs draw its own.
    pub fn mkfs_uuid(&self) -> Option<String> {
        self.reproducible.then(|| uuid_text(&self.uuid))
    }
}

/// 16 bytes shaped as a version-4 UUID (version and variant bits set).
pub fn uuid_v4(mut b: [u8; 16]) -> [u8; 16] {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// A UUID's text form, as mkfs tools take it (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
pub fn uuid_text(b: &[u8; 16]) -> String {
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

/// How one build runs external tools (through [`crate::runner`]): with the build's clock,
/// and with interrupts turned into [`BuildError::Interrupted`].
#[derive(Clone, Copy, Debug)]
pub struct Tools {
    fake_time: Option<i64>,
}

impl Tools {
    /// Run `program`; returns its stdout and stderr, joined.
    pub fn run(&self, program: &str, args: &[String]) -> Result<String, BuildError> {
        self.run_tool(Tool::new(program).args(args))
    }

    /// [`Tools::run`] where the tool sees no block device ([`Tool::hide_block_devices`]):
    /// for the btrfs-progs that set a derived UUID, which other images on the host may carry.
    pub fn run_hiding_block_devices(
        &self,
        program: &str,
        args: &[String],
    ) -> Result<String, BuildError> {
        self.run_tool(Tool::new(program).args(args).hide_block_devices())
    }

    /// [`Tools::run`] with environment variables set (`Some`) or removed (`None`).
    pub fn run_with_env(
        &self,
        program: &str,
        args: &[String],
        env: &[(&str, Option<String>)],
    ) -> Result<String, BuildError> {
        let mut t = Tool::new(program).args(args);
        for (k, v) in env {
            t = match v {
                Some(v) => t.env(k, v),
                None => t.env_remove(k),
            };
        }
        self.run_tool(t)
    }

    fn run_tool(&self, t: Tool) -> Result<String, BuildError> {
        super::check_interrupt()?;
        let mut t = t;
        if let Some(epoch) = self.fake_time {
            t = t.env("E2FSPROGS_FAKE_TIME", epoch.to_string());
        }
        let out = t.run().map_err(|e| {
            if crate::interrupt::requested() {
                BuildError::Interrupted
            } else {
                BuildError::Tool(e)
            }
        })?;
        super::check_interrupt()?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(text)
    }
}

/// Everything a writer needs for one image.
pub struct Job<'a> {
    /// The frozen merged tree, injections included.
    pub tree: &'a Arc<Tree>,
    pub fs: FsType,
    /// The `[filesystem]` settings (compression and its level for the read-only types).
    pub settings: &'a FilesystemConfig,
    /// The size the image starts at and the free space it must keep.
    pub plan: &'a SizePlan,
    pub identity: &'a Identity,
    /// The image file to write (created at `plan.image_bytes`, in the private work directory;
    /// empty for the read-only types, whose writers size it).
    pub image: &'a Path,
    /// The private work directory (mount points, scratch files); removed after the build.
    pub work: &'a Path,
    /// The cache directory, where a writer may keep work for later builds (squashfs' block
    /// cache); `None` with `--no-cache`, when nothing may be read from it or left in it.
    pub cache_dir: Option<&'a Path>,
    /// Called with the file bytes written so far.
    pub progress: &'a dyn Fn(u64),
}

impl Job<'_> {
    /// How this job runs its external tools.
    pub fn tools(&self) -> Tools {
        self.identity.tools()
    }
}

/// What a writer wrote.
#[derive(Debug)]
pub struct Written {
    pub report: BuildReport,
    /// The image's sha256 (hex), when the writer hashed it while writing; else the caller
    /// hashes the finished file.
    pub sha256: Option<String>,
    /// What the writer wrote: a raw image, or already the qcow2 image `image_format` asked
    /// for (the native ext4 writer); the pipeline converts a raw one when qcow2 was asked.
    pub format: ImageFormat,
}

/// An image writer: one per output format and method.
pub trait Writer: Sync {
    /// Write `job.image` from `job.tree`. Phases are marked on `sw`.
    fn write(&self, job: &Job<'_>, sw: &mut Stopwatch) -> Result<Written, BuildError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_identities_follow_their_inputs() {
        let a = Identity::derived(1_700_000_000, &[b"digest", b"config"]);
        assert_eq!(a, Identity::derived(1_700_000_000, &[b"digest", b"config"]));
        assert!(a.reproducible);
        assert_eq!(a.epoch, 1_700_000_000);
        // Another input, or another epoch's inputs: another identity.
        for other in [
            Identity::derived(1_700_000_000, &[b"digest", b"config2"]),
            Identity::derived(1_700_000_001, &[b"digest", b"config", b"1"]),
        ] {
            assert_ne!(other.uuid, a.uuid);
            assert_ne!(other.hash_seed, a.hash_seed);
        }
        assert_ne!(a.uuid, a.hash_seed);
        // Version 4, RFC 4122 variant.
        assert_eq!(a.uuid[6] >> 4, 4);
        assert_eq!(a.uuid[8] >> 6, 0b10);
        let r = Identity::random();
        assert!(!r.reproducible);
        assert_ne!(r.uuid, Identity::random().uuid);
        assert_eq!(r.mkfs_uuid(), None);
        assert_eq!(a.mkfs_uuid(), Some(uuid_text(&a.uuid)));
        assert_eq!(
            uuid_text(&[0x12; 16]),
            "12121212-1212-1212-1212-121212121212"
        );
    }
}
