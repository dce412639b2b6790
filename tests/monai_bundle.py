"""A small MONAI bundle and its data, made here: a tiny 3D ``monai.networks.nets.UNet`` trained a
few steps, in the layout of MONAI's model zoo (``configs/inference.json`` modelled on
``spleen_ct_segmentation``'s: Orientation to RAS, Spacing, ScaleIntensityRange, a Gaussian
SlidingWindowInferer, Activations -> Invertd -> AsDiscrete -> SaveImage), so that
``monai.bundle.run`` runs it as MONAI runs any bundle.

The data are CT-like volumes in HU, with a non-RAS affine and anisotropic voxels (so the bundle's
orientation and resampling both act), two classes: a bright ball (1) and a dark box (2).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

SHAPE = (24, 20, 12)
AFFINE = np.array([[-0.9, 0, 0, 10], [0, -1.1, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
CLASSES = ["ball", "box"]
NETWORK = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 1,
}


def inference_config(roi: list[int], overlap: float = 0.5) -> dict:
    """``configs/inference.json``: what ``monai.bundle.run`` reads (``dataset_dir`` and
    ``output_dir`` are overridden when it runs)."""
    image = {"keys": "image"}
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/nonexistent",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cpu')",
        "network_def": NETWORK,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", **image},
                {"_target_": "EnsureChannelFirstd", **image},
                {"_target_": "Orientationd", **image, "axcodes": "RAS"},
                {"_target_": "Spacingd", **image, "pixdim": [1.2, 1.2, 2.0], "mode": "bilinear"},
                {
                    "_target_": "ScaleIntensityRanged",
                    **image,
                    "a_min": -100,
                    "a_max": 200,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", **image},
            ],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": roi,
            "sw_batch_size": 2,
            "overlap": overlap,
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "separate_folder": False,
                    "resample": False,
                    "output_dtype": "$np.uint8",
                    "print_log": False,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
                "map_location": "cpu",
            }
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": [],
        "run": ["$@evaluator.run()"],
    }


METADATA = {
    "version": "0.1.0",
    "monai_version": "1.6.1",
    "name": "advseg tiny CT bundle",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "hounsfield", "num_channels": 1}},
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 3,
                "channel_def": {"0": "background", "1": CLASSES[0], "2": CLASSES[1]},
            }
        },
    },
}


def volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One case: an image in HU ``SHAPE`` and its label (0 background, 1 ball, 2 box)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    centre = np.array([rng.uniform(6, 10), rng.uniform(6, 14), rng.uniform(4, 8)])
    ball = (grid - centre[:, None, None, None]) ** 2 * np.array([1, 1, 4])[:, None, None, None]
    ball = ball.sum(0) < rng.uniform(12, 20)
    box = np.zeros(SHAPE, bool)
    x0 = int(rng.integers(13, 17))
    box[x0 : x0 + 6, 4:12, 3:9] = True
    label = np.where(ball, 1, np.where(box & ~ball, 2, 0)).astype(np.uint8)
    image = rng.normal(20, 15, SHAPE) + 150 * (label == 1) - 90 * (label == 2)
    return image.astype(np.float32), label


def write_data(root: Path, cases: int = 3, folder: str = "Ts") -> Path:
    """A Decathlon-style folder ``images{folder}/`` + ``labels{folder}/`` of ``cases`` cases."""
    for c in range(cases):
        image, label = volume(c)
        for kind, array in (("images", image), ("labels", label)):
            (root / f"{kind}{folder}").mkdir(parents=True, exist_ok=True)
            nib.save(
                nib.Nifti1Image(array, AFFINE), root / f"{kind}{folder}" / f"ct_{c:02d}.nii.gz"
            )
    return root


def train_network(data: Path, steps: int = 25, seed: int = 0) -> torch.nn.Module:
    """The bundle's UNet, trained ``steps`` Adam steps on the cases' intensity-scaled volumes."""
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in NETWORK.items() if k != "_target_"}
    network = UNet(**kwargs)
    images, labels = [], []
    for path in sorted((data / "imagesTs").glob("*.nii.gz")):
        image = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(data / "labelsTs" / path.name).dataobj).astype(np.int64)
        images.append(np.clip((image + 100) / 300, 0, 1)[None])
        labels.append(label)
    x, y = torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))
    optimiser = torch.optim.Adam(network.parameters(), lr=0.02)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(network(x), y)
        loss.backward()
        optimiser.step()
    return network.eval()


def write_bundle(
    root: Path, data: Path, roi: tuple[int, ...] = (16, 16, 8), steps: int = 25
) -> Path:
    """The bundle folder ``root``: configs/inference.json, configs/metadata.json and
    models/model.pt (a plain state dict, as the model zoo's)."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    config = inference_config(list(roi))
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=2))
    network = train_network(data, steps)
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root
