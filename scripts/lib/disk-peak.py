#!/usr/bin/env python3
"""Run a command and sample the disk space its own files take (used by scripts/bench.sh).

    disk-peak.py OUT_FILE PATTERN... -- CMD [ARGS...]

Every 50 ms, each glob PATTERN is expanded and the allocated size (st_blocks) of every
file it names is summed, directories walked recursively, hard links counted once. Writes
"peak_kib final_kib" to OUT_FILE: the largest sum while CMD ran, and the sum once it
exited. Unlike measure.py's filesystem-wide disk column, other writers on the same
filesystem do not count; a file created and deleted between two samples can be missed.
CMD's stdout and stderr pass through. Exits with CMD's status.
"""
import glob
import os
import subprocess
import sys
import time

INTERVAL = 0.05


def allocated_kib(patterns):
    seen, total = set(), 0

    def add(path):
        nonlocal total
        try:
            st = os.lstat(path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512

    for pattern in patterns:
        for path in glob.glob(pattern):
            add(path)
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    add(os.path.join(root, name))
    return total // 1024


def main():
    if "--" not in sys.argv[2:]:
        sys.exit(__doc__)
    sep = sys.argv.index("--", 2)
    out_file, patterns, cmd = sys.argv[1], sys.argv[2:sep], sys.argv[sep + 1:]
    if not patterns or not cmd:
        sys.exit(__doc__)
    peak = 0
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        peak = max(peak, allocated_kib(patterns))
        time.sleep(INTERVAL)
    final = allocated_kib(patterns)
    with open(out_file, "w") as f:
        f.write(f"{max(peak, final)} {final}\n")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
