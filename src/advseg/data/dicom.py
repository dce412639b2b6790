"""DICOM in and out: a series with DICOM SEG labels read like a NIfTI volume, and a volume
written back as a series with its source's header and pixel type.

Layout (the NIfTI layout, :mod:`advseg.data.nifti`, with DICOM in place of NIfTI files)::

    imagesTr/NAME/        one DICOM series: one single-frame image file per slice
    labelsTr/NAME.dcm     its DICOM SEG (binary or fractional), referencing those images

:func:`as_nifti` turns a series, or a SEG on its series' grid, into a ``nibabel.Nifti1Image``
(the modality's values, ``stored * RescaleSlope + RescaleIntercept``, and the RAS affine from the
DICOM geometry), so the NIfTI reader's canonical orientation, affine checks, slices and label
masks apply unchanged: a DICOM data set is indexed, cached, trained on, attacked and reported
exactly as a NIfTI one. The SEG's segment numbers are its label values; without a
``dataset.json`` or ``--labels`` the class names are the SEG's segment labels
(:func:`seg_labels`). :func:`write_series_like` writes a volume on a source series' grid as a new
series: every header element of the source kept (patient, study, geometry, pixel module), new
series and instance UIDs, the pixel values converted back to the source's stored dtype.

pydicom reads and writes the files and highdicom reads the SEG (the optional ``dicom`` extra:
``pip install advseg[dicom]``); both are imported only when DICOM is met.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advseg.errors import UserError

SEG_SUFFIX = ".dcm"
"""A label file in ``labelsTr/`` that is a DICOM SEG."""


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise UserError(
            "DICOM data needs pydicom and highdicom: pip install 'advseg[dicom]'"
        ) from None
    return pydicom


def _highdicom() -> Any:
    _pydicom()
    try:
        import highdicom
    except ImportError:
        raise UserError("DICOM SEG labels need highdicom: pip install 'advseg[dicom]'") from None
    return highdicom


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM series folder or a DICOM SEG file (by the layout's rule)."""
    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(SEG_SUFFIX)


def read_series(folder: str | Path) -> list[Any]:
    """The image datasets of a series folder, sorted along the slice normal (pixels not yet
    decoded).

    Raises:
        UserError: an empty folder, a file that is not DICOM, several series, or slices that do
            not share an orientation.
    """
    pydicom = _pydicom()
    folder = Path(folder)
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise UserError(f"{folder}: no DICOM files (an empty series)")
    datasets = []
    for file in files:
        try:
            datasets.append(pydicom.dcmread(file))
        except Exception as err:  # pydicom raises several types for a file that is not DICOM
            raise UserError(f"{file}: not a readable DICOM file ({type(err).__name__})") from None
    series = {str(d.get("SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise UserError(f"{folder}: holds {len(series)} series; put one series per folder")
    for d in datasets:
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if key not in d:
                raise UserError(f"{d.filename}: no {key} (a series needs its geometry)")
    orientation = np.asarray(datasets[0].ImageOrientationPatient, float)
    for d in datasets[1:]:
        if not np.allclose(np.asarray(d.ImageOrientationPatient, float), orientation, atol=1e-4):
            raise UserError(f"{d.filename}: its orientation differs from {datasets[0].filename}")
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(datasets, key=lambda d: float(np.dot(normal, d.ImagePositionPatient)))


def series_affine(datasets: Sequence[Any]) -> np.ndarray:
    """The RAS affine (4, 4) of voxel ``(column, row, slice)`` of a sorted series.

    DICOM positions are LPS: ``P = IPP_0 + i * dc * row_cosine + j * dr * column_cosine + k * s``
    (``PixelSpacing`` = (dr, dc), ``s`` the step between slice positions); RAS flips x and y.
    """
    first = datasets[0]
    orientation = np.asarray(first.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, float)
    if len(datasets) > 1:
        step = (np.asarray(datasets[-1].ImagePositionPatient, float) - origin) / (len(datasets) - 1)
    else:
        thickness = float(first.get("SliceThickness", 1.0) or 1.0)
        step = np.cross(orientation[:3], orientation[3:]) * thickness
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * dc
    affine[:3, 1] = orientation[3:] * dr
    affine[:3, 2] = step
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS


def _rescale(dataset: Any) -> tuple[float, float]:
    return float(dataset.get("RescaleSlope", 1) or 1), float(dataset.get("RescaleIntercept", 0))


def series_volume(datasets: Sequence[Any]) -> np.ndarray:
    """The series' modality values as a ``(columns, rows, slices)`` array (float32 when a
    rescale applies, else the stored dtype)."""
    planes = []
    for d in datasets:
        slope, intercept = _rescale(d)
        pixels = d.pixel_array  # (rows, columns), stored values
        planes.append(pixels if (slope, intercept) == (1.0, 0.0) else pixels * slope + intercept)
    dtype = np.result_type(*[p.dtype for p in planes])
    volume = np.stack(planes, axis=-1).astype(
        np.float32 if np.issubdtype(dtype, np.floating) else dtype
    )
    return volume.transpose(1, 0, 2)  # (columns, rows, slices): voxel (i, j, k) of the affine


def _series_folder(seg_path: Path) -> Path:
    """``labelsTr/NAME.dcm`` -> ``imagesTr/NAME``: the series the SEG segments."""
    folder = seg_path.parent.parent / "imagesTr" / seg_path.name[: -len(SEG_SUFFIX)]
    if not folder.is_dir():
        raise UserError(f"{seg_path}: no series folder {folder} for this DICOM SEG")
    return folder


def seg_volume(seg_path: str | Path, datasets: Sequence[Any]) -> np.ndarray:
    """A SEG's labels on its series' grid, ``(columns, rows, slices)`` uint16: each voxel the
    number of its segment (0: none), taken per source image by its SOP instance UID.

    Raises:
        UserError: not a readable SEG, one that references none of the series' images, or
            overlapping segments (one label per voxel is needed).
    """
    highdicom = _highdicom()
    seg_path = Path(seg_path)
    try:
        seg = highdicom.seg.segread(seg_path)
    except Exception as err:
        raise UserError(f"{seg_path}: not a readable DICOM SEG ({type(err).__name__})") from None
    uids = [str(d.SOPInstanceUID) for d in datasets]
    referenced = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    if not referenced & set(uids):
        raise UserError(f"{seg_path}: references none of the images of {_series_folder(seg_path)}")
    try:
        label = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            combine_segments=True,
            assert_missing_frames_are_empty=True,  # an image without a frame: no segment
            dtype=np.uint16,
        )  # (slices, rows, columns) of segment numbers; overlaps are refused by highdicom
    except Exception as err:
        raise UserError(f"{seg_path}: cannot read its segments ({err})") from None
    return np.asarray(label).transpose(2, 1, 0)  # (columns, rows, slices)


def seg_labels(seg_path: str | Path) -> dict[int, str]:
    """Segment number -> segment label of a SEG (made identifiers: ``left kidney`` ->
    ``left_kidney``), the class names of a DICOM data set without another label mapping."""
    import re

    highdicom = _highdicom()
    try:
        seg = highdicom.seg.segread(Path(seg_path))
    except Exception as err:
        raise UserError(f"{seg_path}: not a readable DICOM SEG ({type(err).__name__})") from None
    return {
        int(item.SegmentNumber): re.sub(r"\W+", "_", str(item.SegmentLabel).strip()).strip("_")
        or f"segment{int(item.SegmentNumber)}"
        for item in seg.SegmentSequence
    }


def layout_labels(root: str | Path) -> dict[int, str] | None:
    """The class names of a DICOM data set from its first SEG (``labelsTr/*.dcm``), or None
    when ``labelsTr/`` holds no SEG."""
    folder = Path(root) / "labelsTr"
    segs = sorted(folder.glob(f"*{SEG_SUFFIX}")) if folder.is_dir() else []
    return seg_labels(segs[0]) if segs else None


def as_nifti(path: str | Path) -> Any:
    """A series folder or a SEG file as a ``nibabel.Nifti1Image`` (values and RAS affine)."""
    import nibabel as nib

    path = Path(path)
    if path.is_dir():
        datasets = read_series(path)
        return nib.Nifti1Image(series_volume(datasets), series_affine(datasets))
    datasets = read_series(_series_folder(path))
    return nib.Nifti1Image(seg_volume(path, datasets), series_affine(datasets))


def from_canonical(volume: np.ndarray, source: str | Path) -> np.ndarray:
    """A volume in the canonical (RAS+) voxel order that :mod:`advseg.data.nifti` reads
    ``source`` in (``(x, y, z)``, as ``as_closest_canonical`` gives it) back in the series' own
    ``(columns, rows, slices)`` order, for :func:`write_series_like`."""
    import nibabel as nib

    datasets = read_series(source)
    own = nib.orientations.io_orientation(series_affine(datasets))
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), own)
    return nib.orientations.apply_orientation(volume, back)


def write_series_like(
    source: str | Path, volume: np.ndarray, out: str | Path, description: str = "adversarial"
) -> list[Path]:
    """Write ``volume`` (modality values on the grid of the series in ``source``, as
    :func:`series_volume` gives it: ``(columns, rows, slices)``) as a new series in ``out``.

    Every element of each source file is kept, except: the pixel data (the values converted
    back to the source's stored values, ``(v - intercept) / slope`` rounded and clipped to the
    stored dtype's range, in that dtype), new SeriesInstanceUID and SOPInstanceUIDs (a derived
    series must not pose as the original), ``SeriesDescription`` with `` (<description>)``
    appended, and ``ImageType`` marked ``DERIVED``.

    Returns:
        The files written, one per slice, in slice order.

    Raises:
        UserError: ``volume`` is not on the source's grid.
    """
    pydicom = _pydicom()
    from pydicom.uid import generate_uid

    from advseg.atomic import atomic_path

    datasets = read_series(source)
    expected = (int(datasets[0].Columns), int(datasets[0].Rows), len(datasets))
    if tuple(volume.shape) != expected:
        raise UserError(
            f"{source}: a volume of shape {tuple(volume.shape)} is not on this series' grid "
            f"(columns, rows, slices) = {expected}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    written = []
    for k, original in enumerate(datasets):
        dataset = copy.deepcopy(original)
        stored = original.pixel_array
        slope, intercept = _rescale(original)
        values = (np.asarray(volume[:, :, k], np.float64).T - intercept) / slope  # (rows, cols)
        info = np.iinfo(stored.dtype) if np.issubdtype(stored.dtype, np.integer) else None
        if info is not None:
            values = np.clip(np.round(values), info.min, info.max)
        pixels = values.astype(stored.dtype)
        dataset.PixelData = pixels.tobytes()
        meta = getattr(dataset, "file_meta", None)
        if (
            meta is not None
            and "TransferSyntaxUID" in meta
            and meta.TransferSyntaxUID.is_compressed
        ):
            meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian  # raw pixels now
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        if meta is not None:
            meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.SeriesDescription = f"{original.get('SeriesDescription', '')} ({description})"
        image_type = list(original.get("ImageType", ["ORIGINAL", "PRIMARY"]))
        dataset.ImageType = ["DERIVED", *image_type[1:]]
        target = out / f"{k + 1:04d}.dcm"
        with atomic_path(target) as tmp:
            pydicom.dcmwrite(tmp, dataset, enforce_file_format=True)
        written.append(target)
    return written
