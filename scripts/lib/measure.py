#!/usr/bin/env python3
"""Run one benchmark command and measure it (used by scripts/bench.sh).

    measure.py DF_PATH OUT_FILE -- CMD [ARGS...]

Appends one line to OUT_FILE: "wall_seconds max1_rss_kib tree_rss_kib disk_kib"
  wall_seconds  elapsed time of CMD
  max1_rss_kib  the largest peak RSS of any single process of the tree (what
                `/usr/bin/time -f %M` reports: wait4's ru_maxrss)
  tree_rss_kib  the peak of the summed RSS of CMD and all its live descendants, sampled
                every 50 ms (short-lived peaks between samples can be missed)
  disk_kib      peak used space of the filesystem holding DF_PATH, sampled every 50 ms,
                minus what was used when CMD started (other writers on the same
                filesystem add noise)
CMD's stdout goes to /dev/null, its stderr to OUT_FILE.err. Exits with CMD's status.
"""
import os
import subprocess
import sys
import threading
import time

INTERVAL = 0.05


def used_kib(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit(__doc__)
    df_path, out_file, cmd = sys.argv[1], sys.argv[2], sys.argv[4:]
    start_used = used_kib(df_path)
    peak_used = start_used
    peak_tree = 0
    with open(out_file + ".err", "w") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        # The wait is its own thread, so the wall time ends when CMD does and not at the
        # next sample (polling between samples overstated it by up to INTERVAL).
        done = threading.Event()
        waited = {}

        def wait():
            _, status, ru = os.wait4(proc.pid, 0)
            waited.update(status=status, ru=ru, wall=time.monotonic() - t0)
            done.set()

        waiter = threading.Thread(target=wait)
        waiter.start()
        while not done.is_set():
            peak_tree = max(peak_tree, sum(rss_kib(p) for p in descendants(proc.pid)))
            peak_used = max(peak_used, used_kib(df_path))
            done.wait(INTERVAL)
        waiter.join()
        status, ru, wall = waited["status"], waited["ru"], waited["wall"]
    peak_used = max(peak_used, used_kib(df_path))
    code = os.waitstatus_to_exitcode(status)
    with open(out_file, "a") as f:
        f.write(f"{wall:.3f} {ru.ru_maxrss} {max(peak_tree, ru.ru_maxrss)} {peak_used - start_used}\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
