"""A model advseg did not train, opened for ``advseg evaluate``: the model, the data it is judged
on, and what the records and provenance say of it.

- nnU-Net (``--nnunet DIR``): :class:`~advseg.models.external.nnunet.NnUNet` over the raw data
  set named by ``--data`` (:class:`~advseg.models.external.nnunet_cases.NnUNetCases`): whole
  volumes, one per batch, in the source's units (eps in HU for CT), every labelled case scored;
  unbounded valid range (the perturbation goes into the raw image, before nnU-Net's clipping).
- MONAI bundle (``--bundle DIR``): :class:`~advseg.models.external.bundle.BundleModel` over the
  Decathlon-style folder named by ``--data``
  (:class:`~advseg.models.external.bundle_cases.BundleCases`): whole images read by the bundle's
  own reader, one per batch, in the source's units, every labelled case scored on the image's
  own grid; unbounded valid range (the perturbation goes in before the bundle's preprocessing).
- TorchScript (``--torchscript FILE``) and factories (``--model-factory pkg.mod:fn``): slices of
  the data set named by ``--data`` through advseg's preprocessing (grey in [0, 1] at ``--size``,
  ``--in-channels`` copies), every slice scored: advseg does not know the model's training split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advseg.errors import UserError
from advseg.models.external import ExternalConfig


@dataclass
class Judged:
    """One model to judge, opened.

    Attributes:
        model: the differentiable function attacks go through.
        name: its label in the records.
        arch: the ``arch`` column (``nnunet:3d_fullres``, ``torchscript``, ``factory``).
        activation: ``sigmoid`` or ``softmax``.
        data: the :class:`~advseg.evaluate.cells.SliceSource` it is scored on.
        rows: the rows of ``data.index`` scored (every one).
        batch_size: None (the sweep's) or 1 (volumes of different shapes).
        valid_range: the attacks' valid range: None (unbounded) in the source's units.
        provenance: what the report says of the model (folder, folds, hashes, units).
    """

    model: nn.Module
    name: str
    arch: str
    activation: str
    data: Any
    rows: np.ndarray
    batch_size: int | None = None
    valid_range: tuple[float, float] | None = (0.0, 1.0)
    provenance: dict[str, Any] = field(default_factory=dict)

    def batch(self, rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and masks of ``rows`` (positions in ``data.index``) on the model's device:
        slices ``(B, C, H, W)`` in [0, 1], or one volume ``(1, C, *S)`` in the source's units
        (then the model is told which volume it is: its spacing or affine)."""
        rows = [int(r) for r in np.asarray(rows).reshape(-1)]
        if not rows:
            raise UserError("batch: no rows given")
        if self.batch_size == 1 and len(rows) != 1:
            raise UserError(f"batch: {self.name} takes one volume at a time, got {len(rows)}")
        prepare = getattr(self.data, "prepare", None)
        if prepare is not None:
            prepare(rows)
        dataset = self.data.dataset(rows)
        items = [dataset[i] for i in range(len(dataset))]
        device = next(self.model.parameters()).device
        x = torch.stack([item["image"] for item in items]).to(device)
        return x, torch.stack([item["mask"] for item in items]).to(device)


def open_external(
    config: ExternalConfig,
    data: Path | str | None,
    *,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    data_config: Any = None,
) -> Judged:
    """Open ``config``'s model and the data it is judged on (``--data``, never defaulted).

    ``data_config``: a TorchScript or factory model's whole :class:`~advseg.data.DataConfig`
    (an experiment grid's data, at the model's size and channels) in place of ``data``'s."""
    if data is None:
        what = "an nnU-Net raw data set (imagesTs/ + labelsTs/, or imagesTr/ + labelsTr/)"
        if config.kind == "bundle":
            what = "a Decathlon-style folder (imagesTs/ + labelsTs/, or imagesTr/ + labelsTr/)"
        elif config.kind != "nnunet":
            what = "a data set advseg reads (Kaggle layout, NIfTI, or synthetic)"
        raise UserError(f"--{config.flag} needs --data: {what} to score the model on")
    if config.kind == "nnunet":
        return _open_nnunet(config, Path(data), device)
    if config.kind == "bundle":
        return _open_bundle(config, Path(data), device)
    return _open_module(config, data, cache_dir, device, data_config)


def _open_nnunet(config: ExternalConfig, raw: Path, device: str | torch.device) -> Judged:
    from advseg.models.external.nnunet import NnUNet, read_folder
    from advseg.models.external.nnunet_cases import NnUNetCases

    found = read_folder(
        config.path,
        configuration=config.configuration,
        folds=config.folds or None,
        checkpoint=config.checkpoint,
    )
    cases = NnUNetCases(raw, found)
    model = NnUNet(found, cases.spacing(0), mirroring=config.mirroring).to(device)
    cases.bind(model)
    provenance = {
        **found.provenance(),
        "mirroring": config.mirroring,
        "units": "the source's (HU for CT): eps, L-inf and L2 are in them",
        "resampling_gradient": "linear (nnU-Net's own resampling in the forward pass)",
    }
    return Judged(
        model=model,
        name=config.label,
        arch=f"nnunet:{config.configuration}",
        activation=model.activation,
        data=cases,
        rows=np.arange(len(cases.index)),
        batch_size=1,
        valid_range=None,
        provenance=provenance,
    )


def _open_bundle(config: ExternalConfig, folder: Path, device: str | torch.device) -> Judged:
    from advseg.models.external.bundle import BundleModel, check_differentiable, read_bundle
    from advseg.models.external.bundle_cases import BundleCases

    bundle = read_bundle(config.path, classes=config.classes or None, device=device)
    model = BundleModel(bundle)
    cases = BundleCases(folder, bundle)
    check_differentiable(bundle, cases.read(0)[0], cases.metas[0])
    _check_channels(model, cases, f"--bundle {config.path}")
    cases.bind(model)
    provenance = {
        **bundle.provenance(),
        "units": "the source's (HU for CT): eps, L-inf and L2 are in them",
        "grid": "the image's own (the bundle's preprocessing inverted, as its Invertd does)",
    }
    return Judged(
        model=model,
        name=config.label,
        arch="bundle",
        activation=bundle.activation,
        data=cases,
        rows=np.arange(len(cases.index)),
        batch_size=1,
        valid_range=None,
        provenance=provenance,
    )


def _check_channels(model: nn.Module, cases: Any, where: str) -> None:
    """One forward of the first case: the outputs must fit the classes (one line if not)."""
    expected = len(cases.classes) + (1 if model.activation == "softmax" else 0)
    cases.prepare([0])
    image, _ = cases.read(0)
    try:
        with torch.no_grad():
            out = model(image[None].to(next(iter(model.parameters())).device))
    except UserError:
        raise
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{where}: fails on {cases.index['id'].iloc[0]} ({first[:160]})") from None
    if out.shape[1] != expected:
        raise UserError(
            f"{where}: gives {out.shape[1]} output channels, but {len(cases.classes)} classes "
            f"({', '.join(cases.classes)}) with {model.activation} need {expected} (--classes)"
        )


def _open_module(
    config: ExternalConfig,
    data: Path | str,
    cache_dir: Path | None,
    device: str | torch.device,
    data_config: Any = None,
) -> Judged:
    from advseg.data import DataConfig, PreprocessConfig, load_data
    from advseg.models.external.module import (
        check_outputs,
        file_sha256,
        load_factory,
        load_torchscript,
    )

    if config.kind == "torchscript":
        model, where = load_torchscript(config.path, device), f"--torchscript {config.path}"
    else:
        model, where = load_factory(config.path, config.weights, device), config.path
    preprocess = PreprocessConfig(size=config.size, channels=config.in_channels)
    if data_config is None:
        data_config = DataConfig(path=Path(data), cache_dir=cache_dir, preprocess=preprocess)
    loaded = load_data(data_config)
    if list(loaded.classes) != list(config.classes):
        raise UserError(
            f"--classes {','.join(config.classes)}: the data's classes are "
            f"{','.join(loaded.classes)} (in that order)"
        )
    check_outputs(model, config.in_channels, config.classes, config.activation, where, config.size)
    files = [config.path] if config.kind == "torchscript" else []
    files += [config.weights] if config.weights else []
    provenance = {
        "kind": config.kind,
        "path": config.path,
        "sha256": {str(f): file_sha256(f) for f in files},
        "classes": list(config.classes),
        "in_channels": config.in_channels,
        "activation": config.activation,
        "units": "advseg's preprocessing: grey values in [0, 1]",
    }
    return Judged(
        model=model,
        name=config.label,
        arch=config.kind,
        activation=config.activation,
        data=loaded,
        rows=np.arange(len(loaded.index)),
        provenance=provenance,
    )
