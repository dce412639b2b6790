"""Robustness curves from one minimal-norm run, refined and not, against a 7-eps APGD sweep.

Trains a small zoo model (``worst_case.train``: sigmoid, Dice + BCE, or ``--activation softmax``,
Dice + CE) on the synthetic phantom and on the synthetic abdominal CT volumes (NIfTI), then on the
same held-out slices (with a mask, seeded, spread over the test cases):

1. one cell per minimal-norm run (``--runs``, ``ATTACK:STEPS``, default ``alma-prox:500,
   alma-prox:100,pdpgd:100``; L-inf, criterion ``dice<=0.5``, ``refine`` as ``--refine``,
   default ``6x20``): every slice's refined ``min_eps`` and the search's own norm
   ``min_eps_upper`` (what ``refine=off`` reports: the search does not depend on the refinement,
   so one run gives both curves), so the share of slices whose foreground Dice falls to 0.5 or
   below at any eps, refined and not;
2. APGD (``bce`` / ``ce``, 50 steps) at 7 eps, geometric from a quarter of the smallest finite,
   positive norm any run found to the largest (1, 2, 4, 6, 8, 12, 16 /255 when fewer than two
   are), one cell per eps, the share of slices with Dice <= 0.5 at each; and per slice the
   smallest of these eps that breaks it (the sweep's minimal eps, at the grid's resolution).

Prints, per data set and run, refined and unrefined: the curve and the sweep at the 7 eps, their
largest and mean absolute difference (:func:`advseg.stats.curves.agreement`), the median minimal
eps, the median over slices of ``min_eps`` / the sweep's minimal eps, and the time ratio of the
whole 7-eps sweep to the run: wall and process CPU seconds measured in the same process; the
refinement's share is timed by wrapping ``MinimalNorm.refine`` (the unrefined run's time is the
run's minus it). Writes ``OUT/minnorm-curve-KINDS-ACTIVATION.json``. Sized for a shared CPU.

    PYTHONPATH=src python benchmarks/minnorm_curve.py --out /tmp/minnorm-curve
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from advseg.attacks.minimal import MinimalNorm
from advseg.data import DataConfig, PreprocessConfig, load_data, split_cases
from advseg.evaluate import evaluate_cell
from advseg.stats import curves
from worst_case import TEST_FRACTION, make_data, train  # benchmarks/ is the script's folder

THRESHOLD = 0.5
SPENT = {"wall": 0.0, "cpu": 0.0}  # seconds inside MinimalNorm.refine
_refine = MinimalNorm.refine


def timed_refine(self, *args, **kwargs):
    """``MinimalNorm.refine``, its wall and CPU seconds added to :data:`SPENT`."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        return _refine(self, *args, **kwargs)
    finally:
        SPENT["wall"] += time.perf_counter() - wall
        SPENT["cpu"] += time.process_time() - cpu


MinimalNorm.refine = timed_refine


def timed_cell(model, data, rows, attack, eps, kind, arch, options, loss):
    """The cell's records and ``{"wall", "cpu", "refine_wall", "refine_cpu"}`` seconds."""
    SPENT.update(wall=0.0, cpu=0.0)
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate_cell(model, data, rows, attack, [loss], eps, model_name=kind, arch=arch,
                           attack_kwargs=options, batch_size=8)  # fmt: skip
    seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
               "refine_wall": SPENT["wall"], "refine_cpu": SPENT["cpu"]}  # fmt: skip
    return result.records, seconds


def unrefined(records: pd.DataFrame, label: str) -> pd.DataFrame:
    """A minimal cell's records as ``refine=off`` reports them: the search's own norm."""
    return records.assign(min_eps=records["min_eps_upper"], attack=label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/minnorm-curve"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--model", default="unet-tiny", help="a zoo name")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--kinds", default="phantom,nifti")
    parser.add_argument("--runs", default="alma-prox:500,alma-prox:100,pdpgd:100",
                        help="minimal-norm runs, ATTACK:STEPS")  # fmt: skip
    parser.add_argument("--refine", default="6x20", help="the runs' refine option")
    parser.add_argument("--apgd-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared CPU)")
    parser.add_argument("--sweep", default="apgd", help="the fixed-eps attack")
    parser.add_argument("--activation", choices=["sigmoid", "softmax"], default="sigmoid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(name, int(steps)) for name, steps in (r.split(":") for r in args.runs.split(","))]
    results = []
    for kind in args.kinds.split(","):
        path = make_data(kind, args.out)
        config = DataConfig(path=path, preprocess=PreprocessConfig(size=args.size),
                            cache_dir=args.out / "cache" / kind)  # fmt: skip
        data = load_data(config)
        train_rows, test_rows = split_cases(data.index, TEST_FRACTION, 0)
        act = "" if args.activation == "sigmoid" else f"-{args.activation}"
        saved = args.out / f"{kind}-{args.model}{act}-{args.size}px-{args.train_steps}.pt"
        if saved.exists():
            model = torch.load(saved, weights_only=False).eval()
        else:
            images = torch.from_numpy(data.images[train_rows]).unsqueeze(1).repeat(1, 3, 1, 1)
            masks = torch.from_numpy(data.masks[train_rows]).float()
            model = train(args.model, images, masks, args.train_steps, args.activation)
            torch.save(model, saved)
        with_mask = [int(r) for r in test_rows if data.masks[r].any()]
        n = min(args.slices, len(with_mask))
        rows = sorted(int(r) for r in np.random.default_rng(0).choice(with_mask, n, replace=False))
        loss = "ce" if args.activation == "softmax" else "bce"
        common = {"activation": args.activation}
        minimal = {}  # label -> (records, seconds)
        for attack, steps in runs:
            options = {"criterion": "dice", "threshold": THRESHOLD, "steps": steps,
                       "refine": args.refine, **common}  # fmt: skip
            label = f"{attack}:{steps}"
            records, seconds = timed_cell(model, data, rows, attack, 1.0, kind, args.model,
                                          options, loss)  # fmt: skip
            minimal[label] = (records, seconds)
            print(f"{kind} {label}: {records['attack_setting'].iloc[0]}, {seconds['wall']:.1f} s "
                  f"wall, refine {seconds['refine_wall']:.1f} s", flush=True)  # fmt: skip
        found = pd.concat([curves.slice_table(r) for r, _ in minimal.values()])
        upper = pd.concat([curves.slice_table(unrefined(r, "u")) for r, _ in minimal.values()])
        values = np.concatenate([found["min_eps"].to_numpy(), upper["min_eps"].to_numpy()])
        finite = values[np.isfinite(values) & (values > 0)]
        print(f"{kind}: clean slice Dice {found['dice_clean'].mean():.3f}; min_eps 0 (broken "
              f"clean) {int((values == 0).sum())}, inf {int(np.isinf(values).sum())}, "
              f"between {finite.size} of {values.size}", flush=True)  # fmt: skip
        if finite.size >= 2:  # where the curves and the sweep move
            grid = np.geomspace(finite.min() / 4, finite.max(), 7)
            grid = sorted({float(f"{e:.3g}") for e in grid})
        else:
            grid = [e / 255 for e in (1, 2, 4, 6, 8, 12, 16)]
        sweep, sweep_seconds = [], {"wall": 0.0, "cpu": 0.0}
        for eps in grid:
            records, seconds = timed_cell(model, data, rows, args.sweep, eps, kind, args.model,
                                          {"steps": args.apgd_steps, **common}, loss)  # fmt: skip
            sweep.append(records)
            for key in sweep_seconds:
                sweep_seconds[key] += seconds[key]
        broken_at = pd.concat([curves.slice_table(r) for r in sweep])  # per slice: eps broken
        broken_at = broken_at[broken_at["dice_adv"] <= THRESHOLD].groupby("slice_id")["eps"].min()
        for label, (cell, seconds) in minimal.items():
            for refined in (True, False):
                found = cell if refined else unrefined(cell, cell["attack"].iloc[0])
                spent = {k: seconds[k] - (0 if refined else seconds[f"refine_{k}"])
                         for k in ("wall", "cpu")}  # fmt: skip
                row = compare(found, sweep, broken_at, grid, sweep_seconds, spent)
                row |= {"kind": kind, "activation": args.activation, "slices": n, "run": label,
                        "refined": refined, "refine": args.refine if refined else "off",
                        "setting": str(cell["attack_setting"].iloc[0]),
                        "sweep_attack": args.sweep, "apgd_steps": args.apgd_steps}  # fmt: skip
                results.append(row)
                report(row, loss)
        name = f"minnorm-curve-{args.kinds}-{args.activation}.json"
        (args.out / name).write_text(json.dumps(results, indent=1))


def compare(found, sweep, broken_at, grid, sweep_seconds, spent) -> dict:
    """One minimal cell's curve against the sweep: agreement, medians, time ratios."""
    records = pd.concat([found, *sweep], ignore_index=True)
    curve = curves.min_eps_curve(records, grid)
    points = curves.sweep_curve(records, THRESHOLD)
    agree = curves.agreement(records).iloc[0]  # one minimal cell, one sweep
    median = curves.median_min_eps(records).iloc[0]
    own = curves.slice_table(found).set_index("slice_id")["min_eps"]
    both = pd.concat([own, broken_at], axis=1, keys=["min_eps", "sweep"]).dropna()
    both = both[both["min_eps"] > 0]  # broken by the sweep, not already clean
    ratio = float((both["min_eps"] / both["sweep"]).median()) if len(both) else math.nan
    return {"eps": grid, "curve": curve["broken"].round(4).tolist(),
            "sweep": points.sort_values("eps")["broken"].round(4).tolist(),
            "max_abs_diff": float(agree["max_abs_diff"]),
            "mean_abs_diff": float(agree["mean_abs_diff"]),
            "mean_diff": float(agree["mean_diff"]),
            "median_min_eps": [float(median["median"]), float(median["low"]),
                               float(median["high"])],
            "median_ratio_to_sweep": ratio, "ratio_slices": len(both),
            "found": float(median["found"]), "minimal_seconds": spent["wall"],
            "minimal_cpu_seconds": spent["cpu"], "sweep_seconds": sweep_seconds["wall"],
            "sweep_cpu_seconds": sweep_seconds["cpu"],
            "time_ratio": sweep_seconds["wall"] / spent["wall"],
            "cpu_time_ratio": sweep_seconds["cpu"] / spent["cpu"]}  # fmt: skip


def report(row: dict, loss: str) -> None:
    print(f"\n{row['kind']} ({row['activation']}): {row['slices']} slices, {row['run']} refine="
          f"{row['refine']} vs {row['sweep_attack']}-{loss} ({row['apgd_steps']} steps) at "
          f"{len(row['eps'])} eps, Dice <= {THRESHOLD}")  # fmt: skip
    print("  eps        " + " ".join(f"{e:8.4f}" for e in row["eps"]))
    print("  curve      " + " ".join(f"{v:8.3f}" for v in row["curve"]))
    print("  sweep      " + " ".join(f"{v:8.3f}" for v in row["sweep"]))
    low, high = row["median_min_eps"][1:]
    print(f"  max |diff| {row['max_abs_diff']:.3f}, mean |diff| {row['mean_abs_diff']:.3f}, mean "
          f"diff {row['mean_diff']:+.3f}; median min_eps {row['median_min_eps'][0]:.4g} "
          f"[{low:.4g}, {high:.4g}], found {row['found']:.0%}; min_eps / sweep's minimal eps: "
          f"median {row['median_ratio_to_sweep']:.2f} over {row['ratio_slices']} "
          "slices")  # fmt: skip
    print(f"  time: minimal {row['minimal_seconds']:.1f} s ({row['minimal_cpu_seconds']:.1f} s "
          f"CPU), sweep {row['sweep_seconds']:.1f} s ({row['sweep_cpu_seconds']:.1f} s CPU); "
          f"sweep / minimal {row['time_ratio']:.2f} wall, {row['cpu_time_ratio']:.2f} CPU",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
