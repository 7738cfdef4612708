#!/usr/bin/env bash
# Cross-site benchmark: two mover sites on this machine, beside what the same machine does with
# other tools, on the same data sets, in one run.
#
# Sections (SECTIONS, default "lan wan"):
#   lan  0. fio on DATA_ROOT's disk: direct 1 MiB reads of the incompressible set (QD 6, the
#           two workers' 3 each) beside direct 1 MiB writes (QD 4), flow-balanced to equal bytes:
#           the disk's ceiling for a backup whose source and destination share it, as both
#           sites here do; and the same reads alone;
#        1. iperf3 TCP over loopback, one stream (the kernel's ceiling for a byte stream);
#        2. `mover-bench quic`: raw quinn, memory to memory, separate processes, mover's
#           transport settings: 1 connection x 1 stream, and 2 connections (mover's shape: one
#           per worker on this 2-core machine);
#        3. mover site-to-site backup (site a -> daemon of site b, loopback) of an incompressible
#           and a float32-checkpoint data set, each into fresh sites, caches dropped first;
#           restore of that snapshot from b; and for reference a local backup of the same set;
#        4. the incompressible backup again from /dev/shm (no disk read at the source: isolates
#           the transfer and the receiver) unless SHM=0;
#        5. rsync -a over ssh to localhost (a private sshd on a free port) of the same sets,
#           with ssh's default cipher and with aes128-gcm@openssh.com.
#   wan  mover backups from a to b through `mover-wan` (RTT 2 x 25 ms, 0.5% loss, 1 Gbit/s by
#        default), a's peer set to udp_payload_bytes_max = 1452, for each congestion controller
#        and bandwidth cap in WAN_CASES; link utilisation = bytes / (elapsed x rate); plus raw
#        quinn (`mover-bench quic --wan`) on the same link for reference.
#
# GB/s = bytes_total / elapsed_s (mover's job document) in 1e9 B/s; for rsync, bytes of the set /
# wall time of the rsync command. Every run records the load average before it and the whole
# machine's CPU busy share during it (/proc/stat): other work on the box shows there.
#
# Environment:
#   DATA_ROOT   data sets, sites and results (default /work/bench-remote); on the disk, not tmpfs
#   SIZE        size of each LAN data set (default 4GiB; units as mover-datagen)
#   REPEAT      runs of each LAN measurement and each bbr WAN case (default 2)
#   SECTIONS    "lan wan" (default), "lan" or "wan"
#   SHM         1 (default) also back up the incompressible set from /dev/shm; 0 to skip
#   IPERF_SECONDS  duration of each iperf3 run (default 10)
#   QUIC_SIZE   bytes per raw quinn run (default SIZE)
#   SSH_CIPHERS ciphers for rsync's ssh, "default" = ssh's own choice
#               (default "default aes128-gcm@openssh.com")
#   WAN_ARGS    mover-wan link (default "--delay-ms 25 --loss 0.005 --rate 1gbit")
#   WAN_RATE_BPS  the link rate in bits/s for utilisation (default 1e9)
#   WAN_SIZE    data set for bbr WAN cases (default 1GiB)
#   WAN_CUBIC_SIZE  data set for cubic WAN cases (default 32MiB: cubic reads 0.5% random loss
#               as congestion and moves a few Mbit/s, a larger set takes minutes)
#   WAN_CASES   congestion:bandwidth pairs, "-" for no cap
#               (default "bbr:- bbr:950mbit bbr:1gbit cubic:- cubic:950mbit")
#   WAN_CUBIC_REPEAT  runs of each cubic case (default 1)
#   NO_BUILD=1  use the binaries already in target/release
#   VERIFY=1    compare every restored and rsynced tree with the source (cmp; slow)
#   KEEP_SETS=1 keep the generated data sets for the next run (default: removed at the end)
#
# Binaries are copied to RUN_DIR/bin first, so a rebuild elsewhere during the run changes
# nothing. Raw outputs (job JSON, time reports, iperf3/quinn JSON, relay counters, logs) stay
# in DATA_ROOT/run-TIMESTAMP/; the summary goes to stdout and DATA_ROOT/results-remote.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_ROOT=${DATA_ROOT:-/work/bench-remote}
SIZE=${SIZE:-4GiB}
REPEAT=${REPEAT:-2}
SECTIONS=${SECTIONS:-"lan wan"}
SHM=${SHM:-1}
IPERF_SECONDS=${IPERF_SECONDS:-10}
QUIC_SIZE=${QUIC_SIZE:-$SIZE}
SSH_CIPHERS=${SSH_CIPHERS:-"default aes128-gcm@openssh.com"}
WAN_ARGS=${WAN_ARGS:-"--delay-ms 25 --loss 0.005 --rate 1gbit"}
WAN_RATE_BPS=${WAN_RATE_BPS:-1e9}
WAN_SIZE=${WAN_SIZE:-1GiB}
WAN_CUBIC_SIZE=${WAN_CUBIC_SIZE:-32MiB}
WAN_CASES=${WAN_CASES:-"bbr:- bbr:950mbit bbr:1gbit cubic:- cubic:950mbit"}
WAN_CUBIC_REPEAT=${WAN_CUBIC_REPEAT:-1}
NO_BUILD=${NO_BUILD:-0}
VERIFY=${VERIFY:-0}
KEEP_SETS=${KEEP_SETS:-0}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

COMMANDS=()
CACHE_NOTE=""
NET_ROWS=()
DISK_ROWS=()
MOVER_ROWS=()
RSYNC_ROWS=()
WAN_ROWS=()
CLEANUP=()

die() {
    echo "remote_e2e.sh: $*" >&2
    exit 1
}
log() { echo "== $*" >&2; }
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
            CACHE_NOTE="could not drop the page cache (needs root); reads may have been served from memory"
            log "note: $CACHE_NOTE"
        fi
    fi
}

div() { awk -v a="$1" -v b="$2" -v k="${3:-1}" -v f="${4:-%.3f}" 'BEGIN { printf f, (b > 0 ? a / b * k : 0) }'; }
now() { date +%s.%N; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
load1() { cut -d' ' -f1 /proc/loadavg; }
# "busy idle" jiffies of the whole machine.
cpu_sample() { awk '/^cpu / { idle = $5 + $6; busy = 0; for (i = 2; i <= NF; i++) busy += $i; print busy - idle, idle; exit }' /proc/stat; }
# Busy share of all cores between two samples, as a percentage of the whole machine.
cpu_busy() {
    local b0 i0 b1 i1
    read -r b0 i0 <<<"$1"
    read -r b1 i1 <<<"$2"
    awk -v b="$((b1 - b0))" -v i="$((i1 - i0))" 'BEGIN { printf "%.0f%%", (b + i > 0 ? 100 * b / (b + i) : 0) }'
}
# utime + stime of a process in seconds.
proc_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$1/stat"; }
set_bytes() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
# time -f '%e %U %S' report: wall user sys
time_fields() { tail -n 1 "$1"; }

cleanup() {
    local item
    for item in "${CLEANUP[@]}"; do
        eval "$item" || true
    done
}
trap cleanup EXIT

# Sets SET_DIR to the data set KIND of SIZE (files of FILE_SIZE), generating it if needed.
ensure_set() {
    local kind=$1 size=$2 file_size=$3
    SET_DIR=$DATA_ROOT/sets/$kind-$size
    local marker=$DATA_ROOT/sets/.$kind-$size.complete
    local cmd=("$DATAGEN" generate --kind "$kind" --size "$size" --file-size "$file_size" --seed 42 --out "$SET_DIR")
    mkdir -p "$DATA_ROOT/sets"
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

# --- two sites ----------------------------------------------------------------------------------

# Fresh sites a and b under DATA_ROOT/sites, b's daemon running; sets DAEMON_PID, B_PORT, A_CONF.
start_pair() {
    local sites=$DATA_ROOT/sites
    rm -rf "$sites"
    mkdir -p "$sites"
    "$MOVER" init --site a --dir "$sites/a" --listen 127.0.0.1:0 >/dev/null
    "$MOVER" init --site b --dir "$sites/b" --listen 127.0.0.1:0 >/dev/null
    local fa fb
    fa=$("$MOVER" identity --config "$sites/a/mover.toml" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["fingerprint"])')
    fb=$("$MOVER" identity --config "$sites/b/mover.toml" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["fingerprint"])')
    "$MOVER" peer add a 127.0.0.1:1 "$fa" --config "$sites/b/mover.toml" >/dev/null
    local out=$RUN_DIR/daemon-$RUN_TAG.out err=$RUN_DIR/daemon-$RUN_TAG.err
    "$MOVER" daemon --config "$sites/b/mover.toml" >"$out" 2>"$err" &
    DAEMON_PID=$!
    CLEANUP+=("kill $DAEMON_PID 2>/dev/null")
    local i
    for i in $(seq 200); do
        B_PORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out")
        [[ -n $B_PORT ]] && break
        kill -0 "$DAEMON_PID" 2>/dev/null || die "daemon of b exited (see $err)"
        sleep 0.05
    done
    [[ -n $B_PORT ]] || die "daemon of b did not say where it listens (see $out, $err)"
    "$MOVER" peer add b "127.0.0.1:$B_PORT" "$fb" --config "$sites/a/mover.toml" >/dev/null
    A_CONF=$sites/a/mover.toml
    A_DIR=$sites/a
}

stop_pair() {
    kill "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    rm -rf "$DATA_ROOT/sites"
}

# Sets keys of a's [peers.b] section (KEY=VALUE ..., values written as TOML strings unless
# numeric). `mover peer add` wrote the section; keys go right under its header.
set_peer_b() {
    python3 - "$A_CONF" "$@" <<'PY'
import re, sys
path, pairs = sys.argv[1], sys.argv[2:]
text = open(path).read().split("\n")
head = text.index("[peers.b]")
end = next((i for i in range(head + 1, len(text)) if text[i].startswith("[")), len(text))
keys = dict(p.split("=", 1) for p in pairs)
body = [l for l in text[head + 1:end] if l.split("=")[0].strip() not in keys]
for k, v in keys.items():
    body.insert(0, f"{k} = {v}" if re.fullmatch(r"[0-9]+", v) else f'{k} = "{v}"')
text[head + 1:end] = body
open(path, "w").write("\n".join(text))
PY
}

# One mover job (backup or restore) on site a: sets J_* from its job document and time report.
mover_job() {
    local tag=$1
    shift
    local json=$RUN_DIR/$tag.json timef=$RUN_DIR/$tag.time
    record "$MOVER --site-dir \$A --json $*"
    local d0 c0 l0
    l0=$(load1)
    d0=$(proc_cpu "$DAEMON_PID")
    c0=$(cpu_sample)
    if ! /usr/bin/time -f '%e %U %S' -o "$timef" "$MOVER" --site-dir "$A_DIR" --json "$@" >"$json" 2>"$RUN_DIR/$tag.err"; then
        die "mover $* failed (job: $json, log: $RUN_DIR/$tag.err)"
    fi
    local c1 d1
    c1=$(cpu_sample)
    d1=$(proc_cpu "$DAEMON_PID")
    J_BUSY=$(cpu_busy "$c0" "$c1")
    J_LOAD=$l0
    J_DCPU=$(awk -v a="$d0" -v b="$d1" 'BEGIN { printf "%.2f", b - a }')
    read -r J_STATE J_TOTAL J_ELAPSED J_WIRE J_SENT < <(python3 - "$json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
print(j["state"], j["bytes_total"], j["elapsed_s"], j.get("wire_bytes_sent", 0) or 0, j.get("bytes_sent", 0) or 0)
PY
    )
    [[ $J_STATE == done ]] || die "mover $* ended in state $J_STATE (see $json)"
    local wall user sys
    read -r wall user sys < <(time_fields "$timef")
    J_WALL=$wall
    J_CCPU=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
    J_GBPS=$(div "$J_TOTAL" "$J_ELAPSED" 1e-9)
}

verify_tree() {
    local src=$1 dst=$2
    [[ $VERIFY == 1 ]] || return 0
    log "verifying $dst against $src"
    diff -rq "$src" "$dst" >&2 || die "$dst differs from $src"
}

# Cross-site backup of DATA into fresh sites, then a restore of it from b.
mover_pair_run() {
    local set_name=$1 data=$2 rep=$3 source=$4
    RUN_TAG=$set_name-$source-$rep
    start_pair
    drop_caches
    log "mover backup $set_name from $source to b (run $rep)"
    mover_job "backup-$RUN_TAG" backup "$data" --to b
    MOVER_ROWS+=("| $set_name | backup a→b ($source) | $rep | $J_TOTAL | $J_WIRE | $(printf %.3f "$J_ELAPSED") | **$J_GBPS** | $J_CCPU | $J_DCPU | $J_LOAD | $J_BUSY |")
    if [[ $source == disk ]]; then
        local restore=$DATA_ROOT/restore
        rm -rf "$restore"
        drop_caches
        log "mover restore $set_name from b (run $rep)"
        mover_job "restore-$RUN_TAG" restore latest --to "$restore" --from b
        MOVER_ROWS+=("| $set_name | restore b→a | $rep | $J_TOTAL | - | $(printf %.3f "$J_ELAPSED") | **$J_GBPS** | $J_CCPU | $J_DCPU | $J_LOAD | $J_BUSY |")
        verify_tree "$data" "$restore"
        rm -rf "$restore"
    fi
    stop_pair
}

# A local backup of DATA into a fresh site (reference: no transport at all).
local_run() {
    local set_name=$1 data=$2 rep=$3
    local site=$DATA_ROOT/sites/local tag=local-$set_name-$rep
    rm -rf "$site"
    mkdir -p "$DATA_ROOT/sites"
    "$MOVER" init --site l --dir "$site" >/dev/null
    drop_caches
    log "mover local backup $set_name (run $rep)"
    record "$MOVER backup $data --site-dir $site --json"
    local l0 c0 c1
    l0=$(load1)
    c0=$(cpu_sample)
    /usr/bin/time -f '%e %U %S' -o "$RUN_DIR/$tag.time" "$MOVER" backup "$data" --site-dir "$site" --json >"$RUN_DIR/$tag.json" 2>"$RUN_DIR/$tag.err" ||
        die "local backup failed (see $RUN_DIR/$tag.err)"
    c1=$(cpu_sample)
    local total elapsed wall user sys
    read -r total elapsed < <(python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); print(j["bytes_total"], j["elapsed_s"])' "$RUN_DIR/$tag.json")
    read -r wall user sys < <(time_fields "$RUN_DIR/$tag.time")
    MOVER_ROWS+=("| $set_name | local backup (reference) | $rep | $total | - | $(printf %.3f "$elapsed") | $(div "$total" "$elapsed" 1e-9) | $(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }') | - | $l0 | $(cpu_busy "$c0" "$c1") |")
    rm -rf "$site"
}

# --- other tools --------------------------------------------------------------------------------

# fio on the disk under DATA_ROOT: reads of the set's first file alone, then beside writes.
fio_run() {
    local data=$1 rep=$2 file scratch=$DATA_ROOT/fio-scratch out
    file=$(find "$data" -type f | sort | head -n 1)
    local common=(--bs=1M --ioengine=io_uring --direct=1 --runtime=8 --time_based --output-format=json)
    drop_caches
    out=$RUN_DIR/fio-read-$rep.json
    record "fio --name=read --filename=$file --rw=read --iodepth=6 ${common[*]}"
    fio --name=read --filename="$file" --rw=read --iodepth=6 "${common[@]}" >"$out"
    DISK_ROWS+=("| fio direct reads alone (QD 6) | $rep | $(fio_gbps "$out" read) | - |")
    drop_caches
    out=$RUN_DIR/fio-mixed-$rep.json
    record "fio --name=read --filename=$file --rw=read --iodepth=6 --flow=1 ${common[*]} --name=write --filename=$scratch --size=2G --rw=write --iodepth=4 --flow=1 ${common[*]}"
    fio --name=read --filename="$file" --rw=read --iodepth=6 --flow=1 "${common[@]}" \
        --name=write --filename="$scratch" --size=2G --rw=write --iodepth=4 --flow=1 "${common[@]}" >"$out"
    rm -f "$scratch"
    DISK_ROWS+=("| fio direct reads (QD 6) beside direct writes (QD 4), equal bytes | $rep | **$(fio_gbps "$out" read)** | $(fio_gbps "$out" write) |")
}

# GB/s of fio job DIRECTION (read or write) summed over the jobs of a JSON report.
fio_gbps() {
    python3 - "$1" "$2" <<'PY'
import json, sys
jobs = json.load(open(sys.argv[1]))["jobs"]
print("%.3f" % (sum(j[sys.argv[2]]["bw_bytes"] for j in jobs) / 1e9))
PY
}

iperf_run() {
    local rep=$1 port out
    port=$(free_port)
    out=$RUN_DIR/iperf3-$rep.json
    iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
    local server=$!
    CLEANUP+=("kill $server 2>/dev/null")
    sleep 0.3
    record "iperf3 -s -1 -p $port & iperf3 -c 127.0.0.1 -p $port -t $IPERF_SECONDS -J"
    local l0 c0 c1
    l0=$(load1)
    c0=$(cpu_sample)
    iperf3 -c 127.0.0.1 -p "$port" -t "$IPERF_SECONDS" -J >"$out"
    c1=$(cpu_sample)
    wait "$server" 2>/dev/null || true
    local gbps
    gbps=$(python3 -c 'import json, sys; print("%.3f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"] / 8e9))' "$out")
    NET_ROWS+=("| iperf3 TCP loopback, 1 stream, ${IPERF_SECONDS} s | $rep | $gbps | - | - | $l0 | $(cpu_busy "$c0" "$c1") |")
}

quic_run() {
    local rep=$1 label=$2
    shift 2
    local out=$RUN_DIR/quic-$(echo "$label" | tr -c 'a-z0-9' '-')-$rep.json
    record "$BENCH quic --json $*"
    local l0 c0 c1
    l0=$(load1)
    c0=$(cpu_sample)
    "$BENCH" quic --json "$@" >"$out"
    c1=$(cpu_sample)
    local gbps cpu
    read -r gbps cpu < <(python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["server"]
print("%.3f" % r["gb_per_s"], "%.2f/%.2f" % (r["client_cpu_user_s"] + r["client_cpu_sys_s"], s["cpu_user_s"] + s["cpu_sys_s"]))
PY
    )
    NET_ROWS+=("| $label | $rep | $gbps | $cpu | $(python3 -c 'import json, sys; print(" ".join(str(c["path_mtu"]) for c in json.load(open(sys.argv[1]))["per_connection"]))' "$out") | $l0 | $(cpu_busy "$c0" "$c1") |")
}

start_sshd() {
    local dir=$RUN_DIR/ssh
    mkdir -p "$dir" /run/sshd
    chmod 700 "$dir"
    ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key" </dev/null
    ssh-keygen -q -t ed25519 -N '' -f "$dir/user_key" </dev/null
    cp "$dir/user_key.pub" "$dir/authorized_keys"
    SSH_PORT=$(free_port)
    cat >"$dir/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $dir/sshd.pid
Subsystem sftp internal-sftp
EOF
    record "/usr/sbin/sshd -f $dir/sshd_config -D -e &   # private sshd, port $SSH_PORT"
    /usr/sbin/sshd -f "$dir/sshd_config" -D -e 2>"$dir/sshd.log" &
    SSHD_PID=$!
    CLEANUP+=("kill $SSHD_PID 2>/dev/null")
    SSH_BASE="ssh -p $SSH_PORT -i $dir/user_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    local i
    for i in $(seq 50); do
        $SSH_BASE "$(id -un)@127.0.0.1" true 2>/dev/null && return 0
        sleep 0.1
    done
    die "private sshd on port $SSH_PORT does not accept the key (see $dir/sshd.log)"
}

# The cipher ssh negotiates with these options.
ssh_cipher() {
    $SSH_BASE -v "$@" "$(id -un)@127.0.0.1" true 2>&1 | sed -n 's/.*kex: client->server cipher: \([^ ]*\).*/\1/p' | head -n 1
}

rsync_run() {
    local set_name=$1 data=$2 cipher=$3 rep=$4
    local ssh_cmd=$SSH_BASE opts=()
    if [[ $cipher != default ]]; then
        opts=(-c "$cipher")
        ssh_cmd="$SSH_BASE -c $cipher"
    fi
    local used
    used=$(ssh_cipher "${opts[@]}")
    local dst=$DATA_ROOT/rsync-dst tag=rsync-$set_name-$(echo "$cipher" | tr -c 'a-z0-9' '-')-$rep
    rm -rf "$dst"
    mkdir -p "$dst"
    drop_caches
    log "rsync over ssh ($used) of $set_name (run $rep)"
    record "rsync -a -e \"$ssh_cmd\" $data/ $(id -un)@127.0.0.1:$dst/"
    local l0 c0 c1
    l0=$(load1)
    c0=$(cpu_sample)
    /usr/bin/time -f '%e %U %S' -o "$RUN_DIR/$tag.time" rsync -a -e "$ssh_cmd" "$data/" "$(id -un)@127.0.0.1:$dst/" 2>"$RUN_DIR/$tag.err" ||
        die "rsync failed (see $RUN_DIR/$tag.err)"
    sync
    c1=$(cpu_sample)
    local wall user sys bytes
    read -r wall user sys < <(time_fields "$RUN_DIR/$tag.time")
    bytes=$(set_bytes "$data")
    verify_tree "$data" "$dst"
    RSYNC_ROWS+=("| $set_name | $used | $rep | $bytes | $(printf %.2f "$wall") | **$(div "$bytes" "$wall" 1e-9)** | $(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }') | $l0 | $(cpu_busy "$c0" "$c1") |")
    rm -rf "$dst"
}

# --- WAN --------------------------------------------------------------------------------------------

wan_run() {
    local set_name=$1 data=$2 congestion=$3 bandwidth=$4 rep=$5
    RUN_TAG=wan-$set_name-$congestion-$bandwidth-$rep
    start_pair
    local relay_out=$RUN_DIR/relay-$RUN_TAG.out
    record "$WAN --listen 127.0.0.1:0 --to 127.0.0.1:$B_PORT $WAN_ARGS --json-stats"
    # shellcheck disable=SC2086
    "$WAN" --listen 127.0.0.1:0 --to "127.0.0.1:$B_PORT" $WAN_ARGS --json-stats >"$relay_out" 2>"$RUN_DIR/relay-$RUN_TAG.err" &
    local relay=$!
    CLEANUP+=("kill $relay 2>/dev/null")
    local relay_addr="" i
    for i in $(seq 100); do
        relay_addr=$(sed -n 's/^listening on \(.*\)$/\1/p' "$relay_out")
        [[ -n $relay_addr ]] && break
        sleep 0.05
    done
    [[ -n $relay_addr ]] || die "mover-wan did not start (see $relay_out)"
    local keys=("address=$relay_addr" "udp_payload_bytes_max=1452" "congestion=$congestion")
    [[ $bandwidth == - ]] || keys+=("bandwidth=$bandwidth")
    set_peer_b "${keys[@]}"
    record "# a's [peers.b]: ${keys[*]}"
    drop_caches
    log "WAN backup $set_name, $congestion, bandwidth $bandwidth (run $rep)"
    mover_job "backup-$RUN_TAG" backup "$data" --to b
    kill -TERM "$relay"
    wait "$relay" 2>/dev/null || true
    local drops
    drops=$(python3 - "$relay_out" <<'PY'
import json, sys
stats = None
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        stats = json.loads(line)
if stats is None:
    print("no stats")
else:
    c, s = stats["client_to_server"], stats["server_to_client"]
    print("%d/%d/%d of %d; acks %d/%d/%d" % (c["dropped_loss"], c["dropped_queue"], c["dropped_buffer"], c["received_datagrams"], s["dropped_loss"], s["dropped_queue"], s["dropped_buffer"]))
PY
    )
    local util wire_util
    util=$(awk -v b="$J_TOTAL" -v e="$J_ELAPSED" -v r="$WAN_RATE_BPS" 'BEGIN { printf "%.1f%%", 100 * b * 8 / (e * r) }')
    wire_util=$(awk -v b="$J_WIRE" -v e="$J_ELAPSED" -v r="$WAN_RATE_BPS" 'BEGIN { printf "%.1f%%", 100 * b * 8 / (e * r) }')
    WAN_ROWS+=("| mover backup | $set_name | $congestion | $bandwidth | $rep | $J_TOTAL | $J_WIRE | $(printf %.2f "$J_ELAPSED") | **$util** | $wire_util | $drops | $J_LOAD | $J_BUSY |")
    stop_pair
}

wan_quic_run() {
    local size=$1 congestion=$2 bandwidth=$3 rep=$4
    local out=$RUN_DIR/quic-wan-$congestion-$bandwidth-$size-$rep.json
    local args=(quic --json --size "$size" --connections 2 --udp-payload-bytes-max 1452 --congestion "$congestion" --wan "$WAN_ARGS")
    [[ $bandwidth == - ]] || args+=(--bandwidth "$bandwidth")
    record "$BENCH $(printf '%q ' "${args[@]}")"
    log "WAN raw quinn $size, $congestion, bandwidth $bandwidth (run $rep)"
    local l0 c0 c1
    l0=$(load1)
    c0=$(cpu_sample)
    "$BENCH" "${args[@]}" >"$out"
    c1=$(cpu_sample)
    local row
    row=$(python3 - "$out" "$WAN_RATE_BPS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); rate = float(sys.argv[2])
wire = sum(c["udp_tx_bytes"] for c in r["per_connection"])
w = r.get("wan") or {}
c, s = w.get("client_to_server", {}), w.get("server_to_client", {})
drops = "%d/%d/%d of %d; acks %d/%d/%d" % (c.get("dropped_loss", 0), c.get("dropped_queue", 0), c.get("dropped_buffer", 0), c.get("received_datagrams", 0), s.get("dropped_loss", 0), s.get("dropped_queue", 0), s.get("dropped_buffer", 0))
print("%d | %d | %.2f | **%.1f%%** | %.1f%% | %s" % (r["bytes"], wire, r["elapsed_s"], 100 * r["bytes"] * 8 / (r["elapsed_s"] * rate), 100 * wire * 8 / (r["elapsed_s"] * rate), drops))
PY
    )
    WAN_ROWS+=("| raw quinn, 2 connections | memory | $congestion | $bandwidth | $rep | $row | $l0 | $(cpu_busy "$c0" "$c1") |")
}

# ------------------------------------------------------------------------------------------------

command -v python3 >/dev/null || die "python3 is needed to parse JSON"
cd "$ROOT"
if [[ $NO_BUILD != 1 ]]; then
    log "building mover, mover-datagen, mover-wan and mover-bench (release)"
    record "cargo build --release -p mover -p mover-tools -p mover-bench"
    cargo build --release -p mover -p mover-tools -p mover-bench
fi
mkdir -p "$DATA_ROOT"
[[ $(stat -f -c %T "$DATA_ROOT") != tmpfs ]] || die "DATA_ROOT $DATA_ROOT is on tmpfs: set DATA_ROOT to a directory on the disk"
RUN_DIR=$DATA_ROOT/run-$(date +%Y%m%dT%H%M%S)
mkdir -p "$RUN_DIR/bin"
# What the binaries were built from, taken now: the tree may move during the run.
REVISION="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- mover transport tools 2>/dev/null || echo ' (mover/transport/tools modified)')"
for b in mover mover-datagen mover-wan mover-bench; do
    [[ -x $TARGET_DIR/release/$b ]] || die "$TARGET_DIR/release/$b is missing: run cargo build --release"
    cp -p "$TARGET_DIR/release/$b" "$RUN_DIR/bin/"
done
MOVER=$RUN_DIR/bin/mover
DATAGEN=$RUN_DIR/bin/mover-datagen
WAN=$RUN_DIR/bin/mover-wan
BENCH=$RUN_DIR/bin/mover-bench
ensure_package /usr/bin/time time

size_bytes=$("$DATAGEN" size "$SIZE")
avail=$(($(df -P -k "$DATA_ROOT" | awk 'NR == 2 { print $4 }') * 1024))
# two sets, a site holding one, a restore or rsync copy of one, margin
need=$((5 * size_bytes + (2 << 30)))
((avail >= need)) || die "DATA_ROOT $DATA_ROOT has $avail bytes free, expected at least $need for SIZE=$SIZE"

if [[ " $SECTIONS " == *" lan "* ]]; then
    ensure_package iperf3 iperf3
    ensure_package fio fio
    ensure_package rsync rsync
    ensure_package /usr/sbin/sshd openssh-server
    ensure_package ssh openssh-client

    ensure_set incompressible "$SIZE" 256MiB
    inc_dir=$SET_DIR
    ensure_set checkpoints "$SIZE" 512MiB
    cp_dir=$SET_DIR

    for rep in $(seq "$REPEAT"); do
        log "fio on the disk (run $rep)"
        fio_run "$inc_dir" "$rep"
    done
    for rep in $(seq "$REPEAT"); do
        log "iperf3 (run $rep)"
        iperf_run "$rep"
    done
    for rep in $(seq "$REPEAT"); do
        log "raw quinn (run $rep)"
        quic_run "$rep" "raw quinn ($QUIC_SIZE), 1 connection x 1 stream" --size "$QUIC_SIZE"
        quic_run "$rep" "raw quinn ($QUIC_SIZE), 2 connections (threads) x 1 stream" --size "$QUIC_SIZE" --connections 2
    done

    for rep in $(seq "$REPEAT"); do
        mover_pair_run "incompressible-$SIZE" "$inc_dir" "$rep" disk
        mover_pair_run "checkpoints-$SIZE" "$cp_dir" "$rep" disk
    done
    if [[ $SHM == 1 ]]; then
        shm_avail=$(($(df -P -k /dev/shm | awk 'NR == 2 { print $4 }') * 1024))
        if ((shm_avail > size_bytes + (2 << 30))); then
            shm_dir=/dev/shm/mover-remote-e2e-$$
            CLEANUP+=("rm -rf $shm_dir")
            mkdir -p "$shm_dir"
            record "cp -a $inc_dir $shm_dir/"
            cp -a "$inc_dir" "$shm_dir/"
            for rep in $(seq "$REPEAT"); do
                mover_pair_run "incompressible-$SIZE" "$shm_dir/$(basename "$inc_dir")" "$rep" shm
            done
            rm -rf "$shm_dir"
        else
            log "skipping the /dev/shm run: $shm_avail bytes free there"
        fi
    fi
    for rep in $(seq "$REPEAT"); do
        local_run "incompressible-$SIZE" "$inc_dir" "$rep"
        local_run "checkpoints-$SIZE" "$cp_dir" "$rep"
    done

    start_sshd
    for cipher in $SSH_CIPHERS; do
        for rep in $(seq "$REPEAT"); do
            rsync_run "incompressible-$SIZE" "$inc_dir" "$cipher" "$rep"
            rsync_run "checkpoints-$SIZE" "$cp_dir" "$cipher" "$rep"
        done
    done
    kill "$SSHD_PID" 2>/dev/null || true
fi

if [[ " $SECTIONS " == *" wan "* ]]; then
    ensure_set incompressible "$WAN_SIZE" 256MiB
    wan_dir=$SET_DIR
    ensure_set incompressible "$WAN_CUBIC_SIZE" 16MiB
    wan_cubic_dir=$SET_DIR
    for case in $WAN_CASES; do
        congestion=${case%%:*}
        bandwidth=${case#*:}
        if [[ $congestion == cubic ]]; then
            for rep in $(seq "$WAN_CUBIC_REPEAT"); do
                wan_run "incompressible-$WAN_CUBIC_SIZE" "$wan_cubic_dir" cubic "$bandwidth" "$rep"
            done
        else
            for rep in $(seq "$REPEAT"); do
                wan_run "incompressible-$WAN_SIZE" "$wan_dir" "$congestion" "$bandwidth" "$rep"
            done
        fi
    done
    for case in $WAN_CASES; do
        congestion=${case%%:*}
        bandwidth=${case#*:}
        if [[ $congestion == cubic ]]; then
            wan_quic_run "$WAN_CUBIC_SIZE" cubic "$bandwidth" 1
        else
            wan_quic_run "$WAN_SIZE" "$congestion" "$bandwidth" 1
        fi
    done
fi

# --- report ----------------------------------------------------------------------------------------
results=$RUN_DIR/results.md
{
    echo "# mover cross-site benchmark"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), mover $REVISION at the start of the run; binaries built $(date -u -r "$MOVER" +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "- nproc $(nproc), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r), $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "- DATA_ROOT $DATA_ROOT on $(df -P "$DATA_ROOT" | awk 'NR == 2 { print $1 }') ($(stat -f -c %T "$DATA_ROOT")); load and busy columns: 1-min load average before the run, whole-machine CPU busy share during it"
    [[ -z $CACHE_NOTE ]] || echo "- note: $CACHE_NOTE"
    if [[ ${#DISK_ROWS[@]} -gt 0 ]]; then
        echo
        echo "## Disk ceiling ($(df -P "$DATA_ROOT" | awk 'NR == 2 { print $1 }'), where both sites' data lives)"
        echo
        echo "| what | run | read GB/s | write GB/s |"
        echo "|---|---:|---:|---:|"
        printf '%s\n' "${DISK_ROWS[@]}"
    fi
    if [[ ${#NET_ROWS[@]} -gt 0 ]]; then
        echo
        echo "## Transport ceilings (loopback, memory to memory)"
        echo
        echo "| what | run | GB/s | CPU s client/server | path MTU | load | busy |"
        echo "|---|---:|---:|---:|---|---:|---:|"
        printf '%s\n' "${NET_ROWS[@]}"
    fi
    if [[ ${#MOVER_ROWS[@]} -gt 0 ]]; then
        echo
        echo "## mover site to site (loopback; GB/s = bytes_total / elapsed_s)"
        echo
        echo "| data set | job | run | bytes_total | wire_bytes_sent | elapsed_s | GB/s | client CPU s | daemon CPU s | load | busy |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        printf '%s\n' "${MOVER_ROWS[@]}"
    fi
    if [[ ${#RSYNC_ROWS[@]} -gt 0 ]]; then
        echo
        echo "## rsync -a over ssh to localhost (GB/s = bytes / wall time)"
        echo
        echo "| data set | cipher | run | bytes | wall s | GB/s | client CPU s (rsync+ssh) | load | busy |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
        printf '%s\n' "${RSYNC_ROWS[@]}"
    fi
    if [[ ${#WAN_ROWS[@]} -gt 0 ]]; then
        echo
        echo "## WAN: mover-wan $WAN_ARGS, udp_payload_bytes_max 1452 (utilisation = bytes x 8 / (elapsed x $WAN_RATE_BPS bit/s))"
        echo
        echo "| what | data | congestion | bandwidth cap | run | bytes_total | wire bytes | elapsed s | utilisation (payload) | utilisation (wire) | relay drops data loss/queue/buffer of received; acks | load | busy |"
        echo "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"
        printf '%s\n' "${WAN_ROWS[@]}"
    fi
    echo
    echo "## Commands"
    echo
    echo '```'
    echo "DATA_ROOT=$DATA_ROOT SIZE=$SIZE REPEAT=$REPEAT SECTIONS=\"$SECTIONS\" WAN_SIZE=$WAN_SIZE WAN_CASES=\"$WAN_CASES\" bench/remote_e2e.sh"
    printf '%s\n' "${COMMANDS[@]}"
    echo '```'
    echo
    echo "Raw outputs: $RUN_DIR"
} >"$results"
cp "$results" "$DATA_ROOT/results-remote.md"
if [[ $KEEP_SETS != 1 ]]; then
    rm -rf "$DATA_ROOT/sets"
fi
cat "$results"
