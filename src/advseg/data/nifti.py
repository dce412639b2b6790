"""Reader for NIfTI volumes in the nnU-Net / Medical Segmentation Decathlon layout.

Layout::

    imagesTr/NAME.nii.gz (MSD) or imagesTr/NAME_0000.nii.gz (nnU-Net, first channel only)
    labelsTr/NAME.nii.gz          integer label volume, the same shape as its image

Each volume becomes one scan (``case{N}_day0``) whose axial slices (the third array axis) are the
rows of the SliceIndex. A slice is the array ``volume[:, :, z]`` transposed, so that its height is
the second voxel axis and its width the first. Label values are mapped to class names by a small
user mapping (``{1: "liver", 2: "tumour"}``; several values may map to one class); values not in
the mapping, and 0, are background. The case number is the trailing number of the volume's name
when every name has a distinct one, else the volume's position in name order (from 1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from advseg.data.index import Exclusions, make_index, slice_id
from advseg.data.rle import rle_encode
from advseg.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def parse_label_map(spec: str | Path | Mapping[Any, str]) -> dict[int, str]:
    """A label mapping from a dict, a JSON file, or text like ``1=liver,2=tumour``.

    Returns:
        label value -> class name.
    """
    if isinstance(spec, Mapping):
        items = list(spec.items())
        where = "nifti_labels"
    elif str(spec).endswith(".json") or Path(str(spec)).is_file():
        path = Path(spec)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: cannot read the label mapping ({err})") from None
        if not isinstance(data, dict):
            raise UserError(f'{path}: expected a JSON object like {{"1": "liver"}}')
        items, where = list(data.items()), str(path)
    else:
        items, where = [], "--labels"
        for part in str(spec).split(","):
            value, sep, name = part.partition("=")
            if not sep:
                raise UserError(f"--labels: {part!r} is not VALUE=NAME (e.g. 1=liver,2=tumour)")
            items.append((value.strip(), name.strip()))
    mapping: dict[int, str] = {}
    for value, name in items:
        try:
            label = int(str(value))
        except ValueError:
            raise UserError(f"{where}: label value {value!r} is not an integer") from None
        if label == 0:
            raise UserError(f"{where}: label 0 is the background and cannot name a class")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"{where}: class name {name!r} must be an identifier like small_bowel")
        mapping[label] = name
    if not mapping:
        raise UserError(f"{where}: the label mapping is empty")
    return mapping


def dataset_json_labels(root: str | Path) -> dict[int, str] | None:
    """The label mapping of ``root/dataset.json``, or None when there is no such file.

    Reads both published forms: the Decathlon's ``{"0": "background", "1": "liver"}`` and
    nnU-Net v2's ``{"background": 0, "liver": 1}`` (a region given as a list of values maps each
    value to the region's name). Background (0) is dropped; names are made identifiers
    (``"left kidney"`` -> ``left_kidney``).
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text()).get("labels")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"{path}: cannot read its labels ({err})") from None
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{path}: has no 'labels' object (pass --labels 1=liver,... instead)")
    mapping: dict[int, str] = {}
    for key, value in labels.items():
        decathlon = isinstance(value, str)
        name, values = (value, [key]) if decathlon else (key, value)
        values = values if isinstance(values, list) else [values]
        for v in values:
            try:
                number = int(v)
            except (TypeError, ValueError):
                raise UserError(f"{path}: label {key!r}: {v!r} is not an integer") from None
            if number != 0:
                mapping[number] = (
                    re.sub(r"\W+", "_", str(name).strip()).strip("_") or f"label{number}"
                )
    return parse_label_map(mapping)


def read_volume(path: str | Path) -> np.ndarray:
    """A 3D NIfTI volume as an ``(H, W, Z)`` array (voxel axes 1, 0, 2), native dtype."""
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as err:  # nibabel raises many types for a broken file
        raise UserError(f"{path}: cannot read NIfTI volume ({type(err).__name__}: {err})") from None
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise UserError(
                f"{path}: {bad} of {data.size} voxels are not finite numbers (NaN or inf)"
            )
    return data.transpose(1, 0, 2)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _volumes(folder: Path) -> dict[str, Path]:
    """NIfTI files of a folder by stem, skipping hidden files (MSD archives hold ``._*`` ones)."""
    files = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    return {_stem(p): p for p in files if p.name.endswith(NIFTI_SUFFIXES)}


def read_nifti(
    root: str | Path, labels: str | Path | Mapping[Any, str]
) -> tuple[pd.DataFrame, Exclusions]:
    """Index a NIfTI data set: one row per axial slice of every labelled volume.

    Args:
        root: directory holding ``imagesTr/`` and ``labelsTr/``.
        labels: label value -> class name (see :func:`parse_label_map`).

    Returns:
        The SliceIndex (masks as RLE) and what was left out (image volumes without labels).
    """
    root = Path(root)
    mapping = parse_label_map(labels)
    classes = list(dict.fromkeys(mapping[v] for v in sorted(mapping)))
    for folder in ("imagesTr", "labelsTr"):
        if not (root / folder).is_dir():
            raise UserError(f"{root / folder}: not found (the NIfTI layout needs {folder}/)")
    images = {
        re.sub(r"_0000$", "", stem): path
        for stem, path in _volumes(root / "imagesTr").items()
        if not re.search(r"_000[1-9]$", stem)
    }
    label_files = _volumes(root / "labelsTr")
    if not images:
        raise UserError(f"{root / 'imagesTr'}: no .nii.gz volumes (empty data set)")
    names = [n for n in images if n in label_files]
    exclusions = Exclusions(unlabelled=len(images) - len(names))
    if not names:
        raise UserError(f"{root / 'labelsTr'}: no label volume matches an image in imagesTr/")
    numbers = [re.search(r"(\d+)$", n) for n in names]
    if all(numbers) and len({int(m.group(1)) for m in numbers}) == len(names):
        cases = [int(m.group(1)) for m in numbers]
    else:
        cases = list(range(1, len(names) + 1))

    frames = []
    for name, case in zip(names, cases, strict=True):
        image_path, label_path = images[name], label_files[name]
        try:
            image = nib.load(str(image_path))
        except Exception as err:
            raise UserError(f"{image_path}: cannot read NIfTI header ({err})") from None
        label = read_volume(label_path)  # (H, W, Z)
        if np.issubdtype(label.dtype, np.floating):
            fractional = label != np.round(label)
            if fractional.any():
                raise UserError(
                    f"{label_path}: {int(fractional.sum())} voxels hold non-integer labels "
                    f"(e.g. {label[fractional].flat[0]:g}); labels must be whole numbers"
                )
        shape = image.shape[1], image.shape[0], *image.shape[2:]
        if label.shape != shape:
            raise UserError(
                f"{label_path}: shape {label.shape[1::-1] + label.shape[2:]} differs from its "
                f"image {image_path} {tuple(image.shape)}"
            )
        zooms = image.header.get_zooms()
        h, w, depth = label.shape
        rows = {
            "id": [slice_id(case, 0, z + 1) for z in range(depth)],
            "case": case,
            "day": 0,
            "scan": f"case{case}_day0",
            "slice": np.arange(1, depth + 1),
            "image_path": str(image_path),
            "image_z": np.arange(depth),
            "width": w,
            "height": h,
            "spacing_w": float(zooms[0]),
            "spacing_h": float(zooms[1]),
        }
        for cls in classes:
            values = [v for v, c in mapping.items() if c == cls]
            mask = np.isin(label, values)  # (H, W, Z)
            rows[cls] = [rle_encode(mask[:, :, z]) for z in range(depth)]
        frames.append(pd.DataFrame(rows))
    index = make_index(pd.concat(frames, ignore_index=True), classes)
    index.attrs["label_source"] = str(root / "labelsTr")
    index.attrs["case_names"] = dict(zip(cases, names, strict=True))
    return index, exclusions
