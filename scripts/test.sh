#!/usr/bin/env bash
# The full test suite, from a fresh Debian 12 machine: installs what it needs, builds the
# cached Debian test images, then runs lint, unit, integration (root, rootless, FUSE) tests.
#   scripts/test.sh            everything
#   FLEDGE_SKIP_INSTALL=1 ...       skip apt (packages already present)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/need-root.sh
need_root "the full suite uses loop devices, mounts and a test user"
start=$(date +%s)
[ "${FLEDGE_SKIP_INSTALL:-}" = 1 ] || scripts/install-deps.sh
scripts/setup-test-host.sh
scripts/make-test-images.sh
export CI="${CI:-}" FLEDGE_TEST_SETUP=1
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets -- --test-threads=2
# The pure-Rust inflate that `--no-default-features` builds instead of ISA-L: the layer
# decoding tests again, with flate2.
cargo test --no-default-features --lib layer:: -- --test-threads=2
# Fuzzing: each cargo-fuzz target for a bounded time (panics are bugs).
scripts/fuzz.sh "${FLEDGE_FUZZ_SECONDS:-45}"
# The VM tests use the binary `cargo test` just built (dependencies are optimised in every
# profile; the kernel backend copies in the kernel), which saves a release build.
FLEDGE_SKIP_INSTALL=1 FLEDGE_BIN="$PWD/target/debug/fledge" vm-tests/run
echo "test.sh: all tests passed in $(( $(date +%s) - start )) s"
