"""Randomized-smoothing certification of a segmentation model (SegCertify).

Fischer, Baader & Vechev, ICML 2021, "Scalable Certified Segmentation via Randomized Smoothing",
https://arxiv.org/abs/2107.00228; the single-decision bound is Cohen, Rosenfeld & Kolter, ICML
2019, https://arxiv.org/abs/1902.02918.

The smoothed model decides each (pixel, class) by majority under Gaussian noise of standard
deviation ``sigma`` added to the whole image. Here the outputs are multi-label sigmoids, so each
(pixel, class) is one binary decision (organ / no organ; a softmax model's argmax gives the same
binary decisions). For one image ``x`` ``(C, H, W)``:

1. selection: ``n0`` noisy forwards; each (pixel, class) takes the majority decision ``c``;
2. estimation: ``n`` fresh noisy forwards; ``k`` = how often each (pixel, class) decided ``c``;
3. for an L2 radius ``R`` the threshold is ``tau = Phi(R / sigma)``: a decision whose true
   probability ``p`` exceeds ``tau`` cannot change under any perturbation of L2 norm below ``R``
   (Cohen et al., Theorem 1). The one-sided binomial test of ``p <= tau`` gives a p-value per
   (pixel, class); the Holm-Bonferroni procedure over all of the image's (pixel, class) tests
   keeps the family-wise error at ``alpha``: the rejected ones are *certified*, the others
   *abstain*. ``R = 0`` (``tau = 1/2``) certifies the majority decision itself.

Per slice and class, the certified Dice at ``R`` counts every abstained pixel as wrong (a
foreground pixel that abstains is a false negative, a background one a false positive). The
per-pixel radius ``sigma * Phi^-1(p_lower)`` with the Clopper-Pearson lower bound is given too
(:func:`certified_radius`, Bonferroni-corrected in :attr:`Certificate.radius`).

Running it over a split's slices, its records and files are :mod:`advseg.evaluate.certify`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from advseg.attacks import frozen, model_logits
from advseg.errors import UserError
from advseg.labels import class_prediction
from advseg.limits import NOISE_MAX, check_count, check_seed


@dataclass
class SmoothingConfig:
    """Settings of the certification.

    Attributes:
        sigma: standard deviation of the Gaussian noise (image units, range [0, 1]).
        n0: noisy forwards that select each decision.
        n: noisy forwards that estimate its probability.
        alpha: family-wise error rate per image (Holm-Bonferroni over its pixel decisions).
        radii: the L2 radii at which certified Dice is recorded.
        samples_per_forward: noisy copies per forward pass (memory vs speed).
        seed: seeds the noise (per batch of slices, so shards draw what one process draws).
        activation: ``sigmoid`` (multi-label) or ``softmax``: how logits become decisions
            (:func:`advseg.labels.class_prediction`: per class, a softmax model's background
            dropped, so each (pixel, class) decision is the binary event "the base model
            predicts this class here", certified as for sigmoid). :func:`certify_checkpoint`
            takes the checkpoint's own.
    """

    sigma: float = 0.25
    n0: int = 16
    n: int = 128
    alpha: float = 0.001
    radii: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2])
    samples_per_forward: int = 32
    seed: int = 0
    activation: str = "sigmoid"

    def __post_init__(self) -> None:
        if not math.isfinite(self.sigma) or self.sigma <= 0:
            raise UserError(f"sigma: must be a number > 0, got {self.sigma}")
        for name in ("n0", "n", "samples_per_forward"):
            check_count(getattr(self, name), name, 1, NOISE_MAX)
        check_seed(self.seed, "seed")
        if not 0 < self.alpha < 1:
            raise UserError(f"alpha: must be in (0, 1), got {self.alpha}")
        if not self.radii:
            raise UserError("radii: at least one radius is needed")
        for radius in self.radii:
            if not math.isfinite(radius) or radius < 0:
                raise UserError(f"radii: {radius} is not a radius >= 0")
        if self.activation not in ("sigmoid", "softmax"):
            raise UserError(f"activation: {self.activation!r} is not sigmoid or softmax")

    @property
    def label(self) -> str:
        """The records' ``loss`` column, e.g. ``sigma=0.25``."""
        return f"sigma={self.sigma:g}"


def binomial_pvalue(counts: np.ndarray, n: int, tau: float) -> np.ndarray:
    """One-sided p-values of ``p <= tau`` having produced ``counts`` successes in ``n`` trials:
    ``P(X >= counts)`` for ``X ~ Binomial(n, tau)``."""
    return stats.binom.sf(np.asarray(counts) - 1, n, tau)


def holm_bonferroni(pvalues: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's step-down procedure (Holm 1979): which null hypotheses are rejected, same shape.

    The p-values are sorted ascending; the ``i``-th (0-based) of ``m`` is rejected while
    ``p_(i) <= alpha / (m - i)``, and the first one that is not stops the procedure.
    The family-wise error rate stays at most ``alpha``.
    """
    flat = np.asarray(pvalues, dtype=np.float64).ravel()
    m = flat.size
    order = np.argsort(flat, kind="stable")
    passes = flat[order] <= alpha / (m - np.arange(m))
    stop = m if passes.all() else int(np.argmin(passes))  # first failure
    rejected = np.zeros(m, dtype=bool)
    rejected[order[:stop]] = True
    return rejected.reshape(np.shape(pvalues))


def clopper_pearson_lower(counts: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """The one-sided ``1 - alpha`` Clopper-Pearson lower bound of a binomial proportion."""
    counts = np.asarray(counts)
    bound = stats.beta.ppf(alpha, np.maximum(counts, 1), n - counts + 1)
    return np.where(counts > 0, bound, 0.0)


def certified_radius(p_lower: np.ndarray, sigma: float) -> np.ndarray:
    """``sigma * Phi^-1(p_lower)`` (Cohen et al., Theorem 1); 0 where ``p_lower <= 1/2``
    (no certificate: the smoothed decision abstains)."""
    radius = sigma * stats.norm.ppf(np.asarray(p_lower, dtype=np.float64))
    return np.where(np.asarray(p_lower) > 0.5, radius, 0.0)


def noisy_votes(
    model: nn.Module,
    x: Tensor,
    sigma: float,
    samples: int,
    generator: torch.Generator,
    *,
    per_forward: int = 32,
    activation: str = "sigmoid",
) -> Tensor:
    """How often each (pixel, class) is predicted under ``samples`` draws of noise.

    Args:
        x: images ``(B, C, H, W)``.

    Returns:
        ``(B, K, H, W)`` int64 counts in ``0..samples``.
    """
    b = x.shape[0]
    votes = None
    done = 0
    with frozen(model), torch.inference_mode():
        while done < samples:
            s = min(per_forward, samples - done)
            copies = x.repeat(s, 1, 1, 1)  # (s * B, C, H, W), sample-major
            noise = torch.randn(copies.shape, generator=generator, device=x.device)
            logits = model_logits(model, copies + sigma * noise.to(x.dtype)).float()
            decided = class_prediction(logits, activation)  # (s * B, K, H, W)
            decided = decided.view(s, b, *decided.shape[1:])
            counts = decided.sum(0, dtype=torch.int64)  # (B, K, H, W)
            votes = counts if votes is None else votes + counts
            done += s
    return votes


@dataclass
class Certificate:
    """The smoothed decisions of a batch and their estimation counts.

    Attributes:
        decision: ``(B, K, H, W)`` bool, the majority decision chosen on the ``n0`` draws.
        counts: ``(B, K, H, W)`` int, how often the ``n`` estimation draws agreed with it.
        n, sigma, alpha: the estimation draws, the noise and the error rate.
    """

    decision: Tensor
    counts: Tensor
    n: int
    sigma: float
    alpha: float

    def certified(self, radius: float) -> np.ndarray:
        """``(B, K, H, W)`` bool: the decisions certified at L2 ``radius`` (Holm per image)."""
        tau = float(stats.norm.cdf(radius / self.sigma))
        pvalues = binomial_pvalue(self.counts.cpu().numpy(), self.n, tau)
        return np.stack([holm_bonferroni(p, self.alpha) for p in pvalues])

    @property
    def radius(self) -> np.ndarray:
        """``(B, K, H, W)``: each decision's certified radius, with Clopper-Pearson bounds at
        ``alpha / (K H W)`` (Bonferroni), so that all of an image's radii hold together; 0 means
        no certificate."""
        counts = self.counts.cpu().numpy()
        m = int(np.prod(counts.shape[1:]))
        return certified_radius(clopper_pearson_lower(counts, self.n, self.alpha / m), self.sigma)


def certify_batch(
    model: nn.Module, x: Tensor, config: SmoothingConfig, generator: torch.Generator
) -> Certificate:
    """SegCertify on a batch of images ``(B, C, H, W)``: selection, then estimation draws."""
    draw = dict(per_forward=config.samples_per_forward, activation=config.activation)
    selection = noisy_votes(model, x, config.sigma, config.n0, generator, **draw)
    decision = 2 * selection > config.n0  # (B, K, H, W); a tie decides "no organ"
    on = noisy_votes(model, x, config.sigma, config.n, generator, **draw)
    counts = torch.where(decision, on, config.n - on)
    return Certificate(decision, counts, config.n, config.sigma, config.alpha)
