"""Robustness curves from one minimal-norm run against a 7-eps APGD sweep: agreement and time.

Trains a small zoo model (``worst_case.train``: sigmoid, Dice + BCE, or ``--activation softmax``,
Dice + CE) on the synthetic phantom and on the synthetic abdominal CT volumes (NIfTI), then on the
same held-out slices (with a mask, seeded, spread over the test cases):

1. one cell per minimal-norm attack (``--attacks``, default ``alma-prox,pdpgd``; L-inf,
   criterion ``dice<=0.5``): every slice's ``min_eps``, so the share of slices whose foreground
   Dice falls to 0.5 or below at any eps;
2. APGD (``bce`` / ``ce``) at 7 eps, geometric from a quarter of the smallest finite, positive
   ``min_eps`` to the largest (so the sweep's rise and the curves' both lie inside; 1, 2, 4, 6,
   8, 12, 16 /255 when fewer than two are), one cell per eps, the share of slices with
   Dice <= 0.5 at each; and per slice the smallest of these eps that breaks it (the sweep's
   minimal eps, at the grid's resolution).

Prints, per data set and minimal-norm attack, the two curves at the 7 eps, their largest and mean
absolute difference (:func:`advseg.stats.curves.agreement`), the median minimal eps with its
case-bootstrap interval, the median over slices of ``min_eps`` / the sweep's minimal eps (how
far above what APGD needs the minimal-norm attack stops), and the time of the minimal-norm run
against the sweep's (one process, measured in the same run). Writes
``OUT/minnorm-curve-KINDS-ACTIVATION.json``. Sized for a shared CPU.

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

from advseg.data import DataConfig, PreprocessConfig, load_data, split_cases
from advseg.evaluate import evaluate_cell
from advseg.stats import curves
from worst_case import TEST_FRACTION, make_data, train  # benchmarks/ is the script's folder

THRESHOLD = 0.5


def timed_cell(
    model, data, rows, attack, eps, kind, arch, options, loss
) -> tuple[pd.DataFrame, float]:
    start = time.perf_counter()
    result = evaluate_cell(model, data, rows, attack, [loss], eps, model_name=kind, arch=arch,
                           attack_kwargs=options, batch_size=8)  # fmt: skip
    return result.records, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/minnorm-curve"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--model", default="unet-tiny", help="a zoo name")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--kinds", default="phantom,nifti")
    parser.add_argument("--attacks", default="alma-prox,pdpgd", help="minimal-norm attacks")
    parser.add_argument("--minimal-steps", type=int, default=500)
    parser.add_argument("--apgd-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared CPU)")
    parser.add_argument("--sweep", default="apgd", help="the fixed-eps attack")
    parser.add_argument("--activation", choices=["sigmoid", "softmax"], default="sigmoid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
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
        minimal = {}  # attack -> (records, seconds)
        for attack in args.attacks.split(","):
            options = {"criterion": "dice", "threshold": THRESHOLD, "steps": args.minimal_steps,
                       **common}  # fmt: skip
            minimal[attack] = timed_cell(model, data, rows, attack, 1.0, kind, args.model,
                                         options, loss)  # fmt: skip
        found = pd.concat([curves.slice_table(r) for r, _ in minimal.values()])
        values = found["min_eps"].to_numpy()
        finite = values[np.isfinite(values) & (values > 0)]
        print(f"{kind}: clean slice Dice {found['dice_clean'].mean():.3f}; min_eps 0 (broken "
              f"clean) {int((values == 0).sum())}, inf {int(np.isinf(values).sum())}, "
              f"between {finite.size} of {values.size}", flush=True)  # fmt: skip
        if finite.size >= 2:  # where the curves and the sweep move
            grid = np.geomspace(finite.min() / 4, finite.max(), 7)
            grid = sorted({float(f"{e:.3g}") for e in grid})
        else:
            grid = [e / 255 for e in (1, 2, 4, 6, 8, 12, 16)]
        sweep, sweep_seconds = [], 0.0
        for eps in grid:
            records, seconds = timed_cell(model, data, rows, args.sweep, eps, kind, args.model,
                                          {"steps": args.apgd_steps, **common}, loss)  # fmt: skip
            sweep.append(records)
            sweep_seconds += seconds
        broken_at = pd.concat([curves.slice_table(r) for r in sweep])  # per slice: eps broken
        broken_at = broken_at[broken_at["dice_adv"] <= THRESHOLD].groupby("slice_id")["eps"].min()
        for attack, (found, minimal_seconds) in minimal.items():
            records = pd.concat([found, *sweep], ignore_index=True)
            curve = curves.min_eps_curve(records, grid)
            points = curves.sweep_curve(records, THRESHOLD)
            agree = curves.agreement(records).iloc[0]  # one minimal cell, one sweep
            median = curves.median_min_eps(records).iloc[0]
            own = curves.slice_table(found).set_index("slice_id")["min_eps"]
            both = pd.concat([own, broken_at], axis=1, keys=["min_eps", "sweep"]).dropna()
            both = both[both["min_eps"] > 0]  # broken by the sweep, not already clean
            ratio = float((both["min_eps"] / both["sweep"]).median()) if len(both) else math.nan
            row = {"kind": kind, "activation": args.activation, "slices": n,
                   "attack": attack, "sweep_attack": args.sweep,
                   "eps": grid, "curve": curve["broken"].round(4).tolist(),
                   "sweep": points.sort_values("eps")["broken"].round(4).tolist(),
                   "max_abs_diff": float(agree["max_abs_diff"]),
                   "mean_abs_diff": float(agree["mean_abs_diff"]),
                   "mean_diff": float(agree["mean_diff"]),
                   "median_min_eps": [float(median["median"]), float(median["low"]),
                                      float(median["high"])],
                   "median_ratio_to_sweep": ratio, "ratio_slices": len(both),
                   "found": float(median["found"]), "minimal_seconds": minimal_seconds,
                   "sweep_seconds": sweep_seconds,
                   "time_ratio": sweep_seconds / minimal_seconds}  # fmt: skip
            results.append(row)
            print(f"\n{kind} ({args.activation}): {n} slices, {attack} "
                  f"({args.minimal_steps} steps) vs {args.sweep}-{loss} ({args.apgd_steps} steps) "
                  f"at {len(grid)} eps, Dice <= {THRESHOLD}")  # fmt: skip
            print("  eps        " + " ".join(f"{e:8.4f}" for e in grid))
            print("  curve      " + " ".join(f"{v:8.3f}" for v in row["curve"]))
            print("  sweep      " + " ".join(f"{v:8.3f}" for v in row["sweep"]))
            print(f"  max |diff| {row['max_abs_diff']:.3f}, mean |diff| "
                  f"{row['mean_abs_diff']:.3f}, mean diff {row['mean_diff']:+.3f}; median "
                  f"min_eps {median['median']:.4g} [{median['low']:.4g}, {median['high']:.4g}], "
                  f"found {row['found']:.0%}; min_eps / sweep's minimal eps: median "
                  f"{ratio:.2f} over {len(both)} slices")  # fmt: skip
            print(f"  time: minimal {minimal_seconds:.1f} s, sweep {sweep_seconds:.1f} s, ratio "
                  f"{row['time_ratio']:.2f}", flush=True)  # fmt: skip
        name = f"minnorm-curve-{args.kinds}-{args.activation}.json"
        (args.out / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
