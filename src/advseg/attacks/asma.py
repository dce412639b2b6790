"""ASMA: the Adaptive Segmentation Mask Attack of Ozbulak et al. (2019), within a budget."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
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
    that move the last, hardest pixels. The IoU is adv-lib's (``adv_lib.attacks.segmentation.
    asma``, ``iou_masks``): the mean over every class, background included, of
    ``|pred = c & Y^A = c| / (|pred = c| + |Y^A = c| - |both| + 1e-6)`` (a class absent from both
    counts 0); sigmoid outputs: over each class's two values.

    Returned, as adv-lib returns it: the iterate with the smallest ``||x_n - x_0||_2`` among those
    that make at least ``adv_threshold`` of the elements adversarial (at the target when
    targeted, off the true mask otherwise), or, while none has, the one with the largest such
    share; an iterate is scored before its step, so the last update is not (adv-lib's loop).

    Sigmoid multi-label outputs are read as a two-way softmax per (pixel, class) with logits
    ``(-z / 2, z / 2)``, so the target's logit is ``(2 t - 1) z / 2``. Targeted (the paper): ``y``
    is the target mask ``Y^A``. Untargeted: the target is ``1 - y`` (sigmoid) or the most likely
    other class at the clean image (softmax), as in :class:`~advseg.attacks.dag.DAG`.

    Departures from adv-lib, each tested (``tests/test_dag_asma.py``): the IoU of the multiplier
    is each sample's own, where adv-lib pools the batch (a slice's attack must not depend on the
    slices batched with it; with one slice per batch the two are the same, step for step); every
    step is projected into the ``eps`` ball and the valid range (the paper and adv-lib only clip
    to the range: advseg compares attacks at a budget); by default (``scale="unit"``) the
    gradient is normalised per sample (L-inf or L2 norm) so that ``tau`` and ``beta`` are in
    image units, where the raw gradient (``scale="paper"``, with adv-lib's ``tau=1e-7,
    beta=1e-6``) has a size that depends on the model and the image size; untargeted, the target
    is another class (adv-lib's untargeted mode raises the true class's logit). The ``loss`` does
    not enter the step (it names the records and is what a trace reports).

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs,
            record_trace: see :class:`~advseg.attacks.base.Attack`.
        steps: iterations (default 20; the paper ran up to 2500 without a budget).
        tau: the base multiplier; by default ``1.25 * eps / steps`` (``scale="unit"``) or
            ``1e-7`` (``scale="paper"``).
        beta: the multiplier's growth with the IoU; by default ``1.25 * eps / steps``, or
            ``1e-6`` (``scale="paper"``).
        scale: ``unit`` (normalised gradient) or ``paper`` (the raw gradient).
        adv_threshold: the share of adversarial elements that makes an iterate a success
            (default 0.99, adv-lib's).

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
                 adv_threshold: float = 0.99, **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        if scale not in ("unit", "paper"):
            raise UserError(f"asma: scale {scale!r} is not 'unit' or 'paper'")
        self.steps = check_steps(steps, self.name)
        unit = 1.25 * self.eps / self.steps
        self.tau = check_alpha(tau, unit if scale == "unit" else 1e-7, self.name)
        self.beta = check_alpha(beta, unit if scale == "unit" else 1e-6, self.name)
        self.scale: Scale = scale
        if (
            isinstance(adv_threshold, bool)
            or not isinstance(adv_threshold, (int, float))
            or not (0 < adv_threshold <= 1)
        ):
            raise UserError(f"asma: adv_threshold must be in (0, 1], got {adv_threshold!r}")
        self.adv_threshold = float(adv_threshold)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            clean = self.logits(x)
        truth, target = adversarial_labels(clean, y, self.activation, self.targeted)
        if self.targeted:
            truth = target  # success: at the target
        best = BestAdversarial(x, self.adv_threshold)
        x_adv = x.clone()
        for n in range(self.steps):
            x_in = x_adv.detach().requires_grad_(True)
            logits = self.logits(x_in)
            self.note(logits, y)
            at_truth = predicts(logits.detach(), truth, self.activation)
            best.update(x_adv, at_truth if self.targeted else ~at_truth)
            missing = ~predicts(logits.detach(), target, self.activation)  # the adaptive mask
            value = (target_logit(logits, target, self.activation) * missing).sum()
            value = value - ((x_in - x) ** 2).sum()  # (the paper: minus ||x_n - x_0||_2^2)
            (grad,) = torch.autograd.grad(value, x_in)  # (B, C, H, W)
            if self.scale == "unit":
                grad = normalise(grad, self.norm)
            iou = target_iou(logits.detach(), target, self.activation)  # (B,)
            multiplier = self.tau + self.beta * (iou if n else torch.zeros_like(iou))  # tau_n
            x_adv = self.project(x_adv + multiplier.view(-1, *[1] * (x.dim() - 1)) * grad, x)
        return best.x


class BestAdversarial:
    """adv-lib's choice of the returned iterate (``asma``'s trackers), per sample: the smallest
    squared L2 distance among the successful iterates (a share of adversarial elements of at
    least ``threshold``), or, before any success, the largest share (ties: the later iterate)."""

    def __init__(self, x: Tensor, threshold: float) -> None:
        self.x0, self.threshold = x, threshold
        self.x = x.clone()
        b = x.shape[0]
        self.dist = torch.full((b,), float("inf"), device=x.device)
        self.share = torch.zeros(b, device=x.device)
        self.found = torch.zeros(b, dtype=torch.bool, device=x.device)

    def update(self, x_adv: Tensor, adversarial: Tensor) -> None:
        """Score ``x_adv`` whose adversarial elements are ``adversarial`` (bool, batch first)."""
        share = adversarial.flatten(1).float().mean(1)  # (B,)
        dist = (x_adv - self.x0).flatten(1).square().sum(1)
        success = share >= self.threshold
        better = (success & (dist <= self.dist)) | (
            ~self.found & (share >= self.share.clamp(max=self.threshold))
        )
        self.found |= success
        self.dist = torch.where(better, dist, self.dist)
        self.share = torch.where(better, share, self.share)
        self.x = torch.where(better.view(-1, *[1] * (x_adv.dim() - 1)), x_adv.detach(), self.x)


def target_logit(logits: Tensor, target: Tensor, activation: Activation) -> Tensor:
    """The logit of the target class: ``(B, H, W)`` softmax, ``(B, K, H, W)`` sigmoid."""
    if activation == "sigmoid":
        return (2 * target - 1).to(logits.dtype) * logits / 2
    return logits.gather(1, target.unsqueeze(1)).squeeze(1)


def target_iou(logits: Tensor, target: Tensor, activation: Activation) -> Tensor:
    """Per sample ``(B,)``: adv-lib's mean IoU of the prediction and the target over every class.

    Softmax: the classes ``0..K-1`` of ``target`` ``(B, H, W)``, background included; sigmoid:
    the two values of each class's bit (``2 K`` classes). A class absent from both counts 0
    (adv-lib's ``1e-6`` in the denominator).
    """
    if activation == "sigmoid":
        shift = 2 * torch.arange(logits.shape[1], device=logits.device).view(
            1, -1, *[1] * (logits.dim() - 2)
        )
        pred, goal, classes = (
            (logits > 0).long() + shift,
            target.long() + shift,
            2 * logits.shape[1],
        )
    else:
        pred, goal, classes = logits.argmax(1), target.long(), logits.shape[1]
    pred = F.one_hot(pred.flatten(1), classes).bool()  # (B, N, classes)
    goal = F.one_hot(goal.flatten(1), classes).bool()
    inter = (pred & goal).sum(1)  # (B, classes)
    union = pred.sum(1) + goal.sum(1) - inter
    return (inter / (union + 1e-6)).mean(1).to(logits.dtype)
