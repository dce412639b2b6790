"""``--compat notebook``: the paper's Kaggle notebook reproduced, departures and all.

The paper ("Susceptibility of Adversarial Attack on Medical Image Segmentation Models") computed
its Table II with code that departs from its own text in three ways (FACTS.md §4). This module
reproduces that *code*, so that its numbers can be recomputed and the departures measured; it is
NOT a recommended attack. The correct attack is advseg's default, the paper's equation 5.

The notebook's attack (``FGSM_attack`` in ``notebooks/utils.ipynb``), one slice at a time::

    img.requires_grad = True
    output = model(img)
    loss = loss(mask, output)                          # arguments swapped
    loss.backward()
    perturbed = (1 - eps) * img + eps * img.grad.sign()   # a blend, not x + eps * sign
    return torch.clamp(perturbed, 0, 1)

1. **Blended update**: ``(1 - eps) * x + eps * sign(g)``; its L-inf change reaches about
   ``2 eps`` on bright pixels (:class:`advseg.attacks.FGSM` with ``update="notebook"``).
2. **Swapped loss arguments**: ``loss(mask, logits)``. MONAI and torch take the input first, so
   the sigmoid went onto the mask and the logits became the "target". For BCE the gradient with
   respect to the logits is then ``-mask`` (a constant): the attack lowers the logits under the
   mask, whatever the model predicts. :func:`notebook_loss` calls the very same torch / MONAI
   classes the notebook named, in its argument order.
3. **Soft ground truth**: the masks were area-resized to 224 x 224 (``cv2.INTER_AREA``) and never
   thresholded, so the attack's target holds fractions on organ borders. :func:`soft_masks`
   rebuilds them from the index's RLE at the model's resolution.

Its Dice is ``1 - monai.losses.DiceLoss()(mask, pred)`` (no sigmoid, hard predictions
``sigmoid >= 0.5``), averaged over the three channels with a channel empty in both masks counting
1, over the test slices with any mask: the ``paper`` protocol of :mod:`advseg.stats.summary`, which
``--compat notebook`` selects. One difference is kept on purpose: the notebook also scored
against the soft mask, advseg scores every attack against the binary mask of its cache (records
hold pixel counts), so that both modes are scored alike.

Use it from the CLI (``advseg evaluate --compat notebook``, ``advseg run X --compat notebook``),
from YAML (``compat: notebook`` for the whole experiment, or per attack), or from the library
(:func:`create_compat_attack`, ``evaluate_cell(..., compat="notebook")``). Records of a notebook
cell carry the attack label ``fgsm:notebook``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advseg.attacks import Attack, create_attack
from advseg.data.preprocess import fit_square
from advseg.data.rle import rle_decode
from advseg.errors import UserError
from advseg.losses import PerSampleLoss

Compat = Literal["none", "notebook"]
COMPAT_MODES: tuple[str, ...] = ("none", "notebook")
NOTEBOOK_ATTACKS: tuple[str, ...] = ("fgsm",)
NOTEBOOK_LOSSES: tuple[str, ...] = ("bce", "focal", "dicefocal")


def check_compat(compat: str, where: str = "compat") -> str:
    """``compat`` if it is a known mode, else a :class:`UserError` naming ``where``."""
    if compat not in COMPAT_MODES:
        raise UserError(f"{where}: {compat!r} is not one of {', '.join(COMPAT_MODES)}")
    return compat


def compat_label(attack: str, compat: str) -> str:
    """The records' attack label: ``fgsm`` for equation 5, ``fgsm:notebook`` for the notebook."""
    return attack if compat == "none" else f"{attack}:{compat}"


def _per_sample(values: Tensor) -> Tensor:
    return values.flatten(1).mean(1)  # (B, ...) -> (B,): the notebook's mean at batch 1


def notebook_loss(name: str) -> PerSampleLoss:
    """The notebook's attack loss ``name``, called as it called it: ``loss(mask, logits)``.

    Returns a per-sample callable ``(logits (B, K, H, W), target (B, K, H, W)) -> (B,)`` (the
    attacks' interface) that swaps its arguments before calling the notebook's class:

    - ``bce``: ``torch.nn.BCEWithLogitsLoss()``;
    - ``focal``: ``monai.losses.FocalLoss()`` (gamma 2, sigmoid);
    - ``dicefocal``: ``monai.losses.DiceFocalLoss(sigmoid=True)`` (the notebook's default).

    Per sample the value is the notebook's ``reduction="mean"`` on that slice alone, so a batch
    gives every slice the gradient the notebook gave it one slice at a time.
    """
    if name == "bce":

        def loss(logits: Tensor, target: Tensor) -> Tensor:
            swapped = F.binary_cross_entropy_with_logits(target, logits, reduction="none")
            return _per_sample(swapped)

    elif name == "focal":
        from monai.losses import FocalLoss  # here: MONAI's package import is heavy

        focal = FocalLoss(reduction="none")

        def loss(logits: Tensor, target: Tensor) -> Tensor:
            return _per_sample(focal(target, logits))

    elif name == "dicefocal":
        # reduction "none": dice (B, K, 1, 1) + focal (B, K, H, W); the per-sample mean of the
        # sum is the mean over channels of the Dice term plus the mean Focal term.
        from monai.losses import DiceFocalLoss

        dicefocal = DiceFocalLoss(sigmoid=True, reduction="none")

        def loss(logits: Tensor, target: Tensor) -> Tensor:
            return _per_sample(dicefocal(target, logits))

    else:
        raise UserError(
            f"compat notebook: loss {name!r} was not in the notebook; it used "
            f"{', '.join(NOTEBOOK_LOSSES)}"
        )
    loss.__name__ = name  # the records' loss column
    return loss


def create_compat_attack(
    name: str, model: nn.Module, loss: str, eps: float, compat: str = "none", **kwargs: Any
) -> Attack:
    """An attack by name under a compatibility mode.

    ``compat="none"`` is :func:`advseg.attacks.create_attack`. ``compat="notebook"`` builds the
    notebook's FGSM: the blended update and the swapped loss of :func:`notebook_loss`; its target
    should be :func:`soft_masks` (``evaluate_cell`` passes them).

    Raises:
        UserError: an unknown mode, an attack or loss the notebook did not have, or an option
            that contradicts it (an L2 norm, ``update: sign``, a targeted attack).
    """
    check_compat(compat)
    if compat == "none":
        return create_attack(name, model, loss, eps, **kwargs)
    if name not in NOTEBOOK_ATTACKS:
        raise UserError(
            f"compat notebook: the notebook attacked with {', '.join(NOTEBOOK_ATTACKS)} only, "
            f"not {name!r}"
        )
    for key, allowed in (("update", "notebook"), ("norm", "linf"), ("targeted", False)):
        if key in kwargs and kwargs[key] not in (None, allowed):
            raise UserError(f"compat notebook: {name} option {key}={kwargs[key]!r} is not the "
                            f"notebook's ({allowed!r})")  # fmt: skip
    if kwargs.get("loss_kwargs"):
        raise UserError("compat notebook: the notebook's losses take no loss_kwargs")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("update", "loss_kwargs")}
    return create_attack(name, model, notebook_loss(loss), eps, update="notebook", **kwargs)


def soft_masks(
    index: pd.DataFrame,
    rows: Sequence[int],
    classes: Sequence[str],
    size: int,
    resize: str = "stretch",
):
    """The notebook's masks: full-resolution masks area-resized to ``size``, not thresholded.

    As ``cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA).astype("float32")`` on the
    ``(H, W, K)`` float64 mask the notebook built from the RLE (the notebook stretched); with
    ``resize="pad"`` the aspect is kept and the masks padded as the data's images are.

    Args:
        index: a SliceIndex (``width``, ``height`` and one RLE column per class).
        rows: positions in ``index``.
        classes: the class columns, in channel order.
        size: the side S of the model's input.

    Returns:
        ``(N, K, S, S)`` float32 tensor in [0, 1].

    Raises:
        UserError: the index has no RLE columns to rebuild the masks from.
    """
    missing = [c for c in ("width", "height", *classes) if c not in index.columns]
    if missing:
        raise UserError(
            f"compat notebook: soft masks are rebuilt from the slice index's RLE, which lacks "
            f"column(s) {', '.join(missing)}"
        )
    out = np.zeros((len(rows), len(classes), size, size), np.float32)
    for i, row in enumerate(rows):
        meta = index.iloc[int(row)]
        h, w = int(meta["height"]), int(meta["width"])
        full = np.zeros((h, w, len(classes)), np.float64)  # the notebook's blank_mask
        for k, name in enumerate(classes):
            full[:, :, k] = rle_decode(meta[name], h, w, where=f"{meta['id']}, {name}")
        resized = fit_square(full, size, resize, cv2.INTER_AREA).astype(np.float32)
        out[i] = resized.reshape(size, size, -1).transpose(2, 0, 1)
    return torch.from_numpy(out)
