"""What ``advseg demo`` costs, per phase, on this checkout and on older source trees, in one run.

Each tree runs the whole demo (``python -m advseg demo --out DIR --threads N``, its own shipped
demo experiment, the phantom written into DIR) in a fresh process; with several trees they start
together (``--together``, the default: both see the same load) or one after the other. Printed per
tree: the process's wall and CPU seconds (user + system, every thread) and, where the tree prints
them (issue 24 on), each phase's wall and CPU seconds; then the ratios against the first tree. On
a busy machine compare the CPU seconds: wall times measure the other processes too.

Usage:
    python benchmarks/bench_demo.py                                  # this checkout
    python benchmarks/bench_demo.py --src /tmp/old/src src --threads 2
(an older tree: ``git archive <commit> src | tar -x -C /tmp/old``)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def phases(log: str) -> dict[str, dict[str, float]]:
    """``{"wall": {phase: s}, "cpu": {phase: s}}`` from the demo's last lines (empty if absent)."""
    found: dict[str, dict[str, float]] = {}
    text = " ".join(log.split())  # the console may wrap the lines
    for kind, key in (("time", "wall"), ("CPU time (all threads)", "cpu")):
        match = re.search(re.escape(kind) + r": ((?:[a-z]+ [0-9.]+ s,? )+)\(total", text)
        if match:
            found[key] = {
                name: float(value) for name, value in re.findall(r"([a-z]+) ([0-9.]+) s", match[1])
            }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", nargs="+", type=Path, default=[Path(__file__).parents[1] / "src"])
    parser.add_argument("--threads", type=int, default=1, help="--threads of each demo (default 1)")
    parser.add_argument("--sequential", action="store_true", help="one tree after the other")
    parser.add_argument("--work", type=Path, help="where the run directories go (default: temp)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="advseg-bench-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    trees = [p.resolve() for p in args.src]
    print(f"load average at start: {os.getloadavg()}; threads {args.threads}")
    running: dict[int, tuple[Path, float, Path]] = {}  # pid -> (tree, start, log)
    results = []

    def finish(pid: int = -1) -> None:  # pid -1: whichever demo ends first
        pid, status, usage = os.wait4(pid, 0)  # the child's own CPU time
        tree, began, log_path = running.pop(pid)
        if status != 0:
            raise SystemExit(f"the demo of {tree} failed: see {log_path}")
        wall, cpu = time.perf_counter() - began, usage.ru_utime + usage.ru_stime
        results.append((tree, wall, cpu, phases(log_path.read_text())))

    for i, tree in enumerate(trees):
        out, log_path = work / f"demo{i}", work / f"demo{i}.log"
        env = {**os.environ, "PYTHONPATH": str(tree), "ADVSEG_THREADS": str(args.threads)}
        command = [sys.executable, "-m", "advseg", "demo", "--out", str(out),
                   "--threads", str(args.threads)]  # fmt: skip
        with log_path.open("w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        running[process.pid] = (tree, time.perf_counter(), log_path)
        if args.sequential:
            finish(process.pid)
    while running:
        finish()
    results.sort(key=lambda result: trees.index(result[0]))
    print(f"load average at end: {os.getloadavg()}")
    first = results[0]
    for tree, wall, cpu, found in results:
        ratios = f"x{wall / first[1]:.2f} wall, x{cpu / first[2]:.2f} CPU of the first"
        print(f"{tree}: process wall {wall:.1f} s, CPU {cpu:.1f} s ({ratios})")
        for key in ("wall", "cpu"):
            if key in found:
                parts = ", ".join(f"{name} {s:.1f}" for name, s in found[key].items())
                print(f"  phases {key:4s}: {parts} (total {sum(found[key].values()):.1f} s)")


if __name__ == "__main__":
    main()
