#!/usr/bin/env python3
"""Runs a command and reports its wall time and peak anonymous memory (RssAnon: heap, not mapped files).

Usage: peak_mem.py [--json] -- CMD ARGS...   Polls /proc every 20 ms over the process and its children."""
import json
import os
import subprocess
import sys
import time


def rss_anon_kib(pid):
    total = 0
    try:
        pids = [pid] + [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def main():
    args = sys.argv[1:]
    as_json = args[:1] == ["--json"]
    if as_json:
        args = args[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    start = time.monotonic()
    proc = subprocess.Popen(args)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_anon_kib(proc.pid))
        time.sleep(0.02)
    wall = time.monotonic() - start
    result = {"seconds": round(wall, 3), "peak_rss_anon_mib": round(peak / 1024, 1), "exit": proc.returncode}
    print(json.dumps(result) if as_json else f"{wall:.2f} s, peak RssAnon {peak / 1024:.1f} MiB, exit {proc.returncode}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
