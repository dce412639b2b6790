"""The cases an nnU-Net model is judged on: a raw data set read as nnU-Net reads it.

:class:`NnUNetCases` is a :class:`~advseg.evaluate.cells.SliceSource` whose items are whole
volumes in the source's units (HU for CT), in the axis order of nnU-Net's image reader (the one
``plans.json`` names, SimpleITK's ``(z, y, x)`` by default), with their masks, one per class or
region of ``dataset.json``. The evaluation engine attacks each volume through
:class:`~advseg.models.external.nnunet.NnUNet` (one volume per batch: volumes differ in shape),
so eps is in those units. Its index has one row per case (``slice`` -1), and its geometry the
voxel spacing in mm, so HD95 is in mm.
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
from advseg.models.external.nnunet import NnUNetFolder

IMAGE_FOLDERS = (("imagesTs", "labelsTs"), ("imagesTr", "labelsTr"))


class CaseRows(Dataset):
    """``rows`` of a case source (anything with ``read(row) -> (image, mask)``: the nnU-Net and
    bundle cases) as the evaluation engine's dataset of ``{"image", "mask", "row"}`` items."""

    def __init__(self, cases: Any, rows: Sequence[int]) -> None:
        self.cases, self.rows = cases, [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        image, mask = self.cases.read(row)
        return {"image": image, "mask": mask, "row": row}


class NnUNetCases:
    """The labelled cases of ``raw`` (an nnU-Net raw data set: ``imagesTs/`` + ``labelsTs/``,
    else ``imagesTr/`` + ``labelsTr/``) for the model in ``found``.

    Attributes:
        index: one row per case: ``id`` (nnU-Net's case identifier), ``case`` (its position),
            ``scan`` (= id), ``slice`` (-1: a whole volume), ``image_paths``, ``label_path``.
        classes: the model's classes (or regions), in output order.
        geometry: ``mm_d``, ``mm_h``, ``mm_w`` per case: voxel spacing in the reader's order.
        location: the raw folder, absolute.
    """

    def __init__(self, raw: str | Path, found: NnUNetFolder) -> None:
        from nnunetv2.imageio.reader_writer_registry import (
            determine_reader_writer_from_dataset_json,
        )
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        root = Path(raw)
        if not root.is_dir():
            raise UserError(f"--data {root}: no such directory (an nnU-Net raw data set)")
        pair = next(((i, lab) for i, lab in IMAGE_FOLDERS if (root / lab).is_dir()), None)
        if pair is None:
            raise UserError(f"--data {root}: no labelsTs/ or labelsTr/ to score against")
        images, labels = root / pair[0], root / pair[1]
        ending = str(found.dataset_json.get("file_ending", ".nii.gz"))
        channels = found.in_channels
        rows = []
        for label in sorted(labels.glob(f"*{ending}")):
            case = label.name[: -len(ending)]
            paths = [images / f"{case}_{c:04d}{ending}" for c in range(channels)]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise UserError(f"{missing[0]}: missing (the image of label {label.name})")
            rows.append({"id": case, "image_paths": [str(p) for p in paths], "label": str(label)})
        if not rows:
            raise UserError(f"{labels}: no *{ending} label files")
        self.location = str(root.resolve())
        self.found = found
        self.label_manager = PlansManager(found.plans).get_label_manager(found.dataset_json)
        self.classes = list(found.classes)
        reader_class = determine_reader_writer_from_dataset_json(
            found.dataset_json, rows[0]["image_paths"][0]
        )
        self.reader = reader_class()
        self.index = pd.DataFrame(
            {
                "id": [r["id"] for r in rows],
                "case": np.arange(len(rows), dtype=np.int64),
                "scan": [r["id"] for r in rows],
                "slice": np.full(len(rows), -1, dtype=np.int64),
                "image_paths": [r["image_paths"] for r in rows],
                "label_path": [r["label"] for r in rows],
            }
        )
        spacings = [self._spacing(r["image_paths"]) for r in rows]
        self.geometry = pd.DataFrame(spacings, columns=["mm_d", "mm_h", "mm_w"])
        self.models: list = []
        self.data_range = None  # PSNR/SSIM over each volume's own range (HU, not [0, 1])

    def bind(self, model: object) -> None:
        """Let ``model`` (an :class:`~advseg.models.external.nnunet.NnUNet`) take each volume's
        spacing from :meth:`prepare` before it is attacked: nnU-Net's resampling needs it."""
        self.models.append(model)

    def prepare(self, rows: Sequence[int]) -> None:
        """Called by the evaluation engine before each batch: the bound models take the spacing
        of its one volume."""
        if len(rows) != 1:
            raise ValueError(f"nnU-Net volumes are attacked one at a time, got {len(rows)}")
        for model in self.models:
            model.spacing = self.spacing(rows[0])

    def _spacing(self, paths: list[str]) -> list[float]:
        _, properties = self.reader.read_images(paths)
        spacing = [float(s) for s in properties["spacing"]]
        return spacing if len(spacing) == 3 else [1.0, *spacing]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def fingerprint(self) -> str:
        """The cases' files by name, size and modification time, hashed (``data.json``)."""
        digest = hashlib.sha256()
        for entry in self.index.itertuples():
            for path in [*entry.image_paths, entry.label_path]:
                stat = Path(path).stat()
                digest.update(f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"nnunet-raw-{digest.hexdigest()[:16]}"

    def spacing(self, row: int) -> tuple[float, float, float]:
        """The voxel spacing of case ``row`` in the reader's axis order."""
        return tuple(float(v) for v in self.geometry.iloc[int(row)])

    def read(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Case ``row``: the image ``(C, *spatial)`` float32 in the source's units and its masks
        ``(K, *spatial)`` float32 in {0, 1}, one per class (or region)."""
        entry = self.index.iloc[int(row)]
        image, _ = self.reader.read_images(list(entry["image_paths"]))
        label, _ = self.reader.read_seg(entry["label_path"])
        label = np.asarray(label[0])
        if label.shape != image.shape[1:]:
            raise UserError(
                f"{entry['label_path']}: shape {label.shape} differs from its image's "
                f"{image.shape[1:]}"
            )
        masks = []
        for name in self.classes:
            values = self.found.labels[name]
            values = values if isinstance(values, (list, tuple)) else [values]
            masks.append(np.isin(label, np.asarray(values)))
        mask = np.stack(masks).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), torch.from_numpy(
            mask
        )

    def nifti(self, row: int, array: np.ndarray) -> bytes:
        """``array`` (the reader's axis order, one channel or one mask) as the bytes of a
        ``.nii.gz`` file on case ``row``'s own grid (its spacing, origin and direction, as
        SimpleITK read them: data sets read by nnU-Net's SimpleITKIO)."""
        import tempfile

        import SimpleITK as sitk

        _, properties = self.reader.read_images(list(self.index.iloc[int(row)]["image_paths"]))
        geometry = properties.get("sitk_stuff")
        if geometry is None:
            raise UserError(
                f"{self.location}: read by {type(self.reader).__name__}; export writes the "
                "source grid of SimpleITK-read data sets only"
            )
        image = sitk.GetImageFromArray(np.asarray(array))
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "volume.nii.gz"
            sitk.WriteImage(image, str(path), True)
            return path.read_bytes()

    def dataset(self, rows: Sequence[int]) -> Dataset:
        """Whole volumes of ``rows``: ``{"image": (C, Z, Y, X), "mask": (K, Z, Y, X), "row"}``."""
        return CaseRows(self, rows)
