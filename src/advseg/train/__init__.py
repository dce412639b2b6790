"""The training loop, as in the paper, on one process or many (torchrun).

Paper settings (FACTS.md §1): AdamW (lr 3e-4), cosine annealing to eta_min 5e-6 over the epochs,
15 epochs, early stopping on validation Dice, Dice + Focal loss, augmentation of image and mask
together (:mod:`advseg.augment`). On top: mixed precision (bf16, or fp16 with a gradient scaler)
and channels_last on a GPU, gradient accumulation, DataLoader workers, seeding per epoch (so a
resumed run repeats the draws of an uninterrupted one), DistributedDataParallel under torchrun.

A run directory holds ``checkpoints/best`` and ``checkpoints/last``
(:mod:`advseg.models.checkpoint`: safetensors + JSON, written atomically; ``last`` also holds the
optimiser, scheduler and scaler states for ``resume``), ``log.csv`` (one row per epoch) and,
optionally, TensorBoard events. Only rank 0 writes.

Validation Dice is the "global" protocol: per class, ``2 TP / (2 TP + FP + FN)`` with TP, FP, FN
summed over every validation pixel, then the mean over classes present in the labels or the
predictions. It needs no per-slice convention for empty masks and never is NaN. The prediction is
evaluation's (:func:`advseg.labels.class_prediction`: sigmoid > threshold, or the softmax argmax
without its background channel), scored against the multi-label masks.

``train.activation: softmax`` trains a model of K + 1 outputs (background first) on the masks
made a partition (:func:`advseg.labels.softmax_target`: an overlapping pixel takes the first of
its classes), with a softmax loss (``dicece`` by default, or ``ce``).

The package's modules: :mod:`~advseg.train.config` (settings, results, device and precision),
:mod:`~advseg.train.loop` (the loop, validation), :mod:`~advseg.train.state` (resume),
:mod:`~advseg.train.display` (progress, ETA, TensorBoard) and :mod:`~advseg.train.from_data`
(split, model, data metadata: :func:`train_on_data`; cross-validation: :func:`train_folds`).
"""

from advseg.train.config import (
    PAPER_BATCH_SIZES,
    EpochStats,
    Precision,
    TrainConfig,
    TrainResult,
    resolve_device,
    resolve_precision,
)
from advseg.train.from_data import (
    data_metadata,
    fold_dir,
    new_model,
    overlapping_pixels,
    train_folds,
    train_on_data,
)
from advseg.train.loop import global_dice, train

__all__ = [
    "PAPER_BATCH_SIZES",
    "EpochStats",
    "Precision",
    "TrainConfig",
    "TrainResult",
    "data_metadata",
    "fold_dir",
    "global_dice",
    "new_model",
    "overlapping_pixels",
    "resolve_device",
    "resolve_precision",
    "train",
    "train_folds",
    "train_on_data",
]
