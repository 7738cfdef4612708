#!/usr/bin/env python3
"""Per-thread CPU of running processes, sampled from /proc, for finding who waits when.

    bench/thread_cpu.py --interval 0.05 --out timeline.tsv PID [PID ...]

Samples utime+stime of every thread of each PID (and the whole machine's busy/idle jiffies)
every INTERVAL seconds until all PIDs have exited or SIGINT/SIGTERM arrives. Then prints, per
process and thread name, the CPU seconds used and the share of the sampled wall time; the
timeline (one row per sample: seconds, per-process CPU share of one core, machine busy %)
goes to --out. Jiffies are 10 ms at CLK_TCK 100, so use intervals of 50 ms or more and read
short windows as coarse.
"""
import argparse
import os
import signal
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def threads(pid):
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        out[int(tid)] = (name, int(fields[11]), int(fields[12]))
    return out


def machine():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    values = [int(x) for x in parts]
    idle = values[3] + values[4]
    return sum(values) - idle, idle


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--out")
    ap.add_argument("pids", nargs="+", type=int)
    args = ap.parse_args()
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    first = {}
    last = {}
    rows = []
    t0 = time.monotonic()
    prev_machine = machine()
    prev_proc = {}
    while not stop[0]:
        now = time.monotonic() - t0
        alive = 0
        row = [f"{now:.3f}"]
        for pid in args.pids:
            ts = threads(pid)
            if ts is None:
                row.append("")
                continue
            alive += 1
            total = 0
            for tid, (name, u, s) in ts.items():
                first.setdefault((pid, tid), (name, u, s))
                last[(pid, tid)] = (name, u, s)
                total += u + s
            before = prev_proc.get(pid)
            prev_proc[pid] = total
            row.append("" if before is None else f"{(total - before) / HZ / args.interval:.2f}")
        m = machine()
        db, di = m[0] - prev_machine[0], m[1] - prev_machine[1]
        prev_machine = m
        row.append(f"{100 * db / max(db + di, 1):.0f}")
        rows.append(row)
        if alive == 0:
            break
        time.sleep(args.interval)
    wall = time.monotonic() - t0
    if args.out:
        with open(args.out, "w") as f:
            f.write("t_s\t" + "\t".join(f"cpu_{p}" for p in args.pids) + "\tmachine_busy_pct\n")
            for r in rows:
                f.write("\t".join(r) + "\n")
    per = {}
    for key, (name, u1, s1) in last.items():
        _, u0, s0 = first[key]
        pid = key[0]
        agg = per.setdefault((pid, name), [0, 0, 0])
        agg[0] += (u1 - u0) / HZ
        agg[1] += (s1 - s0) / HZ
        agg[2] += 1
    print(f"sampled {wall:.2f} s (first sample to last; CPU before the first sample is not counted)")
    print(f"{'pid':>7} {'thread':<18} {'n':>3} {'user s':>7} {'sys s':>7} {'% of wall':>9}")
    for (pid, name), (u, s, n) in sorted(per.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        if u + s == 0:
            continue
        print(f"{pid:>7} {name:<18} {n:>3} {u:>7.2f} {s:>7.2f} {100 * (u + s) / wall:>8.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
