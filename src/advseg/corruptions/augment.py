"""Corruptions as a training augmentation (``advseg train --augment corruptions``).

Training on the corruptions one is later tested on is the plainest defence against them (as
AugMix-style training is for ImageNet-C, Hendrycks et al., ICLR 2020,
https://arxiv.org/abs/1912.02781; here the corruptions themselves, as in MedMNIST-C's
augmentation use). :class:`RandomCorruption` corrupts one training image, with probability ``p``,
by one corruption drawn uniformly from ``names`` at a severity drawn uniformly from
``severities``: the same TorchIO transforms, parameters and severity ranges as
``advseg evaluate --corruption`` (:func:`advseg.corruptions.corrupt`).

Randomness: every draw (whether, which, how strong, the transform's parameters) comes from a
``torch.Generator`` seeded by one number drawn from torch's global generator, as
:class:`advseg.augment.Augment` reseeds MONAI: the draws follow ``torch.manual_seed`` (the
training seed, per epoch) and DataLoader workers, which torch seeds one by one, differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from advseg.corruptions import corrupt
from advseg.corruptions.base import CORRUPTIONS, SEVERITIES, check_severity
from advseg.errors import UserError


def corruption_names(names: Sequence[str], where: str = "augment.corruptions") -> list[str]:
    """``names`` with ``all`` expanded to every corruption, each once, in the order given.

    Raises:
        UserError: an unknown name (naming ``where``).
    """
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(n for n in CORRUPTIONS.names() if n not in out)
        elif name not in CORRUPTIONS:
            raise UserError(f"{where}: {CORRUPTIONS.unknown_message(name)}, or all")
        elif name not in out:
            out.append(name)
    return out


class RandomCorruption:
    """Corrupt an image ``(C, H, W)`` in [0, 1] with probability ``p`` (see the module doc).

    Args:
        names: corruption names (``all`` for every one).
        p: probability that an image is corrupted at all.
        severities: the severities drawn from, uniformly (default 1 to 5).
    """

    def __init__(
        self, names: Sequence[str], p: float = 0.5, severities: Sequence[int] = SEVERITIES
    ) -> None:
        self.names = corruption_names(names)
        if not self.names:
            raise UserError("augment.corruptions: no corruption named")
        if not 0.0 <= p <= 1.0:
            raise UserError(f"augment.p_corruption: {p} is not a probability in [0, 1]")
        self.p = float(p)
        self.severities = tuple(
            check_severity(s, "augment.corruption_severities") for s in severities
        )
        if not self.severities:
            raise UserError("augment.corruption_severities: no severity named")

    def __call__(self, image: Tensor) -> Tensor:
        """``(C, H, W)`` in [0, 1] -> the same shape, corrupted or not."""
        generator = torch.Generator().manual_seed(int(torch.randint(2**31, ()).item()))
        if float(torch.rand((), generator=generator)) >= self.p:
            return image
        name = self.names[int(torch.randint(len(self.names), (), generator=generator))]
        severity = self.severities[
            int(torch.randint(len(self.severities), (), generator=generator))
        ]
        return corrupt(image[None], name, severity, generator=generator)[0]
