#!/usr/bin/env bash
# The daemon's API under load, and what the daemon costs when it has nothing to do.
#
#   1. a fresh site in a temp directory (`mover init --socket DIR/api.sock`), a small data set,
#      `mover daemon` (release build) started on it;
#   2. one snapshot through the socket (`mover backup --wait`), so GET /v1/jobs/{id} has a job
#      and verify jobs have something (small) to check;
#   3. idle cost: VmRSS from /proc/PID/status, CPU (utime + stime from /proc/PID/stat) over
#      IDLE_SECONDS of idleness, as % of one core;
#   4. `mover-bench api` (a separate process): req/s and latency with 1, 4 and 16 keep-alive
#      connections for SECONDS each, then SUBMITS verify jobs one at a time (submit-to-running);
#   5. SIGTERM to the daemon, which must drain and exit 0.
#
# Environment:
#   CONNECTIONS    connection counts to run (default "1 4 16")
#   SECONDS_EACH   length of each request run (default 5)
#   SUBMITS        verify jobs for the submit latency (default 50)
#   IDLE_SECONDS   idle window for the CPU figure (default 30)
#   DATA_MIB       size of the data set (default 8)
#   SKIP_BUILD=1   use the binaries already in target/release
#   KEEP=1         keep the temp directory (raw JSON, daemon log)
#
# The summary goes to stdout; raw outputs are in the temp directory (printed, kept with KEEP=1).
# Client and daemon share the machine's cores: on a small machine the figures are for both
# together (the bench reports each side's CPU per request).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONNECTIONS=${CONNECTIONS:-"1 4 16"}
SECONDS_EACH=${SECONDS_EACH:-5}
SUBMITS=${SUBMITS:-50}
IDLE_SECONDS=${IDLE_SECONDS:-30}
DATA_MIB=${DATA_MIB:-8}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
MOVER=$TARGET_DIR/release/mover
BENCH=$TARGET_DIR/release/mover-bench

die() {
    echo "api.sh: $*" >&2
    exit 1
}
log() { echo "== $*" >&2; }

command -v jq >/dev/null || die "jq is needed for the summary (apt-get install -y jq)"

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "cargo build --release -p mover -p mover-bench"
    (cd "$ROOT" && cargo build --release -p mover -p mover-bench >&2)
fi
[[ -x $MOVER && -x $BENCH ]] || die "$MOVER or $BENCH missing: build them (cargo build --release -p mover -p mover-bench)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mover-api-bench.XXXXXX")
SOCK=$WORK/api.sock
DAEMON_PID=
cleanup() {
    if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "api.sh: raw outputs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

clk_tck=$(getconf CLK_TCK)
# utime + stime of PID in clock ticks (fields 14 and 15 of /proc/PID/stat; the command name
# in field 2 may hold spaces, so count from the closing parenthesis).
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- $stat
    echo $((${12} + ${13}))
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
threads() { awk '/^Threads:/ { print $2 }' "/proc/$1/status"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

LOAD_START=$(loadavg)
log "site and data set in $WORK (load average $LOAD_START)"
"$MOVER" init --site apibench --dir "$WORK/site" --socket "$SOCK" >/dev/null
mkdir -p "$WORK/data/text"
for ((i = 0; i < DATA_MIB; i++)); do
    head -c $((1024 * 1024)) /dev/urandom >"$WORK/data/part-$i.bin"
done
for ((i = 0; i < 64; i++)); do
    seq "$i" 7 40000 >"$WORK/data/text/log-$i.txt"
done

log "starting mover daemon"
"$MOVER" daemon --config "$WORK/site/mover.toml" >"$WORK/daemon.out" 2>"$WORK/daemon.err" &
DAEMON_PID=$!
for ((i = 0; i < 300; i++)); do
    grep -q "api on" "$WORK/daemon.out" 2>/dev/null && break
    kill -0 "$DAEMON_PID" 2>/dev/null || die "the daemon exited before it was ready: $(tail -n 5 "$WORK/daemon.err")"
    sleep 0.1
done
grep -q "api on" "$WORK/daemon.out" || die "the daemon did not print its ready line within 30 s"
log "$(head -n 1 "$WORK/daemon.out")"
RSS_READY=$(rss_kib "$DAEMON_PID")

export MOVER_SOCKET=$SOCK
log "one snapshot: mover backup $WORK/data --wait"
"$MOVER" --json backup "$WORK/data" --wait --idempotency-key api-bench-seed >"$WORK/backup.json" ||
    die "the seed backup failed (exit $?): $(cat "$WORK/backup.json")"
SNAPSHOT=$(jq -r '.snapshot // "?"' "$WORK/backup.json")
BYTES=$(jq -r '.bytes_total // 0' "$WORK/backup.json")

log "idle for $IDLE_SECONDS s"
sleep 2
RSS_IDLE=$(rss_kib "$DAEMON_PID")
THREADS_IDLE=$(threads "$DAEMON_PID")
t0=$(cpu_ticks "$DAEMON_PID")
start=$(date +%s.%N)
sleep "$IDLE_SECONDS"
t1=$(cpu_ticks "$DAEMON_PID")
end=$(date +%s.%N)
IDLE_CPU_PCT=$(awk -v d=$((t1 - t0)) -v hz="$clk_tck" -v s="$start" -v e="$end" \
    'BEGIN { printf "%.3f", d / hz / (e - s) * 100 }')
IDLE_CPU_S=$(awk -v d=$((t1 - t0)) -v hz="$clk_tck" 'BEGIN { printf "%.2f", d / hz }')
RSS_IDLE_END=$(rss_kib "$DAEMON_PID")

for n in $CONNECTIONS; do
    log "mover-bench api --connections $n --seconds $SECONDS_EACH"
    "$BENCH" api --socket "$SOCK" --connections "$n" --seconds "$SECONDS_EACH" --json >"$WORK/load-$n.json"
done
if ((SUBMITS > 0)); then
    log "mover-bench api --seconds 0 --submits $SUBMITS"
    "$BENCH" api --socket "$SOCK" --seconds 0 --submits "$SUBMITS" --json >"$WORK/submit.json"
fi
RSS_AFTER=$(rss_kib "$DAEMON_PID")
HWM_AFTER=$(hwm_kib "$DAEMON_PID")
LOAD_END=$(loadavg)

log "SIGTERM"
STOP_START=$(date +%s.%N)
kill -TERM "$DAEMON_PID"
rc=0
wait "$DAEMON_PID" || rc=$?
STOP_S=$(awk -v s="$STOP_START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')
DAEMON_PID=
[[ -S $SOCK ]] && die "the socket $SOCK is still there after the daemon stopped"

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
echo
echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
echo "mover $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') (release); load average $LOAD_START at start, $LOAD_END at end"
echo "site: one snapshot ($SNAPSHOT) of $BYTES bytes"
echo
echo "daemon idle: VmRSS $(mib "$RSS_READY") MiB when ready, $(mib "$RSS_IDLE") MiB after the seed backup, $(mib "$RSS_IDLE_END") MiB after ${IDLE_SECONDS} s idle; $THREADS_IDLE threads"
echo "daemon idle CPU: ${IDLE_CPU_S} s over ${IDLE_SECONDS} s = ${IDLE_CPU_PCT}% of one core"
echo "daemon after the load: VmRSS $(mib "$RSS_AFTER") MiB, peak (VmHWM) $(mib "$HWM_AFTER") MiB"
echo
echo "GET /v1/jobs/{id} and GET /v1/status alternately, keep-alive, ${SECONDS_EACH} s per row:"
printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' connections req/s "p50 µs" "p99 µs" "p99.9 µs" "max µs" errors \
    "daemon CPU µs/req" "client CPU µs/req"
printf '|%s\n' "---|---:|---:|---:|---:|---:|---:|---:|---:|"
for n in $CONNECTIONS; do
    jq -r 'def r: (. * 10 | round) / 10;
        .load | "| \(.connections) | \(.req_per_s) | \(.latency_us.p50 | r) | \(.latency_us.p99 | r) | \(.latency_us.p999 | r) | \(.latency_us.max | r) | \(.errors) | \(.daemon_cpu_us_per_request // "n/a" | if type == "number" then r else . end) | \(.client_cpu_us_per_request | r) |"' \
        "$WORK/load-$n.json"
done
first=${CONNECTIONS%% *}
jq -r '.load.routes[] | "  \(.route): \(.response_bytes_mean) bytes per answer"' "$WORK/load-$first.json"
if ((SUBMITS > 0)); then
    echo
    jq -r '.submit | "\(.submits) verify submits one at a time (state polled every \(.poll_us) µs), \(.not_done) not done, \(.running_in_post_answer) already running in the POST answer:"' "$WORK/submit.json"
    echo "| ms | p50 | p99 | max | mean |"
    echo "|---|---:|---:|---:|---:|"
    jq -r 'def r: (. * 100 | round) / 100;
        .submit |
        ["POST answered (client)", .post_answer_ms],
        ["POST sent → seen running (client)", .submit_to_running_ms],
        ["started − submitted (daemon, whole ms)", .daemon_queued_ms],
        ["POST sent → seen ended (client)", .submit_to_end_ms]
        | "| \(.[0]) | \(.[1].p50 | r) | \(.[1].p99 | r) | \(.[1].max | r) | \(.[1].mean | r) |"' "$WORK/submit.json"
fi
echo
echo "SIGTERM: the daemon exited $rc after ${STOP_S} s"
[[ $rc == 0 ]] || die "the daemon exited $rc on SIGTERM (expected 0): $(tail -n 5 "$WORK/daemon.err")"
