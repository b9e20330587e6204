#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS per target, default 60 (CI calls `fuzz/run.sh 20`). TARGETs default to all of them.
# Works on the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z flags cargo-fuzz
# passes. Each target starts from its committed seeds (fuzz/seeds/TARGET) copied into a scratch
# corpus (fuzz/corpus/TARGET, git-ignored, kept between local runs so coverage accumulates).
# Crashes land in fuzz/artifacts/TARGET/ and the full libFuzzer log in fuzz/artifacts/TARGET.log.
#
# Environment:
#   FUZZ_SANITIZER  address (default) or none; none is also used automatically when an
#                   address-sanitizer build fails.
#
# Exits non-zero when any target crashed, timed out or failed to build.
set -euo pipefail

seconds="${1:-60}"
shift || true
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$fuzz_dir")"
cd "$root"

all_targets=(decorate rewrite cookies splice)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
sanitizer="${FUZZ_SANITIZER:-address}"
# Overflow checks and debug assertions on: an arithmetic slip in src/ is a crash, not a wrap.
build_flags=(--debug-assertions)

echo "== building (sanitizer: $sanitizer)"
build_log="$(mktemp)"
trap 'rm -f "$build_log"' EXIT
if ! cargo fuzz build "${build_flags[@]}" --sanitizer "$sanitizer" 2>&1 | tee "$build_log"; then
    # A compile error in the code is not the sanitizer's fault: no point building again.
    if [ "$sanitizer" = none ] || grep -q '^error\[E' "$build_log"; then
        echo "build failed" >&2
        exit 2
    fi
    echo "== the $sanitizer sanitizer build failed on this toolchain; building with --sanitizer none"
    sanitizer=none
    cargo fuzz build "${build_flags[@]}" --sanitizer none
fi

status=0
summary=()
for target in "${targets[@]}"; do
    corpus="$fuzz_dir/corpus/$target"
    artifacts="$fuzz_dir/artifacts/$target"
    log="$fuzz_dir/artifacts/$target.log"
    mkdir -p "$corpus" "$artifacts"
    cp -f "$fuzz_dir/seeds/$target"/* "$corpus"/

    # Inputs up to 8 KiB for the rewriter, so a tag can outgrow the 4 KiB memory limit.
    max_len=4096
    [ "$target" = rewrite ] && max_len=8192
    [ "$target" = splice ] && max_len=20000

    echo "== fuzzing $target for ${seconds}s"
    set +e
    cargo fuzz run "${build_flags[@]}" --sanitizer "$sanitizer" "$target" "$corpus" -- \
        -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" \
        >"$log" 2>&1
    rc=$?
    set -e

    # The last status line (`#N DONE cov: ... ft: ... corp: ...`, or the last pulse before a
    # crash) and the executions from the final stats.
    last="$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)"
    execs="$(awk '/^stat::number_of_executed_units:/ {print $2}' "$log" | tail -n 1)"
    rate="$(awk '/^stat::average_exec_per_sec:/ {print $2}' "$log" | tail -n 1)"
    if [ "$rc" -eq 0 ]; then
        result="ok"
    else
        result="FAILED (exit $rc)"
        status=1
        echo "---- $target: end of $log"
        grep -vE '^#[0-9]+' "$log" | tail -n 40
        crash="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        if [ -n "$crash" ]; then
            echo "---- reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $target ${crash#"$root"/}"
        fi
    fi
    line="$target: $result, ${execs:-?} executions (${rate:-?}/s) in ${seconds}s; ${last:-no status line}"
    echo "$line"
    summary+=("$line")
done

echo
echo "== summary (sanitizer: $sanitizer)"
printf '%s\n' "${summary[@]}"
exit "$status"
