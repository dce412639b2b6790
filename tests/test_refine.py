"""The minimal-norm attacks' refinement (an APGD bisection below the norm the search found): sound
(never above the search's norm, never below the exact minimal norm, its image verified to break
the sample within its norm), and it makes the robustness curve agree with a fixed-eps sweep."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from advseg.attacks import create_attack
from advseg.attacks.metric import sample_dice
from advseg.attacks.refine import Refinement, parse_refine
from advseg.errors import UserError
from test_minimal_norm import Bands, band_batch, exact_minimal_norms, norms  # tests/ on sys.path
from tiny_models import blobs, fit, tiny_net


def test_refine_option_is_parsed_and_named():
    assert parse_refine(True, "a") == parse_refine("on", "a") == Refinement(6, 20)
    assert parse_refine(False, "a") is parse_refine("off", "a") is None
    assert parse_refine("8x30", "a") == Refinement(8, 30)
    for bad in ("8x0", "x20", "often", 3):
        with pytest.raises(UserError, match="refine must be on, off or ROUNDSxSTEPS"):
            parse_refine(bad, "alma-prox")
    model = Bands().requires_grad_(False)
    assert create_attack("pdpgd", model, steps=50).setting == "steps=50 refine=apgd-bisection 6x20"
    off = create_attack("alma-prox", model, steps=50, refine=False)
    assert off.setting == "steps=50 refine=off"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_refined_norm_is_close_to_the_exact_one_where_the_search_overshoots(norm):
    """PDPGD at its default primal step overshoots the exact minimal norm of the band model ~4x
    (L-inf; ``test_minimal_norm``): the bisection brings it within 10% (L-inf), never below the
    exact value (nothing smaller exists) nor above the search's own. (L2: APGD's cross-entropy
    spreads the perturbation over every pixel where the exact one spends it on the easiest 90%,
    so there it only has to be sound.)"""
    model = Bands(mix=0.0).requires_grad_(False)
    x, _, onehot = band_batch(model, n=4, size=10)
    linf, l2 = exact_minimal_norms(model, x, 0.9)
    exact = torch.as_tensor(linf if norm == "linf" else l2)
    attack = create_attack("pdpgd", model, "ce", None, norm=norm, activation="softmax",
                           threshold=0.9, steps=100, refine="8x20")  # fmt: skip
    images = attack(x, onehot)
    upper, found = attack.min_eps_upper, attack.min_eps
    assert torch.isfinite(upper).all() and (found <= upper).all()
    assert (found >= exact * (1 - 1e-3)).all()
    if norm == "linf":
        assert (upper >= 2 * exact).all()  # the search alone overshoots
        assert (found <= exact * 1.1).all()

    assert torch.allclose(norms(images - x, norm), found, rtol=1e-5)
    with torch.no_grad():
        wrong = (model(images).argmax(1) != onehot.argmax(1)).float().flatten(1).mean(1)
    assert (wrong >= 0.9).all()  # the image at the refined norm still breaks the sample


@pytest.fixture(scope="module")
def trained():
    model = fit(tiny_net(), *blobs(64, seed=1), steps=60)
    x, y = blobs(8, seed=2)
    return model, x, y


def test_refined_image_breaks_the_sample_within_its_norm_and_budget(trained):
    model, x, y = trained
    free = create_attack("pdpgd", model, "bce", None, criterion="dice", steps=100)
    images = free(x, y)
    found = torch.isfinite(free.min_eps)
    assert found.sum() >= 6 and (free.min_eps[found] < free.min_eps_upper[found]).all()
    with torch.no_grad():
        dice = sample_dice(model(images), y, "sigmoid")
    assert (dice[found] <= 0.5).all()  # re-scored as the records score it
    assert torch.allclose(norms(images - x, "linf")[found], free.min_eps[found])
    assert images.min() >= 0 and images.max() <= 1
    eps = float(free.min_eps[found].median())
    capped = create_attack("pdpgd", model, "bce", eps, criterion="dice", steps=100)
    capped_images = capped(x, y)
    assert torch.equal(capped.min_eps, free.min_eps)  # the same search and bisection
    assert (norms(capped_images - x, "linf") <= eps + 1e-6).all()


def test_refined_curve_agrees_with_a_fixed_eps_sweep(trained):
    """On a trained net the curve of the search alone lies far right of an APGD sweep (the
    search stops above what APGD needs); the refined one is within one slice of it at every eps."""
    model, x, y = trained
    attack = create_attack("pdpgd", model, "bce", None, criterion="dice", steps=100)
    attack(x, y)
    refined, upper = attack.min_eps.numpy(), attack.min_eps_upper.numpy()
    grid = np.geomspace(np.min(refined) / 2, np.max(upper[np.isfinite(upper)]), 7)
    sweep = []
    for eps in grid:
        images = create_attack("apgd", model, "bce", float(eps), steps=50)(x, y)
        with torch.no_grad():
            sweep.append(float((sample_dice(model(images), y, "sigmoid") <= 0.5).float().mean()))
    sweep = np.array(sweep)
    refined_curve = np.array([(refined <= e).mean() for e in grid])
    upper_curve = np.array([(upper <= e).mean() for e in grid])
    assert np.abs(refined_curve - sweep).max() <= 1 / len(x)
    assert np.abs(upper_curve - sweep).max() >= 3 / len(x)  # what the refinement fixes


class Blind(nn.Module):
    """Logits that ignore the image: no perturbation breaks anything."""

    def forward(self, x):
        return torch.full((len(x), 1, *x.shape[2:]), 5.0) + 0 * x


def test_a_sample_the_search_missed_is_tried_at_the_budget(trained):
    model, x, y = trained
    attack = create_attack("alma-prox", model, "bce", 1.0, criterion="dice", steps=5)
    images = attack(x, y)
    assert torch.isinf(attack.min_eps_upper).all()  # 5 steps find nothing
    found = torch.isfinite(attack.min_eps)
    assert found.sum() >= 6  # APGD at eps 1, then the bisection below its norm
    with torch.no_grad():
        dice = sample_dice(model(images), y, "sigmoid")
    assert (dice[found] <= 0.5).all()
    assert torch.allclose(norms(images - x, "linf")[found], attack.min_eps[found])
    without = create_attack("alma-prox", model, "bce", None, criterion="dice", steps=5)
    without(x, y)
    assert torch.isinf(without.min_eps).all()  # no budget to try


def test_never_broken_stays_inf_and_clean_broken_stays_zero():
    x = torch.rand(3, 1, 8, 8)
    y = torch.ones(3, 1, 8, 8)
    y[2] = 0  # predicted everywhere, empty in the mask: Dice 0, broken clean
    attack = create_attack("alma-prox", Blind(), "bce", 1.0, criterion="dice", steps=20)
    attack(x, y)
    assert torch.isinf(attack.min_eps[:2]).all() and torch.isinf(attack.min_eps_upper[:2]).all()
    assert attack.min_eps[2] == 0 and attack.min_eps_upper[2] == 0
    assert not math.isnan(float(attack.min_eps.sum()))


def test_apgd_with_a_radius_per_sample_equals_one_run_per_radius(trained):
    """The bisection runs the whole batch at once, each sample in its own ball: the same as
    running each sample alone at its radius."""
    from advseg.attacks.apgd import APGD

    model, x, y = trained
    x, y = x[:3], y[:3]
    radii = torch.tensor([0.01, 0.05, 0.2])
    apgd = APGD(model, "bce", 0.0, steps=10)
    generator = torch.Generator().manual_seed(0)
    start = (x + 0.3 * (torch.rand(x.shape, generator=generator) - 0.5)).clamp(0, 1)
    start = x + (start - x).clamp(-radii.view(-1, 1, 1, 1), radii.view(-1, 1, 1, 1))
    together, _ = apgd.run(x, y, radii.view(-1, 1, 1, 1), 10, start, generator)
    for i, radius in enumerate(radii.tolist()):
        alone, _ = apgd.run(x[i : i + 1], y[i : i + 1], radius, 10, start[i : i + 1], generator)
        assert torch.allclose(together[i : i + 1], alone, atol=1e-6)
        assert (together[i] - x[i]).abs().max() <= radius + 1e-6
