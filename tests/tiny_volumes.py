"""A tiny 3D model trained for one epoch on tiny synthetic volumes: the checkpoint the tests of
volume features (evaluation, corruptions, defences, SEA and VAFA) judge."""

from __future__ import annotations

from pathlib import Path

from advseg.data import DataConfig, VolumeConfig, write_synthetic_nifti
from advseg.data.synth_mri import write_synthetic_mri
from advseg.train import TrainConfig, train_on_data

PATCH = (16, 16, 16)


def train_tiny_volume_model(root: Path, kind: str = "ct") -> tuple[DataConfig, Path]:
    """Write 5 synthetic ``kind`` volumes (``ct``: abdominal CT, ``mri``: brain MRI) of 16 x 32 x
    24 under ``root/kind``, train unet3d-tiny on 16^3 patches for one epoch (30% of the cases
    held out for test, 30% for validation) and return the data config and best checkpoint."""
    write = write_synthetic_nifti if kind == "ct" else write_synthetic_mri
    write(root / kind, cases=5, slices=16, size=(32, 24), seed=0)
    config = DataConfig(path=root / kind, cache_dir=root / "cache",
                        volume=VolumeConfig(patch=PATCH, samples=2))  # fmt: skip
    train = TrainConfig(model="unet3d-tiny", epochs=1, batch_size=2, lr=1e-2, device="cpu")
    result = train_on_data(config, train, root / "run", test_fraction=0.3, val_fraction=0.3)
    return config, result.best_path
