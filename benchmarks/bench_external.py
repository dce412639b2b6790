"""Models advseg did not train, judged end to end from the CLI: an nnU-Net v2 model trained by
nnU-Net's own trainer, and a MONAI bundle.

Stages (each reuses what the earlier ones left in ``--work``):

``prepare``  nnU-Net: 12 CT-like cases (tests/nnunet_results.py's generator: HU, a ball and a small
             structure), 8 in ``imagesTr`` and 4 held out in ``imagesTs``; nnU-Net's own
             ``nnUNetv2_plan_and_preprocess`` (2d), then folds 0 and 1 trained by nnU-Net's own
             ``nnUNetTrainer_1epoch`` (one epoch: 250 iterations, its augmentation, its loss, on
             the CPU). Bundle: tests/monai_bundle.py's tiny 3D UNet, trained 25 Adam steps on
             3 cases, judged on 3 held-out cases.
``evaluate`` ``advseg evaluate`` for each setting (``--threads 1``): the bundle under PGD (``--eps``
             in HU, ``--steps``, its ce and dicece losses) and ``sea`` (``preset=fast``);
             nnU-Net fold 0 under PGD (loss ce) with and without mirroring; folds 0, 1 and
             their ensemble 0,1 (no mirroring) in one run under PGD with ``--transfer`` (each
             model's adversarial volumes scored on the two others); fold 0 (no mirroring) under
             ``sea`` on two of the held-out volumes (``--max-slices 2``: the CPU is shared).
             Wall time per run, clean Dice and Dice under each attack (mean over the held-out
             volumes and classes, from the records), into ``--work/results.json`` and a table
             on stdout.

    python benchmarks/bench_external.py --work /tmp/external-bench [--stage prepare|evaluate|all]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the generators the tests use: one definition of the data

DATASET = "Dataset901_Tiny"


def prepare_nnunet(work: Path) -> Path:
    """Raw data, nnU-Net's plans and preprocessing, folds 0 and 1 trained by nnU-Net."""
    from nnunet_results import write_raw

    raw_root, pre, results = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "results"
    raw = write_raw(raw_root, cases=12)
    (raw / "imagesTs").mkdir(exist_ok=True)
    (raw / "labelsTs").mkdir(exist_ok=True)
    for i in range(8, 12):  # held out: nnU-Net never sees them
        shutil.move(raw / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz", raw / "imagesTs")
        shutil.move(raw / "labelsTr" / f"tiny_{i:03d}.nii.gz", raw / "labelsTs")
    dataset = json.loads((raw / "dataset.json").read_text())
    dataset["numTraining"] = 8
    (raw / "dataset.json").write_text(json.dumps(dataset))
    env = {**os.environ, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(pre),
           "nnUNet_results": str(results), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "false",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    bin_dir = Path(sys.executable).parent
    run = [
        str(bin_dir / "nnUNetv2_plan_and_preprocess"),
        "-d",
        "901",
        "-c",
        "2d",
        "-np",
        "1",
        "-npfp",
        "1",
    ]
    subprocess.run(run, env={**env, "nnUNet_n_proc_DA": "1"}, check=True)  # 0 breaks its planner
    for fold in ("0", "1"):
        started = time.perf_counter()
        train = [str(bin_dir / "nnUNetv2_train"), "901", "2d", fold, "-tr",
                 "nnUNetTrainer_1epoch", "-device", "cpu"]  # fmt: skip
        subprocess.run(train, env=env, check=True)
        print(f"fold {fold} trained in {time.perf_counter() - started:.0f} s", flush=True)
    return results / DATASET


def prepare_bundle(work: Path) -> tuple[Path, Path]:
    """tests/monai_bundle.py's bundle, trained on 3 cases; 3 other cases to judge it on."""
    from monai_bundle import volume, write_bundle, write_data

    train = write_data(work / "bundle-train", cases=3)
    bundle = write_bundle(work / "bundle", train)
    test = work / "bundle-test"
    import nibabel as nib

    from monai_bundle import AFFINE

    for c in range(3):  # other seeds than the training cases'
        image, label = volume(100 + c)
        for kind, array in (("imagesTs", image), ("labelsTs", label)):
            (test / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, AFFINE), test / kind / f"ct_{c:02d}.nii.gz")
    return bundle, test


def evaluate(args: list[str], out: Path) -> dict:
    """One ``advseg evaluate`` run: wall seconds and the mean Dice per attack from its records."""
    import pandas as pd

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    command = [sys.executable, "-m", "advseg", "evaluate", *args, "--threads", "1", "--out",
               str(out)]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    seconds = time.perf_counter() - started
    records = pd.concat(pd.read_parquet(p) for p in sorted((out / "records").glob("*.parquet")))
    result: dict = {"seconds": round(seconds, 1), "volumes": int(records["slice_id"].nunique())}
    for (source, model), rows in records.groupby(["source", "model"], sort=False):
        key = model if source == model else f"{source} -> {model}"
        cell = {"clean": round(float(rows["dice_clean"].mean()), 4)}
        for attack, group in rows.groupby("attack"):
            cell[str(attack)] = round(float(group["dice_adv"].mean()), 4)
        result[key] = cell
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/external-bench"))
    parser.add_argument(
        "--stage", choices=["prepare", "prepare-bundle", "evaluate", "all"], default="all"
    )
    parser.add_argument("--eps", type=float, default=20.0, help="PGD/sea eps in HU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated setting names to run")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("prepare", "all"):
        prepare_nnunet(work)
    if args.stage in ("prepare", "prepare-bundle", "all") and not (work / "bundle").is_dir():
        prepare_bundle(work)
    if args.stage.startswith("prepare"):
        return
    nnunet = work / "results" / DATASET / "nnUNetTrainer_1epoch__nnUNetPlans__2d"
    raw = work / "nnUNet_raw" / DATASET
    pgd = ["--attack", "pgd", "--eps", f"{args.eps:g}", "--steps", str(args.steps)]
    sea = ["--attack", "sea", "--attack-option", "preset=fast", "--eps", f"{args.eps:g}"]
    nn = ["--nnunet", str(nnunet), "--configuration", "2d", "--loss", "ce"]
    settings = {  # the CPU this was measured on is shared: sea on two volumes, without mirroring
        "bundle": ["--bundle", str(work / "bundle"), *pgd, *sea[:-2]],
        "nnunet-f0-nomirror": [*nn, "--folds", "0", "--no-mirroring", *pgd],
        "nnunet-f0": [*nn, "--folds", "0", *pgd],
        "nnunet-folds": [
            *nn,
            "--folds",
            "0",
            "--folds",
            "1",
            "--folds",
            "0,1",
            "--transfer",
            "--no-mirroring",
            *pgd,
        ],
        "nnunet-f0-nomirror-sea": [
            *nn[:-2],
            "--folds",
            "0",
            "--no-mirroring",
            "--max-slices",
            "2",
            *sea,
        ],
    }
    data = {"bundle": work / "bundle-test"}
    only = [s for s in args.only.split(",") if s]
    path = work / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name, options in settings.items():
        if only and name not in only:
            continue
        where = data.get(name, raw)
        results[name] = evaluate([*options, "--data", str(where)], work / "runs" / name)
        results[name]["eps_hu"] = args.eps
        results[name]["pgd_steps"] = args.steps
        print(name, results[name], flush=True)
        path.write_text(json.dumps(results, indent=2))
    print(f"{'setting':20} {'model (source -> target)':52} {'s':>7} {'clean':>7} {'pgd':>7} "
          f"{'sea':>7}")  # fmt: skip
    for name, r in results.items():
        for key, cell in r.items():
            if isinstance(cell, dict):
                sea = next((v for k, v in cell.items() if k.startswith("sea")), float("nan"))
                print(f"{name:20} {key:52} {r['seconds']:7.1f} {cell['clean']:7.4f} "
                      f"{cell.get('pgd', float('nan')):7.4f} {sea:7.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
