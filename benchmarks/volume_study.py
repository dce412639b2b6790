"""The 3D study through the product: `advseg data synth`, `advseg train`, `advseg evaluate`.

For each data set (``--kinds``: ``ct``, the synthetic abdominal CT volumes, `advseg data synth
--kind nifti`; ``mri``, the synthetic brain MRI volumes, `--kind mri`), in ``--out``:

1. the data set (``--cases`` volumes of ``--slices`` slices, seed 0);
2. models trained by `advseg train` on the same split (``--test-fraction``, ``--val-fraction``,
   split seed 0), each evaluated at its last epoch: ``3d`` = unet3d-tiny on ``--patch``^3
   patches of the volumes resampled to ``--spacing`` (default per kind; CT: clipped to the
   foreground percentiles and z-scored as nnU-Net; MRI: z-scored per volume), ``--epochs3d``
   epochs of 4 patches per volume (a third centred on foreground), batch 2, AdamW ``--lr3d``
   cosine; ``2d`` = the 2D unet-tiny on the same volumes' axial slices (``--size`` square,
   aspect kept and padded, each slice divided by its maximum: the product's 2D preprocessing),
   ``--epochs2d`` epochs, batch 16; for the kinds in ``--vaft``, ``3d-vaft`` = unet3d-tiny trained
   exactly like ``3d`` but with ``--adv-train vaft`` (``--vaft-eps``, ``--vaft-steps`` VAFA
   steps, ``--vaft-fraction`` of each batch);
3. `advseg evaluate --split test` on the held-out volumes (3D: whole volumes through the
   sliding-window inference, ``--through inference`` and ``--through tiles``; 2D: every slice of
   the same volumes), loss dicefocal, L-inf, at ``--eps`` = 4/255 and 8/255 **of the inputs'
   range**: 2D slices are in [0, 1], so eps as given; a 3D checkpoint's inputs are z-scored, so
   eps x the width of its valid range (CT: the z-scored clip; MRI: the data set's z-scored
   extremes), read from the checkpoint. Cells: FGSM, PGD-``--steps``, APGD-``--steps``,
   SEA (``preset=fast``, ``--sea-steps`` per member), and VAFA (largest quantisation step
   ``--vafa-eps``, ``--steps`` steps of ``--vafa-alpha``) held to ``ssim_min`` = the lowest SSIM
   PGD left on a held-out volume at that eps (3D: through inference), so VAFA is compared with
   PGD at (at least) PGD's SSIM. The VAFT model: clean, PGD and VAFA (the clean ``3d`` model's
   ``ssim_min``) through inference. ``--only`` limits the models (e.g. to evaluate some while
   another trains).

Every cell is one `advseg evaluate` run directory (skipped when its records exist: a killed study
resumes); the summary (``--out``/study.json and a Markdown table) is computed from the records:
Dice per (held-out volume, class) from the records' tp / fp / fn (2D: summed over the volume's
slices; a class absent from both truth and prediction counts 1), averaged; SSIM averaged over
volumes (2D: over slices); the largest L-inf.

    python benchmarks/volume_study.py --out /tmp/volstudy --kinds ct mri --vaft ct
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

#: (D, H, W) mm: the synthetic CT (192 x 160 x 32 at 0.8 x 0.8 x 2.5) becomes 32 x 40 x 48, the
#: MRI (96 x 96 x 32 at 1 x 1 x 1.2) 32 x 48 x 48: four 32^3 windows at overlap 0.5.
SPACING = {"ct": "2.5,3.2,3.2", "mri": "1.2,2,2"}
SYNTH = {"ct": "nifti", "mri": "mri"}
LOSS = "dicefocal"
ATTACKS = ("fgsm", "pgd", "apgd", "sea", "vafa")


def advseg(args: list[str], log: Path) -> None:
    """Run one advseg command (this interpreter, the same source tree), its output to ``log``."""
    src = os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "advseg", *args], check=False, stdout=out,
                              stderr=subprocess.STDOUT, env=env)  # fmt: skip
    if done.returncode:
        sys.exit(f"advseg {' '.join(args)} failed ({done.returncode}): see {log}")
    print(f"  {time.time() - start:7.0f} s  advseg {' '.join(args[:3])} ... ({log.name})",
          flush=True)  # fmt: skip


def train(args, kind: str, name: str) -> Path:
    """Train one model of the study (skipped when its run has a log); its last checkpoint (all
    epochs: the VAFT model and its clean twin are compared after the same training)."""
    run = args.out / "runs" / f"{kind}-{name}"
    last = run / "checkpoints" / "last.safetensors"
    if (run / "log.csv").exists():
        return last
    common = ["--data", str(args.out / kind), "--cache-dir", str(args.out / "cache"),
              "--test-fraction", str(args.test_fraction), "--val-fraction",
              str(args.val_fraction), "--split-seed", "0", "--seed", "0", "--device", "cpu",
              "--threads", str(args.threads), "--patience", "0", "--out", str(run)]  # fmt: skip
    if name == "2d":
        model = ["--model", "unet-tiny", "--size", str(args.size), "--epochs",
                 str(args.epochs2d), "--batch-size", "16", "--lr", str(args.lr2d)]  # fmt: skip
    else:
        model = ["--model", "unet3d-tiny", "--patch", str(args.patch), "--spacing",
                 args.spacing or SPACING[kind], "--modality", kind, "--epochs", str(args.epochs3d),
                 "--batch-size", "2", "--lr", str(args.lr3d)]  # fmt: skip
        if name == "3d-vaft":
            model += ["--adv-train", "vaft", "--adv-eps", str(args.vaft_eps), "--adv-steps",
                      str(args.vaft_steps), "--adv-fraction", str(args.vaft_fraction)]  # fmt: skip
    advseg(["train", *model, *common], args.out / "logs" / f"train-{kind}-{name}.log")
    return last


def width(checkpoint: Path) -> float:
    """The width of a 3D checkpoint's valid range (its inputs' range, z-units); 1 for slices."""
    meta = json.loads(checkpoint.with_suffix(".json").read_text())["meta"]
    valid = (meta.get("data") or {}).get("volumes", {}).get("valid_range")
    return 1.0 if not valid else float(valid[1]) - float(valid[0])


def evaluate(args, kind: str, name: str, checkpoint: Path, cell: str, attack: str,
             eps: list[float], extra: list[str], through: list[str]) -> Path:  # fmt: skip
    """One `advseg evaluate` cell into ``evaluations/<kind>-<name>/<cell>`` (skipped if done)."""
    out = args.out / "evaluations" / f"{kind}-{name}" / cell
    if (out / "summary.csv").exists():  # written last: the cell is complete
        return out
    command = ["evaluate", str(checkpoint), "--out", str(out), "--split", "test", "--attack",
               attack, "--loss", LOSS, "--device", "cpu", "--threads", str(args.threads),
               "--protocol", "per-class", "--examples", "0", "--batch-size", "16"]  # fmt: skip
    for e in eps:
        command += ["--eps", f"{e:.10g}"]
    for t in through if name != "2d" else []:
        command += ["--through", t]
    advseg([*command, *extra], args.out / "logs" / f"eval-{kind}-{name}-{cell}.log")
    return out


def records(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted((out / "records").glob("*.parquet"))],
                     ignore_index=True)  # fmt: skip


def summarise(frame: pd.DataFrame, scale: float, unit: float | None = None) -> list[dict]:
    """Cells of one evaluation: Dice per (volume, class) from the counts, averaged; SSIM and
    the largest L-inf. ``eps / scale`` and ``linf / unit`` (``unit`` default ``scale``) are in
    units of the inputs' range (vafa: its eps is a range fraction already, scale 1)."""
    unit = scale if unit is None else unit
    cells = []
    for (attack, eps, setting), part in frame.groupby(["attack", "eps", "attack_setting"]):
        per = part.groupby(["scan", "class"])[
            ["tp_clean", "fp_clean", "fn_clean", "tp_adv", "fp_adv", "fn_adv"]
        ].sum()
        dice = {}
        for when in ("clean", "adv"):
            tp, fp, fn = (per[f"{c}_{when}"].to_numpy(float) for c in ("tp", "fp", "fn"))
            denominator = 2 * tp + fp + fn  # 0: absent from truth and prediction, counts 1
            ratio = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
            dice[when] = float(ratio.mean())
        ssim = part.drop_duplicates(["scan", "slice"])["ssim"]
        name, _, through = str(attack).partition(":")
        cells.append({
            "attack": name, "through": through or "slices", "eps": float(eps) / scale,
            "eps_model_units": float(eps), "setting": setting,
            "dice_clean": dice["clean"], "dice_adv": dice["adv"],
            "ssim": float(ssim.mean()), "ssim_min": float(ssim.min()),
            "linf": float(part["linf"].max()) / unit,
            "volumes": int(part["scan"].nunique()), "pairs": len(per),
        })  # fmt: skip
    return cells


def study(args, kind: str) -> list[dict]:
    data = args.out / kind
    if not data.exists():
        advseg(["data", "synth", "--kind", SYNTH[kind], "--out", str(data), "--cases",
                str(args.cases), "--slices", str(args.slices), "--seed", "0"],
               args.out / "logs" / f"synth-{kind}.log")  # fmt: skip
    evaluated = [n for n in ("2d", "3d") if n in args.only]
    vaft = "3d-vaft" in args.only and kind in args.vaft
    needed = sorted({*evaluated, *(["3d", "3d-vaft"] if vaft else [])})
    checkpoints = {name: train(args, kind, name) for name in needed}
    through = ["inference", "tiles"]
    steps = ["--steps", str(args.steps)]
    found = []

    def cell(name: str, cell: str, attack: str, eps: list[float], extra: list[str],
             protocols: list[str], matched: float | None = None) -> list[dict]:  # fmt: skip
        """Evaluate (or read) one cell; its summary rows, eps in units of the inputs' range."""
        ckpt = checkpoints[name]
        scale = 1.0 if attack == "vafa" else width(ckpt)  # vafa's eps is a range fraction
        out = evaluate(args, kind, name, ckpt, cell, attack, [e * scale for e in eps], extra,
                       protocols)  # fmt: skip
        cells = summarise(records(out), scale, width(ckpt))
        for c in cells:
            c.update(kind=kind, model=name, cell=cell, params=params(ckpt))
            if matched is not None:
                c["matched_eps"] = matched
        found.extend(cells)
        return cells

    def vafa_at(pgd: list[dict], protocols: list[str], models: list[str]) -> None:
        """VAFA on ``models`` held to the lowest per-volume SSIM that PGD left in ``pgd``."""
        for e in args.eps:
            matched = [c for c in pgd if math.isclose(c["eps"], e, rel_tol=1e-6)
                       and c["through"] in ("inference", "slices")]  # fmt: skip
            floor = math.floor(matched[0]["ssim_min"] * 1e4) / 1e4
            extra = [*steps, "--alpha", f"{args.vafa_alpha:.10g}",
                     "--attack-option", f"ssim_min={floor}"]  # fmt: skip
            for model in models:
                cell(model, f"vafa-at-pgd-{round(e * 255)}", "vafa", [args.vafa_eps], extra,
                     protocols, matched=e)  # fmt: skip

    def protocols(attack: str) -> list[str]:
        return through if attack in args.tiles else ["inference"]

    for name in evaluated:
        cell(name, "fgsm", "fgsm", args.eps, [], protocols("fgsm"))
        pgd = cell(name, "pgd", "pgd", args.eps, steps, protocols("pgd"))
        vafa_at(pgd, protocols("vafa"), [name])
        cell(name, "apgd", "apgd", args.eps, steps, protocols("apgd"))
    if vaft:  # the VAFT model beside the clean one trained alike; VAFA at the clean PGD's SSIM
        cell("3d-vaft", "pgd", "pgd", args.eps, steps, ["inference"])
        pgd = [c for c in found if (c["model"], c["attack"]) == ("3d", "pgd")]
        if not pgd:  # the clean model's PGD cell, read (or run) without the rest of its grid
            pgd = cell("3d", "pgd", "pgd", args.eps, steps, protocols("pgd"))
            del found[-len(pgd) :]
        vafa_at(pgd, ["inference"], ["3d-vaft"])
    for name in evaluated:  # SEA last: the costliest
        extra = ["--attack-option", "preset=fast", "--steps", str(args.sea_steps)]
        cell(name, "sea", "sea", args.eps, extra, protocols("sea"))
    return found


def params(checkpoint: Path) -> int:
    """The model's parameter count (its records say it too)."""
    meta = json.loads(checkpoint.with_suffix(".json").read_text())["meta"]
    return int(meta.get("params") or 0)


def table(cells: list[dict]) -> str:
    lines = ["| kind | model | attack | eps | through | Dice clean | Dice adv | SSIM | linf |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in cells:
        eps = c.get("matched_eps", c["eps"])
        label = f"{round(eps * 255)}/255" + (" (SSIM-matched)" if "matched_eps" in c else "")
        lines.append(f"| {c['kind']} | {c['model']} | {c['attack']} | {label} | {c['through']} "
                     f"| {c['dice_clean']:.3f} | {c['dice_adv']:.3f} | {c['ssim']:.3f} "
                     f"| {c['linf']:.4f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kinds", nargs="+", default=["ct", "mri"], choices=["ct", "mri"])
    parser.add_argument("--vaft", nargs="*", default=["ct"], choices=["ct", "mri"],
                        help="kinds that also get a VAFT-trained 3D model")  # fmt: skip
    parser.add_argument("--cases", type=int, default=14)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--test-fraction", type=float, default=0.36)
    parser.add_argument("--val-fraction", type=float, default=0.08)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--spacing", help="D,H,W mm for the 3D models (default: CT "
                        f"{SPACING['ct']}, MRI {SPACING['mri']})")  # fmt: skip
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--epochs3d", type=int, default=40)
    parser.add_argument("--epochs2d", type=int, default=30)
    parser.add_argument("--lr3d", type=float, default=0.005)
    parser.add_argument("--lr2d", type=float, default=0.005)
    parser.add_argument("--vaft-fraction", type=float, default=0.5)
    parser.add_argument("--vaft-eps", type=float, default=0.0784)
    parser.add_argument("--vaft-steps", type=int, default=1)
    parser.add_argument("--eps", type=float, nargs="+", default=[4 / 255, 8 / 255])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sea-steps", type=int, default=5)
    parser.add_argument("--vafa-eps", type=float, default=80 / 255)
    parser.add_argument("--vafa-alpha", type=float, default=4 / 255)
    parser.add_argument("--tiles", nargs="*", default=list(ATTACKS), choices=ATTACKS,
                        help="attacks run through tiles too (3D; default all)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", default=["2d", "3d", "3d-vaft"],
                        help="the models to train and evaluate (default: all)")  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cells = [c for kind in args.kinds for c in study(args, kind)]
    (args.out / "study.json").write_text(json.dumps({"cells": cells}, indent=1))
    print(table(cells))


if __name__ == "__main__":
    main()
