#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a bounded time, one after the other, with the
# machine's stable toolchain.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
#
# cargo-fuzz needs nightly-only rustc flags (-Z sanitizer, coverage); RUSTC_BOOTSTRAP=1 lets
# the stable compiler accept them. New corpus entries go to corpus/<target>/ (git ignores all
# but seed-*), crashes to artifacts/<target>/; the exit status is non-zero if any target failed.
set -euo pipefail

cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

mkdir -p target/run-logs
failed=()
summary=()
for target in "${targets[@]}"; do
    log=target/run-logs/$target.log
    echo "== $target: ${seconds}s (log: fuzz/$log)"
    # One process per target (no -jobs/-workers): the machine is small and shared.
    set +e
    cargo fuzz run "$target" -- -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        2>&1 | tee "$log" | grep -E '^(#[0-9]+.*DONE|Done |==[0-9]+==ERROR|SUMMARY|thread .* panicked)'
    status=${PIPESTATUS[0]}
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    per_second=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        summary+=("$target: FAILED (status $status) after ${runs:-?} runs; see fuzz/$log and fuzz/artifacts/$target/")
    else
        summary+=("$target: ${runs:-?} runs, ${per_second:-?} runs/s, no crash")
    fi
done

echo
printf '%s\n' "${summary[@]}"
[ ${#failed[@]} -eq 0 ]
