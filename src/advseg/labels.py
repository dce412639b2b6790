"""How a model's outputs line up with the multi-label masks, for each activation.

The masks are multi-label everywhere: ``(B, K, H, W)`` in {0, 1}, one channel per class, and
classes may overlap (in UW-Madison the two bowels touch and overlap on some pixels).

- ``sigmoid`` (the paper's, the default): the model outputs K logits, one independent decision
  per (pixel, class): ``logit > 0``.
- ``softmax``: the model outputs K + 1 logits, channel 0 the background and channel ``1 + k`` the
  class ``k``: one class per pixel, the argmax. Its training (and attack) target is a partition,
  :func:`softmax_target`: a pixel of several classes is labelled with the **first of them in the
  class order** (``large_bowel`` before ``small_bowel`` before ``stomach``), so no pixel is
  dropped; :func:`overlap_pixels` counts those pixels, which ``advseg train`` reports and the
  checkpoint stores.

Whatever the activation, a prediction is scored against the true multi-label masks
(:func:`class_prediction` gives ``(B, K, H, W)``): a softmax model cannot predict both classes of
an overlapping pixel, and that costs it the Dice it costs. Validation (:mod:`advseg.train`) and
evaluation (:mod:`advseg.evaluate`) take this one function.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from advseg.errors import UserError

Activation = Literal["sigmoid", "softmax"]
ACTIVATIONS: tuple[str, ...] = ("sigmoid", "softmax")
DEFAULT_LOSS = {"sigmoid": "dicefocal", "softmax": "dicece"}
"""The training loss of each activation when none is named (the paper's Dice + Focal; Dice + CE)."""
DEFAULT_ATTACK_LOSSES = {"sigmoid": ("bce", "focal", "dicefocal"), "softmax": ("ce", "dicece")}
"""The attack losses ``advseg evaluate`` takes when none is named: the paper's three for sigmoid
models; for softmax ones, cross-entropy and the softmax training loss."""


def check_activation(value: object, where: str = "activation") -> Activation:
    """``value`` if it is ``sigmoid`` or ``softmax``, else a :class:`UserError` naming ``where``."""
    if value not in ACTIVATIONS:
        raise UserError(f"{where}: {value!r} is not sigmoid or softmax")
    return value  # type: ignore[return-value]


def output_channels(classes: int, activation: str) -> int:
    """The model's output channels for ``classes`` classes: K (sigmoid) or K + 1 (softmax)."""
    return classes + 1 if check_activation(activation) == "softmax" else classes


def softmax_target(mask: Tensor) -> Tensor:
    """One-hot ``(B, K + 1, H, W)``, channel 0 the background, of multi-label ``(B, K, H, W)``.

    A pixel of several classes takes the first of them in the class order; a pixel of none is
    background. The dtype is the mask's (float masks give float one-hots).
    """
    present = mask > 0.5
    labels = torch.where(present.any(1), present.to(torch.uint8).argmax(1) + 1, 0)  # first wins
    return F.one_hot(labels.long(), mask.shape[1] + 1).movedim(-1, 1).to(mask.dtype)


def class_prediction(logits: Tensor, activation: str, threshold: float = 0.5) -> Tensor:
    """Hard per-class masks ``(B, K, H, W)`` bool from logits, to score against the masks.

    Sigmoid: ``sigmoid(logit) > threshold`` (``logit > 0`` at 0.5, as
    :func:`advseg.metrics.hard_prediction`). Softmax: the argmax over the K + 1 channels, the
    background channel dropped.
    """
    if check_activation(activation) == "sigmoid":
        return logits > math.log(threshold / (1 - threshold))
    winner = logits.argmax(1)  # (B, H, W), 0 = background
    return F.one_hot(winner, logits.shape[1])[..., 1:].movedim(-1, 1).bool()


def overlap_pixels(masks: Tensor) -> int:
    """How many pixels of ``masks`` ``(N, K, H, W)`` belong to more than one class."""
    return int(((masks > 0).sum(1) > 1).sum())


def checkpoint_activation(saved: object, given: str | None, where: str) -> Activation:
    """The activation to read a checkpoint's logits with: its own (``sigmoid`` when it names none,
    as checkpoints did before softmax training), which ``given`` (``--activation``) may repeat
    but not contradict: the other reading of its logits would score numbers that mean nothing.

    Raises:
        UserError: ``given`` differs from the checkpoint's, or is no activation.
    """
    own = check_activation(saved or "sigmoid", f"{where}: activation")
    if given is not None and check_activation(given, "--activation") != own:
        raise UserError(
            f"--activation {given}: {where} was trained with {own} outputs; leave --activation "
            "out (the checkpoint says it)"
        )
    return own


def model_target(mask: Tensor, activation: str) -> Tensor:
    """What a loss or an attack takes as the target of masks ``(B, K, H, W)``: the masks
    themselves (sigmoid), or their one-hot partition with background (softmax)."""
    return softmax_target(mask) if check_activation(activation) == "softmax" else mask
