#!/usr/bin/env python3
"""What every thread of some processes waits on while the machine has an idle core.

    bench/thread_waits.py PID [PID ...]

Samples /proc/PID/task/*/{stat,wchan} every 5 ms until the processes exit (at most 60 s).
In each sample where fewer than two threads are runnable (a core of this 2-core machine is
idle), it counts each mover thread's state and kernel wait channel; the table then says
who was blocked where while a core idled. This is how site b's pack writers were found
waiting in __iomap_dio_rw (BENCHMARKS.md, run 5). The sampler itself costs a few percent of
a core; use it to find causes, not to time runs.
"""
import collections
import os
import sys
import time


def threads(pid):
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return None
    rows = []
    for tid in tids:
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            wchan = open(f"/proc/{pid}/task/{tid}/wchan").read().strip()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state = stat[stat.rindex(")") + 2]
        rows.append((comm, state, wchan))
    return rows


def main():
    pids = sys.argv[1:]
    if not pids:
        sys.exit(__doc__)
    idle = collections.Counter()
    samples = idle_samples = 0
    deadline = time.time() + 60
    while time.time() < deadline:
        rows, alive = [], False
        for pid in pids:
            found = threads(pid)
            if found is not None:
                alive = True
                rows.extend(found)
        if not alive:
            break
        samples += 1
        if sum(1 for _, state, _ in rows if state == "R") < 2:
            idle_samples += 1
            for comm, state, wchan in rows:
                if comm.startswith("mover-") or comm.startswith("iou-"):
                    idle[(comm.rstrip("0123456789-"), state, wchan or "-")] += 1
        time.sleep(0.005)
    print(f"samples {samples}, with fewer than 2 runnable threads {idle_samples}")
    print(f"{'count':>6} {'thread':20} state wait channel")
    for (comm, state, wchan), n in idle.most_common(25):
        print(f"{n:6d} {comm:20} {state:5} {wchan}")


if __name__ == "__main__":
    main()
