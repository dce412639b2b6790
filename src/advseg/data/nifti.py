"""Reader for NIfTI volumes in the nnU-Net / Medical Segmentation Decathlon layout.

Layout::

    imagesTr/NAME.nii.gz (MSD) or imagesTr/NAME_0000.nii.gz (nnU-Net, first channel only)
    labelsTr/NAME.nii.gz          integer label volume, the same shape as its image

Every volume, image and label alike, is first reoriented to the closest canonical (RAS+)
orientation with nibabel's ``as_closest_canonical``, so that an LPS-stored volume gives the same
slices as an RAS one. An image and its label must then share the affine (within
:data:`AFFINE_TOLERANCE`): a pair that does not is refused, naming both files.

Each volume becomes one scan (``case{N}_day0``) whose axial slices (the third canonical axis) are
the rows of the SliceIndex. A slice is the array ``volume[:, :, z]`` transposed, so that its height
is the second (posterior-anterior) axis and its width the first (left-right). Label values are
mapped to class names by a small user mapping (``{1: "liver", 2: "tumour"}``; several values may
map to one class). Values not in the mapping are background; they are counted per value
(:attr:`Exclusions.unmapped`, warned about with an ``AdvsegWarning``), or refused with
``strict=True`` (``--strict-labels``). The case number is the trailing number of the volume's name
when every name has a distinct one, else the volume's position in name order (from 1).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from advseg.config import read_json
from advseg.data.index import Exclusions, make_index, slice_id, voxels
from advseg.data.rle import rle_encode
from advseg.errors import AdvsegWarning, UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm",)
"""A label file with this suffix is a DICOM SEG, and a folder in imagesTr/ a DICOM series."""

#: Largest difference (mm, per affine entry) between an image's and its label's canonical affine.
AFFINE_TOLERANCE = 1e-3


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
        data = read_json(path)
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
        if label in mapping and mapping[label] != name:
            raise UserError(f"{where}: label {label} named twice ({mapping[label]}, {name})")
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
    document = read_json(path)
    labels = document.get("labels") if isinstance(document, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{path}: has no 'labels' object (pass --labels 1=liver,... instead)")
    mapping: dict[int, str] = {}
    spelt: dict[str, str] = {}  # class name -> the name as dataset.json spells it
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
                clean = re.sub(r"\W+", "_", str(name).strip()).strip("_") or f"label{number}"
                first = spelt.setdefault(clean, str(name))
                if first != str(name):  # two classes would silently become one
                    raise UserError(
                        f"{path}: labels {first!r} and {str(name)!r} both become class "
                        f"{clean!r}; rename one of them"
                    )
                mapping[number] = clean
    return parse_label_map(mapping)


def _open(path: str | Path) -> nib.Nifti1Image:
    """A NIfTI file, or a DICOM series folder / SEG file as one (:mod:`advseg.data.dicom`)."""
    if _is_dicom(Path(path)):
        from advseg.data.dicom import as_nifti

        return as_nifti(path)
    image = nib.load(str(path))
    check_volume_header(path, tuple(int(n) for n in image.shape), image.get_data_dtype())
    return image


MAX_LABEL = 2**16 - 1
"""The largest label value: a class number (nnU-Net's and the Decathlon's are below 256); a
negative one or 1e20 is a damaged or misread file, not a class."""

MAX_VOLUME_BYTES = 4 * 2**30
"""The largest volume read (4 GiB decoded, as its header states): a whole-body CT at 0.5 mm is
under 1 GiB; a file claiming more (a gzip bomb, a damaged header) is refused before decoding."""


def check_volume_header(path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse, from the header alone, a volume too large to decode or of a type that holds no
    image (complex numbers): one line naming the file."""
    if np.dtype(dtype).kind == "c":
        raise UserError(f"{path}: voxels are complex numbers ({dtype}); expected real intensities")
    size = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if size > MAX_VOLUME_BYTES:
        raise UserError(
            f"{path}: its header declares {'x'.join(map(str, shape))} voxels of {dtype} "
            f"({size / 2**30:.1f} GiB decoded, more than {MAX_VOLUME_BYTES // 2**30} GiB); "
            "refused before decoding"
        )


def _is_dicom(path: Path) -> bool:
    return path.is_dir() or path.name.lower().endswith(DICOM_SUFFIXES)


def load_canonical(path: str | Path) -> nib.Nifti1Image:
    """A NIfTI image (or DICOM series / SEG) reoriented to the closest canonical orientation
    (RAS+); data not read yet when it is already canonical."""
    try:
        return nib.as_closest_canonical(_open(path))
    except UserError:
        raise
    except Exception as err:  # nibabel raises many types for a broken file
        raise UserError(f"{path}: cannot read NIfTI volume ({type(err).__name__}: {err})") from None


def canonical_geometry(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """The shape and affine ``as_closest_canonical`` gives ``path``, from its header alone."""
    try:
        image = _open(path)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path}: cannot read NIfTI header ({err})") from None
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 3:
        raise UserError(f"{path}: expected a 3D volume, got shape {shape}")
    ornt = nib.orientations.io_orientation(image.affine)
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, shape[:3])
    dummy = np.broadcast_to(np.zeros((), bool), shape[:3])  # no memory: only its shape is used
    return nib.orientations.apply_orientation(dummy, ornt).shape + shape[3:], affine


DECODE_COPIES = 2
"""Copies of a volume held while it is decoded and reoriented (the decoded array and one copy):
what :func:`read_volume` asks of the available memory before it decodes anything."""


def available_memory() -> int | None:
    """Bytes of memory the kernel says a new allocation can take now (``MemAvailable``), or
    None where it does not say (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(path: str | Path, image: nib.Nifti1Image) -> None:
    """Refuse, from the header, a volume whose decoding would not fit the memory available now:
    a gzip bomb under :data:`MAX_VOLUME_BYTES` (a few MB of zeros declaring gigabytes) is one
    line here instead of the kernel's OOM kill or a MemoryError traceback part-way."""
    shape = tuple(int(n) for n in image.shape)
    size = int(np.prod(shape, dtype=np.float64)) * np.dtype(image.get_data_dtype()).itemsize
    free = available_memory()
    if free is not None and size * DECODE_COPIES > free:
        raise UserError(
            f"{path}: decoding it needs about {size * DECODE_COPIES / 2**30:.2f} GiB (its header "
            f"declares {'x'.join(map(str, shape))} voxels of {image.get_data_dtype()}), more "
            f"than the {free / 2**30:.2f} GiB of memory available now; refused before decoding"
        )


def read_volume(path: str | Path, image: nib.Nifti1Image | None = None) -> np.ndarray:
    """A 3D NIfTI volume in canonical orientation as an ``(H, W, Z)`` array (canonical voxel axes
    1, 0, 2), native dtype. ``image``: ``path`` already opened with :func:`load_canonical`.

    Raises:
        UserError: a volume whose decoding would not fit the memory available
            (:func:`check_memory`, from the header), a truncated or damaged file, a MemoryError
            while decoding, NaN or inf voxels: one line naming ``path``.
    """
    image = load_canonical(path) if image is None else image
    check_memory(path, image)
    try:
        data = np.asanyarray(image.dataobj)
    except MemoryError:
        raise UserError(f"{path}: out of memory while decoding the volume") from None
    except Exception as err:  # a truncated file fails when its data is read
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


def _check_label_values(path: Path, label: np.ndarray, chunk: int = 2**24) -> None:
    """Refuse non-integer labels and labels outside 0..:data:`MAX_LABEL`, a few slices at a
    time: the temporaries stay ~``chunk`` voxels, not several copies of the whole volume."""
    per = max(1, chunk // max(1, label.shape[0] * label.shape[1]))
    for z in range(0, label.shape[2], per):
        part = label[:, :, z : z + per]
        if np.issubdtype(part.dtype, np.floating):
            fractional = part != np.round(part)
            if fractional.any():
                count = sum(
                    int(np.count_nonzero(p != np.round(p)))
                    for p in (label[:, :, k : k + per] for k in range(0, label.shape[2], per))
                )
                raise UserError(
                    f"{path}: {count} voxels hold non-integer labels "
                    f"(e.g. {part[fractional].flat[0]:g}); labels must be whole numbers"
                )
    for z in range(0, label.shape[2], per):
        part = label[:, :, z : z + per]
        outside = (part < 0) | (part > MAX_LABEL)  # a class number, not a wrapped integer
        if outside.any():
            count = sum(
                int(np.count_nonzero((p < 0) | (p > MAX_LABEL)))
                for p in (label[:, :, k : k + per] for k in range(0, label.shape[2], per))
            )
            raise UserError(
                f"{path}: {count} voxels hold labels outside 0..{MAX_LABEL} "
                f"(e.g. {part[outside].flat[0]:g}); labels are class numbers"
            )


def label_counts(label: np.ndarray, chunk: int = 2**24) -> dict[int, int]:
    """Voxels per label value of an integer-valued volume (zero counts left out), counted a few
    slices at a time (an int64 copy of the whole volume was 8 bytes a voxel at once)."""
    if label.ndim < 3:
        label = label.reshape(*label.shape, *([1] * (3 - label.ndim)))
    per = max(1, chunk // max(1, label.shape[0] * label.shape[1]))
    found: dict[int, int] = {}
    for z in range(0, label.shape[2], per):
        values = label[:, :, z : z + per].astype(np.int64).ravel()
        if values.size and values.min() >= 0 and values.max() < 1 << 16:
            counts = np.bincount(values)
            pairs = ((int(v), int(counts[v])) for v in np.flatnonzero(counts))
        else:
            unique, counts = np.unique(values, return_counts=True)
            pairs = ((int(v), int(n)) for v, n in zip(unique, counts, strict=True))
        for value, count in pairs:
            found[value] = found.get(value, 0) + count
    return dict(sorted(found.items()))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *DICOM_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _volumes(folder: Path) -> dict[str, Path]:
    """NIfTI files of a folder by stem, skipping hidden files (MSD archives hold ``._*`` ones);
    DICOM series folders and SEG files (``.dcm``) too (:mod:`advseg.data.dicom`)."""
    files = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    return {_stem(p): p for p in files if p.name.endswith(NIFTI_SUFFIXES) or _is_dicom(p)}


def read_nifti(
    root: str | Path, labels: str | Path | Mapping[Any, str], strict: bool = False
) -> tuple[pd.DataFrame, Exclusions]:
    """Index a NIfTI data set: one row per axial slice of every labelled volume.

    Args:
        root: directory holding ``imagesTr/`` and ``labelsTr/``.
        labels: label value -> class name (see :func:`parse_label_map`).
        strict: refuse a label volume holding a value the mapping lacks (else it is background,
            counted in the exclusions and warned about).

    Returns:
        The SliceIndex (masks as RLE) and what was left out (image volumes without labels, label
        values not in the mapping).

    Raises:
        UserError: a missing folder, an unreadable volume, an image and label whose shapes or
            canonical affines differ (naming both files), non-integer labels, labels below 0 or
            above :data:`MAX_LABEL`, or (``strict``) unmapped label values.
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
        raise UserError(
            f"{root / 'imagesTr'}: no .nii.gz volumes or DICOM series folders (empty data set)"
        )
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
        image_shape, image_affine = canonical_geometry(image_path)
        label_shape = canonical_geometry(label_path)[0]
        if label_shape != image_shape:  # from the headers, before the label is decoded
            raise UserError(
                f"{label_path}: shape {label_shape} differs from its "
                f"image {image_path} {image_shape} (both in canonical orientation)"
            )
        label_image = load_canonical(label_path)
        label = read_volume(label_path, label_image)  # (H, W, Z), canonical
        _check_label_values(label_path, label)
        difference = float(np.abs(label_image.affine - image_affine).max())
        if difference > AFFINE_TOLERANCE:
            raise UserError(
                f"{label_path}: its affine differs from its image {image_path}'s by up to "
                f"{difference:.3g} mm (tolerance {AFFINE_TOLERANCE:g}): the label does not lie "
                "on the image's voxels"
            )
        unmapped = {v: n for v, n in label_counts(label).items() if v != 0 and v not in mapping}
        if unmapped and strict:
            raise UserError(
                f"{label_path}: label values not in the label mapping (--strict-labels): "
                + ", ".join(f"{v} ({voxels(n)})" for v, n in unmapped.items())
            )
        for value, count in unmapped.items():
            exclusions.unmapped[value] = exclusions.unmapped.get(value, 0) + count
        if unmapped:
            exclusions.unmapped_volumes.append(name)
        zooms = np.sqrt((image_affine[:3, :3] ** 2).sum(axis=0))  # canonical voxel sizes
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
    if exclusions.unmapped:
        warnings.warn(
            f"{root / 'labelsTr'}: {exclusions.unmapped_line()}", AdvsegWarning, stacklevel=2
        )
    index = make_index(pd.concat(frames, ignore_index=True), classes)
    index.attrs["label_source"] = str(root / "labelsTr")
    index.attrs["case_names"] = dict(zip(cases, names, strict=True))
    return index, exclusions
