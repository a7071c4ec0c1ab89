#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a bounded time each, one
# after another, and fails on the first crash, leak, timeout or broken
# property. Usage: tests/fuzz/run.sh SECONDS_PER_TARGET [TARGET...]
# Extra libFuzzer flags come from FUZZ_FLAGS, e.g. a count of executions
# instead of a time: FUZZ_FLAGS=-runs=1000000 tests/fuzz/run.sh 3600
#
# Needs the nightly toolchain (libFuzzer's instrumentation is unstable) and
# installs cargo-fuzz, pinned, if it is missing. New inputs go to
# tests/fuzz/target/corpus/<target> (ignored by git) so the committed seed
# corpus in tests/fuzz/corpus/<target> only changes by hand; a crash leaves
# its input in tests/fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${1:?usage: tests/fuzz/run.sh SECONDS_PER_TARGET [TARGET...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wire_decode log_scan snapshot_decode raft_decode config_parse)
cargo_fuzz_version=0.13.1

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly); cargo fuzz needs it" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version 2>/dev/null | grep -qF "$cargo_fuzz_version"; then
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

# One build for every target; `run` below then finds it up to date.
# Debug assertions on, so that integer overflow is a crash too. No
# AddressSanitizer by default: our crates forbid `unsafe`, so what it guards
# against cannot happen in them, and without it the build of every
# dependency (quinn, rustls, tokio for the config target) takes minutes less
# and the targets run faster. FUZZ_SANITIZER=address turns it back on.
fuzz=(cargo +nightly fuzz)
sanitizer=${FUZZ_SANITIZER:-none}
"${fuzz[@]}" build --fuzz-dir tests/fuzz --debug-assertions --sanitizer "$sanitizer"

logs=$(mktemp -d)
for target in "${targets[@]}"; do
    work=tests/fuzz/target/corpus/$target
    mkdir -p "$work"
    echo "fuzz: $target for ${seconds}s"
    status=0
    "${fuzz[@]}" run --fuzz-dir tests/fuzz --debug-assertions --sanitizer "$sanitizer" "$target" "$work" "tests/fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 ${FUZZ_FLAGS:-} >"$logs/$target.log" 2>&1 || status=$?
    grep -E '^(#[0-9]+ +(INITED|DONE)|Done [0-9]+ runs)' "$logs/$target.log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$logs/$target.log" >&2
        echo "fuzz: $target failed (exit $status)" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$target.log" | tail -n 1)
    echo "fuzz: $target ran ${runs:-?} inputs without a failure"
done
