"""The per-batch engine: attack one batch with one attack per loss, sharing what can be shared.

- The losses of a batch share one clean forward pass. For a single-step attack (FGSM) that pass is
  made with the input requiring grad, so it gives the clean prediction *and*, through one
  backward per loss on the same graph, every loss's input gradient (one vmapped backward,
  ``is_grads_batched``, measured slower on a CPU: ``benchmarks/bench_attack.py``). For iterative
  attacks the clean prediction is one shared ``inference_mode`` forward.
- The eps values of a single-step attack's sweep share that gradient too (:func:`sweep_batch`,
  :func:`sweep_images`): one gradient forward and one backward per loss for every eps.
- The model's parameters require no grad during the attack (only the input gradient is made).
- Each loss's adversarial images go through the model in an ``inference_mode`` forward of the
  batch size the user chose: one forward of all losses' images at once held three times the
  activations and was measured 1.1-1.3x slower on a CPU at 128 px (caches).
- On a GPU, bf16 autocast.

:func:`score_batch` is the same forward for images made elsewhere (transfer, universal
perturbations). Random starts draw from one generator per (batch, loss) (:func:`draw_seed`), so
that a loss's numbers depend neither on the shard nor on the other losses.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from advseg.attacks import Attack, MinimalNorm, frozen, model_logits


@dataclass
class BatchOutput:
    """The tensors of one attacked batch: clean logits, and per loss the images and logits."""

    clean_logits: Tensor  # (B, K, H, W)
    x_adv: list[Tensor]  # L x (B, C, H, W)
    adv_logits: list[Tensor]  # L x (B, K, H, W)
    members: list[list[str] | None] = field(default_factory=list)
    """Per loss, an ensemble attack's winning member per slice (``sea``); None otherwise."""
    min_eps: list[Tensor | None] = field(default_factory=list)
    """Per loss, a minimal-norm attack's smallest breaking norm per slice ``(B,)`` (``alma-prox``,
    ``pdpgd``: :attr:`~advseg.attacks.minimal.MinimalNorm.min_eps`); None otherwise."""
    min_eps_upper: list[Tensor | None] = field(default_factory=list)
    """Per loss, that attack's norm before its refinement (``MinimalNorm.min_eps_upper``)."""
    criteria: list[str] = field(default_factory=list)
    """Per loss, that attack's criterion (``dice<=0.5``); ``""`` otherwise."""


def attack_batch(
    model: nn.Module,
    attacks: Sequence[Attack],
    x: Tensor,
    y: Tensor,
    generators: Sequence[torch.Generator] | None = None,
) -> BatchOutput:
    """Attack one batch with one attack per loss, sharing the clean forward.

    Args:
        model: the model the attacks were built on.
        attacks: one attack per loss, all on ``model`` (same kind, same eps).
        x: images ``(B, C, H, W)``; y: masks ``(B, K, H, W)``.
        generators: one random generator per attack, for random starts; per batch and loss, so
            that a loss's numbers depend neither on the shard nor on the other losses.
    """
    if all(a.single_step and a.model is model for a in attacks):  # not on adaptive views
        return sweep_batch(model, [attacks], x, y)[0]
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    with frozen(model), amp:
        with torch.inference_mode():
            clean_logits = model_logits(model, x).float()
        draws = generators or [None] * len(attacks)
        x_adv = [a(x, y, generator=g) for a, g in zip(attacks, draws, strict=True)]
        with torch.inference_mode():
            adv_logits = [model_logits(model, images).float() for images in x_adv]
    members = [list(a.winners) if getattr(a, "loss_ensemble", False) else None for a in attacks]
    minimal = [isinstance(a, MinimalNorm) for a in attacks]
    min_eps = [a.min_eps.clone() if m else None for a, m in zip(attacks, minimal, strict=True)]
    upper = [a.min_eps_upper.clone() if m else None for a, m in zip(attacks, minimal, strict=True)]
    criteria = [a.criterion_label if m else "" for a, m in zip(attacks, minimal, strict=True)]
    return BatchOutput(clean_logits, x_adv, adv_logits, members, min_eps, upper, criteria)


def sweep_batch(
    model: nn.Module, sweep: Sequence[Sequence[Attack]], x: Tensor, y: Tensor
) -> list[BatchOutput]:
    """Attack one batch at several eps with single-step attacks, at the cost of one gradient.

    A single-step attack's image is a function of the gradient at the clean image, which no eps
    changes: :func:`sweep_images` makes every (eps, loss)'s images from one forward with input
    gradient and one backward per loss; each (eps, loss) then costs one ``inference_mode``
    forward of its images (they differ, so these forwards cannot be shared).

    Args:
        model: the model the attacks were built on.
        sweep: per eps, one single-step attack per loss (same kind and options; losses are told
            apart by name, and an eps may have its own subset of them).
        x: images ``(B, C, H, W)``; y: masks ``(B, K, H, W)``.

    Returns:
        One :class:`BatchOutput` per eps, each exactly what :func:`attack_batch` gives for it.
    """
    clean_logits, images = sweep_images(model, sweep, x, y)
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    outputs = []
    with frozen(model), amp, torch.inference_mode():
        for x_adv in images:
            adv_logits = [model_logits(model, batch).float() for batch in x_adv]
            outputs.append(BatchOutput(clean_logits, x_adv, adv_logits))
    return outputs


def sweep_images(
    model: nn.Module, sweep: Sequence[Sequence[Attack]], x: Tensor, y: Tensor
) -> tuple[Tensor, list[list[Tensor]]]:
    """The clean logits ``(B, K, H, W)`` and, per eps and loss, the adversarial images.

    One forward with input gradient gives the clean prediction and, through one backward per
    distinct loss (by name) on its graph, every loss's gradient; each (eps, loss)'s images are
    then its attack's ``apply_gradient``. See :func:`sweep_batch` for the arguments.
    """
    if not all(a.single_step for attacks in sweep for a in attacks):
        raise ValueError("sweep_images: every attack must be single-step (apply_gradient)")
    by_loss = {a.loss.name: a for attacks in sweep for a in attacks}  # one gradient per loss
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    with frozen(model), amp, torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = model_logits(model, x_in).float()
        grads = {}
        for i, (name, attack) in enumerate(by_loss.items()):
            objective = attack.objective(logits, y).sum()
            last = i == len(by_loss) - 1
            grads[name] = torch.autograd.grad(objective, x_in, retain_graph=not last)[0]
    images = [[a.apply_gradient(x, grads[a.loss.name]) for a in attacks] for attacks in sweep]
    return logits.detach(), images


def draw_seed(attack: Attack, batch_number: int) -> int:
    """The seed of one (batch, loss)'s random starts: stable across runs, shards and loss sets."""
    return zlib.crc32(f"{attack.seed}/{batch_number}/{attack.loss.name}".encode())


def start_generators(attacks: Sequence[Attack], batch_number: int) -> list[torch.Generator]:
    """One generator per loss for a batch's random starts (see :func:`draw_seed`)."""
    device = next(attacks[0].model.parameters()).device
    return [torch.Generator(device=device).manual_seed(draw_seed(a, batch_number)) for a in attacks]


def score_batch(model: nn.Module, x: Tensor, x_adv: Sequence[Tensor]) -> BatchOutput:
    """Score given adversarial images on ``model``: the clean and each loss's forward."""
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    with frozen(model), amp, torch.inference_mode():
        clean_logits = model_logits(model, x).float()
        adv_logits = [model_logits(model, images.to(x.device)).float() for images in x_adv]
    return BatchOutput(clean_logits, [images.to(x.device) for images in x_adv], adv_logits)
