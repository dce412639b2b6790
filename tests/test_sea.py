"""SEA: per slice the worst member, the winners named, broken slices skipped."""

import pytest
import torch

from advseg.attacks import create_attack
from advseg.attacks.sea import slice_dice
from advseg.errors import UserError
from advseg.metrics import dice_score, hard_prediction
from tiny_models import fit, tiny_net  # tests/ is on sys.path


def squares(n: int, size: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(n, 3, size, size, generator=g)
    y = torch.zeros(n, 3, size, size)
    for i in range(n):
        for k in range(3):
            r, c = torch.randint(0, size - 5, (2,), generator=g).tolist()
            x[i, k, r : r + 5, c : c + 5] += 0.6
            y[i, k, r : r + 5, c : c + 5] = 1
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    return fit(tiny_net(batch_norm=False), *squares(32, seed=1), steps=50), *squares(6, seed=2)


def test_slice_dice_is_the_metrics_dice_averaged_over_classes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 6, 6, generator=g)
    y = (torch.rand(4, 3, 6, 6, generator=g) > 0.6).float()
    y[0, 1] = 0
    logits[0, 1] = -1  # a class empty in both: Dice 1
    expected = dice_score(hard_prediction(logits), y > 0.5).mean(1)
    torch.testing.assert_close(slice_dice(logits, y, "sigmoid"), expected)
    labels = y.argmax(1)
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2)
    expected = dice_score(hard_prediction(logits, "softmax"), one_hot.bool()).mean(1)
    torch.testing.assert_close(slice_dice(logits, labels, "softmax"), expected)


def test_per_slice_dice_is_at_most_every_members(trained):
    model, x, y = trained
    sea = create_attack("sea", model, eps=0.06, steps=8, skip_broken=False)
    outputs = {}
    for name, member in zip(sea.member_names, sea.members, strict=True):
        run = member.perturb

        def keep(xs, ys, g, run=run, name=name):
            outputs[name] = run(xs, ys, g)
            return outputs[name]

        member.perturb = keep
    x_adv = sea(x, y)
    with torch.no_grad():
        ours = slice_dice(model(x_adv), y, "sigmoid")
        clean = slice_dice(model(x), y, "sigmoid")
        members = {n: slice_dice(model(o), y, "sigmoid") for n, o in outputs.items()}
    assert set(members) == {"masked-bce", "js", "masked-spherical", "balanced-bce"}
    for dice in members.values():
        assert torch.all(ours <= dice)
    assert torch.all(ours <= clean) and ours.mean() < clean.mean() - 0.03
    # the winner is named, and its own output is the one kept
    for i, winner in enumerate(sea.winners):
        assert winner in members
        assert members[winner][i] == ours[i]
    assert (x_adv - x).abs().max() <= 0.06 + 1e-6


def test_broken_slices_are_not_attacked_again(trained):
    model, x, y = trained
    wrong = y.clone()
    with torch.no_grad():
        wrong[:3] = (model(x[:3]) <= 0).float()  # the model is wrong everywhere there: Dice 0
    skipping = create_attack("sea", model, eps=0.03, steps=4)
    everything = create_attack("sea", model, eps=0.03, steps=4, skip_broken=False)
    skipping(x, wrong)
    everything(x, wrong)
    assert everything.attacked == 4 * 6
    assert skipping.attacked <= 4 * 3  # never the three broken slices
    assert skipping.winners[:3] == ["none"] * 3


def test_members_steps_and_softmax_forms():
    model = tiny_net(batch_norm=False)
    sea = create_attack("sea", model, eps=0.03, steps=10, activation="softmax")
    assert sea.member_names == ["masked-ce", "js", "masked-spherical", "balanced-ce"]
    assert [m.steps for m in sea.members] == [3, 3, 2, 2]
    assert all(m.activation == "softmax" and m.progressive for m in sea.members)
    assert sea.members[1].loss.per_sample.__qualname__.startswith("js")
    x, y = squares(2)
    assert sea(x, y.argmax(1)).shape == x.shape
    custom = create_attack(
        "sea", model, eps=0.03, steps=4, members=["bce", "js"], progressive=False
    )
    assert custom.member_names == ["bce", "js"] and not custom.members[0].progressive


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"members": ["bce", "bec"]}, "unknown loss 'bec'"),
        ({"members": []}, "members must be"),
        ({"members": ["bce", "bce"]}, "each member once"),
        ({"members": ["masked-ce"]}, "is a softmax loss"),
        ({"steps": 3}, "one per member"),
    ],
)
def test_bad_members_and_steps_are_user_errors(kw, message):
    with pytest.raises(UserError, match=message):
        create_attack("sea", tiny_net(batch_norm=False), eps=0.03, **kw)
