#!/usr/bin/env bash
# Metadata-heavy trees: back up and restore FILES small files (0-96 bytes) spread over DIRS
# directories, and report elapsed time, files/s and peak RSS (GNU time's "Maximum resident
# set size") for mover and, when installed, restic and borg on the same tree, one after
# another with a warm cache.
#
# Environment:
#   DATA_ROOT  where the tree, repositories and restores go (default /dev/shm/mover-many:
#              the files are tiny, so a tmpfs takes metadata, not the disk, out of the way;
#              1 M files need about 4 GiB per copy there, two copies per tool)
#   FILES      number of files (default 1000000)
#   DIRS       number of directories (default 1000)
#   KEEP=1     keep the tree between runs (it is regenerated when FILES or DIRS change)
#
# Needs target/release/mover (cargo build --release -p mover). Results go to stdout and
# DATA_ROOT/results.md; the /usr/bin/time reports stay in DATA_ROOT/run-*/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_ROOT=${DATA_ROOT:-/dev/shm/mover-many}
FILES=${FILES:-1000000}
DIRS=${DIRS:-1000}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
MOVER=$TARGET_DIR/release/mover
TREE=$DATA_ROOT/tree
RUN=$DATA_ROOT/run-$(date +%Y%m%d-%H%M%S)
ROWS=()

die() {
    echo "many_files.sh: $*" >&2
    exit 1
}
[ -x "$MOVER" ] || die "$MOVER missing: cargo build --release -p mover"
[ -x /usr/bin/time ] || die "/usr/bin/time (GNU time) missing"
mkdir -p "$DATA_ROOT" "$RUN"

generate() {
    if [ -f "$DATA_ROOT/tree.complete" ] && [ "$(cat "$DATA_ROOT/tree.complete")" = "$FILES $DIRS" ]; then
        return
    fi
    rm -rf "$TREE"
    echo "generating $FILES files in $DIRS directories under $TREE" >&2
    python3 - "$TREE" "$FILES" "$DIRS" <<'EOF'
import os, random, sys
root, files, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(14)
for d in range(dirs):
    os.makedirs(os.path.join(root, f"d{d:04}"), exist_ok=True)
for i in range(files):
    path = os.path.join(root, f"d{i % dirs:04}", f"f{i:07}")
    with open(path, "wb") as f:
        f.write(rng.randbytes(rng.randint(0, 96)))
EOF
    echo "$FILES $DIRS" > "$DATA_ROOT/tree.complete"
}

# measure NAME LABEL COMMAND...: runs under GNU time, adds a row.
measure() {
    local name=$1 label=$2
    shift 2
    local report=$RUN/$name.time
    /usr/bin/time -v -o "$report" "$@" > "$RUN/$name.out" 2> "$RUN/$name.err" \
        || die "$name failed: $(tail -3 "$RUN/$name.err")"
    local elapsed rss seconds
    elapsed=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$report")
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$report")
    seconds=$(python3 -c "
t = '$elapsed'.split(':')
s = 0.0
for part in t: s = s * 60 + float(part)
print(f'{s:.1f}')")
    ROWS+=("| $label | $seconds | $(python3 -c "print(f'{$FILES / $seconds:,.0f}')") | $((rss / 1024)) |")
    echo "$label: ${seconds} s, $((rss / 1024)) MiB peak RSS" >&2
}

generate
sync

# mover: a fresh site, a full backup, a restore, then a second backup (nothing changed).
SITE=$RUN/site
"$MOVER" init --site bench --dir "$SITE" > /dev/null
measure mover-backup "mover backup" "$MOVER" backup "$TREE" --site-dir "$SITE" --json
SNAPSHOT=$(python3 -c "import json,sys; print(json.load(open('$RUN/mover-backup.out'))['snapshot'])")
measure mover-restore "mover restore" "$MOVER" restore "$SNAPSHOT" --to "$RUN/mover-restored" --site-dir "$SITE" --json
rm -rf "$RUN/mover-restored"
MANIFEST_BYTES=$(find "$SITE/manifests" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
PACKS=$(find "$SITE" -name '*.pack' | wc -l)
measure mover-again "mover backup, unchanged" "$MOVER" backup "$TREE" --site-dir "$SITE" --json

if command -v restic > /dev/null; then
    export RESTIC_PASSWORD=bench
    restic init --repo "$RUN/restic" > /dev/null
    measure restic-backup "restic backup" restic --repo "$RUN/restic" backup --quiet "$TREE"
    measure restic-restore "restic restore" restic --repo "$RUN/restic" restore latest --target "$RUN/restic-restored"
    rm -rf "$RUN/restic-restored"
else
    echo "restic not installed: left out" >&2
fi
if command -v borg > /dev/null; then
    export BORG_PASSPHRASE=bench
    borg init --encryption=none "$RUN/borg" > /dev/null
    measure borg-backup "borg create" borg create "$RUN/borg::one" "$TREE"
    mkdir -p "$RUN/borg-restored"
    measure borg-restore "borg extract" sh -c "cd '$RUN/borg-restored' && borg extract '$RUN/borg::one'"
    rm -rf "$RUN/borg-restored"
else
    echo "borg not installed: left out" >&2
fi

{
    echo "$FILES files of 0-96 bytes in $DIRS directories ($TREE), $(nproc) cores, $(date -u +%F)"
    echo
    echo "| run | elapsed s | files/s | peak RSS MiB |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "mover's manifest object: $MANIFEST_BYTES bytes; packs after the first backup: $PACKS"
} | tee "$DATA_ROOT/results.md"
rm -rf "$RUN/site" "$RUN/restic" "$RUN/borg"
[ "${KEEP:-1}" = 1 ] || rm -rf "$TREE"
