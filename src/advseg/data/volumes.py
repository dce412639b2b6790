"""Volumes as data: one row per scan, normalised by modality, cached, memory-mapped on read.

:func:`load_volumes` reads the sources the slices read (:func:`advseg.data.load.build_index`:
NIfTI / DICOM in the Decathlon or nnU-Net layout, the Kaggle UW-Madison layout) and stacks each
scan's slices into one volume ``(D, H, W)``, axial slices first:

- NIfTI: the canonical (RAS+) volume the slices are cut from, its voxel sizes kept;
- UW-Madison: the PNG slices in slice-number order, their pixel spacing in plane and the data
  set's slice thickness (:data:`~advseg.data.volume_prep.UWMGI_SLICE_THICKNESS`, 3 mm) across.

Then (``DataConfig.volume``, :class:`~advseg.data.volume_prep.VolumeConfig`) intensities are
normalised by modality, optionally resampled to one spacing, and written once to a cache entry
beside the slices' (``<cache root>/<key>/``: ``volumes.json``, ``image-NNNN.npy`` ``(D, H, W)``
float32, ``mask-NNNN.npy`` ``(K, D, H, W)`` uint8), keyed by the data's content (the slices'
key: ids, masks, the image files' digests) and the volume settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from advseg.config import to_dict
from advseg.data.cache import key_and_digests
from advseg.data.content import keep_digests
from advseg.data.index import Exclusions, index_classes
from advseg.data.load import DataConfig, build_index, resolve_path
from advseg.data.location import cache_root, location
from advseg.data.nifti import canonical_geometry, read_volume
from advseg.data.patches import PatchDataset, VolumeDataset
from advseg.data.preprocess import PreprocessConfig
from advseg.data.rle import rle_decode
from advseg.data.uwmgi import read_png
from advseg.data.volume_prep import (
    UWMGI_SLICE_THICKNESS,
    VolumeConfig,
    ct_normalisation,
    foreground_sample,
    mri_normalisation,
    resample,
    resampled_shape,
)
from advseg.errors import UserError

#: Bump when the cached volumes' meaning changes (2: CT inputs clipped to their float32 range;
#: 3: MRI volumes have a finite valid range, the z-scored volumes' lowest and highest value).
VOLUME_CACHE_VERSION = 3

#: The columns of a volume index, one row per scan (then nothing: masks live in the arrays).
VOLUME_COLUMNS = (
    "id", "scan", "case", "day", "image_path", "slices", "depth", "height", "width",
    "spacing_d", "spacing_h", "spacing_w", "source_depth", "source_height", "source_width",
    "source_spacing_d", "source_spacing_h", "source_spacing_w", "mean", "std",
)  # fmt: skip


@dataclass
class VolumeData:
    """A loaded volumetric data set: row i of :attr:`index` is volume i.

    Attributes:
        index: one row per scan (:data:`VOLUME_COLUMNS`, ``slice`` -1: a whole volume, as
            records name it, and ``ras`` 1 where the volume is in canonical RAS+ orientation,
            NIfTI / DICOM, 0 for stacked PNG slices): ``id`` = ``scan``, the array's
            ``depth, height, width`` and voxel size ``spacing_d, spacing_h, spacing_w`` (mm),
            the source's shape and spacing before resampling, and ``mean``, ``std`` of the
            z-score (a model-input difference ``d`` is ``d * std`` in the source's units).
        classes: class names, the order of the mask channels.
        images: per volume ``(D, H, W)`` float32, memory-mapped.
        masks: per volume ``(K, D, H, W)`` uint8 in {0, 1}, memory-mapped.
        normalisation: how intensities were normalised (``kind``: ``ct`` or ``mri``; ``mean``,
            ``std``, ``low``, ``high`` for CT).
        valid_range: the model inputs' range, which attacks take as ``valid_range`` and PSNR /
            SSIM as their data range (CT: the clip z-scored; MRI: the lowest and the highest
            value of all the z-scored volumes, so that one range holds every volume as it is
            and eps, SSIM and VAFA's quantisation steps have one unit for the data set).
        config: the volume settings.
        exclusions, cache_path, decoded, location: as :class:`advseg.data.SliceData`'s
            (``decoded``: volumes decoded by this load).
    """

    index: pd.DataFrame
    classes: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    normalisation: dict[str, Any]
    valid_range: tuple[float, float] | None
    config: VolumeConfig
    exclusions: Exclusions
    cache_path: Path
    decoded: int
    location: str = ""

    def __len__(self) -> int:
        return len(self.index)

    @property
    def geometry(self) -> pd.DataFrame:
        """``mm_d``, ``mm_h``, ``mm_w`` per row: the voxel size, for HD95 and the surface Dice in
        mm (what the evaluation reads of a source, :func:`advseg.runs.record_rows.pixel_mm`)."""
        columns = {"mm_d": "spacing_d", "mm_h": "spacing_h", "mm_w": "spacing_w"}
        return pd.DataFrame({k: self.index[v].to_numpy(float) for k, v in columns.items()})

    @property
    def data_range(self) -> float | None:
        """The inputs' range for PSNR and SSIM: the valid range's width (None: each volume's own
        max - min, for caches without a valid range)."""
        return None if self.valid_range is None else self.valid_range[1] - self.valid_range[0]

    def volume(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Volume ``row`` as model input ``(1, D, H, W)`` float32 and masks ``(K, D, H, W)``
        float32."""
        image = torch.from_numpy(np.array(self.images[row], dtype=np.float32))[None]
        return image, torch.from_numpy(self.masks[row].astype(np.float32))

    def spacing(self, row: int) -> tuple[float, float, float]:
        """Voxel size ``(D, H, W)`` in mm of volume ``row``'s array."""
        r = self.index.iloc[row]
        return float(r["spacing_d"]), float(r["spacing_h"]), float(r["spacing_w"])

    def dataset(self, rows: np.ndarray | list[int] | None = None) -> VolumeDataset:
        """Whole volumes of ``rows`` (all when None) as a torch Dataset
        (:class:`advseg.data.patches.VolumeDataset`: batch size 1, volumes differ in size)."""
        return VolumeDataset(self, np.arange(len(self)) if rows is None else rows)

    def patches(
        self, rows: np.ndarray | list[int], patch: tuple[int, int, int], flip: bool = False
    ) -> PatchDataset:
        """Training patches of ``rows``' volumes (:class:`advseg.data.patches.PatchDataset`,
        ``config.samples`` per volume, ``config.foreground`` of them on foreground, mirrored at
        random with ``flip``)."""
        return PatchDataset(
            self, rows, patch, self.config.samples, self.config.foreground, flip=flip
        )


def modality_of(root: Path, source: str, config: VolumeConfig) -> str:
    """``ct`` or ``mri``: the config's choice, else ``dataset.json``'s first channel (CT or not;
    ``modality`` in the Decathlon's form, ``channel_names`` in nnU-Net v2's)."""
    if config.modality != "auto":
        return config.modality
    if source == "uwmgi":
        return "mri"
    try:
        document = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return "mri"
    names = document.get("channel_names") or document.get("modality") or {}
    first = next(iter(names.values()), "") if isinstance(names, dict) else ""
    return "ct" if str(first).strip().upper() == "CT" else "mri"


def read_scan(rows: pd.DataFrame, classes: list[str], where: str) -> tuple[np.ndarray, ...]:
    """One scan's raw volume from its slice rows (sorted by slice number).

    Returns:
        ``(image (D, H, W) float32 in source units, masks (K, D, H, W) uint8, spacing (3,))``.
    """
    rows = rows.sort_values("slice", kind="stable")
    scan = str(rows["scan"].iat[0])
    shapes = set(zip(rows["height"], rows["width"], strict=True))
    if len(shapes) > 1:
        raise UserError(f"{where}: scan {scan} has slices of several sizes {sorted(shapes)}")
    h, w = shapes.pop()
    path = str(rows["image_path"].iat[0])
    if int(rows["image_z"].iat[0]) >= 0:  # NIfTI / DICOM: the canonical volume, axial first
        volume = read_volume(path)  # (H, W, Z)
        image = np.moveaxis(volume, 2, 0)[rows["image_z"].to_numpy()]
        affine = canonical_geometry(path)[1]
        thickness = float(np.sqrt((affine[:3, 2] ** 2).sum()))
    else:  # PNG slices stacked by slice number
        image = np.stack([read_png(p, w, h) for p in rows["image_path"]])
        thickness = UWMGI_SLICE_THICKNESS
    masks = np.zeros((len(classes), len(rows), h, w), np.uint8)
    for k, cls in enumerate(classes):
        for z, (rle, sid) in enumerate(zip(rows[cls], rows["id"], strict=True)):
            masks[k, z] = rle_decode(rle, h, w, where=f"{where}: {sid}, {cls}")
    spacing = np.array([thickness, rows["spacing_h"].iat[0], rows["spacing_w"].iat[0]], float)
    return image.astype(np.float32), masks, spacing


def load_volumes(config: DataConfig, progress: Callable[[int], None] | None = None) -> VolumeData:
    """Index, stack, normalise, resample (once, cached) and memory-map a data set's volumes.

    Args:
        config: the data config; ``config.volume`` says how volumes are prepared.
        progress: called with the number of volumes prepared so far while the cache fills.
    """
    slices, exclusions = build_index(config)
    root = resolve_path(config)
    source = "uwmgi" if (root / "train.csv").exists() else "nifti"
    volume = config.volume
    modality = modality_of(root, source, volume)
    slice_key, digests = key_and_digests(slices, PreprocessConfig(), cache_root(config.cache_dir))
    settings = {"version": VOLUME_CACHE_VERSION, "slices": slice_key, "modality": modality}
    settings["spacing"] = None if volume.spacing is None else list(volume.spacing)
    key = "vol-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    entry = cache_root(config.cache_dir) / key
    decoded = 0
    if not (entry / "volumes.json").is_file():
        decoded = _build(entry, slices, modality, volume, str(root), progress)
    keep_digests(entry, digests)  # the files' stat keys now: not read again next time
    meta = json.loads((entry / "volumes.json").read_text())
    index = pd.DataFrame(meta["rows"], columns=list(VOLUME_COLUMNS))
    index = index.assign(slice=-1, ras=np.uint8(source == "nifti"))  # NIfTI / DICOM: RAS+
    n = len(index)
    images = [np.load(entry / f"image-{i:04d}.npy", mmap_mode="r") for i in range(n)]
    masks = [np.load(entry / f"mask-{i:04d}.npy", mmap_mode="r") for i in range(n)]
    valid = meta["valid_range"]
    return VolumeData(
        index=index,
        classes=list(meta["classes"]),
        images=images,
        masks=masks,
        normalisation=meta["normalisation"],
        valid_range=None if valid is None else (float(valid[0]), float(valid[1])),
        config=volume,
        exclusions=exclusions,
        cache_path=entry,
        decoded=decoded,
        location=location(config.path),
    )


def _build(
    entry: Path,
    slices: pd.DataFrame,
    modality: str,
    volume: VolumeConfig,
    where: str,
    progress: Callable[[int], None] | None,
) -> int:
    """Write the cache entry: raw volumes first (for the CT statistics), then normalised."""
    classes = index_classes(slices)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.{os.getpid()}.",
                                suffix=".tmp"))  # fmt: skip
    try:
        rows, samples = [], []
        lowest, highest = np.inf, -np.inf  # MRI: the z-scored volumes' extremes
        scans = list(dict.fromkeys(slices["scan"]))
        for i, scan in enumerate(scans):
            part = slices[slices["scan"] == scan]
            image, masks, spacing = read_scan(part, classes, where)
            np.save(tmp / f"raw-{i:04d}.npy", image)
            np.save(tmp / f"mask-{i:04d}.npy", masks)
            if modality == "ct":
                samples.append(foreground_sample(image, masks.any(axis=0), seed=i))
            first = part.iloc[0]
            rows.append({
                "id": scan, "scan": scan, "case": int(first["case"]), "day": int(first["day"]),
                "image_path": str(first["image_path"]), "slices": len(part),
                "source_depth": image.shape[0], "source_height": image.shape[1],
                "source_width": image.shape[2], "source_spacing_d": spacing[0],
                "source_spacing_h": spacing[1], "source_spacing_w": spacing[2],
            })  # fmt: skip
        shared = ct_normalisation(samples, where) if modality == "ct" else None
        for i, row in enumerate(rows):
            image = np.load(tmp / f"raw-{i:04d}.npy")
            masks = np.load(tmp / f"mask-{i:04d}.npy")
            norm = shared or mri_normalisation(image)
            image = norm.apply(image)
            source = (row["source_depth"], row["source_height"], row["source_width"])
            spacing = (row["source_spacing_d"], row["source_spacing_h"], row["source_spacing_w"])
            shape = source
            if volume.spacing is not None:
                shape = resampled_shape(source, spacing, volume.spacing)
            image, masks = resample(image, masks, shape)
            if norm.valid_range is not None:  # a float32 blend may round one ulp outside
                image = np.clip(image, *norm.valid_range)
            lowest, highest = min(lowest, float(image.min())), max(highest, float(image.max()))
            np.save(tmp / f"image-{i:04d}.npy", image)
            np.save(tmp / f"mask-{i:04d}.npy", masks)
            (tmp / f"raw-{i:04d}.npy").unlink()
            row.update(depth=shape[0], height=shape[1], width=shape[2], mean=norm.mean,
                       std=norm.std)  # fmt: skip
            for axis, n_src, n_new, mm in zip("dhw", source, shape, spacing, strict=True):
                row[f"spacing_{axis}"] = float(mm) * n_src / n_new  # exact after rounding
            if progress is not None:
                progress(i + 1)
        normalisation = asdict(shared) if shared else {"kind": "mri"}
        valid = list(shared.valid_range or ()) if shared else [lowest, highest]
        if not shared and not lowest < highest:  # constant volumes: a range of 1 around them
            valid = [lowest - 0.5, lowest + 0.5] if np.isfinite(lowest) else None
        meta = {
            "version": VOLUME_CACHE_VERSION, "classes": classes, "rows": rows,
            "normalisation": normalisation, "config": to_dict(volume), "valid_range": valid,
        }  # fmt: skip
        (tmp / "volumes.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "volumes.json").is_file():  # pragma: no cover - not a concurrent build
                raise
        return len(rows)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def volume_note(data: VolumeData) -> dict[str, Any]:
    """What a 3D checkpoint stores of its volumes' preparation (``meta.data.volumes``): the
    normalisation, the valid range, the settings and each volume's spacing by scan."""
    return {
        "normalisation": data.normalisation,
        "valid_range": None if data.valid_range is None else list(data.valid_range),
        "config": to_dict(data.config),
        "spacing": {
            str(r.scan): [r.spacing_d, r.spacing_h, r.spacing_w] for r in data.index.itertuples()
        },
    }
