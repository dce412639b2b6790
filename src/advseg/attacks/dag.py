"""DAG: Dense Adversary Generation, the per-pixel margin attack of Xie et al. (2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advseg.attacks.base import _DIVISION_EPS, ATTACKS, Activation, Attack
from advseg.attacks.bim import check_alpha, check_steps


@ATTACKS.register("dag")
class DAG(Attack):
    """Dense Adversary Generation, for sigmoid multi-label and softmax outputs, within a budget.

    Paper: Xie et al., "Adversarial Examples for Semantic Segmentation and Object Detection",
    ICCV 2017, https://arxiv.org/abs/1703.08603 (Algorithm 1).

    Every pixel ``n`` has a label ``l_n`` and an adversarial label ``l'_n``. Each step sums, over
    the pixels still predicted as ``l_n`` (the active set ``T_m``, which only shrinks), the
    gradient of the margin ``f_{l'_n} - f_{l_n}`` of their logits, and takes the normalised step
    ``r'_m = gamma * r_m / ||r_m||_inf``; a pixel that left ``l_n`` never comes back into ``T``.
    The labels (``(B, H, W)`` class maps for softmax, ``(B, K, H, W)`` per-class bits for sigmoid,
    where the margin of a (pixel, class) is ``(2 l' - 1) * z``):

    - untargeted: ``l`` is the true mask ``y``; ``l'`` is ``1 - y`` (sigmoid) or the most likely
      other class at the clean image (softmax; the paper draws it at random);
    - targeted: ``l`` is the clean prediction and ``l'`` the target ``y``; pixels already at the
      target are not in ``T``.

    Unlike the paper, which has no budget (it stops when ``T`` is empty), every step is projected
    into the ``eps`` ball (L-inf; with ``norm="l2"`` the step is normalised by its L2 norm) and the
    valid range. The ``loss`` does not enter the step: DAG's objective is its margin; the loss
    names the records and is what a trace (``record_trace``) reports.

    Args:
        model, loss, eps, norm, valid_range, targeted, activation, seed, loss_kwargs,
            record_trace: see :class:`~advseg.attacks.base.Attack`.
        steps: the paper's maximum number of iterations (default 20).
        gamma: the size of each normalised step; by default ``2.5 * eps / steps`` (the paper:
            0.5 grey levels of 255).

    Shape:
        - x: ``(B, C, H, W)``; y: ``(B, K, H, W)`` masks (or ``(B, H, W)`` indices, softmax);
          output: ``(B, C, H, W)``.

    Example:
        >>> attack = DAG(model, eps=8 / 255, steps=20)
        >>> x_adv = attack(images, masks)
    """

    name = "dag"

    def __init__(self, model: nn.Module, loss="bce", eps: float = 0.009, *, steps: int = 20,
                 gamma: float | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__(model, loss, eps, **kwargs)
        self.steps = check_steps(steps, self.name)
        self.gamma = check_alpha(gamma, 2.5 * self.eps / self.steps, self.name)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            clean = self.logits(x)
        source, target = adversarial_labels(clean, y, self.activation, self.targeted)
        active = predicts(clean, source, self.activation) & (source != target)
        x_adv = x.clone()
        for _ in range(self.steps):
            x_in = x_adv.detach().requires_grad_(True)
            logits = self.logits(x_in)
            self.note(logits, y)
            active = active & predicts(logits.detach(), source, self.activation)  # T_m
            value = (margin(logits, source, target, self.activation) * active).sum()
            (grad,) = torch.autograd.grad(value, x_in)  # r_m, (B, C, H, W)
            x_adv = self.project(x_adv + self.gamma * normalise(grad, self.norm), x)
        return x_adv


def adversarial_labels(
    clean: Tensor, y: Tensor, activation: Activation, targeted: bool
) -> tuple[Tensor, Tensor]:
    """``(l, l')``: the labels pushed down and up, ``(B, K, H, W)`` sigmoid or ``(B, H, W)``.

    Args:
        clean: the clean logits ``(B, K, H, W)``.
        y: the true mask (untargeted) or the target (targeted): ``(B, K, H, W)`` or, for
            softmax, ``(B, H, W)`` class indices.
    """
    if activation == "sigmoid":
        y = (y > 0.5).long()
        if targeted:
            return (clean > 0).long(), y
        return y, 1 - y
    labels = class_map(y, clean)
    if targeted:
        return clean.argmax(1), labels
    others = clean.scatter(1, labels.unsqueeze(1), float("-inf"))  # (B, K, H, W)
    return labels, others.argmax(1)


def class_map(y: Tensor, logits: Tensor) -> Tensor:
    """Class indices ``(B, H, W)`` from indices or one-hot masks ``(B, K, H, W)`` (volumes: with
    the D axis); ``y`` is one-hot where it has the logits' shape."""
    if y.shape == logits.shape:
        return y.argmax(1)
    return y.long()


def predicts(logits: Tensor, labels: Tensor, activation: Activation) -> Tensor:
    """Where the hard prediction equals ``labels``: ``(B, K, H, W)`` sigmoid, ``(B, H, W)``."""
    if activation == "sigmoid":
        return (logits > 0).long() == labels
    return logits.argmax(1) == labels


def margin(logits: Tensor, source: Tensor, target: Tensor, activation: Activation) -> Tensor:
    """``f_{l'} - f_l`` per pixel (softmax, ``(B, H, W)``) or per (pixel, class) (sigmoid).

    A sigmoid output is a two-way softmax with logits ``(0, z)``, so its margin toward ``l'`` is
    ``(2 l' - 1) z`` (defined where ``l' != l``; elsewhere masked out by the caller).
    """
    if activation == "sigmoid":
        return (2 * target - 1).to(logits.dtype) * logits
    up = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    down = logits.gather(1, source.unsqueeze(1)).squeeze(1)
    return up - down


def normalise(grad: Tensor, norm: str) -> Tensor:
    """``grad / ||grad||`` per sample (L-inf or L2); a zero gradient stays zero."""
    flat = grad.flatten(1)
    size = flat.abs().amax(1) if norm == "linf" else flat.norm(p=2, dim=1)  # (B,)
    return grad / (size + _DIVISION_EPS).view(-1, *([1] * (grad.dim() - 1)))
