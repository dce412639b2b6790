"""The worst case each attack finds at the same budget of steps: PGD-10, PGD-100, SegPGD-100,
CosPGD-100, APGD-100 and SEA's ``fast`` preset (100 steps over its four members), on a model
trained on the synthetic phantom (Kaggle layout) and on synthetic abdominal CT volumes (NIfTI).

Prints the mean DSC (the paper's protocol) on held-out slices that have a mask, at eps 0.009 and
0.03 (L-inf), the gap SEA finds below PGD-100, which SEA member won how many slices, and what
SEA's ``skip_broken`` saves (SEA timed again with it off). Sized for a shared CPU: ``--model``
(a zoo name) trained for ``--train-steps`` Adam steps on the training cases' arrays (its clean
DSC is printed: judge the numbers by it), ``--slices`` test slices drawn seeded and spread over
the test cases, ``--size`` px.

    python benchmarks/worst_case.py [--out /tmp/worst-case] [--model unet] [--size 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from advseg.allocator import keep_freed_memory
from advseg.data import DataConfig, PreprocessConfig, load_data, split_cases
from advseg.data.synth import write_synthetic
from advseg.data.synth_nifti import write_synthetic_nifti
from advseg.labels import model_target, output_channels
from advseg.losses import create_loss
from advseg.models.zoo import create_model

ATTACKS = [  # (label, attack, loss, options)
    ("PGD-10", "pgd", "bce", {"steps": 10}),
    ("PGD-100", "pgd", "bce", {"steps": 100}),
    ("SegPGD-100", "segpgd", "bce", {"steps": 100}),
    ("CosPGD-100", "cospgd", "bce", {"steps": 100}),
    ("APGD-100", "apgd", "bce", {"steps": 100}),
    ("SEA-100", "sea", "bce", {"preset": "fast"}),
]
EPS = [0.009, 0.03]
TEST_FRACTION = 0.25


def make_data(kind: str, root: Path) -> Path:
    path = root / kind
    if not path.exists():
        if kind == "phantom":
            write_synthetic(path, cases=8, scans=1, slices=32, seed=0)
        else:
            write_synthetic_nifti(path, cases=8, slices=32, size=(96, 80), seed=0)
    return path


def train(
    name: str, images: torch.Tensor, masks: torch.Tensor, steps: int, activation: str = "sigmoid"
) -> torch.nn.Module:
    """A zoo model trained with Adam on Dice + BCE (sigmoid: K outputs) or Dice + CE (softmax:
    K + 1 outputs on the masks' partition, ``dicece``), batches of 16 drawn with a fixed seed."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, classes=output_channels(masks.shape[1], activation))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2 if name == "unet-tiny" else 1e-3)
    masks = model_target(masks, activation)  # softmax: one-hot with background first
    losses = [create_loss("dicece")] if activation == "softmax" else []
    losses = losses or [create_loss("dice"), create_loss("bce")]
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(images), (16,), generator=g)
        x, y = images[pick], masks[pick]
        optimizer.zero_grad()
        logits = model(x)
        sum(loss(logits, y) for loss in losses).backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/worst-case"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--model", default="unet-tiny", help="a zoo name")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--kinds", default="phantom,nifti")
    parser.add_argument("--eps", default=",".join(map(str, EPS)))
    args = parser.parse_args()
    from advseg.evaluate import evaluate_cell  # here: sea_budget.py imports this module on an
    from advseg.stats.summary import summarize_cells  # older source tree without these

    keep_freed_memory()
    for kind in args.kinds.split(","):
        path = make_data(kind, args.out)
        config = DataConfig(
            path=path,
            preprocess=PreprocessConfig(size=args.size),
            cache_dir=args.out / "cache" / kind,
        )
        data = load_data(config)
        train_rows, test_rows = split_cases(data.index, TEST_FRACTION, 0)
        images = torch.from_numpy(data.images[train_rows]).unsqueeze(1).repeat(1, 3, 1, 1)
        masks = torch.from_numpy(data.masks[train_rows]).float()
        start = time.perf_counter()
        model = train(args.model, images, masks, args.train_steps)
        with_mask = [int(r) for r in test_rows if data.masks[r].any()]
        rng = np.random.default_rng(0)  # spread over the test cases, not the first slices
        n = min(args.slices, len(with_mask))
        with_mask = sorted(int(r) for r in rng.choice(with_mask, size=n, replace=False))
        print(f"{kind}: {len(data.index)} slices, classes {list(data.classes)}; trained on "
              f"{len(train_rows)} in {time.perf_counter() - start:.0f} s; {len(with_mask)} test "
              "slices with a mask", flush=True)  # fmt: skip
        for eps in [float(e) for e in args.eps.split(",")]:
            dsc, winners, t_sea = {}, "", 0.0
            for label, attack, loss, options in ATTACKS:
                start = time.perf_counter()
                result = evaluate_cell(
                    model, data, with_mask, attack, [loss], eps, model_name=kind,
                    arch=args.model, attack_kwargs=options, batch_size=16,
                )  # fmt: skip
                cells = summarize_cells(result.records, "paper")
                clean, dsc[label] = (float(cells[c].iloc[0]) for c in ("dsc_clean", "dsc_adv"))
                if attack == "sea":
                    won = result.records.drop_duplicates("slice_id")["member"].value_counts()
                    winners = ", ".join(f"{name} {count}" for name, count in won.items())
                seconds = time.perf_counter() - start
                t_sea = seconds if attack == "sea" else t_sea
                print(f"  {kind} eps {eps:g} {label:11s} DSC {dsc[label]:.3f}  ({seconds:.0f} s)",
                      flush=True)  # fmt: skip
            start = time.perf_counter()
            full = evaluate_cell(
                model, data, with_mask, "sea", ["bce"], eps, model_name=kind, arch=args.model,
                attack_kwargs={"preset": "fast", "skip_broken": False}, batch_size=16,
            )  # fmt: skip
            t_full = time.perf_counter() - start
            dsc_full = float(summarize_cells(full.records, "paper")["dsc_adv"].iloc[0])
            print(f"  {kind} eps {eps:g} SEA-100 without skip_broken DSC {dsc_full:.3f} "
                  f"({t_full:.0f} s; with it {t_sea:.0f} s: skipping saves "
                  f"{1 - t_sea / t_full:.0%})", flush=True)  # fmt: skip
            best_single = min(v for k, v in dsc.items() if k != "SEA-100")
            gap, single_gap = dsc["PGD-100"] - dsc["SEA-100"], best_single - dsc["SEA-100"]
            print(f"  {kind} eps {eps:g}: clean {clean:.3f}; SEA below PGD-100 by {gap:.3f}, "
                  f"below the best single attack by {single_gap:.3f}; SEA winners: {winners}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
