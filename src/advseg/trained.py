"""Where the Python API starts (kept for users: the code of :func:`load_trained` lives in
:mod:`advseg.train.trained`).

:func:`load_trained` opens a checkpoint advseg trained; :func:`load_external` a model it did not
(an nnU-Net v2 results folder, a MONAI bundle, a TorchScript file, a module factory), as
``advseg evaluate --nnunet / --bundle / --torchscript / --model-factory`` opens it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from advseg.evaluate.external import Judged, open_external
from advseg.models.external import ExternalConfig
from advseg.train.trained import Trained, checkpoint_label, load_trained, trained_data_config

__all__ = [
    "Judged",
    "Trained",
    "checkpoint_label",
    "load_external",
    "load_trained",
    "trained_data_config",
]


def load_external(
    *,
    data: str | Path,
    nnunet: str | Path | None = None,
    bundle: str | Path | None = None,
    torchscript: str | Path | None = None,
    factory: str | None = None,
    weights: str | Path | None = None,
    configuration: str = "3d_fullres",
    folds: list[str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    mirroring: bool = True,
    classes: list[str] | None = None,
    in_channels: int = 1,
    activation: str = "sigmoid",
    size: int = 224,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> Judged:
    """Open one model advseg did not train, with the data it is judged on.

    Name exactly one of ``nnunet`` (a results folder; ``configuration``, ``folds``,
    ``checkpoint``, ``mirroring`` as nnU-Net's predictor takes them), ``bundle`` (a MONAI bundle
    folder), ``torchscript`` (a ``torch.jit.save`` file) or ``factory``
    (``package.module:function``, with ``weights`` in safetensors); the last two need
    ``classes``, ``in_channels``, ``activation`` and ``size`` (advseg's preprocessing).
    ``data``: the nnU-Net raw data set, the bundle's Decathlon-style folder, or a data set
    advseg reads. The result's ``model`` is what attacks take (with ``activation=`` and
    ``valid_range=`` from it: None, the source's units, for nnU-Net and bundles), ``rows`` what
    ``advseg evaluate`` scores, ``batch(rows)`` images and masks.

    Raises:
        UserError: none or several models named, or what ``advseg evaluate`` refuses.
    """
    from advseg.errors import UserError

    given = {"nnunet": nnunet, "bundle": bundle, "torchscript": torchscript, "factory": factory}
    named = [(kind, path) for kind, path in given.items() if path is not None]
    if len(named) != 1:
        raise UserError("load_external: name one of nnunet, bundle, torchscript or factory")
    kind, path = named[0]
    config = ExternalConfig(
        kind=kind, path=str(path), weights=str(weights) if weights else None,
        configuration=configuration, folds=[str(f) for f in folds or []], checkpoint=checkpoint,
        mirroring=mirroring, classes=list(classes or []), in_channels=in_channels,
        activation=activation, size=size,
    )  # fmt: skip
    cache = Path(cache_dir) if cache_dir is not None else None
    return open_external(config, data, cache_dir=cache, device=device)
