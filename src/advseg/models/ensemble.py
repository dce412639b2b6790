"""Ensemble models: several trained models as one, averaging their probabilities.

``ensemble:<a>+<b>+...`` in an experiment grid names an :class:`EnsembleModel` built from the
grid's models ``a``, ``b``, ... (trained in the run or loaded from checkpoints). It is a
first-class model: evaluated, attacked white-box (the gradient runs through every member) and
scored as a transfer target (:mod:`advseg.crossmodel.transfer`). The paper names ensembles as
future work.

The output is the *logit of the mean probability*, so that everything downstream (losses, hard
predictions at probability 0.5, attacks) treats it like any single model:

- sigmoid (multi-label): ``p = mean_m sigmoid(z_m)``, output ``log p - log(1 - p)``, computed as
  ``logsumexp_m logsigmoid(z_m) - logsumexp_m logsigmoid(-z_m)`` (finite for any logits, and
  its gradient does not vanish where a clamp of ``p`` would cut it);
- softmax: output ``log mean_m softmax(z_m)`` (its softmax is the mean probability).

An ensemble of one model is that model (:func:`build_ensemble` returns it unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advseg.attacks import model_logits
from advseg.errors import UserError

ENSEMBLE_PREFIX = "ensemble:"


def ensemble_members(arch: str) -> list[str]:
    """The member names of ``ensemble:a+b`` (``[a, b]``); a UserError for an empty list."""
    members = [m for m in arch.removeprefix(ENSEMBLE_PREFIX).split("+") if m]
    if not arch.startswith(ENSEMBLE_PREFIX) or not members:
        raise UserError(f"{arch!r}: an ensemble is written ensemble:<model>+<model>+...")
    return members


class EnsembleModel(nn.Module):
    """The mean of several models' probabilities, as logits ``(B, K, H, W)``.

    Args:
        members: models mapping ``(B, C, H, W)`` to logits ``(B, K, H, W)``, all with the same
            output shape.
        activation: ``sigmoid`` (multi-label masks) or ``softmax``.
        names: the members' names, for the error when their outputs differ.

    Example:
        >>> net = EnsembleModel([unet_a, unet_b])
        >>> net(images).sigmoid()  # the mean of the two models' probabilities
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        activation: Literal["sigmoid", "softmax"] = "sigmoid",
        names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not members:
            raise UserError("an ensemble needs at least one model")
        if activation not in ("sigmoid", "softmax"):
            raise UserError(f"ensemble: activation {activation!r} is not sigmoid or softmax")
        self.members = nn.ModuleList(members)
        self.activation = activation
        self.names = list(names) or [f"member {i}" for i in range(len(members))]

    def forward(self, x: Tensor) -> Tensor:
        outputs = [model_logits(m, x) for m in self.members]
        for name, out in zip(self.names[1:], outputs[1:], strict=True):
            if out.shape != outputs[0].shape:
                raise UserError(
                    f"ensemble members {self.names[0]!r} and {name!r} predict different shapes: "
                    f"{tuple(outputs[0].shape[1:])} vs {tuple(out.shape[1:])}"
                )
        logits = torch.stack(outputs).float()  # (M, B, K, H, W)
        log_m = math.log(len(outputs))
        if self.activation == "softmax":
            return torch.logsumexp(F.log_softmax(logits, dim=2), dim=0) - log_m
        log_p = torch.logsumexp(F.logsigmoid(logits), dim=0) - log_m  # log mean p
        log_q = torch.logsumexp(F.logsigmoid(-logits), dim=0) - log_m  # log mean (1 - p)
        return log_p - log_q


def build_ensemble(
    members: Sequence[nn.Module],
    activation: Literal["sigmoid", "softmax"] = "sigmoid",
    names: Sequence[str] = (),
) -> nn.Module:
    """An :class:`EnsembleModel` of ``members``; a single member is returned as it is."""
    if len(members) == 1:
        return members[0]
    return EnsembleModel(members, activation, names)
