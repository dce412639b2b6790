"""One entry point from a data config to arrays: :func:`load_data`.

``DataConfig`` is the ``data:`` section of an experiment YAML; :func:`load_data` indexes the data
set (Kaggle layout or NIfTI, detected from the directory, or the synthetic phantom when the path
is ``synthetic``), applies the exclusions, fills or opens the preprocessed cache (outside the
data directory: :mod:`advseg.data.location`) and returns a :class:`SliceData` whose
``.dataset(rows)`` feeds a DataLoader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from advseg.data.cache import cached_arrays
from advseg.data.dataset import Item, SliceDataset
from advseg.data.index import Exclusions, Source, detect_source, index_classes
from advseg.data.location import NO_DATA, cache_root, is_synthetic, location, phantom_dir
from advseg.data.nifti import dataset_json_labels, read_nifti
from advseg.data.preprocess import PreprocessConfig, neighbour_rows, slice_geometry
from advseg.data.uwmgi import read_uwmgi
from advseg.data.volume_prep import VolumeConfig
from advseg.errors import UserError


@dataclass
class DataConfig:
    """Where the data is and how it becomes arrays.

    Attributes:
        path: the data directory (``train.csv`` + ``train/``, or ``imagesTr/`` + ``labelsTr/``),
            or ``synthetic``: the synthetic phantom, written once to ``<cache root>/synthetic``.
            None (no data named) is refused when the data is used.
        source: ``auto`` (detect from the directory), ``uwmgi`` or ``nifti``.
        exclude: scans to leave out: a named list (``default``: case7_day0 and case81_day30;
            ``host``: the competition host's 12; ``none``) or a list of scan ids.
        skip_unreadable: skip and count slices that cannot be read instead of stopping.
        nifti_labels: NIfTI label value -> class name (e.g. ``{"1": "liver"}``), or the path of a
            JSON file holding that mapping as ``nifti_labels_file``.
        nifti_labels_file: a JSON file with the NIfTI label mapping.
        strict_labels: refuse NIfTI label values the mapping lacks (else they are background,
            counted in the exclusions and warned about).
        preprocess: resizing, intensity and channel settings.
        cache_dir: where preprocessed arrays are cached, outside the data directory; default
            ``$ADVSEG_CACHE``, else ``$XDG_CACHE_HOME/advseg``, else ``~/.cache/advseg``
            (:func:`advseg.data.location.cache_root`).
        workers: decoding threads when the cache is filled.
        volume: how scans become volumes for 3D models (:func:`advseg.data.load_volumes`).
    """

    path: Path | None = None
    source: Source = "auto"
    exclude: str | list[str] = "default"
    skip_unreadable: bool = False
    nifti_labels: dict[int | str, str] = field(default_factory=dict)
    nifti_labels_file: Path | None = None
    strict_labels: bool = False
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    cache_dir: Path | None = None
    workers: int = 2
    volume: VolumeConfig = field(default_factory=VolumeConfig)

    def __post_init__(self) -> None:
        # YAML gives int keys, JSON string keys: keep one form so that configs compare equal.
        self.nifti_labels = {str(k): v for k, v in self.nifti_labels.items()}


@dataclass
class SliceData:
    """A loaded data set: the index and its preprocessed arrays (row i of each is slice i).

    Attributes:
        index: the SliceIndex of the slices held (excluded and skipped slices removed).
        classes: class names, the order of the mask channels.
        images: ``(N, S, S)`` float32 in [0, 1], memory-mapped.
        masks: ``(N, K, S, S)`` uint8 in {0, 1}, memory-mapped.
        geometry: (set on creation) :func:`~advseg.data.preprocess.slice_geometry` of the index:
            per row the padding (``top``, ``left``, ``fitted_h``, ``fitted_w``) and the mm per
            model pixel (``mm_h``, ``mm_w``).
        preprocess: the preprocessing used.
        exclusions: what was left out, and why.
        cache_path: the cache entry directory.
        decoded: slices decoded by this load (0 when the cache held them).
        location: the data set: ``synthetic`` (the phantom) or its absolute path.
    """

    index: pd.DataFrame
    classes: list[str]
    images: np.ndarray
    masks: np.ndarray
    preprocess: PreprocessConfig
    exclusions: Exclusions
    cache_path: Path
    decoded: int
    location: str = ""

    def __post_init__(self) -> None:
        self.channels = neighbour_rows(
            self.index["scan"].to_numpy(), self.index["slice"].to_numpy(), self.preprocess
        )  # (N, C)
        #: per row: the padding around the slice in its array and the mm per model pixel
        self.geometry = slice_geometry(self.index, self.preprocess)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def synthetic(self) -> bool:
        """Whether this is the synthetic phantom (generated images, not patient data)."""
        return is_synthetic(self.location)

    def dataset(
        self,
        rows: np.ndarray | list[int] | None = None,
        transform: Callable[[Item], Item] | None = None,
    ) -> SliceDataset:
        """A torch Dataset over ``rows`` (positions in :attr:`index`; all rows when None)."""
        rows = np.arange(len(self.index)) if rows is None else rows
        return SliceDataset(self.images, self.masks, self.channels, rows, transform)


def resolve_path(config: DataConfig) -> Path:
    """The data directory, absolute; the phantom (``synthetic``) is written on first use.

    Raises:
        UserError: no data named (``path`` None), saying what to pass.
    """
    if config.path is None:
        raise UserError(NO_DATA)
    if not is_synthetic(config.path):
        return Path(config.path).expanduser().resolve()
    from advseg.data.synth import write_synthetic

    path = phantom_dir(config.cache_dir)
    if not (path / "train.csv").is_file():
        write_synthetic(path, overwrite=True)
    return path


def build_index(config: DataConfig) -> tuple[pd.DataFrame, Exclusions]:
    """The SliceIndex of ``config.path`` and what was excluded (no image is decoded)."""
    path = resolve_path(config)
    source = detect_source(path) if config.source == "auto" else config.source
    if source == "uwmgi":
        if config.nifti_labels or config.nifti_labels_file:
            raise UserError(
                f"{path}: Kaggle layout (train.csv), whose classes are fixed; a NIfTI label "
                "mapping (--labels, nifti_labels) applies to NIfTI data only"
            )
        return read_uwmgi(path, config.exclude, config.skip_unreadable)
    labels = config.nifti_labels_file or config.nifti_labels or dataset_json_labels(path)
    if not labels:  # a DICOM data set: its SEG's segment labels
        from advseg.data.dicom import layout_labels

        labels = layout_labels(path)
    if not labels:
        raise UserError(
            f"{path}: NIfTI data needs a label mapping (a dataset.json with 'labels', "
            "nifti_labels, or --labels 1=liver,...)"
        )
    return read_nifti(path, labels, strict=config.strict_labels)


def load_data(config: DataConfig, progress: Callable[[int], None] | None = None) -> SliceData:
    """Index, exclude, decode (once, cached) and memory-map a data set.

    Args:
        config: the data config.
        progress: called with the number of slices decoded so far while the cache fills.
    """
    index, exclusions = build_index(config)
    arrays = cached_arrays(
        index,
        config.preprocess,
        cache_root(config.cache_dir),
        skip_unreadable=config.skip_unreadable,
        workers=config.workers,
        progress=progress,
    )
    exclusions.skipped.update(arrays.skipped)
    classes = index_classes(index)
    kept = index.iloc[arrays.kept].reset_index(drop=True)
    kept.attrs = dict(index.attrs)
    return SliceData(
        index=kept,
        classes=classes,
        images=arrays.images,
        masks=arrays.masks,
        preprocess=config.preprocess,
        exclusions=exclusions,
        cache_path=arrays.path,
        decoded=arrays.decoded,
        location=location(config.path),
    )
