#!/usr/bin/env bash
# Slurm epilog example: back up a finished job's output directory with mover.
#
# slurmd runs the Epilog (slurm.conf: Epilog=/etc/slurm/epilog.d/mover.sh) as root on each
# node of the job once the job has ended. This script submits the job's output directory to
# the node's mover daemon with the idempotency key "slurm-$SLURM_JOB_ID-epilog", so an epilog
# that runs again for the same job (a retried epilog, a requeue of the node's cleanup, several
# nodes talking to one daemon) returns the job already submitted instead of backing the
# directory up twice. It then waits for the backup with `mover wait` and logs the outcome.
#
# Environment (set it in the script's caller or edit the defaults below):
#   MOVER_SOCKET        the daemon's API socket (default /run/mover/mover.sock)
#   MOVER_BACKUP_DIR    template of the directory to back up; $SLURM_JOB_USER, $SLURM_JOB_ID,
#                       $SLURM_JOB_UID, $SLURMD_NODENAME (also as ${...}) and %u, %j are
#                       replaced (default /scratch/$SLURM_JOB_USER/$SLURM_JOB_ID/output; keep
#                       it in single quotes where you set it)
#   MOVER_TO            optional SITE[:TIER]: back up to that peer site instead of this one
#   MOVER_PRIORITY      job priority, -1000..1000 (default 0)
#   MOVER_WAIT_TIMEOUT  seconds to wait for the backup (default 300; 0 = submit and return).
#                       The node stays COMPLETING while its epilog runs, so keep this short:
#                       on timeout the backup carries on in the daemon, only the epilog stops
#                       watching it (`mover status JOB` shows it later).
#   MOVER_ALL_NODES     1 = run on every node of the job; default: only on the job's first
#                       node (needs scontrol; the directory is usually on a shared file system)
#   MOVER_STRICT        1 = exit non-zero when the backup was not done. Slurm DRAINS a node
#                       whose epilog fails, so the default is to log and exit 0.
#   MOVER_BIN           the mover binary (default: mover from PATH below)
#
# Logs go to syslog (tag mover-epilog, facility user) through logger, and to stderr (which
# slurmd keeps only at debug levels; useful when running the script by hand).
set -euo pipefail

# slurmd gives prologs and epilogs no search path.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

SOCKET=${MOVER_SOCKET:-/run/mover/mover.sock}
# shellcheck disable=SC2016 # a template: expanded below, not by the shell here
TEMPLATE=${MOVER_BACKUP_DIR:-'/scratch/$SLURM_JOB_USER/$SLURM_JOB_ID/output'}
TO=${MOVER_TO:-}
PRIORITY=${MOVER_PRIORITY:-0}
WAIT_TIMEOUT=${MOVER_WAIT_TIMEOUT:-300}
ALL_NODES=${MOVER_ALL_NODES:-0}
STRICT=${MOVER_STRICT:-0}
MOVER=${MOVER_BIN:-mover}

JOB_ID=${SLURM_JOB_ID:-}
JOB_USER=${SLURM_JOB_USER:-}
JOB_UID=${SLURM_JOB_UID:-}
NODE=${SLURMD_NODENAME:-$(hostname -s 2>/dev/null || uname -n)}

log() {
    local priority=$1
    shift
    echo "mover-epilog [$priority] job ${JOB_ID:-?}: $*" >&2
    if command -v logger >/dev/null 2>&1; then
        logger -t mover-epilog -p "user.$priority" -- "job ${JOB_ID:-?}: $*" 2>/dev/null || true
    fi
}

# The epilog's own exit status: 0 unless MOVER_STRICT=1 and the backup was not done.
finish() {
    local ok=$1
    if [[ $ok != 1 && $STRICT == 1 ]]; then
        exit 1
    fi
    exit 0
}

if [[ -z $JOB_ID ]]; then
    log err "SLURM_JOB_ID is not set: run this as slurm.conf's Epilog"
    finish 0
fi
case $WAIT_TIMEOUT in
'' | *[!0-9.]*)
    log err "MOVER_WAIT_TIMEOUT=$WAIT_TIMEOUT: expected seconds"
    finish 0
    ;;
esac

# Once per job: only the first node of the allocation submits (unless told otherwise).
if [[ $ALL_NODES != 1 && -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null 2>&1; then
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || true)
    if [[ -n $first && $first != "$NODE" ]]; then
        exit 0
    fi
fi

# Expand the template without eval (it comes from configuration, not from the job).
dir=$TEMPLATE
for name in SLURM_JOB_USER SLURM_JOB_ID SLURM_JOB_UID SLURMD_NODENAME; do
    value=${!name:-}
    dir=${dir//\$\{$name\}/$value}
    dir=${dir//\$$name/$value}
done
dir=${dir//%u/$JOB_USER}
dir=${dir//%j/$JOB_ID}

# Nothing to back up: this job wrote no output there. Skip quietly.
if [[ ! -d $dir ]]; then
    exit 0
fi

# The daemon runs as root and reads whatever it is given. The job's user owns this path and
# could have replaced it with a link to someone else's data, so insist that the directory it
# resolves to belongs to the job's user.
real=$(realpath -e -- "$dir")
owner=$(stat -c %u -- "$real")
if [[ -n $JOB_UID && $owner != "$JOB_UID" ]]; then
    log warning "$dir resolves to $real, owned by uid $owner, not the job's uid $JOB_UID; not backing it up"
    finish 0
fi

key="slurm-$JOB_ID-epilog"
submit=("$MOVER" --socket "$SOCKET" backup "$real" --idempotency-key "$key" --priority "$PRIORITY")
if [[ -n $TO ]]; then
    submit+=(--to "$TO")
fi

# Submit. The CLI prints the job id ("ID" or "ID (already submitted with this idempotency key)");
# its exit code says why a submit did not happen.
rc=0
out=$("${submit[@]}" 2>&1) || rc=$?
out=${out//$'\n\n'/$'\n'}
line=${out//$'\n'/; }
case $rc in
0) ;;
5)
    log err "backup of $real refused by the daemon: $line"
    finish 0
    ;;
6)
    log err "backup of $real not submitted: mover daemon unreachable or busy at $SOCKET: $line"
    finish 0
    ;;
2)
    log err "backup of $real: bad usage of mover (check MOVER_TO, MOVER_PRIORITY): $line"
    finish 0
    ;;
*)
    log err "backup of $real not submitted (exit $rc): $line"
    finish 0
    ;;
esac
job=${out%%[[:space:]]*}
if [[ $out == *"already submitted"* ]]; then
    log info "backup of $real already submitted as mover job $job (key $key)"
else
    log info "backup of $real submitted as mover job $job (key $key${TO:+, to $TO})"
fi

if [[ $WAIT_TIMEOUT == 0 ]]; then
    finish 1
fi

# stdout: the CLI's one-line summary of the ended job; stderr: progress lines every 10 s, then
# the reason when it did not end done. Log the summary and the last stderr line.
errors=$(mktemp "${TMPDIR:-/tmp}/mover-epilog.XXXXXX")
trap 'rm -f "$errors"' EXIT
rc=0
out=$("$MOVER" --socket "$SOCKET" wait "$job" --timeout "$WAIT_TIMEOUT" 2>"$errors") || rc=$?
out=${out//$'\n'/; }
reason=$(grep -v '^[[:space:]]*$' "$errors" | tail -n 1 || true)
if [[ $rc != 0 && -n $reason ]]; then
    out="${out:+$out; }$reason"
fi
case $rc in
0)
    log info "backup of $real done: $out"
    finish 1
    ;;
1) log err "backup of $real failed (mover job $job): $out" ;;
3) log err "backup of $real found damage (mover job $job): $out" ;;
4) log warning "backup of $real was cancelled (mover job $job): $out" ;;
5) log err "mover job $job: the daemon refused the wait: $out" ;;
6) log warning "mover job $job: lost the daemon while waiting (a stopped daemon resumes the job when it starts again): $out" ;;
7)
    log notice "mover job $job still running after ${WAIT_TIMEOUT}s; it continues in the daemon (mover status $job)"
    finish 1
    ;;
*) log err "mover wait $job exited $rc: $out" ;;
esac
finish 0
