//! Arbitrary OCI layout documents through the real source parser: `index.json`, and two
//! blobs (typically a manifest or nested index, and an image config) written into a layout
//! directory, then resolved for the host platform and for an explicit one.
//!
//! Input: the three documents separated by the byte 0xff (which never occurs in UTF-8
//! JSON): `INDEX 0xff BLOB_A 0xff BLOB_B`. So that the fuzzer can reach the manifest and
//! config parsers, the placeholders `@A` / `@B` are replaced by the `sha256:` digest of blob
//! A / B and `@a` / `@b` by its size (B is substituted into A first, then both into the
//! index). Errors are fine; panics are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fn replace(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

fn digest(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn fill(doc: &[u8], letter: u8, blob: &[u8]) -> Vec<u8> {
    let d = format!("sha256:{}", digest(blob));
    let s = blob.len().to_string();
    let doc = replace(doc, &[b'@', letter.to_ascii_uppercase()], d.as_bytes());
    replace(&doc, &[b'@', letter], s.as_bytes())
}

fuzz_target!(|data: &[u8]| {
    let parts: Vec<&[u8]> = data.splitn(3, |&b| b == 0xff).collect();
    let part = |i: usize| parts.get(i).copied().unwrap_or_default();
    let index = part(0);
    let blob_b = part(2).to_vec();
    let blob_a = fill(part(1), b'b', &blob_b);
    let index = fill(&fill(index, b'b', &blob_b), b'a', &blob_a);

    let dir = tempfile::Builder::new()
        .prefix("fledge-fuzz-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir");
    let root = dir.path();
    let blobs = root.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("layout dirs");
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    std::fs::write(root.join("index.json"), &index).expect("index.json");
    for blob in [&blob_a, &blob_b] {
        std::fs::write(blobs.join(digest(blob)), blob).expect("blob");
    }
    for reference in [
        format!("oci:{}", root.display()),
        format!("oci:{}:latest", root.display()),
    ] {
        let Ok(src) = fledge::source::open(&reference) else {
            continue;
        };
        let _ = src.describe();
        for platform in [
            fledge::source::Platform::host(),
            fledge::source::Platform::parse("linux/arm/v7").expect("valid platform"),
        ] {
            if let Ok(img) = src.resolve(&platform) {
                let _ = fledge::manifest::ImageRuntimeConfig::from_oci(&img.config);
            }
        }
    }
});
