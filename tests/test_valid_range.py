"""Valid ranges follow the data (issue 26): an attack refuses images outside its valid range in
one line instead of clipping them (which moved z-scored pixels by 4 at eps 0.01), keeps the budget
on unbounded inputs with ``valid_range=None``, and evaluation takes the range from the
checkpoint's preprocessing."""

import pytest
import torch

from advseg.attacks import ATTACKS, attack_options, create_attack
from advseg.data import PreprocessConfig
from advseg.errors import UserError
from tiny_models import blobs, tiny_net  # tests/ is on sys.path

NAMES = ATTACKS.names()
PIXEL_NAMES = [name for name in NAMES if ATTACKS.get(name).pixel_budget]
"""The attacks whose eps bounds pixels (the plausible ones keep budgets of their own)."""


def _z_scored(n: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = blobs(n, size=size)
    return (x - x.mean()) / x.std(), y  # as MONAI / nnU-Net feed models: about -1 .. 4


def _args(name: str) -> dict:
    return {"steps": 4} if "steps" in attack_options(name) else {}


def test_the_issues_example_is_refused_in_one_line_not_clipped():
    x, y = _z_scored()
    attack = create_attack("fgsm", tiny_net(), eps=0.01)
    with pytest.raises(UserError) as caught:
        attack(x, y)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("fgsm: the images span [")
    assert "outside valid_range (0, 1)" in message and "valid_range=None" in message


def test_single_step_evaluation_path_refuses_too():
    x, _ = _z_scored()
    with pytest.raises(UserError, match="outside valid_range"):
        create_attack("fgsm", tiny_net(), eps=0.01).apply_gradient(x, torch.ones_like(x))


@pytest.mark.parametrize("name", PIXEL_NAMES)
def test_unbounded_inputs_keep_the_budget_and_are_not_clipped(name):
    x, y = _z_scored()
    x_adv = create_attack(name, tiny_net(), "bce", 0.01, valid_range=None, **_args(name))(x, y)
    assert (x_adv - x).abs().max() <= 0.01 + 1e-6
    assert x_adv.min() < -0.5 and x_adv.max() > 1.1  # still z-scored: nothing pulled into [0, 1]


@pytest.mark.parametrize("name", PIXEL_NAMES)
def test_the_datas_own_range_is_kept(name):
    x, y = _z_scored()
    low, high = float(x.min()), float(x.max())
    kw = {"valid_range": (low, high), **_args(name)}
    x_adv = create_attack(name, tiny_net(), "bce", 0.05, **kw)(x, y)
    assert x_adv.min() >= low and x_adv.max() <= high
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6


def test_unbounded_range_allows_any_linf_budget_and_checks_its_form():
    x, y = _z_scored()
    create_attack("pgd", tiny_net(), eps=2.5, valid_range=None, steps=1)(x, y)  # > width 1: fine
    with pytest.raises(UserError, match=r"eps 2\.5 exceeds the valid range's width 1"):
        create_attack("pgd", tiny_net(), eps=2.5, steps=1)
    with pytest.raises(UserError, match="valid_range"):
        create_attack("pgd", tiny_net(), eps=0.1, valid_range="wide")
    one_sided = create_attack("fgsm", tiny_net(), eps=0.1, valid_range=(None, 4.5))
    assert one_sided.valid_range == (float("-inf"), 4.5)


def test_evaluation_takes_the_range_of_the_checkpoints_preprocessing(monkeypatch):
    from advseg.evaluate import cells

    seen = []
    real = cells.create_compat_attack

    def spy(name, model, loss, eps, compat, **kwargs):
        seen.append(kwargs.get("valid_range"))
        return real(name, model, loss, eps, compat, **kwargs)

    monkeypatch.setattr(cells, "create_compat_attack", spy)

    class Data:  # a SliceSource with a preprocessing, as SliceData
        import pandas as pd

        x, y = blobs(2, size=8)
        index = pd.DataFrame({"id": ["a", "b"], "case": [1, 2], "slice": [1, 1],
                              "scan": ["case1_day0", "case2_day0"]})  # fmt: skip
        classes = ("a", "b", "c")
        preprocess = PreprocessConfig(size=8)

        def dataset(self, rows):
            return [{"image": self.x[r], "mask": self.y[r], "row": r} for r in rows]

    cells.evaluate_cell(tiny_net(), Data(), [0, 1], "fgsm", ["bce"], 0.01, model_name="m", arch="t")
    assert seen == [(0.0, 1.0)] == [PreprocessConfig().value_range]


@pytest.mark.parametrize("name", ["biasfield", "gamma"])
def test_intensity_curves_refuse_an_unbounded_range(name):
    """A bias field multiplies the intensity above the range's floor, a gamma curve maps the
    range onto itself: without those bounds they have nothing to act on (NaN before)."""
    with pytest.raises(UserError, match=f"^{name}: needs a finite"):
        create_attack(name, tiny_net(), "bce", 0.1, valid_range=None)


def test_plausible_attacks_keep_the_datas_own_range():
    x, y = _z_scored()
    low, high = float(x.min()), float(x.max())
    for name in ("biasfield", "elastic", "gamma"):
        x_adv = create_attack(name, tiny_net(), "bce", 0.3, valid_range=(low, high), steps=2)(x, y)
        assert torch.isfinite(x_adv).all() and low <= x_adv.min() and x_adv.max() <= high
