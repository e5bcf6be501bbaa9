//! Arbitrary text as fledge.toml: `Config::parse` returns a config or an error naming the
//! problem; it never panics.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) =
        fledge::config::Config::parse(text, Path::new("/fuzz/fledge.toml"), Path::new("/fuzz"))
    {
        // Derived values must be computable for every accepted config.
        let _ = cfg.filesystem.buffer_bytes(u64::MAX);
        let _ = cfg.filesystem.buffer_bytes(0);
        // The default names come from the parsed reference (which may refuse it).
        if let Ok(r) = fledge::source::reference::ImageRef::parse(&cfg.source.image) {
            let _ = (r.base_name(), r.tag(), r.version());
        }
    }
});
