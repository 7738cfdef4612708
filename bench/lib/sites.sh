# Two fresh sites a and b on loopback for the bench probes, b's daemon running; sourced by
# bench/remote_probe.sh and bench/restore_probe.sh. Needs MOVER (the binary), S (where the
# sites go) and R (where the daemon's output goes).

fingerprint() { "$MOVER" identity --config "$1" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["fingerprint"])'; }
# CPU seconds (user + system) a process has used so far.
proc_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$1/stat"; }

init_sites() {
    "$MOVER" init --site a --dir "$S/a" --listen 127.0.0.1:0 >/dev/null
    "$MOVER" init --site b --dir "$S/b" --listen 127.0.0.1:0 >/dev/null
}

# Starts b's daemon (prefixed by "$@", e.g. taskset -c 1), makes a and b peers, and sets
# DPID and PORT; a trap stops the daemon on exit.
start_daemon_b() {
    "$MOVER" peer add a 127.0.0.1:1 "$(fingerprint "$S/a/mover.toml")" --config "$S/b/mover.toml" >/dev/null
    "$@" "$MOVER" daemon --config "$S/b/mover.toml" >"$R/daemon.out" 2>"$R/daemon.err" &
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
}

# Stops b's daemon and waits for it: the next run reuses these paths.
stop_daemon_b() {
    kill "$DPID" 2>/dev/null || true
    wait "$DPID" 2>/dev/null || true
    trap - EXIT
}
