"""A tiny nnU-Net v2 data set and results folder, made here with nnU-Net's own code.

``write_raw`` writes four CT-like cases (HU, a large and a small structure) in nnU-Net's raw
layout. ``tests/data/nnunet_tiny_plans.json`` is what nnU-Net v2's own planner
(``extract_fingerprints`` + ``plan_experiments``, nnunetv2 2.8.1) made of that data set;
``tests/test_external_nnunet.py::test_planner_reproduces_the_committed_plans`` (slow) makes it
again and compares. ``write_results`` builds each fold's network with nnU-Net's trainer
(``nnUNetTrainer.build_network_architecture``, nnU-Net's own initialisation, seeded per fold) and
saves it in the trainer's checkpoint layout, so ``nnUNetPredictor`` reads the folder as its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

PLANS = Path(__file__).parent / "data" / "nnunet_tiny_plans.json"
DATASET = "Dataset901_Tiny"
LABELS = {"background": 0, "ball": 1, "small": 2}
SHAPE = (40, 36, 20)  # nibabel's (x, y, z); SimpleITK reads (z, y, x) = (20, 36, 40)
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def write_raw(root: Path, cases: int = 4) -> Path:
    """``root/DATASET`` in nnU-Net's raw layout; returns it."""
    raw = root / DATASET
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(cases):
        zz, yy, xx = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
        c = rng.uniform(12, 24, 3)
        ball = ((zz - c[0]) ** 2 + (yy - c[1] * 0.8) ** 2 + ((xx - c[2] * 0.5) * 1.5) ** 2) < 60
        small = ((zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 8) ** 2) < 12
        label = np.zeros(SHAPE, np.uint8)
        label[ball] = 1
        label[small] = 2
        image = -100.0 + 80.0 * label.astype(np.float32) + rng.normal(0, 20, SHAPE)
        nib.save(
            nib.Nifti1Image(image.astype(np.float32), AFFINE),
            raw / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz",
        )
        nib.save(nib.Nifti1Image(label, AFFINE), raw / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset))
    return raw


def write_results(
    root: Path,
    configurations: tuple[str, ...] = ("2d", "3d_fullres"),
    folds: tuple[int, ...] = (0, 1),
    raw: Path | None = None,
) -> Path:
    """``root/DATASET/nnUNetTrainer__nnUNetPlans__CFG/{plans.json, dataset.json, fold_F/}``."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw = raw or write_raw(root / "raw")
    plans = json.loads(PLANS.read_text())
    dataset = json.loads((raw / "dataset.json").read_text())
    manager = PlansManager(plans)
    heads = manager.get_label_manager(dataset).num_segmentation_heads
    base = root / "results" / DATASET
    for configuration in configurations:
        folder = base / f"nnUNetTrainer__nnUNetPlans__{configuration}"
        config = manager.get_configuration(configuration)
        axes = (0, 1) if configuration == "2d" else (0, 1, 2)
        for fold in folds:
            torch.manual_seed(100 + fold)
            network = nnUNetTrainer.build_network_architecture(
                manager, config, 1, heads, enable_deep_supervision=True
            )
            (folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
            checkpoint = {
                "network_weights": network.state_dict(),
                "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01}]},
                "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [0.5]},
                "_best_ema": None,
                "current_epoch": 1,
                "init_args": {
                    "plans": plans,
                    "configuration": configuration,
                    "fold": fold,
                    "dataset_json": dataset,
                    "device": torch.device("cpu"),
                },
                "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": axes,
            }
            torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
        (folder / "plans.json").write_text(json.dumps(plans))
        shutil.copy(raw / "dataset.json", folder / "dataset.json")
    return base
