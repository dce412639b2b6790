"""Measure the paper's loss-ranking claim under its notebook code and under equation 5.

For each data set (the phantom, and the synthetic abdominal CT volumes in the NIfTI layout), each
model and each training seed: train a small model (``advseg.train.train_on_data``), attack its
held-out slices with FGSM under BCE, Focal and Dice+Focal at each eps, once as the paper's
notebook did (``compat="notebook"``: blended update, swapped loss arguments, soft masks) and once
as equation 5, then test the ranking of the losses per (data, model, mode, eps) with paired
Wilcoxon signed-rank tests (``advseg.report.claims``). Also measured: on how many pixels the
notebook's gradient sign agrees with equation 5's for the same loss.

Run (CPU minutes at the defaults)::

    python benchmarks/claims_ranking.py --out /tmp/claims-bench

Prints the verdict table and writes ``ranking.csv``, ``verdict.csv``, ``sign_agreement.csv`` and
``records.parquet`` into ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from advseg.allocator import keep_freed_memory
from advseg.data import DataConfig, PreprocessConfig, load_data, split_train_val_test, spread_rows
from advseg.data.synth import write_synthetic
from advseg.data.synth_nifti import write_synthetic_nifti
from advseg.evaluate import evaluate_cell
from advseg.evaluate.compat import create_compat_attack, soft_masks
from advseg.models import load_checkpoint
from advseg.report.claims import loss_ranking, per_slice_dsc, ranking_verdict
from advseg.train import TrainConfig, train_on_data

LOSSES = ["bce", "focal", "dicefocal"]


def make_data(kind: str, root: Path, cases: int, slices: int) -> Path:
    path = root / f"data-{kind}"
    if not path.exists():
        if kind == "phantom":
            write_synthetic(path, cases=cases, scans=1, slices=slices, seed=0)
        else:
            write_synthetic_nifti(path, cases=cases, slices=slices, size=(128, 112), seed=0)
    return path


def sign_agreement(model, data, rows, eps: float, loss: str) -> float:
    """Share of input pixels where the notebook's gradient sign equals equation 5's."""
    batch = [data.dataset(rows)[i] for i in range(len(rows))]
    x = torch.stack([b["image"] for b in batch])
    y = torch.stack([b["mask"] for b in batch])
    soft = soft_masks(data.index, rows, data.classes, x.shape[-1], data.preprocess.resize)
    ours = create_compat_attack("fgsm", model, loss, eps, "none")
    theirs = create_compat_attack("fgsm", model, loss, eps, "notebook")
    with torch.enable_grad():
        g_ours = ours.gradient(x, y)[0].sign()
        g_theirs = theirs.gradient(x, soft)[0].sign()
    decided = (g_ours != 0) & (g_theirs != 0)
    return float((g_ours == g_theirs)[decided].float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/claims-bench"))
    parser.add_argument("--data", nargs="+", default=["phantom", "nifti"])
    parser.add_argument("--models", nargs="+", default=["unet-tiny", "unet"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--eps", nargs="+", type=float, default=[0.009, 0.03])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cases", type=int, default=48)  # 12 held out: case-level p < 0.001
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)  # oversubscribed CPUs: OpenMP spinning costs more than it gains
    args.out.mkdir(parents=True, exist_ok=True)
    frames, signs = [], []
    start = time.perf_counter()
    for kind in args.data:
        path = make_data(kind, args.out, args.cases, args.slices)
        data_config = DataConfig(
            path=path, cache_dir=args.out / "cache", preprocess=PreprocessConfig(size=args.size)
        )
        data = load_data(data_config)
        _, _, test_rows = split_train_val_test(data.index, 0.25, 0.2, 0)
        rows = [int(r) for r in test_rows if data.masks[r].any()]
        print(f"{kind}: {len(data)} slices, {len(rows)} test slices with a mask, "
              f"classes {', '.join(data.classes)}", flush=True)  # fmt: skip
        for arch in args.models:
            for seed in args.seeds:
                out = args.out / f"{kind}-{arch}-seed{seed}"
                config = TrainConfig(model=arch, epochs=args.epochs, batch_size=8, lr=0.002,
                                     patience=0, seed=seed, device="cpu")  # fmt: skip
                config.augment.enabled = False
                if not (out / "checkpoints" / "best.json").exists():
                    train_on_data(data_config, config, out, test_fraction=0.25, val_fraction=0.2)
                model, _ = load_checkpoint(out / "checkpoints" / "best")
                for compat in ("notebook", "none"):
                    for eps in args.eps:
                        result = evaluate_cell(model, data, rows, "fgsm", LOSSES, eps,
                                               model_name=arch, arch=arch, batch_size=16,
                                               compat=compat)  # fmt: skip
                        frames.append(result.records.assign(seed=seed, data=kind))
                for loss in LOSSES:
                    share = sign_agreement(
                        model, data, spread_rows(data.index, rows, 16), args.eps[0], loss
                    )
                    signs.append({"data": kind, "model": arch, "seed": seed, "loss": loss,
                                  "sign_agreement": share})  # fmt: skip
                print(
                    f"  {arch} seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True
                )
    records = pd.concat(frames, ignore_index=True)
    records.to_parquet(args.out / "records.parquet", index=False)
    rankings, verdicts = [], []
    for kind, part in records.groupby("data", sort=False):
        slices = per_slice_dsc(part.drop(columns="data"), "paper")
        clean = slices.groupby(["model", "seed"])["dsc_clean"].mean().groupby("model").mean()
        print(f"\n{kind}: clean per-slice DSC (paper protocol), mean over seeds: "
              + ", ".join(f"{m} {v:.3f}" for m, v in clean.items()))  # fmt: skip
        ranking = loss_ranking(slices).assign(data=kind)
        verdict, lines = ranking_verdict(ranking.drop(columns="data"))
        rankings.append(ranking)
        verdicts.append(verdict.assign(data=kind))
        for line in lines:
            print(f"{kind}: {line}")
    ranking = pd.concat(rankings, ignore_index=True)
    verdict = pd.concat(verdicts, ignore_index=True)
    sign = pd.DataFrame(signs)
    ranking.to_csv(args.out / "ranking.csv", index=False)
    verdict.to_csv(args.out / "verdict.csv", index=False)
    sign.to_csv(args.out / "sign_agreement.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print("\nverdict per (data, model, attack, eps):")
        print(verdict.to_string(index=False))
        print("\npairwise tests (p: Wilcoxon over slice pairs pooled over seeds; p_cases: over "
              "per-case means; diff: DSC a - b with its 95% case-bootstrap interval):")  # fmt: skip
        cols = ["data", "model", "attack", "eps", "loss_a", "loss_b", "n", "dsc_a", "dsc_b",
                "a_lower", "diff", "diff_low", "diff_high", "p", "p_holm", "cases", "p_cases",
                "p_cases_holm", "seeds_a_lower"]  # fmt: skip
        print(ranking[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print("\nsign agreement of the notebook's gradient with equation 5's (same loss):")
        print(sign.groupby(["data", "loss"])["sign_agreement"].agg(["mean", "min", "max"]))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
