//! Arbitrary bytes as one or two layer tars, merged with OCI semantics. Errors are fine;
//! a panic (or an abort, a hang, unbounded memory) is a bug.
//!
//! Input: byte 0 chooses the layout: bit 0 set means two layers, split at the offset given
//! by bytes 1..3 (little endian, modulo the length); the rest is the tar data. Unless bit 1
//! is set, the header checksums of each layer are recomputed first (walking the archive by
//! the size fields), so that mutated headers are not all rejected at the checksum and the
//! fuzzer reaches the merge itself.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fn layer_file(bytes: &[u8]) -> std::fs::File {
    // /dev/shm keeps the per-run files in memory; any temp dir works.
    let mut f = tempfile::tempfile_in("/dev/shm")
        .or_else(|_| tempfile::tempfile())
        .expect("temp file for a layer");
    f.write_all(bytes).expect("writing a layer");
    f
}

/// An octal or base-256 size field, 0 if unreadable.
fn size_field(f: &[u8]) -> u64 {
    if f.first().is_some_and(|b| b & 0x80 != 0) {
        return f[f.len() - 8..]
            .iter()
            .fold(0u64, |v, &b| (v << 8) | u64::from(b));
    }
    let digits = f
        .iter()
        .skip_while(|&&b| b == b' ' || b == 0)
        .take_while(|b| (b'0'..=b'7').contains(b));
    digits.fold(0u64, |v, &b| {
        v.saturating_mul(8).saturating_add(u64::from(b - b'0'))
    })
}

/// Recompute the checksum of every header block, following the size fields.
fn fix_checksums(tar: &mut [u8]) {
    let mut off = 0usize;
    while let Some(h) = off.checked_add(512).and_then(|end| tar.get_mut(off..end)) {
        off += 512;
        if h.iter().all(|&b| b == 0) {
            continue;
        }
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let size = size_field(&h[124..136]);
        let padded = size.saturating_add(511) / 512 * 512;
        off = off.saturating_add(usize::try_from(padded).unwrap_or(usize::MAX));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut parts: Vec<Vec<u8>> = if mode & 1 == 1 && rest.len() >= 2 {
        let at = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let at = if body.is_empty() { 0 } else { at % body.len() };
        vec![body[..at].to_vec(), body[at..].to_vec()]
    } else {
        vec![rest.to_vec()]
    };
    if mode & 2 == 0 {
        parts.iter_mut().for_each(|p| fix_checksums(p));
    }
    let layers = parts.iter().map(|p| layer_file(p)).collect();
    let Ok(tree) = fledge::merge::merge_layers(layers) else {
        return;
    };
    // Read what the tree says is there: every file's bytes come from the layer files by
    // offset, and the walk must terminate.
    let mut buf = [0u8; 4096];
    let mut ids = Vec::new();
    tree.walk(|_, id| ids.push(id));
    for id in ids {
        if let fledge::tree::NodeKind::File { size, .. } = tree.node(id).kind {
            let _ = tree.read_at(id, 0, &mut buf);
            let _ = tree.read_at(id, size.saturating_sub(1), &mut buf);
        }
    }
    let _ = tree.stats();
});
