"""The elastic attack moves the anatomy, so its truth moves with it (AdvChain warps the labels
with the image): attacked against the warped masks, scored against them. A model that follows
the anatomy exactly keeps its Dice under any deformation."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from advseg.attacks import create_attack
from advseg.attacks.elastic import dense_displacement, warp
from advseg.errors import UserError


class Follower(nn.Module):
    """Predicts each class where its image channel is bright: it follows the anatomy exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(40.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * (x - 0.5)


def _blocks(n=4, size=32):
    y = torch.zeros(n, 2, size, size)
    for i in range(n):
        y[i, 0, 4 + i : 14 + i, 5:17] = 1
        y[i, 1, 18:28, 10 + i : 16 + i] = 1
    return y.clone(), y  # the image is the masks' picture


def test_the_truth_is_warped_by_the_images_field_nearest_neighbour():
    x, y = _blocks()
    attack = create_attack("elastic", Follower(), "bce", eps=4.0, steps=3, grid=4)
    x_adv = attack(x, y)
    truth = attack.adversarial_truth(y)
    field = dense_displacement(attack.theta, (32, 32))
    torch.testing.assert_close(truth, warp(y, field, mode="nearest"), rtol=0, atol=0)
    assert set(truth.unique().tolist()) <= {0.0, 1.0}  # still masks
    assert not torch.equal(truth, y)  # it moved
    agreement = ((x_adv > 0.5) == truth.bool()).float().mean()
    assert agreement > 0.98  # the image's anatomy and the truth moved together
    assert ((x_adv > 0.5) == y.bool()).float().mean() < agreement
    attack.eps = 0.0
    attack(x, y)
    assert attack.adversarial_truth(y) is y  # eps 0 moves nothing
    pgd = create_attack("pgd", Follower(), "bce", eps=0.03, steps=1)
    pgd(x, y)
    assert pgd.adversarial_truth(y) is y  # an intensity attack leaves the truth


def test_records_score_the_deformed_image_against_the_deformed_truth():
    from advseg.evaluate import evaluate_cell

    x, y = _blocks()

    class Data:
        classes = ("a", "b")
        index = pd.DataFrame({"id": [f"s{i}" for i in range(4)], "case": [0, 0, 1, 1],
                              "scan": ["x"] * 4, "slice": list(range(4))})  # fmt: skip

        def dataset(self, rows):
            return [{"image": x[r], "mask": y[r], "row": r} for r in rows]

    result = evaluate_cell(
        Follower(), Data(), range(4), "elastic", ["bce"], 4.0, model_name="m", arch="f",
        attack_kwargs={"steps": 3, "grid": 4}, batch_size=2,
    )  # fmt: skip
    records = result.records
    assert (records["dice_clean"] == 1.0).all()
    assert records["dice_adv"].min() > 0.9  # the follower follows: no failure counted
    # against the unmoved truth the same images would have lost far more (the anatomy moved)
    attack = create_attack("elastic", Follower(), "bce", eps=4.0, steps=3, grid=4)
    x_adv = attack(x, y)
    pred = x_adv > 0.5
    inter = (pred & y.bool()).sum((2, 3)).float()
    unmoved = (2 * inter / (pred.sum((2, 3)) + y.sum((2, 3)))).min()
    assert unmoved < records["dice_adv"].min() - 0.05


def test_an_elastic_transfer_is_refused():
    from advseg.crossmodel.transfer import craft

    x, y = _blocks()

    class Data:
        def dataset(self, rows):
            return [{"image": x[r], "mask": y[r], "row": r} for r in rows]

    with pytest.raises(UserError, match="elastic: moves the anatomy"):
        craft(Follower(), Data(), range(4), "elastic", ["bce"], 2.0)
