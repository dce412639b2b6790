"""SEA: per slice the worst member, the winners named, broken slices skipped."""

import pytest
import torch
import torch.nn.functional as F

from advseg.attacks import create_attack
from advseg.attacks.apgd import APGD
from advseg.attacks.sea import slice_dice
from advseg.errors import UserError
from advseg.labels import class_prediction
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


def test_slice_dice_is_the_records_dice_averaged_over_foreground_classes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 6, 6, generator=g)
    y = (torch.rand(4, 3, 6, 6, generator=g) > 0.6).float()
    y[0, 1] = 0
    logits[0, 1] = -1  # a class empty in both: Dice 1
    expected = dice_score(hard_prediction(logits), y > 0.5).mean(1)
    torch.testing.assert_close(slice_dice(logits, y, "sigmoid"), expected)
    labels = y.argmax(1)
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2)
    # softmax: the records score the classes after the background channel 0 only
    expected = dice_score(class_prediction(logits, "softmax"), one_hot[:, 1:].bool()).mean(1)
    torch.testing.assert_close(slice_dice(logits, labels, "softmax"), expected)
    torch.testing.assert_close(slice_dice(logits, one_hot.float(), "softmax"), expected)
    with_background = dice_score(hard_prediction(logits, "softmax"), one_hot.bool()).mean(1)
    assert not torch.allclose(expected, with_background)


def test_per_slice_dice_is_at_most_every_members(trained):
    model, x, y = trained
    sea = create_attack("sea", model, eps=0.06, steps=3, skip_broken=False)
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
    assert set(members) == {"masked-bce", "segpgd-bce", "js", "masked-spherical"}
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
    skipping = create_attack("sea", model, eps=0.03, steps=2)
    everything = create_attack("sea", model, eps=0.03, steps=2, skip_broken=False)
    skipping(x, wrong)
    everything(x, wrong)
    assert everything.attacked == 4 * 6
    assert skipping.attacked <= 4 * 3  # never the three broken slices
    assert skipping.winners[:3] == ["none"] * 3


def test_reference_members_budget_and_softmax_forms():
    model = tiny_net(batch_norm=False)
    sea = create_attack("sea", model, eps=0.03, activation="softmax")
    assert sea.member_names == ["masked-ce", "segpgd-ce", "js", "masked-spherical"]
    assert sea.preset == "reference" and [m.steps for m in sea.members] == [300] * 4
    assert all(m.activation == "softmax" and m.progressive for m in sea.members)
    assert all(m.best == "dice" for m in sea.members)
    assert [m.weighting for m in sea.members] == ["none", "segpgd", "none", "none"]
    # the reference tracks plain cross-entropy, except for the spherical member
    assert [m.track_loss is not None for m in sea.members] == [True, True, True, False]
    assert sea.members[2].loss.per_sample.__qualname__.startswith("js")
    assert "preset='reference'" in repr(sea)
    fast = create_attack("sea", model, eps=0.03, preset="fast")
    assert fast.member_names == ["masked-bce", "segpgd-bce", "js", "masked-spherical"]
    assert [m.steps for m in fast.members] == [25] * 4 and "preset='fast'" in repr(fast)
    x, y = squares(2)
    small = create_attack("sea", model, eps=0.03, steps=2, activation="softmax")
    assert small(x, y.argmax(1)).shape == x.shape
    custom = create_attack(
        "sea", model, eps=0.03, steps=4, members=["bce", "js"], progressive=False
    )
    assert custom.member_names == ["bce", "js"] and not custom.members[0].progressive
    # what the records' attack_setting says of each
    assert (
        sea.setting == "preset=reference steps=300 members=masked-ce+segpgd-ce+js+masked-spherical"
    )
    assert fast.setting == "preset=fast steps=25 members=masked-bce+segpgd-bce+js+masked-spherical"
    assert custom.setting == "preset=reference steps=4 members=bce+js progressive=off"
    assert create_attack("pgd", model, eps=0.03).setting == ""
    # the optional fifth member, in either form, after the reference's four
    plus = create_attack("sea", model, eps=0.03, extra=["balanced-bce"], activation="softmax")
    assert plus.member_names == ["masked-ce", "segpgd-ce", "js", "masked-spherical", "balanced-ce"]
    assert plus.setting.endswith("members=masked-ce+segpgd-ce+js+masked-spherical+balanced-ce")
    one = create_attack("sea", model, eps=0.03, extra="balanced-ce", members=["js"])
    assert one.member_names == ["js", "balanced-bce"]
    optional = create_attack(
        "sea", model, eps=0.03, steps=2, members=["balanced-bce", "padam-bce", "padam-cosine"]
    )
    assert [type(m).__name__ for m in optional.members] == ["APGD", "PAdam", "PAdam"]
    assert optional.members[2].loss.name == "cosine" and optional.members[1].best == "dice"
    assert optional(x, y).shape == x.shape


def test_member_returns_the_lowest_dice_it_visited(trained):
    """Masked losses fall as pixels flip: the highest-loss iterate is not the lowest-Dice one.
    With best="dice" the member returns the lowest Dice of all the points it evaluated."""
    model, x, y = trained
    seen = []
    lowest = {}
    for best in ("loss", "dice"):
        attack = APGD(model, "masked-bce", 0.08, steps=12, best=best, seed=3)
        seen.clear()
        hook = model.register_forward_hook(
            lambda _m, _i, out: seen.append(slice_dice(out.detach(), y, "sigmoid"))
        )
        try:
            x_adv = attack(x, y)
        finally:
            hook.remove()
        visited = torch.stack(seen).min(0).values  # every point the run evaluated
        with torch.no_grad():
            lowest[best] = slice_dice(model(x_adv), y, "sigmoid")
    torch.testing.assert_close(lowest["dice"], visited)  # the lowest it visited, every slice
    assert torch.all(lowest["dice"] <= lowest["loss"])
    assert torch.any(lowest["dice"] < lowest["loss"] - 0.01)  # loss and Dice disagreed


def test_segpgd_member_is_the_references_weighted_ce():
    """APGD's ``segpgd`` weighting gives the gradient of the reference's ``segpgd_loss``:
    ``lam = t / 2T``, CE weighted ``1 - lam`` on right pixels and ``lam`` on wrong ones, averaged
    over the pixels (nmndeep/robust-segmentation, semseg/utils/attacker.py)."""
    model = tiny_net(batch_norm=False, seed=4)
    x, y = squares(3, seed=5)
    labels = y.argmax(1)
    attack = APGD(model, "ce", 0.03, steps=10, weighting="segpgd", activation="softmax")
    attack._run_steps = 10
    for t in (0, 4, 10):
        grad, value, _ = attack.gradient(x, labels, t)
        xr = x.clone().requires_grad_(True)
        logits = model(xr)
        lam = t / 2 / 10
        right = (logits.max(1)[1] == labels).float().detach()
        ce = F.cross_entropy(logits, labels, reduction="none")
        reference = ((1 - lam) * right * ce + lam * (1 - right) * ce).view(3, -1).mean(-1)
        (expected,) = torch.autograd.grad(reference.sum(), xr)
        torch.testing.assert_close(grad, expected)
        plain = F.cross_entropy(logits, labels, reduction="none").view(3, -1).mean(-1)
        torch.testing.assert_close(value, plain.detach())  # the tracked value is plain CE


def test_segpgd_schedule_restarts_with_each_stage():
    """The reference runs each radius stage as its own apgd_train: T is the stage's steps."""
    model = tiny_net(batch_norm=False)
    x, y = squares(2)
    attack = APGD(model, "bce", 0.03, steps=10, weighting="segpgd", progressive=True)
    lams = []
    weigh = attack.weigh

    def spy(logits, target, t):
        lams.append(t / (2 * attack._run_steps))
        return weigh(logits, target, t)

    attack.weigh = spy
    attack(x, y)
    stages = [3, 3, 4]  # 30/30/40 % of 10
    expected = [t / (2 * n) for n in stages for t in range(n)]  # the last step needs no gradient
    assert lams == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"members": ["bce", "bec"]}, "unknown loss 'bec'"),
        ({"members": ["segpgd-bec"]}, "unknown loss 'bec'"),
        ({"members": []}, "members must be"),
        ({"members": ["bce", "bce"]}, "each member once"),
        ({"members": ["masked-ce"]}, "is a softmax loss"),
        ({"members": ["padam-ce"]}, "is a softmax loss"),
        ({"preset": "slow"}, "preset 'slow'"),
        ({"extra": ["js"]}, "each member once"),
        ({"extra": 5}, "extra must be"),
        ({"extra": "balanced-bec"}, "unknown loss 'balanced-bec'"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_members_and_steps_are_user_errors(kw, message):
    with pytest.raises(UserError, match=message):
        create_attack("sea", tiny_net(batch_norm=False), eps=0.03, **kw)


def test_the_evaluate_settings_name_seas_preset_even_by_default(tmp_path):
    from advseg.evaluate.command import EvaluateConfig, named_budget

    def config(attacks, **options):
        return EvaluateConfig(checkpoints=[tmp_path], out=tmp_path, attacks=attacks,
                              attack_options=options)  # fmt: skip

    assert named_budget(config(["pgd", "sea"], steps=5)) == {"steps": 5, "preset": "reference"}
    assert named_budget(config(["sea"], preset="fast")) == {"preset": "fast"}
    assert named_budget(config(["pgd"])) == {}


class Ramp(torch.nn.Module):
    """A scripted landscape: 8 pixels of one class, logit ``c_i - 4 (x_i - 0.5)``, every pixel
    of the class (so the clean image, x = 0.5, is right everywhere). Raising ``x`` flips the
    pixels one by one (smallest ``c`` first); masked BCE averages over the pixels still right,
    so it peaks just before a flip and falls after it, while the Dice only falls."""

    def __init__(self) -> None:
        super().__init__()
        self.c = torch.nn.Parameter(torch.linspace(0.2, 2.4, 8).view(1, 1, 1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c - 4 * (x - 0.5)


def test_on_a_scripted_landscape_the_member_returns_its_lowest_dice():
    model = Ramp().eval()
    x, y = torch.full((1, 1, 1, 8), 0.5), torch.ones(1, 1, 1, 8)
    returned, visited = {}, {}
    for best in ("loss", "dice"):
        seen = []
        hook = model.register_forward_hook(
            lambda _m, _i, out, seen=seen: seen.append(
                float(slice_dice(out.detach(), y, "sigmoid"))
            )
        )
        try:
            x_adv = APGD(model, "masked-bce", 0.5, steps=20, best=best, seed=0)(x, y)
        finally:
            hook.remove()
        with torch.no_grad():
            returned[best] = float(slice_dice(model(x_adv), y, "sigmoid"))
        visited[best] = min(seen)
    assert returned["dice"] == visited["dice"]  # the lowest Dice of every point it evaluated
    assert returned["loss"] > returned["dice"]  # the highest-loss point is not the lowest Dice
