"""The 3D study: a 3D and a 2D U-Net on the same synthetic volumes, attacked end to end through the
sliding-window inference and through tiles; VAFA against PGD at equal SSIM.

Data (one of two kinds, ``--kind``), written in memory by advseg's synthetic writers and scaled
to [0, 1] here, so that eps 4/255 and 8/255 mean what they mean on slices:

- ``ct``: :func:`advseg.data.synth_nifti.synthetic_ct_volume` (liver, spleen, two kidneys), HU
  clipped to [-200, 300] (a soft-tissue window) -> [0, 1];
- ``mri``: :func:`advseg.data.synth_mri.synthetic_mri_volume` (ventricles, thalamus, lesion;
  bias field, Rician noise), clipped to the volume's 99.5th percentile -> [0, 1].

Volumes ``(D, H, W)`` = ``--shape`` (default 32 x 48 x 48), ``--train`` for training and
``--test`` held out. Models: ``unet3d-tiny`` (MONAI DynUNet, 0.09M parameters) on random
``--roi`` patches (a third centred on foreground) and ``unet-tiny`` (the 2D zoo U-Net, 0.12M) on
the same volumes' axial slices, each trained here by a minimal Adam loop on the Dice-focal loss
(``--steps3d`` / ``--steps2d``; advseg's own 3D training z-scores the volumes, which would make
eps a fraction of a standard deviation rather than of the [0, 1] range: hence this loop).

Scoring: the 3D model through :class:`advseg.inference.SlidingWindow` (window ``--roi``^3,
overlap 0.5, Gaussian); the 2D model slice by slice; Dice per (volume, class) of the stacked
prediction (both empty: 1), averaged. Attacks (loss dicefocal, L-inf):

- 3D ``through inference`` (the whole inference is the attacked model) and ``through tiles``
  (non-overlapping window tiles attacked through the bare network, stitched, then scored by the
  overlapping inference), :func:`advseg.attacks.through.attack_volume`;
- 2D: every slice attacked as a 2D image (what a 2D pipeline faces);
- FGSM, PGD-20, APGD-20, SEA (``preset=fast``, ``--sea-steps`` per member) at eps 4/255, 8/255;
- VAFA (largest quantisation step 80/255 of the range, 20 steps of 4/255 on the table), its
  SSIM bound set to the lowest SSIM PGD-20 left on a test volume at each eps (through
  inference), so that both are compared at (at least) PGD's SSIM.

Writes ``--out`` (JSON, one entry per cell, rewritten after each cell: a killed run keeps what it
measured) and prints a table. Times are CPU seconds of this process, one torch thread.

    python benchmarks/volume_study.py --kind ct --out /tmp/study_ct.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from advseg.attacks import create_attack
from advseg.attacks.through import attack_volume
from advseg.data.synth_mri import synthetic_mri_volume
from advseg.data.synth_nifti import synthetic_ct_volume
from advseg.inference import SlidingWindow
from advseg.losses import create_loss
from advseg.metrics import dice_score, hard_prediction, ssim
from advseg.models import count_parameters, create_model

LOSS = "dicefocal"


def make_volumes(kind: str, n: int, shape: tuple[int, int, int], seed: int):
    """``n`` volumes ``(n, 1, D, H, W)`` in [0, 1] and their masks ``(n, K, D, H, W)``."""
    depth, height, width = shape
    images, masks = [], []
    for case in range(n):
        rng = np.random.default_rng([seed, case])
        if kind == "ct":
            hu, label = synthetic_ct_volume((width, height), depth, rng)
            image = (np.clip(hu.astype(np.float32), -200, 300) + 200) / 500
            classes = 4
        else:
            raw, label = synthetic_mri_volume((width, height), depth, rng)
            raw = raw.astype(np.float32)
            image = np.clip(raw / np.percentile(raw, 99.5), 0, 1)
            classes = 3
        image, label = image.transpose(2, 1, 0), label.transpose(2, 1, 0)  # (W,H,Z) -> (D,H,W)
        images.append(torch.from_numpy(np.ascontiguousarray(image))[None])
        onehot = np.stack([label == k for k in range(1, classes + 1)]).astype(np.float32)
        masks.append(torch.from_numpy(onehot))
    return torch.stack(images).float(), torch.stack(masks)


def train3d(x, y, roi, steps, seed):
    """unet3d-tiny on random roi^3 patches, batch 2, a third centred on foreground."""
    torch.manual_seed(seed)
    model = create_model("unet3d-tiny", in_channels=1, classes=y.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    loss = create_loss(LOSS)
    g = torch.Generator().manual_seed(seed)
    shape = x.shape[2:]
    model.train()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(2):
            i = int(torch.randint(len(x), (1,), generator=g))
            fg = torch.nonzero(y[i].amax(0))
            if step % 3 == 0 and len(fg):  # centred on a foreground voxel
                centre = fg[int(torch.randint(len(fg), (1,), generator=g))].tolist()
                start = [
                    min(max(c - roi // 2, 0), s - roi) for c, s in zip(centre, shape, strict=True)
                ]
            else:
                start = [int(torch.randint(s - roi + 1, (1,), generator=g)) for s in shape]
            box = tuple(slice(s, s + roi) for s in start)
            xs.append(x[(i, slice(None), *box)])
            ys.append(y[(i, slice(None), *box)])
        optimizer.zero_grad()
        loss(model(torch.stack(xs)), torch.stack(ys)).backward()
        optimizer.step()
    return model.eval()


def train2d(x, y, steps, seed):
    """unet-tiny on random axial slices of the same volumes, batch 16."""
    torch.manual_seed(seed)
    model = create_model("unet-tiny", in_channels=1, classes=y.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    loss = create_loss(LOSS)
    slices_x, slices_y = to_slices(x), to_slices(y)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(slices_x), (16,), generator=g)
        optimizer.zero_grad()
        loss(model(slices_x[pick]), slices_y[pick]).backward()
        optimizer.step()
    return model.eval()


def to_slices(v: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B * D, C, H, W)``."""
    return v.movedim(2, 1).reshape(-1, v.shape[1], *v.shape[3:])


def to_volumes(s: torch.Tensor, b: int) -> torch.Tensor:
    """``(B * D, C, H, W)`` -> ``(B, C, D, H, W)``."""
    return s.reshape(b, -1, *s.shape[1:]).movedim(1, 2)


def dice(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean Dice over (volume, class) of the sigmoid prediction (both empty: 1)."""
    return float(dice_score(hard_prediction(logits, "sigmoid"), y > 0.5).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["ct", "mri"], default="ct")
    parser.add_argument("--shape", default="32,48,48", help="D,H,W of each volume")
    parser.add_argument("--roi", type=int, default=32)
    parser.add_argument("--train", type=int, default=6)
    parser.add_argument("--test", type=int, default=2)
    parser.add_argument("--steps3d", type=int, default=300)
    parser.add_argument("--steps2d", type=int, default=400)
    parser.add_argument("--sea-steps", type=int, default=5)
    parser.add_argument("--attacks", default="fgsm,pgd,vafa,apgd,sea")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=None, help="cache of the trained weights (.pt)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    x, y = make_volumes(args.kind, args.train + args.test, shape, args.seed)
    xtr, ytr, xte, yte = x[: args.train], y[: args.train], x[args.train :], y[args.train :]
    results: dict = {"kind": args.kind, "shape": shape, "roi": args.roi, "cells": []}

    def save():
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    cache = args.models or str(args.out.with_suffix(".models.pt"))
    t0 = time.process_time()
    if Path(cache).is_file():
        state = torch.load(cache)
        net3 = create_model("unet3d-tiny", in_channels=1, classes=y.shape[1])
        net2 = create_model("unet-tiny", in_channels=1, classes=y.shape[1])
        net3.load_state_dict(state["3d"])
        net2.load_state_dict(state["2d"])
        net3.eval(), net2.eval()
    else:
        net3 = train3d(xtr, ytr, args.roi, args.steps3d, args.seed)
        results["train3d_cpu_s"] = time.process_time() - t0
        t0 = time.process_time()
        net2 = train2d(xtr, ytr, args.steps2d, args.seed)
        results["train2d_cpu_s"] = time.process_time() - t0
        torch.save({"3d": net3.state_dict(), "2d": net2.state_dict()}, cache)
    results["params"] = {"unet3d-tiny": count_parameters(net3), "unet-tiny": count_parameters(net2)}
    inferer = SlidingWindow(net3, (args.roi,) * 3, overlap=0.5, batch_size=4)
    b = len(xte)

    def score3d(v):
        with torch.no_grad():
            return dice(inferer(v), yte)

    def score2d(v):
        with torch.no_grad():
            return dice(to_volumes(net2(to_slices(v)), b), yte)

    def cell(model, attack, eps, through, x_adv, cpu):
        entry = {"model": model, "attack": attack, "eps": eps, "through": through,
                 "dice": score3d(x_adv) if model == "3d" else score2d(x_adv),
                 "ssim": float(ssim(xte, x_adv).mean()),
                 "linf": float((x_adv - xte).abs().max()), "cpu_s": round(cpu, 1)}  # fmt: skip
        results["cells"].append(entry)
        save()
        print(json.dumps(entry), flush=True)

    cell("3d", "clean", 0.0, "-", xte, 0.0)
    cell("2d", "clean", 0.0, "-", xte, 0.0)
    options = {
        "fgsm": {},
        "pgd": {"steps": 20},
        "apgd": {"steps": 20},
        "sea": {"preset": "fast", "steps": args.sea_steps},
    }
    pgd_ssim: dict[float, float] = {}
    for name in args.attacks.split(","):
        for eps in (4 / 255, 8 / 255):
            if name == "vafa":
                if eps not in pgd_ssim:
                    continue
                kw = {"eps": 80 / 255, "steps": 20, "alpha": 4 / 255, "ssim_min": pgd_ssim[eps]}
            else:
                kw = {"eps": eps, **options[name]}
            t0 = time.process_time()
            adv2 = create_attack(name, net2, LOSS, **kw)(to_slices(xte), to_slices(yte))
            cell("2d", name, eps, "slices", to_volumes(adv2, b), time.process_time() - t0)
            for through in ("inference", "tiles"):
                t0 = time.process_time()
                adv = attack_volume(name, inferer, xte, yte, through=through, loss=LOSS, **kw)
                cell("3d", name, eps, through, adv, time.process_time() - t0)
                if name == "pgd" and through == "inference":
                    pgd_ssim[eps] = math.floor(float(ssim(xte, adv).min()) * 1e4) / 1e4
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n{results['kind']}: Dice (SSIM) per cell")
    print("| model | attack | eps | through | Dice | SSIM | L-inf | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for c in results["cells"]:
        print(f"| {c['model']} | {c['attack']} | {c['eps'] * 255:.0f}/255 | {c['through']} | "
              f"{c['dice']:.3f} | {c['ssim']:.4f} | {c['linf']:.4f} | {c['cpu_s']} |")  # fmt: skip


if __name__ == "__main__":
    main()
