#!/usr/bin/env bash
# One instrumented cross-site backup, for finding where site a and site b wait (see the
# "Cross-site (issue 3)" section of BENCHMARKS.md). Fresh sites a and b each time, b's daemon
# on loopback, `mover backup SRC --to b` from a.
#
#   bench/remote_probe.sh SRC [LABEL]
#
# Environment:
#   OUT         where sites and outputs go (default /work/bench-remote/probe); sites are removed
#   PROBE       none (default) | threads (bench/thread_cpu.py on both processes, 50 ms samples)
#               | sched (perf sched record -a, then timehist summary per thread)
#               | strace (strace -f -T -c on both, plus the daemon's sync calls with durations)
#               | perf (perf record -g on both; reports of the top symbols)
#   A_PEER      "key=value ..." for a's [peers.b] (udp_payload_bytes_max, congestion, bandwidth,
#               stream_window_bytes, connection_window_bytes, cipher)
#   A_ENGINE    "key=value ..." for a's [engine] (workers, pin_workers, pack_target_bytes ...)
#   B_ENGINE    the same for b's [engine] (b's daemon runs workers threads; b's packs use
#               pack_target_bytes)
#   B_TIER      a directory for b's tier instead of b/tiers/hot (e.g. on /dev/shm: no disk)
#   TASKSET_A / TASKSET_B  CPU lists to run the client / the daemon on (taskset -c)
#   WAN_ARGS    put `mover-wan WAN_ARGS` (next to MOVER) between a and b, e.g. "--delay-ms 25
#               --loss 0.005 --rate 1gbit"; its counters go to OUT/LABEL/relay.out
#   DROP=1      drop the page cache first (default 1)
#   MOVER=...   the mover binary (default target/release/mover)
# Prints one line: label, elapsed_s, GB/s, client CPU s, daemon CPU s, machine busy %.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=${1:?usage: remote_probe.sh SRC [LABEL]}
LABEL=${2:-probe}
OUT=${OUT:-/work/bench-remote/probe}
PROBE=${PROBE:-none}
DROP=${DROP:-1}
MOVER=${MOVER:-$ROOT/target/release/mover}
A_PEER=${A_PEER:-}
A_ENGINE=${A_ENGINE:-}
B_ENGINE=${B_ENGINE:-}
B_TIER=${B_TIER:-}
TASKSET_A=${TASKSET_A:-}
TASKSET_B=${TASKSET_B:-}

S=$OUT/sites
R=$OUT/$LABEL
rm -rf "$S" "$R"
mkdir -p "$S" "$R"

# Sets KEY=VALUE pairs in SECTION of a mover.toml (strings quoted unless numeric or boolean).
set_keys() {
    python3 - "$@" <<'PY'
import re, sys
path, section, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
lines = open(path).read().split("\n")
head = lines.index(f"[{section}]")
end = next((i for i in range(head + 1, len(lines)) if lines[i].startswith("[")), len(lines))
keys = dict(p.split("=", 1) for p in pairs)
body = [l for l in lines[head + 1:end] if l.split("=")[0].strip() not in keys]
for k, v in keys.items():
    body.insert(0, f"{k} = {v}" if re.fullmatch(r"[0-9]+|true|false", v) else f'{k} = "{v}"')
lines[head + 1:end] = body
open(path, "w").write("\n".join(lines))
PY
}
# shellcheck source=bench/lib/sites.sh
source "$ROOT/bench/lib/sites.sh"
cpu_sample() { awk '/^cpu / { idle = $5 + $6; busy = 0; for (i = 2; i <= NF; i++) busy += $i; print busy - idle, idle; exit }' /proc/stat; }

init_sites
# shellcheck disable=SC2086
[[ -z $A_ENGINE ]] || set_keys "$S/a/mover.toml" engine $A_ENGINE
# shellcheck disable=SC2086
[[ -z $B_ENGINE ]] || set_keys "$S/b/mover.toml" engine $B_ENGINE
if [[ -n $B_TIER ]]; then
    rm -rf "$B_TIER"
    mkdir -p "$B_TIER"
    set_keys "$S/b/mover.toml" tiers.hot "path=$B_TIER"
fi
if [[ -n $TASKSET_B ]]; then
    start_daemon_b taskset -c "$TASKSET_B"
else
    start_daemon_b
fi
if [[ -n ${WAN_ARGS:-} ]]; then
    # shellcheck disable=SC2086
    "$(dirname "$MOVER")/mover-wan" --listen 127.0.0.1:0 --to "127.0.0.1:$PORT" $WAN_ARGS --json-stats >"$R/relay.out" 2>"$R/relay.err" &
    RPID=$!
    trap 'kill $DPID $RPID 2>/dev/null || true' EXIT
    RADDR=""
    for _ in $(seq 100); do
        RADDR=$(sed -n 's/^listening on \(.*\)$/\1/p' "$R/relay.out")
        [[ -n $RADDR ]] && break
        sleep 0.05
    done
    set_keys "$S/a/mover.toml" peers.b "address=$RADDR"
fi
# shellcheck disable=SC2086
[[ -z $A_PEER ]] || set_keys "$S/a/mover.toml" peers.b $A_PEER

if [[ $DROP == 1 ]]; then
    sync
    echo 3 >/proc/sys/vm/drop_caches
fi

client=("$MOVER" --site-dir "$S/a" --json backup "$SRC" --to b)
[[ -z $TASKSET_A ]] || client=(taskset -c "$TASKSET_A" "${client[@]}")
SAMPLER=""
case $PROBE in
none | threads) ;;
sched) perf sched record ${SCHED_G:-} -a -o "$R/sched.data" -- sleep 3600 >/dev/null 2>&1 &
    SAMPLER=$!
    sleep 0.5 ;;
strace) strace -f -T -tt -e trace=fdatasync,fsync,sync_file_range,pwrite64,write -o "$R/daemon.strace" -p "$DPID" 2>/dev/null &
    SAMPLER=$!
    sleep 0.5
    client=(strace -f -c -o "$R/client.strace-summary" "${client[@]}") ;;
perf) perf record -F 999 --call-graph ${CALLGRAPH:-fp} -o "$R/daemon.perf" -p "$DPID" >/dev/null 2>&1 &
    SAMPLER=$!
    sleep 0.3
    client=(perf record -F 999 --call-graph ${CALLGRAPH:-fp} -o "$R/client.perf" -- "${client[@]}") ;;
*) echo "PROBE=$PROBE: expected none, threads, sched, strace or perf" >&2; exit 2 ;;
esac

d0=$(proc_cpu "$DPID")
c0=$(cpu_sample)
MOVER_LOG=${MOVER_LOG:-warn,mover::remote=debug} /usr/bin/time -f '%e %U %S' -o "$R/client.time" "${client[@]}" >"$R/job.json" 2>"$R/client.err" &
CPID=$!
if [[ $PROBE == threads ]]; then
    # The client's pid is time's child; sample both.
    sleep 0.05
    MPID=$(pgrep -P "$CPID" | head -n 1)
    python3 "$ROOT/bench/thread_cpu.py" --interval 0.05 --out "$R/timeline.tsv" "$MPID" "$DPID" >"$R/threads.txt" &
    SAMPLER=$!
fi
wait "$CPID"
c1=$(cpu_sample)
d1=$(proc_cpu "$DPID")
if [[ -n $SAMPLER ]]; then
    kill -INT "$SAMPLER" 2>/dev/null || true
    wait "$SAMPLER" 2>/dev/null || true
fi
case $PROBE in
sched) perf sched timehist -i "$R/sched.data" -s 2>/dev/null | sed -n '/Runtime summary/,$p' >"$R/sched-summary.txt" || true ;;
perf) perf report -i "$R/client.perf" --no-children --sort sym --stdio 2>/dev/null | grep -v '^#' | grep '%' | head -40 >"$R/client-top.txt" || true
    perf report -i "$R/daemon.perf" --no-children --sort sym --stdio 2>/dev/null | grep -v '^#' | grep '%' | head -40 >"$R/daemon-top.txt" || true ;;
esac
read -r wall user sys <"$R/client.time"
python3 - "$R/job.json" "$LABEL" "$user" "$sys" "$d0" "$d1" "$c0" "$c1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
label, user, sys_, d0, d1 = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
b0, i0 = map(int, sys.argv[7].split()); b1, i1 = map(int, sys.argv[8].split())
busy = 100 * (b1 - b0) / max(b1 - b0 + i1 - i0, 1)
print(f"{label}: state {j['state']} bytes_total {j['bytes_total']} elapsed_s {j['elapsed_s']:.3f} GB/s {j['bytes_total'] / j['elapsed_s'] / 1e9:.3f} "
      f"client CPU {user + sys_:.2f} s (user {user:.2f} sys {sys_:.2f}) daemon CPU {d1 - d0:.2f} s machine busy {busy:.0f}%")
PY
if [[ -n ${WAN_ARGS:-} ]]; then
    echo "relay CPU $(proc_cpu "$RPID") s"
    kill -TERM "$RPID" 2>/dev/null || true
    wait "$RPID" 2>/dev/null || true
    tail -n 1 "$R/relay.out"
fi
stop_daemon_b
rm -rf "$S"
[[ -z $B_TIER ]] || rm -rf "$B_TIER"
