"""What an import costs: ``import advseg.attacks``, and attacking an smp model, in fresh processes.

Each case runs in a new interpreter (``python -c``), so nothing is cached in memory; the file
system cache is warmed by one untimed run of every case first. The cases are measured in rounds
(every case once per round, ``--rounds`` times over) and each keeps its fastest run, as
``timeit`` does: slower runs measure other processes on a shared machine, and a change of load
during the run touches every case alike. ``--src`` names source trees to compare in the same
rounds (e.g. an older checkout: ``git archive <commit> src | tar -x -C /tmp/old``); the default is
this checkout's ``src``. Each run's CPU time (user + system of the child) is kept beside its wall
time: on a busy machine the fastest CPU time is the steadier figure. Each case also says whether
MONAI was imported: the smp path needs none of it (MONAI's package ``__init__`` imports every
submodule, networks and apps included, so only importing it inside the functions that use it
keeps it out).

Usage:
    python benchmarks/bench_import.py                       # this checkout, 5 rounds
    python benchmarks/bench_import.py --src /tmp/old/src src --rounds 7
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "torch (the floor)": "import torch",
    "import advseg.attacks": "import advseg.attacks",
    "pgd on an smp model": (
        "import torch; from advseg.attacks import create_attack; "
        "from advseg.models import create_model; "
        "m = create_model('smp:Unet:resnet18').eval(); "
        "x = torch.rand(1, 3, 64, 64); y = (torch.rand(1, 3, 64, 64) > 0.5).float(); "
        "create_attack('pgd', m, 'bce', eps=0.01, steps=1)(x, y)"
    ),
}
REPORT = "; import sys; print('monai' in sys.modules)"


def run(src: Path, code: str) -> tuple[float, float, bool]:
    """Wall and CPU seconds of one fresh interpreter running ``code`` with ``src`` first on the
    path, and whether it imported MONAI."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    before, start = os.times(), time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code + REPORT],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds, after = time.perf_counter() - start, os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return seconds, cpu, out.stdout.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", nargs="+", type=Path, default=[Path(__file__).parents[1] / "src"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trees = [p.resolve() for p in args.src]
    best: dict[tuple[Path, str], float] = {}
    best_cpu: dict[tuple[Path, str], float] = {}
    monai: dict[tuple[Path, str], bool] = {}
    for tree in trees:  # warm the file system cache
        for code in CASES.values():
            run(tree, code)
    for _ in range(args.rounds):
        for tree in trees:
            for name, code in CASES.items():
                seconds, cpu, loaded = run(tree, code)
                key = (tree, name)
                best[key] = min(best.get(key, float("inf")), seconds)
                best_cpu[key] = min(best_cpu.get(key, float("inf")), cpu)
                monai[key] = loaded
    floor = {tree: best[(tree, "torch (the floor)")] for tree in trees}
    print(
        f"fastest of {args.rounds} rounds, wall seconds (and over torch's own import), CPU seconds"
    )
    print(f"load average: {os.getloadavg()}")
    for tree in trees:
        print(f"{tree}:")
        for name in CASES:
            key = (tree, name)
            print(
                f"  {name:24s} {best[key]:6.2f} s  x{best[key] / floor[tree]:.2f} of torch  "
                f"CPU {best_cpu[key]:6.2f} s  MONAI imported: {'yes' if monai[key] else 'no'}"
            )
    if len(trees) == 2:
        for name in list(CASES)[1:]:
            ratio = best[(trees[0], name)] / best[(trees[1], name)]
            cpu = best_cpu[(trees[0], name)] / best_cpu[(trees[1], name)]
            print(
                f"{name}: {trees[0].parent.name} / {trees[1].parent.name} = {ratio:.2f} (wall), "
                f"{cpu:.2f} (CPU)"
            )


if __name__ == "__main__":
    main()
