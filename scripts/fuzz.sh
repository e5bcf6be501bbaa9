#!/usr/bin/env bash
# Run every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) for a bounded time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      (default 60 s, all targets)
#
# Runs on the stable toolchain: `--sanitizer none` needs no nightly-only flag (the
# coverage instrumentation, -Cpasses=sancov-module, is a stable codegen option), and the
# code under test has no unsafe, so AddressSanitizer would add little. Set
# FLEDGE_FUZZ_SANITIZER=address (needs a nightly toolchain: FLEDGE_FUZZ_TOOLCHAIN=nightly)
# to run with ASan anyway.
#
# Each target starts from its committed seeds (fuzz/seeds/TARGET/) plus the corpus that
# earlier runs grew in fuzz/corpus/TARGET/ (ignored by git). A crash, panic, timeout or out-of-memory fails
# the script and prints the reproducer's path and the command that replays it.
set -euo pipefail

secs="${1:-60}"
shift || true
all_targets=(merge_tar oci_json config_toml)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")
case "$secs" in '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;; esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

sanitizer="${FLEDGE_FUZZ_SANITIZER:-none}"
toolchain=()
if [ -n "${FLEDGE_FUZZ_TOOLCHAIN:-}" ]; then
    toolchain=("+${FLEDGE_FUZZ_TOOLCHAIN}")
fi

# libFuzzer options: bounded time, per-input timeout, memory cap, no leak checks (Rust's
# statics are not leaks), inputs up to 64 KiB (tar headers come in 512-byte blocks).
opts=(-max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1)

cargo "${toolchain[@]}" fuzz build --sanitizer "$sanitizer"

failed=()
for t in "${targets[@]}"; do
    corpus="corpus/$t"
    artifacts="artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true
    before="$(find "$artifacts" -type f | sort)"
    echo "== fuzz target $t for ${secs}s"
    status=0
    cargo "${toolchain[@]}" fuzz run --sanitizer "$sanitizer" "$t" "$corpus" -- \
        "${opts[@]}" -artifact_prefix="$root/fuzz/$artifacts/" || status=$?
    after="$(find "$artifacts" -type f | sort)"
    new="$(comm -13 <(echo "$before") <(echo "$after") | sed '/^$/d')"
    if [ "$status" -ne 0 ] || [ -n "$new" ]; then
        failed+=("$t")
        echo "FUZZ FAILURE in $t (exit $status)" >&2
        while IFS= read -r f; do
            [ -n "$f" ] || continue
            echo "  reproducer: $root/fuzz/$f" >&2
            echo "  replay:     (cd $root/fuzz && cargo fuzz run --sanitizer $sanitizer $t $f)" >&2
        done <<<"$new"
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: failures in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets ran ${secs}s each without a crash"
