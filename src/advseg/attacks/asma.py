"""ASMA: the Adaptive Segmentation Mask Attack of Ozbulak et al. (2019), within a budget."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from advseg.attacks.base import ATTACKS, Activation, Attack
from advseg.attacks.bim import check_alpha, check_steps
from advseg.attacks.dag import adversarial_labels, normalise, predicts
from advseg.errors import UserError

Scale = Literal["unit", "paper"]


@ATTACKS.register("asma")
class ASMA(Attack):
    """Adaptive Segmentation Mask Attack: reach a target mask, with an adaptive step multiplier.

    Paper: Ozbulak et al., "Impact of Adversarial Examples on Deep Learning Models for Biomedical
    Image Segmentation", MICCAI 2019, https://arxiv.org/abs/1907.13124 (equations 2-4).

    Each step ascends ``sum_c g(x_n)_c * 1{Y^A = c} * 1{argmax g(x_n) != c} - ||x_n - x_0||_2^2``:
    the target class's logit, only on the pixels not yet at the target (the adaptive mask, which
    shrinks as the attack succeeds), minus the squared distance to the clean image. The step is
    ``x_{n+1} = x_n + tau_n * grad`` with the multiplier ``tau_n = tau + beta * IoU(pred(x_n),
    Y^A)`` (``tau_0 = tau``): the closer the prediction is to the target, the larger the steps
    that move the last, hardest pixels. The IoU is per sample, over the target's foreground
    (class 0 is background for softmax; every (pixel, class) bit for sigmoid; 1 when both are
    empty).

    Sigmoid multi-label outputs are read as a two-way softmax per (pixel, class) with logits
    ``(-z / 2, z / 2)``, so the target's logit is ``(2 t - 1) z / 2``. Targeted (the paper): ``y``
    is the target mask ``Y^A``. Untargeted: the target is ``1 - y`` (sigmoid) or the most likely
    other class at the clean image (softmax), as in :class:`~advseg.attacks.dag.DAG`.

    Unlike the paper, every step is projected into the ``eps`` ball and the valid range (the
    paper only clips to the range), and by default (``scale="unit"``) the gradient is normalised
    per sample (L-inf or L2 norm) so that ``tau`` and ``beta`` are in image units; the paper's raw
    gradient (``scale="paper"``; its code used ``tau=1e-7, beta=1e-6``) has a size that depends
    on the model and the image size. The ``loss`` does not enter the step (it names the records
    and is what a trace reports).

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs,
            record_trace: see :class:`~advseg.attacks.base.Attack`.
        steps: iterations (default 20; the paper ran up to 2500 without a budget).
        tau: the base multiplier; by default ``1.25 * eps / steps`` (``scale="unit"``) or
            ``1e-7`` (``scale="paper"``).
        beta: the multiplier's growth with the IoU; by default ``1.25 * eps / steps``, or
            ``1e-6`` (``scale="paper"``).
        scale: ``unit`` (normalised gradient) or ``paper`` (the raw gradient).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)`` masks (or ``(B, H, W)`` indices, softmax);
          output: ``(B, C, H, W)``.

    Example:
        >>> target = masks.clone(); target[:, 2] = 0  # make the stomach vanish
        >>> attack = ASMA(model, eps=8 / 255, steps=20, targeted=True)
        >>> x_adv = attack(images, target)
    """

    name = "asma"

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *, steps: int = 20,
                 tau: float | None = None, beta: float | None = None, scale: Scale = "unit",
                 **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        if scale not in ("unit", "paper"):
            raise UserError(f"asma: scale {scale!r} is not 'unit' or 'paper'")
        self.steps = check_steps(steps, self.name)
        unit = 1.25 * self.eps / self.steps
        self.tau = check_alpha(tau, unit if scale == "unit" else 1e-7, self.name)
        self.beta = check_alpha(beta, unit if scale == "unit" else 1e-6, self.name)
        self.scale: Scale = scale

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            clean = self.logits(x)
        _, target = adversarial_labels(clean, y, self.activation, self.targeted)
        x_adv = x.clone()
        for n in range(self.steps):
            x_in = x_adv.detach().requires_grad_(True)
            logits = self.logits(x_in)
            self.note(logits, y)
            missing = ~predicts(logits.detach(), target, self.activation)  # the adaptive mask
            value = (target_logit(logits, target, self.activation) * missing).sum()
            value = value - ((x_in - x) ** 2).sum()  # (the paper: minus ||x_n - x_0||_2^2)
            (grad,) = torch.autograd.grad(value, x_in)  # (B, C, H, W)
            if self.scale == "unit":
                grad = normalise(grad, self.norm)
            iou = target_iou(logits.detach(), target, self.activation)  # (B,)
            multiplier = self.tau + self.beta * (iou if n else torch.zeros_like(iou))  # tau_n
            x_adv = self.project(x_adv + multiplier.view(-1, 1, 1, 1) * grad, x)
        return x_adv


def target_logit(logits: Tensor, target: Tensor, activation: Activation) -> Tensor:
    """The logit of the target class: ``(B, H, W)`` softmax, ``(B, K, H, W)`` sigmoid."""
    if activation == "sigmoid":
        return (2 * target - 1).to(logits.dtype) * logits / 2
    return logits.gather(1, target.unsqueeze(1)).squeeze(1)


def target_iou(logits: Tensor, target: Tensor, activation: Activation) -> Tensor:
    """Per sample ``(B,)``: IoU of the prediction's and the target's foreground (1 if both empty).

    Foreground: every set (pixel, class) bit (sigmoid), every pixel of a class other than 0
    (softmax).
    """
    if activation == "sigmoid":
        pred, goal = logits > 0, target.bool()
    else:
        pred, goal = logits.argmax(1) != 0, target != 0
    inter = (pred & goal).flatten(1).sum(1).double()
    union = (pred | goal).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).to(
        logits.dtype
    )
