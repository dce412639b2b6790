"""What a full corruption grid (8 corruptions x 5 severities = 40 cells) costs against one attack
cell, on the same slices, model and machine.

Three timings of whole evaluation passes (records included, as ``advseg evaluate`` makes them):

(attack)  one PGD cell: ``--steps`` steps, one loss (:func:`advseg.evaluate.evaluate_cell`);
(grid)    every corruption at every severity in one pass
          (:func:`advseg.evaluate.corrupted.evaluate_corruptions`: one clean forward per batch
          shared by the 40 cells, then per cell TorchIO's transform and one forward);
(shared)  the transforms alone (:func:`advseg.corruptions.corrupt` on every slice for every
          cell): the part of the grid that is TorchIO's, not the model's.

Prints the times (best of the repeats), grid/attack, the per-cell cost grid/40 against the
attack cell, and the TorchIO share shared/grid; also the time of each corruption's transforms,
so a slow one shows.

    python benchmarks/bench_corruptions.py [--size 64] [--slices 32] [--steps 10] [--repeats 2]

Measured (2026-12-07, unet untrained, 64 px, 32 slices, batch 16, a shared 2-core CPU under
load, ``--repeats 1``): one PGD cell (10 steps, bce) 220 s, the 40-cell grid 505 s: grid/attack
2.29, one corruption cell 0.057 of the PGD cell; TorchIO's transforms 0.19 of the grid (motion
and ghosting the slow ones: 65 s and 18 s of 97 s).

Re-run (2026-12-07, second session; unet untrained, 64 px, 16 slices, batch 16, one thread,
``--repeats 1``, the shared CPU at load 9-14): one PGD cell (10 steps, bce) 10.95 s, the grid
101.2 s: grid/attack 9.24, one corruption cell 0.23 of the PGD cell; TorchIO 8.2 s (share 0.08;
motion 3.2 s, anisotropy 2.1 s). The ratio moves with the load and the thread count (the PGD
cell took 20x less time than in the run above, the grid 2.5x less): the per-cell scoring of
every slice (HD95, records), not TorchIO, is the grid's cost. On trained unets through the CLI
(``benchmarks/corruption_robustness.py``, 48 slices, one thread; the evaluation's own progress
times per model): the 40-cell grid 207-262 s against one optimised ``biasfield`` cell of 10
steps 52-92 s (grid/attack 2.4-2.6 for the same model), and a random bias field cell (steps 0,
one forward) 6-9 s, about one corruption cell's 5-6.5 s.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from advseg.allocator import keep_freed_memory
from advseg.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from advseg.evaluate import evaluate_cell
from advseg.evaluate.corrupted import evaluate_corruptions
from advseg.models.zoo import create_model


class Slices:
    """Random slices with masks, as a :class:`advseg.evaluate.SliceSource`."""

    classes = ("a", "b", "c")

    def __init__(self, count: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(count, 3, size, size, generator=g)
        self.y = (torch.rand(count, 3, size, size, generator=g) > 0.8).float()
        self.index = pd.DataFrame({
            "id": [f"s{i}" for i in range(count)], "case": [i % 4 for i in range(count)],
            "scan": ["x"] * count, "slice": list(range(count)),
        })  # fmt: skip

    def dataset(self, rows):
        return [{"image": self.x[r], "mask": self.y[r], "row": r} for r in rows]


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="unet")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    data = Slices(args.slices, args.size)
    rows = range(args.slices)
    cells = [(name, s) for name in CORRUPTIONS.names() for s in SEVERITIES]
    common = {"model_name": "m", "arch": args.model, "batch_size": args.batch}

    attack = best_of(args.repeats, lambda: evaluate_cell(
        model, data, rows, "pgd", ["bce"], 8 / 255, attack_kwargs={"steps": args.steps}, **common
    ))  # fmt: skip
    grid = best_of(args.repeats, lambda: evaluate_corruptions(model, data, rows, cells, **common))
    each = {}
    for name in CORRUPTIONS.names():
        each[name] = best_of(args.repeats, lambda name=name: [
            corrupt(data.x[i : i + 1], name, s, seed=i) for s in SEVERITIES for i in rows
        ])  # fmt: skip
    shared = sum(each.values())
    print(f"{args.model} {args.size} px, {args.slices} slices, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"attack  one PGD cell ({args.steps} steps, bce): {attack:.2f} s")
    print(f"grid    {len(cells)} corruption cells, one pass: {grid:.2f} s")
    print(f"shared  TorchIO transforms alone: {shared:.2f} s")
    for name, seconds in each.items():
        print(f"        {name}: {seconds:.2f} s for 5 severities")
    per_cell = grid / len(cells) / attack
    print(f"grid/attack {grid / attack:.2f}; per cell (grid/{len(cells)})/attack {per_cell:.3f}; "
          f"TorchIO share shared/grid {shared / grid:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
