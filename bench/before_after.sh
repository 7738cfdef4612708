#!/usr/bin/env bash
# Local backup + restore, cross-site backup and cross-site restore with two mover binaries,
# alternated in one run so that the disk's drift and other load fall on both alike:
#
#   bench/before_after.sh BASE_MOVER HEAD_MOVER SRC [ROUNDS]
#
# e.g. a release build of the commit before a change (a worktree's target/release/mover) and
# this checkout's target/release/mover, a tree in /dev/shm (so the source's disk is not what is
# measured), ROUNDS pairs (default 3). Each round runs base then head for each probe:
#   local    backup and restore into a new site on this disk (as bench/hardening_probe.sh)
#   remote   bench/remote_probe.sh    (backup to a peer daemon on loopback)
#   restore  bench/restore_probe.sh   (restore --from that peer)
# Output: one line per run, prefixed with the probe, round and binary; summarise with medians.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE=${1:?usage: before_after.sh BASE_MOVER HEAD_MOVER SRC [ROUNDS]}
HEAD=${2:?}; SRC=${3:?}; ROUNDS=${4:-3}
WORK=${WORK:-$ROOT/target/bench-before-after}
mkdir -p "$WORK"
json() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }
local_run() { # MOVER LABEL
  local M=$1 W=$WORK/local
  rm -rf "$W"; mkdir -p "$W"
  "$M" init --site b --dir "$W"/site --json >/dev/null
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  local b r
  b=$( { /usr/bin/time -f "%U %S" "$M" backup "$SRC" --site-dir "$W"/site --json > "$W"/b.json; } 2>&1 | tail -1)
  r=$( { /usr/bin/time -f "%U %S" "$M" restore "$(json "$W"/b.json snapshot)" --to "$W"/r --site-dir "$W"/site --json > "$W"/r.json; } 2>&1 | tail -1)
  echo "$2: backup $(json "$W"/b.json elapsed_s)s cpu(u s)=$b restore $(json "$W"/r.json elapsed_s)s cpu(u s)=$r"
  rm -rf "$W"
}
for round in $(seq "$ROUNDS"); do
  for which in base head; do
    if [ "$which" = base ]; then M=$BASE; else M=$HEAD; fi
    local_run "$M" "local-round$round-$which"
    MOVER=$M OUT=$WORK/remote "$ROOT/bench/remote_probe.sh" "$SRC" "remote-round$round-$which"
    MOVER=$M OUT=$WORK/restore "$ROOT/bench/restore_probe.sh" "$SRC" "restore-round$round-$which"
  done
done
