"""Data: sources on disk -> SliceIndex -> cached arrays -> torch Dataset.

See docs/architecture.md ("Data") for the contract. The public API:

- :func:`load_data` (``DataConfig`` -> :class:`SliceData`), :func:`build_index`;
- where data and cache are (:mod:`advseg.data.location`): :data:`SYNTHETIC` (the data path that
  names the phantom), :func:`cache_root`, :func:`resolved_config`;
- readers :func:`read_uwmgi`, :func:`read_nifti` (labels from ``dataset.json`` via
  :func:`dataset_json_labels`), and the synthetic writers :func:`write_synthetic` (MRI phantom,
  Kaggle layout) and :func:`write_synthetic_nifti` (abdominal CT, Decathlon layout);
- :func:`rle_encode`, :func:`rle_decode`;
- :class:`PreprocessConfig` and its pure functions;
- :func:`split_cases`, :func:`split_train_val_test`, :func:`kfold_cases` /
  :func:`fold_train_val_test` (case-level cross-validation), :func:`split_note` /
  :func:`held_out_rows` (the split a checkpoint stores, and its test rows on later data), and
  :func:`spread_rows` (a seeded sample of slices spread over cases);
- :func:`summarize_index` (what ``advseg data info`` prints);
- volumes for 3D models: :func:`load_volumes` (``DataConfig`` -> :class:`VolumeData`, one row
  per scan, ``DataConfig.volume`` a :class:`VolumeConfig`), :class:`PatchDataset` (training
  patches, foreground oversampled), :class:`VolumeDataset` (whole volumes).
"""

from advseg.data.cache import cache_key, cached_arrays
from advseg.data.dataset import SliceDataset
from advseg.data.heldout import held_out_rows, split_note
from advseg.data.index import (
    BASE_COLUMNS,
    UWMGI_CLASSES,
    Exclusions,
    IndexSummary,
    index_classes,
    summarize_index,
)
from advseg.data.load import DataConfig, SliceData, build_index, load_data
from advseg.data.location import SYNTHETIC, cache_root
from advseg.data.nifti import dataset_json_labels, parse_label_map, read_nifti
from advseg.data.patches import PatchDataset, VolumeDataset
from advseg.data.preprocess import (
    PreprocessConfig,
    fitted_size,
    intensity_range,
    neighbour_rows,
    normalize_intensity,
    preprocess_slice,
    resize_image,
    resize_masks,
    restore_slice,
    saved_preprocess,
    slice_geometry,
)
from advseg.data.record import resolved_config
from advseg.data.rle import rle_decode, rle_encode
from advseg.data.split import (
    fold_train_val_test,
    kfold_cases,
    split_cases,
    split_train_val_test,
    spread_positions,
    spread_rows,
)
from advseg.data.synth import SynthSummary, write_synthetic
from advseg.data.synth_nifti import NIFTI_LABELS, NiftiSynthSummary, write_synthetic_nifti
from advseg.data.uwmgi import EXCLUDE_LISTS, read_png, read_uwmgi
from advseg.data.volume_prep import UWMGI_SLICE_THICKNESS, Normalisation, VolumeConfig
from advseg.data.volumes import VolumeData, load_volumes, volume_note

__all__ = [
    "BASE_COLUMNS",
    "EXCLUDE_LISTS",
    "NIFTI_LABELS",
    "SYNTHETIC",
    "UWMGI_CLASSES",
    "UWMGI_SLICE_THICKNESS",
    "DataConfig",
    "Exclusions",
    "IndexSummary",
    "NiftiSynthSummary",
    "Normalisation",
    "PatchDataset",
    "PreprocessConfig",
    "SliceData",
    "SliceDataset",
    "SynthSummary",
    "VolumeConfig",
    "VolumeData",
    "VolumeDataset",
    "build_index",
    "cache_key",
    "cache_root",
    "cached_arrays",
    "dataset_json_labels",
    "fitted_size",
    "fold_train_val_test",
    "held_out_rows",
    "index_classes",
    "intensity_range",
    "kfold_cases",
    "load_data",
    "load_volumes",
    "neighbour_rows",
    "normalize_intensity",
    "parse_label_map",
    "preprocess_slice",
    "read_nifti",
    "read_png",
    "read_uwmgi",
    "resize_image",
    "resize_masks",
    "resolved_config",
    "restore_slice",
    "rle_decode",
    "rle_encode",
    "saved_preprocess",
    "slice_geometry",
    "split_cases",
    "split_note",
    "split_train_val_test",
    "spread_positions",
    "spread_rows",
    "summarize_index",
    "volume_note",
    "write_synthetic",
    "write_synthetic_nifti",
]
