"""SEA before and after it was made faithful to its authors' code, and PAdam: DSC and time.

Trains a small zoo model (sigmoid, Dice + BCE; ``worst_case.train``) on the synthetic phantom and
on the synthetic abdominal CT volumes (NIfTI), saves it, and attacks the same held-out slices
(with a mask, seeded, spread over the test cases) at each eps (L-inf):

- ``--code old``: ``sea`` as it was (run this script with ``PYTHONPATH`` on the old source
  tree): 100 steps in all over ``masked-bce, js, masked-spherical, balanced-bce``, best iterate
  by loss, choice by the Dice over all channels. Its adversarial images and time are saved;
- ``--code new``: scores the old images with the new code (one scoring for every row: the
  preprocessing's masks changed between the two trees), then runs ``sea`` at ``preset=fast``
  (25 steps per member), at the reference budget (300 per member), at the reference budget with
  ``balanced-bce`` as a fifth member, and ``padam`` with ``bce`` (PAdam-CE) and ``cosine``
  (PAdam-Cos), 200 steps.

The new run writes ``OUT/results-KINDS.json`` and prints the paper-protocol DSC (what the report
shows) and the wall time of each cell. Sized for a shared CPU.

    PYTHONPATH=OLD/src python benchmarks/sea_budget.py --code old --out /tmp/sea-budget
    PYTHONPATH=src python benchmarks/sea_budget.py --code new --out /tmp/sea-budget
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from advseg.data import DataConfig, PreprocessConfig, load_data, split_cases
from advseg.labels import model_target
from worst_case import TEST_FRACTION, make_data, train  # benchmarks/ is the script's folder

OLD = "sea (old, 100 in all)"


def new_runs(activation: str) -> list[tuple[str, str, str, dict]]:
    """(label, attack, loss, options) of the new tree's rows, in the model's loss forms."""
    ce = "ce" if activation == "softmax" else "bce"
    five = [f"masked-{ce}", f"segpgd-{ce}", "js", "masked-spherical", f"balanced-{ce}"]
    return [
        ("sea fast (4 x 25)", "sea", ce, {"preset": "fast"}),
        ("sea reference (4 x 300)", "sea", ce, {}),
        ("sea reference + balanced (5 x 300)", "sea", ce, {"members": five}),
        ("padam-ce (200)", "padam", ce, {}),
        ("padam-cos (200)", "padam", "cosine", {}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", choices=["old", "new"], required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sea-budget"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--model", default="unet-tiny", help="a zoo name")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--kinds", default="phantom,nifti")
    parser.add_argument("--eps", default="0.03")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared CPU)")
    parser.add_argument("--activation", choices=["sigmoid", "softmax"], default="sigmoid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for kind in args.kinds.split(","):
        path = make_data(kind, args.out)
        config = DataConfig(
            path=path, preprocess=PreprocessConfig(size=args.size),
            cache_dir=args.out / "cache" / kind,
        )  # fmt: skip
        data = load_data(config)
        train_rows, test_rows = split_cases(data.index, TEST_FRACTION, 0)
        act = "" if args.activation == "sigmoid" else f"-{args.activation}"
        saved = args.out / f"{kind}-{args.model}{act}-{args.size}px-{args.train_steps}.pt"
        if saved.exists():  # both codes attack the very same weights
            model = torch.load(saved, weights_only=False).eval()
        else:
            images = torch.from_numpy(data.images[train_rows]).unsqueeze(1).repeat(1, 3, 1, 1)
            masks = torch.from_numpy(data.masks[train_rows]).float()
            model = train(args.model, images, masks, args.train_steps, args.activation)
            torch.save(model, saved)
        with_mask = [int(r) for r in test_rows if data.masks[r].any()]
        rng = np.random.default_rng(0)
        n = min(args.slices, len(with_mask))
        rows = sorted(int(r) for r in rng.choice(with_mask, size=n, replace=False))
        for eps in [float(e) for e in args.eps.split(",")]:
            saved_old = args.out / f"old-{kind}{act}-{eps:g}.pt"
            if args.code == "old":
                run_old(model, data, rows, eps, saved_old, args.activation)
                continue
            from advseg.evaluate import evaluate_cell  # the new tree's only
            from advseg.stats.summary import summarize_cells

            old = torch.load(saved_old)  # {"x_adv": (N, C, H, W), "seconds": float}
            ce = "ce" if args.activation == "softmax" else "bce"
            runs = [(OLD, "crafted", ce, {}), *new_runs(args.activation)]
            for label, attack, loss, options in runs:
                options = {**options, "activation": args.activation}
                start = time.perf_counter()
                crafted = None
                if attack == "crafted":
                    crafted = lambda x, y, at, old=old: [old["x_adv"][at]]  # noqa: E731
                result = evaluate_cell(
                    model, data, rows, label if crafted else attack, [loss], eps,
                    model_name=kind, arch=args.model, attack_kwargs=options, batch_size=8,
                    crafted=crafted,
                )  # fmt: skip
                seconds = old["seconds"] if crafted else time.perf_counter() - start
                cell = summarize_cells(result.records, "paper").iloc[0]
                won = ""
                if attack == "sea":
                    counts = result.records.drop_duplicates("slice_id")["member"].value_counts()
                    won = ", ".join(f"{name} {count}" for name, count in counts.items())
                row = {"kind": kind, "activation": args.activation, "eps": eps, "label": label,
                       "slices": n, "setting": result.records["attack_setting"].iloc[0],
                       "dsc_clean": float(cell["dsc_clean"]), "dsc_adv": float(cell["dsc_adv"]),
                       "seconds": seconds, "winners": won}  # fmt: skip
                results.append(row)
                print(f"{kind} {args.activation[:4]} eps {eps:g} {label:35s} "
                      f"clean {row['dsc_clean']:.3f} adv {row['dsc_adv']:.3f}  "
                      f"{seconds:6.1f} s  {won}", flush=True)  # fmt: skip
    if args.code == "new":
        name = f"results-{args.kinds}-{args.activation}-{args.eps}.json"
        (args.out / name).write_text(json.dumps(results))


def run_old(
    model: torch.nn.Module, data, rows: list[int], eps: float, path: Path, activation: str
) -> None:
    """The old tree's ``sea`` at its default budget on ``rows`` (one batch, as evaluate_cell
    batches them at this size), its images and time saved for the new tree to score."""
    from advseg.attacks import create_attack

    items = [data.dataset(rows)[i] for i in range(len(rows))]
    x = torch.stack([item["image"] for item in items])
    y = model_target(torch.stack([item["mask"] for item in items]).float(), activation)
    attack = create_attack("sea", model, eps=eps, activation=activation)
    start = time.perf_counter()
    x_adv = attack(x, y)
    seconds = time.perf_counter() - start
    torch.save({"x_adv": x_adv, "seconds": seconds}, path)
    print(f"old sea eps {eps:g}: {seconds:.1f} s, winners {attack.winners}", flush=True)


if __name__ == "__main__":
    main()
