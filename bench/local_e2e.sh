#!/usr/bin/env bash
# End-to-end local backup benchmark: how close does `mover backup` get to what the disk can do?
#
# For an incompressible and a float32-checkpoint data set it measures
#   1. the physical limit: one fio run reading the data set (O_DIRECT, io_uring) while writing
#      the same volume to a scratch file on the same disk, since a local backup does both;
#   2. a full backup into a fresh site (GB/s = bytes_total / elapsed_s, peak RSS);
#   3. for checkpoints, an incremental backup after 2% of one checkpoint changed, against the
#      time it takes merely to `cat` that file;
# and the peak RSS of full backups of 1 GiB and 8 GiB, to show memory does not grow with data.
#
# Environment:
#   DATA_ROOT  where data sets, sites and results go (default /work/bench-data). Must be on the
#              disk being measured, not a tmpfs. Needs about 3x SIZE + the RSS sets free.
#   SIZE       size of each data set (default 4GiB; units as mover-datagen: GiB, MiB, GB ...)
#   SKIP_8G=1  leave out the 8 GiB peak-RSS run
#   RSS_SIZES  data set sizes for the peak-RSS runs (default "1GiB 8GiB")
#
# Data sets are generated once and reused (a marker file records a complete generation).
# Raw outputs (fio and job JSON, /usr/bin/time reports) stay in DATA_ROOT/run-TIMESTAMP/;
# the summary goes to stdout and DATA_ROOT/results.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_ROOT=${DATA_ROOT:-/work/bench-data}
SIZE=${SIZE:-4GiB}
SKIP_8G=${SKIP_8G:-0}
RSS_SIZES=${RSS_SIZES:-"1GiB 8GiB"}
MUTATE_FRACTION=0.02
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
MOVER=$TARGET_DIR/release/mover
DATAGEN=$TARGET_DIR/release/mover-datagen

COMMANDS=()
CACHE_NOTE=""
FIO_ROWS=()
BACKUP_ROWS=()
INCREMENTAL_ROWS=()

die() {
    echo "local_e2e.sh: $*" >&2
    exit 1
}
log() { echo "== $*" >&2; }
# Keeps the exact command lines for the report, as they were run.
record() { COMMANDS+=("$*"); }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

# apt-get update only when the install fails without it: the package lists are often current,
# and an update is slow and needs the network.
ensure_package() {
    local cmd=$1 package=$2
    if [[ -x $cmd ]] || command -v "$cmd" >/dev/null; then
        return 0
    fi
    log "installing $package"
    record "apt-get install -y $package"
    if ! DEBIAN_FRONTEND=noninteractive as_root apt-get install -y "$package" >&2; then
        record "apt-get update"
        as_root apt-get update >&2 || die "$package is missing and apt-get update failed; install $package and rerun"
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y "$package" >&2 ||
            die "$package is missing and could not be installed; install it and rerun"
    fi
}

drop_caches() {
    sync
    if ! as_root sh -c 'echo 3 > /proc/sys/vm/drop_caches' 2>/dev/null; then
        if [[ -z $CACHE_NOTE ]]; then
            CACHE_NOTE="could not drop the page cache (needs root and a writable /proc/sys/vm); buffered reads (cat, fio layout) may have been served from memory"
            log "note: $CACHE_NOTE"
        fi
    fi
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }
# A / B * SCALE printed with FORMAT, 0 when B is 0. The parentheses matter: in awk,
# `printf f, b > 0 ? ...` redirects the output into a file named "0".
div() { awk -v a="$1" -v b="$2" -v k="${3:-1}" -v f="${4:-%.3f}" 'BEGIN { printf f, (b > 0 ? a / b * k : 0) }'; }
now() { date +%s.%N; }

# Sets SET_DIR to the data set KIND of SIZE in files of FILE_SIZE, generating it if needed.
# (A global, not command substitution, so `record` in here reaches the report.)
ensure_set() {
    local kind=$1 size=$2 file_size=$3
    SET_DIR=$DATA_ROOT/$kind-$size
    local marker=$DATA_ROOT/.$kind-$size.complete
    local cmd=("$DATAGEN" generate --kind "$kind" --size "$size" --file-size "$file_size" --seed 42 --out "$SET_DIR")
    if [[ -f $marker ]]; then
        log "reusing $SET_DIR"
        record "# reused $SET_DIR, made by: ${cmd[*]}"
        return
    fi
    record "${cmd[*]}"
    rm -rf "$SET_DIR"
    log "generating $SET_DIR"
    "${cmd[@]}" >&2
    touch "$marker"
}

set_bytes() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }'; }

# One fio invocation, two concurrent jobs: direct sequential read of every file of the data
# set, and a direct sequential write of the same volume to a scratch file on the same disk.
fio_pair() {
    local name=$1 dir=$2
    local bytes files scratch out
    bytes=$(set_bytes "$dir")
    files=$(find "$dir" -type f | sort | paste -sd: -)
    [[ $(find "$dir" -type f -name '*:*' | wc -l) -eq 0 ]] || die "$dir: file names with ':' cannot be passed to fio's filename list"
    scratch=$DATA_ROOT/scratch/fio-write.dat
    out=$RUN_DIR/fio-$name.json
    mkdir -p "$DATA_ROOT/scratch"
    rm -f "$scratch"
    local cmd=(fio --output-format=json --output="$out"
        --ioengine=io_uring --direct=1 --bs=1M --iodepth=32
        --name=read --rw=read --filename="$files" --file_service_type=sequential
        --name=write --rw=write --filename="$scratch" --size="$bytes" --end_fsync=1)
    record "${cmd[*]}"
    drop_caches
    log "fio read+write pair on $name ($bytes bytes)"
    "${cmd[@]}"
    rm -f "$scratch"
    local read_b read_ms write_b write_ms pair_ms
    read -r read_b read_ms write_b write_ms pair_ms < <(python3 - "$out" <<'PY'
import json, sys
jobs = {j["jobname"]: j for j in json.load(open(sys.argv[1]))["jobs"]}
r, w = jobs["read"], jobs["write"]
# job_runtime (ms) covers the whole job including end_fsync; older fio lacks it.
pair = max(j.get("job_runtime", j[d]["runtime"]) for j, d in ((r, "read"), (w, "write")))
print(r["read"]["io_bytes"], r["read"]["runtime"], w["write"]["io_bytes"], w["write"]["runtime"], pair)
PY
    )
    FIO_READ_GBPS[$name]=$(div "$read_b" "$read_ms" 1e-6)
    local write_gbps pair_s
    write_gbps=$(div "$write_b" "$write_ms" 1e-6)
    pair_s=$(awk -v ms="$pair_ms" 'BEGIN { printf "%.2f", ms / 1000 }')
    FIO_ROWS+=("| $name | $bytes | ${FIO_READ_GBPS[$name]} | $write_gbps | $pair_s |")
}

# Times `mover backup DATA` into SITE; sets B_* and appends a row to the backups table.
backup_run() {
    local set_name=$1 run=$2 site=$3 data=$4
    local json=$RUN_DIR/$set_name-$run.json timef=$RUN_DIR/$set_name-$run.time
    local cmd=(/usr/bin/time -v -o "$timef" "$MOVER" backup "$data" --site-dir "$site" --json)
    record "${cmd[*]} > $json"
    drop_caches
    log "backup $run of $set_name"
    if ! "${cmd[@]}" >"$json"; then
        die "mover backup of $data failed (job output: $json, time report: $timef)"
    fi
    read -r B_STATE B_TOTAL B_READ B_NEW B_SENT B_ELAPSED B_MEMCPY B_DIRECT B_WALL B_RSS_KIB < <(python3 - "$json" "$timef" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))
wall, rss = 0.0, 0
for line in open(sys.argv[2]):
    line = line.strip()
    if line.startswith("Elapsed (wall clock) time"):
        clock = line.rsplit(" ", 1)[1].split(":")  # h:mm:ss or m:ss
        wall = sum(float(x) * 60 ** i for i, x in enumerate(reversed(clock)))
    elif line.startswith("Maximum resident set size"):
        rss = int(line.rsplit(" ", 1)[1])
print(job["state"], job["bytes_total"], job["bytes_read"], job["bytes_new"], job["bytes_sent"],
      job["elapsed_s"], job["memcpy_per_byte"], str(job["direct_io"]).lower(), wall, rss)
PY
    )
    [[ $B_STATE == done ]] || die "backup of $data ended in state $B_STATE (see $json)"
    B_GBPS=$(div "$B_TOTAL" "$B_ELAPSED" 1e-9)
    local rss_mib vs_fio="-"
    rss_mib=$(awk -v k="$B_RSS_KIB" 'BEGIN { printf "%.1f", k / 1024 }')
    if [[ $run == full && -n ${FIO_READ_GBPS[$set_name]:-} ]]; then
        vs_fio=$(div "$B_GBPS" "${FIO_READ_GBPS[$set_name]}" 100 '%.0f%%')
    fi
    BACKUP_ROWS+=("| $set_name | $run | $B_TOTAL | $B_READ | $B_NEW | $B_SENT | $(printf %.3f "$B_ELAPSED") | $(printf %.2f "$B_WALL") | $B_GBPS | $vs_fio | $rss_mib | $(printf %.3f "$B_MEMCPY") | $B_DIRECT |")
}

fresh_site() {
    local site=$1
    rm -rf "$site"
    mkdir -p "$(dirname "$site")"
    record "$MOVER init --site bench --dir $site"
    "$MOVER" init --site bench --dir "$site" >/dev/null
}

# ---------------------------------------------------------------------------------------------

declare -A FIO_READ_GBPS=()
command -v python3 >/dev/null || die "python3 is needed to parse fio and job JSON"
cd "$ROOT"
log "building mover and mover-datagen (release)"
record "cargo build --release -p mover -p mover-tools"
cargo build --release -p mover -p mover-tools
ensure_package fio fio
ensure_package /usr/bin/time time

mkdir -p "$DATA_ROOT"
RUN_DIR=$DATA_ROOT/run-$(date +%Y%m%dT%H%M%S)
mkdir -p "$RUN_DIR"
if [[ $(stat -f -c %T "$DATA_ROOT") == tmpfs ]]; then
    die "DATA_ROOT $DATA_ROOT is on tmpfs: this would measure memory, not a disk; set DATA_ROOT"
fi

size_bytes=$("$DATAGEN" size "$SIZE")
rss_sizes=()
for s in $RSS_SIZES; do
    if [[ $SKIP_8G == 1 && $("$DATAGEN" size "$s") -eq $((8 << 30)) ]]; then
        continue
    fi
    rss_sizes+=("$s")
done

# Refuse to start what cannot finish: sets still to generate, plus a site and the fio scratch
# file for the largest set.
largest=$size_bytes
need=0
for spec in "incompressible $SIZE" "checkpoints $SIZE" "${rss_sizes[@]/#/incompressible }"; do
    read -r kind s <<<"$spec"
    b=$("$DATAGEN" size "$s")
    ((b > largest)) && largest=$b
    [[ -f $DATA_ROOT/.$kind-$s.complete ]] || need=$((need + b))
done
need=$((need + 2 * largest + (1 << 30)))
avail=$(($(df -P -k "$DATA_ROOT" | awk 'NR == 2 { print $4 }') * 1024))
((avail >= need)) || die "DATA_ROOT $DATA_ROOT has $avail bytes free, expected at least $need for SIZE=$SIZE and RSS_SIZES=${rss_sizes[*]}"

# --- incompressible ---------------------------------------------------------------------------
ensure_set incompressible "$SIZE" 256MiB
inc_dir=$SET_DIR
inc_name=incompressible-$SIZE
fio_pair "$inc_name" "$inc_dir"
fresh_site "$DATA_ROOT/sites/$inc_name"
backup_run "$inc_name" full "$DATA_ROOT/sites/$inc_name" "$inc_dir"
rm -rf "$DATA_ROOT/sites/$inc_name"

# --- checkpoints: full, then incremental after a 2% change --------------------------------------
ensure_set checkpoints "$SIZE" 512MiB
cp_dir=$SET_DIR
cp_name=checkpoints-$SIZE
cp_site=$DATA_ROOT/sites/$cp_name
fio_pair "$cp_name" "$cp_dir"
fresh_site "$cp_site"
backup_run "$cp_name" full "$cp_site" "$cp_dir"

changed=$(find "$cp_dir" -type f -name '*.f32' | sort | head -n 1)
[[ -n $changed ]] || die "$cp_dir holds no .f32 checkpoint to mutate"
# A new seed each run: re-applying the same mutation would write identical bytes, and the
# incremental backup would then find every chunk already stored.
counter=$DATA_ROOT/.mutation-count
seed=$(($(cat "$counter" 2>/dev/null || echo 0) + 1))
echo "$seed" >"$counter"
record "$DATAGEN mutate $changed --fraction $MUTATE_FRACTION --seed $seed"
mutation=$("$DATAGEN" mutate "$changed" --fraction "$MUTATE_FRACTION" --seed "$seed")
log "$mutation"
mutated_len=$(sed -n 's/.* length=\([0-9]*\).*/\1/p' <<<"$mutation")
backup_run "$cp_name" incremental "$cp_site" "$cp_dir"
inc_elapsed=$B_ELAPSED inc_wall=$B_WALL

record "cat $changed > /dev/null"
drop_caches
t0=$(now)
cat "$changed" >/dev/null
t1=$(now)
cat_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
INCREMENTAL_ROWS+=("| $(basename "$changed") | $(stat -c %s "$changed") | $mutated_len | $(printf %.3f "$inc_elapsed") | $(printf %.2f "$inc_wall") | $cat_s | $(ratio "$inc_elapsed" "$cat_s") | $(ratio "$inc_wall" "$cat_s") |")
rm -rf "$cp_site"

# --- peak RSS against data size ------------------------------------------------------------------
for s in "${rss_sizes[@]}"; do
    ensure_set incompressible "$s" 256MiB
    name=incompressible-$s
    fresh_site "$DATA_ROOT/sites/rss-$name"
    backup_run "$name" rss "$DATA_ROOT/sites/rss-$name" "$SET_DIR"
    rm -rf "$DATA_ROOT/sites/rss-$name"
done

# --- report ----------------------------------------------------------------------------------------
results=$RUN_DIR/results.md
{
    echo "# mover local end-to-end backup benchmark"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), mover $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (working tree modified)')"
    echo
    echo "## Machine"
    echo
    echo "- nproc: $(nproc)"
    echo "- cpu: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "- kernel: $(uname -r)"
    echo "- ulimit -l: $(ulimit -l)"
    echo "- memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "- DATA_ROOT: $DATA_ROOT on $(df -P "$DATA_ROOT" | awk 'NR == 2 { print $1 }') ($(stat -f -c %T "$DATA_ROOT"))"
    echo "- fio: $(fio --version)"
    [[ -z $CACHE_NOTE ]] || echo "- note: $CACHE_NOTE"
    echo
    echo "## Physical limit (one fio run: O_DIRECT read of the set + O_DIRECT write of as many bytes, concurrently)"
    echo
    echo "| data set | bytes | read GB/s | write GB/s | pair elapsed s |"
    echo "|---|---:|---:|---:|---:|"
    printf '%s\n' "${FIO_ROWS[@]}"
    echo
    echo "## Backups (GB/s = bytes_total / elapsed_s, 1e9 B/s; vs fio = share of the fio pair's read GB/s)"
    echo
    echo "| data set | run | bytes_total | bytes_read | bytes_new | bytes_sent | elapsed_s | wall s | GB/s | vs fio | max RSS MiB | memcpy/B | direct_io |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    printf '%s\n' "${BACKUP_ROWS[@]}"
    echo
    echo "## Incremental: ${MUTATE_FRACTION} of one checkpoint changed"
    echo
    echo "| changed file | size | bytes changed | backup elapsed_s | backup wall s | cat s | elapsed_s / cat | wall / cat |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${INCREMENTAL_ROWS[@]}"
    echo
    echo "## Commands"
    echo
    echo '```'
    echo "DATA_ROOT=$DATA_ROOT SIZE=$SIZE SKIP_8G=$SKIP_8G RSS_SIZES=\"$RSS_SIZES\" bench/local_e2e.sh"
    printf '%s\n' "${COMMANDS[@]}"
    echo '```'
    echo
    echo "Raw outputs: $RUN_DIR"
} >"$results"
cp "$results" "$DATA_ROOT/results.md"
cat "$results"
