"""The cases a MONAI bundle is judged on: images and labels read by the bundle's own reading
transforms (its ``LoadImaged`` and ``EnsureChannelFirstd``), on their own grid, in the source's
units.

:class:`BundleCases` is a :class:`~advseg.evaluate.cells.SliceSource` of whole images (volumes or
2D images), one per batch. The folder is a Medical Segmentation Decathlon one, as MONAI's bundles
expect: ``imagesTs/`` + ``labelsTs/`` (else ``imagesTr/`` + ``labelsTr/``), an image named as its
label (or nnU-Net's ``CASE_0000`` beside label ``CASE``). Softmax bundles read label value ``i``
as class ``i`` (channel ``i`` of the outputs, 0 the background); sigmoid bundles need labels with
one channel per class. The index has one row per case (``slice`` -1); the geometry is the voxel
spacing from the image's affine, so HD95 is in mm.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from advseg.errors import UserError
from advseg.models.external.bundle import Bundle
from advseg.models.external.nnunet_cases import IMAGE_FOLDERS, CaseRows


def _ending(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


class BundleCases:
    """The labelled cases of ``folder`` for ``bundle``.

    Attributes:
        index: ``id``, ``case``, ``scan`` (= id), ``slice`` (-1), ``image_path``, ``label_path``.
        classes: the bundle's classes in output order.
        geometry: ``mm_d``, ``mm_h``, ``mm_w`` (``mm_h``, ``mm_w`` for 2D) per case.
        location: the folder, absolute.
    """

    def __init__(self, folder: str | Path, bundle: Bundle) -> None:
        root = Path(folder)
        if not root.is_dir():
            raise UserError(f"--data {root}: no such directory (imagesTs/ + labelsTs/)")
        pair = next(((i, lab) for i, lab in IMAGE_FOLDERS if (root / lab).is_dir()), None)
        if pair is None:
            raise UserError(f"--data {root}: no labelsTs/ or labelsTr/ to score against")
        images, labels = root / pair[0], root / pair[1]
        rows = []
        for label in sorted(p for p in labels.iterdir() if p.is_file()):
            ending = _ending(label.name)
            case = label.name[: -len(ending)] if ending else label.name
            options = [images / label.name, images / f"{case}_0000{ending}"]
            image = next((p for p in options if p.is_file()), None)
            if image is None:
                raise UserError(f"{options[0]}: missing (the image of label {label.name})")
            rows.append({"id": case, "image_path": str(image), "label_path": str(label)})
        if not rows:
            raise UserError(f"{labels}: no label files")
        self.bundle = bundle
        self.classes = list(bundle.classes)
        self.location = str(root.resolve())
        self.index = pd.DataFrame(
            {
                "id": [r["id"] for r in rows],
                "case": np.arange(len(rows), dtype=np.int64),
                "scan": [r["id"] for r in rows],
                "slice": np.full(len(rows), -1, dtype=np.int64),
                "image_path": [r["image_path"] for r in rows],
                "label_path": [r["label_path"] for r in rows],
            }
        )
        self.metas: list[dict[str, Any]] = []
        spacings = []
        for row in rows:
            image = self._load(row["image_path"])
            self.metas.append(dict(image.meta))
            spacings.append([float(s) for s in image.pixdim])
        columns = ["mm_d", "mm_h", "mm_w"][-len(spacings[0]) :]
        self.geometry = pd.DataFrame(spacings, columns=columns)
        self.models: list = []
        self.data_range = None  # PSNR/SSIM over each image's own range (source units)

    def _load(self, path: str):
        key = self.bundle.key
        return self.bundle.reading({key: path})[key]

    def bind(self, model: Any) -> None:
        """Let ``model`` (a :class:`~advseg.models.external.bundle.BundleModel`) take each case's
        metadata (its affine) from :meth:`prepare` before it is attacked."""
        self.models.append(model)

    def prepare(self, rows: Sequence[int]) -> None:
        """Called by the evaluation engine before each batch (of one case)."""
        if len(rows) != 1:
            raise ValueError(f"bundle cases are attacked one at a time, got {len(rows)}")
        for model in self.models:
            model.meta = self.metas[int(rows[0])]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def fingerprint(self) -> str:
        """The cases' files by name, size and modification time, hashed (``data.json``)."""
        digest = hashlib.sha256()
        for entry in self.index.itertuples():
            for path in (entry.image_path, entry.label_path):
                stat = Path(path).stat()
                digest.update(f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"bundle-data-{digest.hexdigest()[:16]}"

    def read(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Case ``row``: the image ``(C, *S)`` float32 as the bundle reads it and its masks
        ``(K, *S)`` float32 in {0, 1}."""
        entry = self.index.iloc[int(row)]
        image = self._load(entry["image_path"])
        label = self._load(entry["label_path"])
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise UserError(
                f"{entry['label_path']}: shape {tuple(label.shape[1:])} differs from its "
                f"image's {tuple(image.shape[1:])}"
            )
        label = label.as_tensor()
        k = len(self.classes)
        if self.bundle.activation == "softmax":
            if label.shape[0] != 1:
                raise UserError(f"{entry['label_path']}: a softmax bundle needs one label channel")
            values = torch.round(label[0])
            mask = torch.stack([values == i for i in range(1, k + 1)])
        elif label.shape[0] == k:
            mask = label > 0
        else:
            raise UserError(
                f"{entry['label_path']}: a sigmoid bundle with {k} classes needs {k} label "
                f"channels, got {label.shape[0]}"
            )
        return image.as_tensor().float().contiguous(), mask.float().contiguous()

    def nifti(self, row: int, array: np.ndarray) -> bytes:
        """``array`` (the reader's axis order, one channel or one mask) as the bytes of a
        ``.nii.gz`` file on case ``row``'s own grid (the affine the bundle's reader gave it)."""
        import gzip

        import nibabel as nib

        affine = np.asarray(self.metas[int(row)]["affine"], dtype=np.float64)
        image = nib.Nifti1Image(np.asarray(array), affine)
        image.header.set_xyzt_units("mm")
        return gzip.compress(image.to_bytes(), mtime=0)

    def dataset(self, rows: Sequence[int]) -> Dataset:
        """Whole images of ``rows``: ``{"image": (C, *S), "mask": (K, *S), "row"}``."""
        return CaseRows(self, rows)
