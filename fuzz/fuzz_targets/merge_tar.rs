//! Arbitrary bytes as one or two layer tars, merged with OCI semantics. Errors are fine;
//! a panic (or an abort, a hang, unbounded memory) is a bug.
//!
//! Input: byte 0 chooses the layout: bit 0 set means two layers, split at the offset given
//! by bytes 1..3 (little endian, modulo the length); the rest is the tar data.
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

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let layers = if mode & 1 == 1 && rest.len() >= 2 {
        let at = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let at = if body.is_empty() { 0 } else { at % body.len() };
        vec![layer_file(&body[..at]), layer_file(&body[at..])]
    } else {
        vec![layer_file(rest)]
    };
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
