"""FGSM: one signed-gradient step, the paper's attack (its equation 5)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS, Attack
from advseg.errors import UserError

Update = Literal["sign", "notebook"]


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """Fast Gradient Sign Method: ``x + eps * sign(grad_x L(f(x), y))``, clipped to the range.

    Paper: Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015,
    https://arxiv.org/abs/1412.6572; equation 5 of the seed paper.

    Distance measure: L-inf (with ``norm="l2"``, the fast gradient method ``x + eps * g / |g|_2``).

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs: see
            :class:`~advseg.attacks.base.Attack`.
        update: ``sign`` (equation 5, the default) or ``notebook``, a compatibility option that
            reproduces the paper's Kaggle notebook: ``(1 - eps) * x + eps * sign(grad)``, a blend
            whose L-inf change can reach about ``2 eps`` (it does NOT keep the budget). Use it
            only to reproduce the notebook's numbers.

    Shape:
        - x: ``(B, C, H, W)`` in the valid range; y: ``(B, K, H, W)`` masks (or a target).
        - output: ``(B, C, H, W)``.

    Example:
        >>> attack = FGSM(model, loss="bce", eps=0.009)
        >>> x_adv = attack(images, masks)
    """

    name = "fgsm"
    single_step = True

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *, update: Update = "sign",
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        if update not in ("sign", "notebook"):
            raise UserError(f"fgsm: update {update!r} is not 'sign' or 'notebook'")
        if update == "notebook" and self.norm != "linf":
            raise UserError("fgsm: update 'notebook' is a sign update; it needs norm 'linf'")
        self.update = update

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        grad, _, _ = self.gradient(x, y)
        return self.apply_gradient(x, grad)

    def apply_gradient(self, x: Tensor, grad: Tensor) -> Tensor:
        """The adversarial images from the objective's gradient at ``x`` ``(B, C, H, W)``.

        Split from :meth:`perturb` so that an evaluation can compute the gradients of several
        losses from one forward pass and apply each here.
        """
        self.check_range(x)
        if self.eps == 0:
            return x.clone()
        if self.update == "notebook":
            return self.clip((1 - self.eps) * x + self.eps * grad.sign())
        if self.norm == "linf":
            return self.clip(x + self.eps * grad.sign())
        return self.project(self.step(x, grad, self.eps), x)
