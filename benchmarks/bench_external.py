"""Models advseg did not train, judged end to end from the CLI: an nnU-Net v2 model trained by
nnU-Net's own trainer, and a MONAI bundle.

Stages (each reuses what the earlier ones left in ``--work``):

``prepare``  nnU-Net: 12 CT-like cases (tests/nnunet_results.py's generator: HU, a ball and a small
             structure), 8 in ``imagesTr`` and 4 held out in ``imagesTs``; nnU-Net's own
             ``nnUNetv2_plan_and_preprocess`` (2d), then folds 0 and 1 trained by nnU-Net's own
             ``nnUNetTrainer_1epoch`` (one epoch: 250 iterations, its augmentation, its loss, on
             the CPU). On the shared 2-core machine of this session that epoch had not ended
             after 45 minutes (9 minutes of CPU), so the measurement used ``train-quickly``.
             Bundle: tests/monai_bundle.py's tiny 3D UNet, trained 25 Adam steps on 3 cases,
             judged on 3 held-out cases.
``train-quickly`` folds 0 and 1 (``--train-folds``) by a plain loop over nnU-Net's own network,
             data, split, loss and optimiser (:func:`train_folds_quickly`), judged with
             ``--trainer nnUNetTrainer``.
``evaluate`` ``advseg evaluate`` for each setting (``--threads 1``): the bundle under PGD (``--eps``
             in HU, ``--steps``, its ce and dicece losses) and ``sea`` (``preset=fast``);
             nnU-Net fold 0 under PGD (loss ce) with and without mirroring; folds 0, 1 and
             their ensemble 0,1 (no mirroring) in one run under PGD with ``--transfer`` (each
             model's adversarial volumes scored on the two others); fold 0 (no mirroring) under
             ``sea`` on two of the held-out volumes (``--max-slices 2``: the CPU is shared).
             Wall time per run, clean Dice and Dice under each attack (mean over the held-out
             volumes and classes, from the records), into ``--work/results.json`` and a table
             on stdout.

    python benchmarks/bench_external.py --work /tmp/external-bench --stage prepare
    python benchmarks/bench_external.py --work /tmp/external-bench --stage train-quickly
    python benchmarks/bench_external.py --work /tmp/external-bench --stage evaluate \
        --trainer nnUNetTrainer [--only nnunet-f0,...]
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


def train_folds_quickly(work: Path, steps: int = 150, folds: tuple[int, ...] = (0, 1)) -> Path:
    """Folds 0 and 1 trained by a plain loop (not nnU-Net's trainer: its augmentation made one
    epoch take longer than this session on the shared CPU), with nnU-Net's own pieces: its
    network (``nnUNetTrainer.build_network_architecture`` from the plans), its preprocessed data
    and its 5-fold split (``splits_final.json``), its loss (``DC_and_CE_loss``, Dice without
    background + CE) and optimiser (SGD, Nesterov, momentum 0.99, lr 0.01), on random 2D patches of
    the plans' patch size and batch size, no augmentation, no deep supervision. Saved in the
    trainer's checkpoint layout as ``nnUNetTrainer__nnUNetPlans__2d/fold_F/``."""
    import numpy as np
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.set_num_threads(1)
    pre = work / "nnUNet_preprocessed" / DATASET
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset = json.loads((pre / "dataset.json").read_text())
    manager = PlansManager(plans)
    config = manager.get_configuration("2d")
    heads = manager.get_label_manager(dataset).num_segmentation_heads
    splits = json.loads((pre / "splits_final.json").read_text())
    folder = str(pre / config.data_identifier)
    out = work / "results" / DATASET / "nnUNetTrainer__nnUNetPlans__2d"
    patch, batch = list(config.patch_size), int(config.batch_size)
    for fold in folds:
        cases = splits[fold]["train"]
        loaded = infer_dataset_class(folder)(folder, cases)
        arrays = [loaded.load_case(c)[:2] for c in cases]
        images = [np.asarray(a[0], np.float32) for a in arrays]  # (C, Z, Y, X)
        labels = [np.asarray(a[1][0], np.int64) for a in arrays]  # (Z, Y, X)
        torch.manual_seed(100 + fold)
        rng = np.random.default_rng(fold)
        network = nnUNetTrainer.build_network_architecture(
            manager, config, 1, heads, enable_deep_supervision=False
        )
        loss = DC_and_CE_loss({"batch_dice": config.batch_dice, "smooth": 1e-5, "do_bg": False,
                               "ddp": False}, {}, weight_ce=1, weight_dice=1,
                              dice_class=MemoryEfficientSoftDiceLoss)  # fmt: skip
        optimiser = torch.optim.SGD(network.parameters(), 0.01, momentum=0.99, nesterov=True,
                                    weight_decay=3e-5)  # fmt: skip
        started = time.process_time()
        for step in range(steps):
            xs, ys = [], []
            for _ in range(batch):
                i = int(rng.integers(len(images)))
                z = int(rng.integers(images[i].shape[1]))
                image = np.pad(images[i][:, z], [(0, 0)] + [(0, max(p - s, 0)) for p, s in
                               zip(patch, images[i].shape[2:], strict=True)])  # fmt: skip
                label = np.pad(labels[i][z], [(0, max(p - s, 0)) for p, s in
                               zip(patch, labels[i].shape[1:], strict=True)])  # fmt: skip
                y0 = int(rng.integers(image.shape[1] - patch[0] + 1))
                x0 = int(rng.integers(image.shape[2] - patch[1] + 1))
                xs.append(image[:, y0 : y0 + patch[0], x0 : x0 + patch[1]])
                ys.append(label[None, y0 : y0 + patch[0], x0 : x0 + patch[1]])
            x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
            optimiser.zero_grad()
            value = loss(network(x), y)
            value.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimiser.step()
            if step % 25 == 0:
                print(f"fold {fold} step {step} loss {value.item():.4f}", flush=True)
        print(f"fold {fold}: {steps} steps, {time.process_time() - started:.0f} s CPU", flush=True)
        checkpoint = {
            "network_weights": network.state_dict(),
            "optimizer_state": optimiser.state_dict(),
            "grad_scaler_state": None,
            "logging": {},
            "_best_ema": None,
            "current_epoch": 1,
            "init_args": {"plans": plans, "configuration": "2d", "fold": fold,
                          "dataset_json": dataset, "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1),
        }  # fmt: skip
        (out / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, out / f"fold_{fold}" / "checkpoint_final.pth")
    (out / "plans.json").write_text(json.dumps(plans))
    (out / "dataset.json").write_text(json.dumps(dataset))
    return out


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
        "--stage",
        choices=["prepare", "prepare-bundle", "train-quickly", "evaluate", "all"],
        default="all",
    )
    parser.add_argument("--train-folds", default="0,1", help="train-quickly: the folds")
    parser.add_argument("--trainer", default="nnUNetTrainer_1epoch", help="whose folds to judge")
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
    if args.stage == "train-quickly":
        train_folds_quickly(work, folds=tuple(int(f) for f in args.train_folds.split(",")))
    if args.stage.startswith("prepare") or args.stage == "train-quickly":
        return
    nnunet = work / "results" / DATASET / f"{args.trainer}__nnUNetPlans__2d"
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
    path = work / (f"results-{args.only}.json" if only else "results.json")  # parallel runs
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
