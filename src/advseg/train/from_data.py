"""Training from a data set: the case split, the model built from the config's seed, and what a
checkpoint records of its data (:func:`train_on_data`, the one way ``advseg train`` and
``advseg run`` train a model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from advseg import distributed
from advseg.augment import Augment
from advseg.config import to_dict
from advseg.data import DataConfig, SliceData
from advseg.errors import UserError
from advseg.labels import (
    output_channels,
    overlap_pixels,
)
from advseg.models.checkpoint import (
    checkpoint_exists,
)
from advseg.models.zoo import create_model
from advseg.train.config import TrainConfig, TrainResult, resolve_device
from advseg.train.from_volumes import is_volumetric, volume_sets
from advseg.train.loop import train


def new_model(
    config: TrainConfig, in_channels: int, classes: int, encoder_weights: str | None = None
) -> nn.Module:
    """``config.model`` initialised from ``config.seed``: the same config, the same start.

    ``classes`` is the data's class count; a softmax model gets one output more (background).
    """
    torch.manual_seed(config.seed)
    outputs = output_channels(classes, config.activation)  # softmax: a background channel first
    return create_model(
        config.model, in_channels=in_channels, classes=outputs, encoder_weights=encoder_weights
    )


def data_metadata(
    data_config: DataConfig,
    data: SliceData,
    *,
    test_fraction: float,
    val_fraction: float,
    split_seed: int,
    rows: dict[str, int],
    split: dict[str, Any] | None = None,
    fold: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """What a checkpoint records of its data, so that an evaluation finds the same test cases.

    ``config`` is the whole :class:`DataConfig` (source, exclusions, label mapping, cache) with
    its paths resolved (absolute; ``synthetic`` for the phantom), the split is
    ``split_train_val_test(index, test_fraction, val_fraction, split_seed)``, and ``split`` its
    cases (:func:`advseg.data.split_note`), which later uses check the data against
    (:func:`advseg.data.held_out_rows`). A cross-validation fold ``(fold, folds)`` stores
    ``folds: {fold, folds}`` in place of ``test_fraction`` (its test cases are its fold's,
    :func:`advseg.data.fold_train_val_test`).
    """
    from advseg.data import resolved_config

    held = {"test_fraction": test_fraction} if fold is None else {
        "folds": {"fold": fold[0], "folds": fold[1]}
    }  # fmt: skip
    return {
        "config": to_dict(resolved_config(data_config)),
        "fingerprint": data.cache_path.name,  # advseg.data.record.data_fingerprint
        "excluded": data.exclusions.lines(),
        **held,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "rows": rows,
        **({} if split is None else {"split": split}),
    }


def train_on_data(
    data_config: DataConfig,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    resume: bool = False,
    progress: bool = False,
    data: SliceData | None = None,
    fold: tuple[int, int] | None = None,
) -> TrainResult:
    """Load a data set, split it by case, build ``config.model`` and :func:`train` it.

    The one way a model is trained from a data set: ``advseg train`` and the experiment runner
    (``advseg run``) both come here, so a grid's model is the model ``advseg train`` makes with
    the same settings, weight for weight.

    The split is the paper's: ``test_fraction`` of the cases held out for evaluation (the same
    ``split_cases(index, test_fraction, split_seed)`` an evaluation calls), then ``val_fraction``
    of the remaining cases for validation (early stopping); no case is on two sides. The data
    source, exclusions, split and row counts are stored in the checkpoints.

    Under torchrun, rank 0 fills the preprocessing cache before the other ranks read it.

    Args:
        data: ``data_config`` already loaded (the experiment runner's); loaded here when None.
        fold: ``(fold, folds)``: train fold ``fold`` of ``folds``-fold case-level
            cross-validation instead (:func:`advseg.data.fold_train_val_test`: its test cases
            are that fold's, seeded by ``split_seed``; ``test_fraction`` is not used).
    """
    from advseg.atomic import check_output_dir
    from advseg.data import fold_train_val_test, load_data, split_note, split_train_val_test

    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0 < value < 1:  # also nan
            raise UserError(f"{name}: {value} must lie in (0, 1)")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise UserError(f"split_seed: expected an integer, got {split_seed!r}")
    resolve_device(config.device)  # an unknown device fails before any data is read
    check_output_dir(out_dir, "training output directory")
    distributed.init()
    if is_volumetric(config.model):  # a 3D network: volumes, patches, sliding-window validation
        if fold is not None:
            raise UserError(f"folds: cross-validation trains 2D models; {config.model} is 3D")
        return _train_volumetric(
            data_config, config, out_dir, test_fraction=test_fraction,
            val_fraction=val_fraction, split_seed=split_seed, resume=resume, progress=progress,
        )  # fmt: skip
    if data is None:
        if not distributed.is_main():
            distributed.barrier()  # rank 0 fills the cache first
        data = load_data(data_config)
        if distributed.is_main():
            distributed.barrier()
    if fold is None:
        train_rows, val_rows, test_rows = split_train_val_test(
            data.index, test_fraction, val_fraction, split_seed
        )
    else:
        train_rows, val_rows, test_rows = fold_train_val_test(
            data.index, fold[1], fold[0], val_fraction, split_seed
        )
    image_size = data_config.preprocess.size
    train_set = data.dataset(train_rows, transform=augmentation(config, image_size))
    val_set = data.dataset(val_rows)
    model = new_model(
        config,
        in_channels=data_config.preprocess.channels,
        classes=len(data.classes),
        encoder_weights=None if resume else config.encoder_weights,
    )
    source = data_metadata(
        data_config,
        data,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        split_seed=split_seed,
        rows={"train": len(train_rows), "val": len(val_rows), "test": len(test_rows)},
        split=split_note(data.index, train_rows, val_rows, test_rows),
        fold=fold,
    )
    if config.activation == "softmax":  # said, not silently relabelled
        source["overlap"] = {
            "pixels": overlapping_pixels(data.masks, train_rows),
            "labelled": "the first of its classes in the class order",
        }
    if resume:  # a run begun before data paths were resolved keeps the fingerprint it saved
        source["fingerprint"] = resumed_fingerprint(Path(out_dir), data, source["fingerprint"])
    result = train(
        model,
        train_set,
        val_set,
        config,
        out_dir,
        classes=list(data.classes),
        preprocessing=to_dict(data_config.preprocess),
        data=source,
        resume=resume,
        progress=progress,
    )
    result.data = source
    return result


def _train_volumetric(
    data_config: DataConfig,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    test_fraction: float,
    val_fraction: float,
    split_seed: int,
    resume: bool,
    progress: bool,
) -> TrainResult:
    """:func:`train_on_data` for a 3D model (:mod:`advseg.train.from_volumes`)."""
    from advseg.data import split_note, volume_note

    sets = volume_sets(
        data_config, config, test_fraction=test_fraction, val_fraction=val_fraction,
        split_seed=split_seed,
    )  # fmt: skip
    train_rows, val_rows, test_rows = sets.rows
    source = data_metadata(
        sets.config,
        sets.data,  # type: ignore[arg-type]  (cache_path, exclusions: as SliceData's)
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        split_seed=split_seed,
        rows={"train": len(train_rows), "val": len(val_rows), "test": len(test_rows)},
        split=split_note(sets.data.index, train_rows, val_rows, test_rows),
    )
    source["volumes"] = volume_note(sets.data)
    model = new_model(
        config, in_channels=1, classes=len(sets.data.classes),
        encoder_weights=None if resume else config.encoder_weights,
    )  # fmt: skip
    result = train(
        model,
        sets.train,
        sets.val,
        config,
        out_dir,
        classes=list(sets.data.classes),
        preprocessing=to_dict(sets.config.preprocess),
        data=source,
        resume=resume,
        progress=progress,
        window=sets.patch,
        overlap=sets.config.volume.overlap,
        valid_range=sets.data.valid_range,
    )
    result.data = source
    return result


def augmentation(config: TrainConfig, image_size: int) -> Augment:
    """The training transform of ``config.augment``: MONAI's augmentations, then the corruptions
    it names (:class:`advseg.corruptions.augment.RandomCorruption`), if any."""
    settings = config.augment
    corruptions = None
    if settings.enabled and settings.corruptions:
        from advseg.corruptions.augment import RandomCorruption  # here: TorchIO loads slowly

        corruptions = RandomCorruption(
            settings.corruptions, settings.p_corruption, settings.corruption_severities
        )
    return Augment(settings, image_size, image_transform=corruptions)


def fold_dir(out_dir: str | Path, fold: int) -> Path:
    """Where fold ``fold`` of a cross-validated training run lives: ``<out_dir>/fold<fold>``."""
    return Path(out_dir) / f"fold{fold}"


def train_folds(
    data_config: DataConfig,
    config: TrainConfig,
    out_dir: str | Path,
    folds: int,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    resume: bool = False,
    progress: bool = False,
    data: SliceData | None = None,
) -> list[TrainResult]:
    """Case-level cross-validation: ``folds`` models, each by :func:`train_on_data` (the one
    training path) in ``<out_dir>/fold<k>/`` on fold ``k``'s split, so that every case is the
    test case of exactly one model (whose checkpoint stores it). The data is loaded once.

    Returns:
        The folds' results, in fold order.
    """
    from advseg.data import fold_train_val_test, load_data

    if is_volumetric(config.model):  # before any data is read
        raise UserError(f"--folds: cross-validation trains 2D models; {config.model} is 3D")
    if data is None:
        if not distributed.is_main():
            distributed.barrier()
        data = load_data(data_config)
        if distributed.is_main():
            distributed.barrier()
    fold_train_val_test(data.index, folds, 0, val_fraction, split_seed)  # fold count checked
    results = []
    for fold in range(folds):
        out = fold_dir(out_dir, fold)
        results.append(
            train_on_data(
                data_config,
                config,
                out,
                val_fraction=val_fraction,
                split_seed=split_seed,
                resume=resume and checkpoint_exists(out / "checkpoints" / "last"),
                progress=progress,
                data=data,
                fold=(fold, folds),
            )
        )
    return results


def overlapping_pixels(masks: Any, rows: Any, chunk: int = 256) -> int:
    """Pixels of ``masks[rows]`` (``(N, K, S, S)``, memory-mapped) in more than one class, read
    ``chunk`` slices at a time: what a softmax training labels with one class of several."""
    rows = list(rows)
    return sum(
        overlap_pixels(torch.from_numpy(masks[rows[i : i + chunk]]))
        for i in range(0, len(rows), chunk)
    )


def resumed_fingerprint(out_dir: Path, data: SliceData, now: str) -> str:
    """The data fingerprint a resumed run goes on with: the one its last checkpoint saved when
    that names the same data (:func:`advseg.data.record.same_data`), else ``now`` (which
    :func:`restore_run` then refuses, if the checkpoint saved another)."""
    from advseg.data.record import same_data
    from advseg.models.checkpoint import read_metadata

    last = out_dir / "checkpoints" / "last"
    if not checkpoint_exists(last):
        return now
    saved = read_metadata(last).data.get("fingerprint")
    return saved if isinstance(saved, str) and saved != now and same_data(saved, data) else now
