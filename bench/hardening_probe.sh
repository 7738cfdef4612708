#!/bin/bash
# Alternating local backup + restore runs of one tree with two mover binaries, side by side:
#   bench/hardening_probe.sh BASE_MOVER HEAD_MOVER SOURCE_DIR WORK_DIR [ROUNDS]
# e.g. a worktree of the older commit built with `cargo build -p mover --bin mover`, this
# checkout's target/debug/mover, a tree in /dev/shm, and a work dir on the disk under test.
# Prints per run: backup and restore seconds (the job's elapsed_s) and CPU (user, system).
set -euo pipefail
BASE=$1; HEAD=$2; SRC=$3; W=$4; ROUNDS=${5:-3}
for round in $(seq "$ROUNDS"); do
  for which in base head; do
    if [ $which = base ]; then M=$BASE; else M=$HEAD; fi
    rm -rf "$W"; mkdir -p "$W"
    "$M" init --site b --dir "$W"/site --json >/dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    B=$( { /usr/bin/time -f "%U %S" "$M" backup "$SRC" --site-dir "$W"/site --json > "$W"/b.json; } 2>&1 | tail -1)
    SNAP=$(python3 -c "import json;print(json.load(open('$W/b.json'))['snapshot'])")
    BE=$(python3 -c "import json;print(json.load(open('$W/b.json'))['elapsed_s'])")
    R=$( { /usr/bin/time -f "%U %S" "$M" restore $SNAP --to "$W"/r --site-dir "$W"/site --json > "$W"/r.json; } 2>&1 | tail -1)
    RE=$(python3 -c "import json;print(json.load(open('$W/r.json'))['elapsed_s'])")
    echo "round $round $which backup ${BE}s cpu(u s)=$B restore ${RE}s cpu(u s)=$R"
  done
done
rm -rf "$W"
