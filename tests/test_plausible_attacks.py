"""The plausible attacks keep their own bounds, on slices and volumes, and are what they say:
biasfield a polynomial gain (checked by a least-squares fit), elastic a bilinear warp of a
control grid (checked against scipy), gamma a power curve (checked from the formula)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from torch import nn

from advseg.attacks import attack_options, create_attack
from advseg.errors import UserError
from advseg.losses import create_loss
from tiny_models import blobs, fit, tiny_net  # tests/ is on sys.path

PLAUSIBLE = ["biasfield", "elastic", "gamma"]


def tiny_net3d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))


def _inputs(volume: bool, batch: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if volume:
        x = torch.rand(batch, 1, 4, size, size, generator=g)
        y = (torch.rand(batch, 2, 4, size, size, generator=g) > 0.5).float()
        return x, y, tiny_net3d(seed % 5)
    x = torch.rand(batch, 3, size, size, generator=g)
    y = (torch.rand(batch, 3, size, size, generator=g) > 0.5).float()
    return x, y, tiny_net(seed=seed % 7)


def _bias_ok(x, x_adv, attack, eps):
    """Unclipped pixels: ``|log(x_adv / x)| <= eps``, and the gain is exp(a cubic)."""
    inside = (x > 0.05) & (x_adv > 0) & (x_adv < 1)
    gain = torch.log(x_adv[inside] / x[inside])
    assert gain.abs().max() <= eps + 1e-4
    assert (attack.size(x, attack.theta) <= eps * (1 + 1e-5)).all()
    # the log gain of the first sample is a polynomial of degree <= 3: a fit leaves no residual
    first = torch.log(x_adv[0, 0] / x[0, 0]).numpy()
    keep = (inside[0, 0]).numpy()
    coords = np.meshgrid(*[np.linspace(-1, 1, n) for n in first.shape], indexing="ij")
    columns = [
        np.prod([c**p for c, p in zip(coords, powers, strict=True)], axis=0)[keep]
        for powers in itertools.product(range(4), repeat=first.ndim)
        if sum(powers) <= 3
    ]
    solution, *_ = np.linalg.lstsq(np.stack(columns, 1), first[keep], rcond=None)
    residual = np.stack(columns, 1) @ solution - first[keep]
    assert np.abs(residual).max() < 1e-4


def _elastic_ok(x, x_adv, attack, eps):
    control = attack.theta  # (B, n, g, g[, g]) pixels
    assert control.abs().max() <= eps + 1e-6
    shape = x.shape[2:]
    for b in range(len(x)):
        # scipy: the control grid interpolated linearly to every pixel, then the image sampled
        # there (order 1, the border repeated)
        at = np.meshgrid(*[np.linspace(0, attack.grid - 1, n) for n in shape], indexing="ij")
        dense = [
            ndimage.map_coordinates(control[b, i].numpy(), at, order=1) for i in range(len(shape))
        ]
        assert max(np.abs(d).max() for d in dense) <= eps + 1e-6
        base = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
        points = [p + d for p, d in zip(base, dense, strict=True)]
        for c in range(x.shape[1]):
            expected = ndimage.map_coordinates(x[b, c].numpy(), points, order=1, mode="nearest")
            np.testing.assert_allclose(x_adv[b, c].numpy(), expected, atol=1e-4)


def _gamma_ok(x, x_adv, attack, eps):
    theta = attack.theta
    assert theta.abs().max() <= eps + 1e-6
    expected = x ** torch.exp(theta).view(-1, *([1] * (x.dim() - 1)))
    torch.testing.assert_close(x_adv, expected, atol=1e-5, rtol=0)


CHECKS = {"biasfield": _bias_ok, "elastic": _elastic_ok, "gamma": _gamma_ok}


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(PLAUSIBLE),
    volume=st.booleans(),
    eps=st.floats(0.01, 0.6),
    steps=st.integers(0, 3),
    batch=st.integers(1, 2),
    size=st.integers(5, 10),
    seed=st.integers(0, 2**16),
)
def test_each_stays_in_its_bound_and_is_what_it_says(name, volume, eps, steps, batch, size, seed):
    x, y, model = _inputs(volume, batch, size, seed)
    eps = eps * 5 if name == "elastic" else eps  # pixels: up to 3
    attack = create_attack(name, model, "bce", eps, steps=steps, seed=seed)
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    CHECKS[name](x, x_adv, attack, eps)
    if steps == 0:  # the random start lies on the bound
        assert attack.size(x, attack.theta).min() >= eps * (1 - 1e-4)


@pytest.mark.parametrize("name", PLAUSIBLE)
def test_the_same_seed_gives_the_same_images(name):
    x, y, model = _inputs(False, 2, 8, 0)
    a = create_attack(name, model, "bce", 0.3, steps=2, seed=4)(x, y)
    b = create_attack(name, model, "bce", 0.3, steps=2, seed=4)(x, y)
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def trained():
    model = fit(tiny_net(), *blobs(64, seed=1), steps=60)
    return (model, *blobs(8, seed=2))


@pytest.mark.parametrize(("name", "eps"), [("biasfield", 0.5), ("elastic", 2.0), ("gamma", 0.5)])
def test_optimised_beats_random_of_the_same_bound(trained, name, eps):
    model, x, y = trained
    loss = create_loss("dice", reduction="none")
    optimised = create_attack(name, model, "dice", eps, steps=10)(x, y)
    random = create_attack(name, model, "dice", eps, steps=0)(x, y)
    with torch.no_grad():
        found, drawn = loss(model(optimised), y).mean(), loss(model(random), y).mean()
        assert found > loss(model(x), y).mean()
        if name == "gamma":  # one parameter: the random start at the bound may be the worst
            assert found >= drawn
        else:
            assert found > drawn


def test_options_and_bad_input():
    assert {"order", "steps", "alpha", "random_start"} <= set(attack_options("biasfield"))
    assert "grid" in attack_options("elastic")
    create_attack("elastic", tiny_net(), eps=3.0)  # pixels: above 1 is fine
    with pytest.raises(UserError, match="norm 'l2'"):
        create_attack("biasfield", tiny_net(), norm="l2")
    with pytest.raises(UserError, match="order must be"):
        create_attack("biasfield", tiny_net(), order=0)
    with pytest.raises(UserError, match="grid must be"):
        create_attack("elastic", tiny_net(), grid=1)
    with pytest.raises(UserError, match="steps must be"):
        create_attack("gamma", tiny_net(), steps=-1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, C, D, H, W\)"):
        create_attack("gamma", tiny_net(), eps=0.3)(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


def test_an_evaluation_cell_records_the_budget_in_its_own_terms():
    import pandas as pd

    from advseg.evaluate import evaluate_cell

    class Data:
        classes = ("a", "b", "c")

        def __init__(self):
            self.x, self.y = blobs(4, size=12, seed=3)
            self.index = pd.DataFrame(
                {
                    "id": [f"s{i}" for i in range(4)],
                    "case": [0, 0, 1, 1],
                    "scan": ["x"] * 4,
                    "slice": list(range(4)),
                }
            )

        def dataset(self, rows):
            return [{"image": self.x[r], "mask": self.y[r], "row": r} for r in rows]

    result = evaluate_cell(
        tiny_net(), Data(), range(4), "elastic", ["bce"], 2.0, model_name="m", arch="tiny",
        attack_kwargs={"steps": 2}, batch_size=2,
    )  # fmt: skip
    records = result.records
    assert set(records["attack"]) == {"elastic"} and set(records["eps"]) == {2.0}
    assert (records["corruption"] == "").all() and len(records) == 4 * 3
