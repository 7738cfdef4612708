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

fingerprint() { "$MOVER" identity --config "$1" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["fingerprint"])'; }
proc_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$1/stat"; }

"$MOVER" init --site a --dir "$S/a" --listen 127.0.0.1:0 >/dev/null
"$MOVER" init --site b --dir "$S/b" --listen 127.0.0.1:0 >/dev/null
"$MOVER" peer add a 127.0.0.1:1 "$(fingerprint "$S/a/mover.toml")" --config "$S/b/mover.toml" >/dev/null
"$MOVER" daemon --config "$S/b/mover.toml" >"$R/daemon.out" 2>"$R/daemon.err" &
DPID=$!
trap 'kill $DPID 2>/dev/null || true' EXIT
PORT=""
for _ in $(seq 200); do
    PORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$R/daemon.out")
    [[ -n $PORT ]] && break
    sleep 0.05
done
[[ -n $PORT ]] || { echo "daemon did not start: $(cat "$R/daemon.err")" >&2; exit 1; }
"$MOVER" peer add b "127.0.0.1:$PORT" "$(fingerprint "$S/b/mover.toml")" --config "$S/a/mover.toml" >/dev/null
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
# The daemon must be gone before the next run reuses these paths.
kill "$DPID" 2>/dev/null || true
wait "$DPID" 2>/dev/null || true
trap - EXIT
rm -rf "$S" "$R/restored"
