#!/usr/bin/env bash
# One instrumented cross-site restore (see "Cross-site (issue 3)" in BENCHMARKS.md): fresh
# sites a and b, b's daemon on loopback, `mover backup SRC --to b` from a, caches dropped,
# then `mover restore latest --from b` at a, timed. Sites are removed at the end.
#
#   bench/restore_probe.sh SRC [LABEL]
#
# Environment:
#   OUT     where sites and outputs go (default /work/bench-remote/rprobe)
#   MOVER   the mover binary (default target/release/mover); alternate two binaries run by
#           run to compare them: this disk's speed drifts within the hour
#   PERF=1  perf record both processes during the restore (client.perf, daemon.perf in
#           OUT/LABEL); CALLGRAPH=dwarf for the client's call graph through libc (default fp)
# Prints one line: label, GB/s, client CPU s (of it system), daemon CPU s during the restore.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=${1:?usage: restore_probe.sh SRC [LABEL]}
LABEL=${2:-restore}
OUT=${OUT:-/work/bench-remote/rprobe}
MOVER=${MOVER:-$ROOT/target/release/mover}
S=$OUT/sites
R=$OUT/$LABEL
rm -rf "$S" "$R"
mkdir -p "$S" "$R"

# shellcheck source=bench/lib/sites.sh
source "$ROOT/bench/lib/sites.sh"
init_sites
start_daemon_b
"$MOVER" --site-dir "$S/a" --json backup "$SRC" --to b >"$R/backup.json"

sync
echo 3 >/proc/sys/vm/drop_caches
client=("$MOVER" --site-dir "$S/a" --json restore latest --from b --to "$R/restored")
SAMPLER=""
if [[ ${PERF:-0} == 1 ]]; then
    perf record -F 999 -g -o "$R/daemon.perf" -p "$DPID" >/dev/null 2>&1 &
    SAMPLER=$!
    sleep 0.3
    client=(perf record -F 999 --call-graph "${CALLGRAPH:-fp}" -o "$R/client.perf" -- "${client[@]}")
fi
d0=$(proc_cpu "$DPID")
/usr/bin/time -f '%e %U %S' -o "$R/client.time" "${client[@]}" >"$R/restore.json" 2>"$R/client.err"
d1=$(proc_cpu "$DPID")
if [[ -n $SAMPLER ]]; then
    kill -INT "$SAMPLER" 2>/dev/null || true
    wait "$SAMPLER" 2>/dev/null || true
fi
read -r _ user sys <"$R/client.time"
python3 - "$R/restore.json" "$LABEL" "$user" "$sys" "$d0" "$d1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
label, user, sys_, d0, d1 = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
print(f"{label}: state {j['state']} restore {j['bytes_total'] / j['elapsed_s'] / 1e9:.3f} GB/s "
      f"client CPU {user + sys_:.2f} s (sys {sys_:.2f}) daemon CPU {d1 - d0:.2f} s direct_io {j.get('direct_io')}")
PY
stop_daemon_b
rm -rf "$S" "$R/restored"
