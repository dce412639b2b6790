"""APGD against torchattacks' APGD (the reference), its schedule, and its options."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advseg.attacks import create_attack
from advseg.errors import UserError

torchattacks = pytest.importorskip("torchattacks")


def one_pixel_net() -> nn.Module:
    """A softmax 'segmentation' model with one output pixel: a classifier in disguise, so that
    torchattacks' classification APGD applies to it unchanged."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
    )  # fmt: skip


class Flat(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).flatten(1)  # (B, K, 1, 1) -> (B, K)


def flat_ce(logits, labels):
    """torchattacks' own cross-entropy kernel: on (B, K) logits and (B,) labels."""
    return F.cross_entropy(logits.flatten(1), labels.flatten().long(), reduction="none")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(5)
    return torch.rand(6, 3, 12, 12, generator=g), torch.randint(0, 4, (6,), generator=g)


def reference(model, x, labels, norm, eps, steps, seed, restarts=1):
    torch.manual_seed(seed)  # torchattacks draws its start from the global generator
    attack = torchattacks.APGD(
        Flat(model), norm=norm, eps=eps, steps=steps, seed=seed, n_restarts=restarts
    )
    return attack.perturb(x, labels, best_loss=True)[1]  # each sample's best iterate


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("steps", [10, 25])
def test_linf_ce_equals_torchattacks_bit_for_bit(batch, seed, steps):
    x, labels = batch
    model = one_pixel_net()
    ours = create_attack("apgd", model, "ce", 8 / 255, steps=steps, seed=seed)(
        x, labels.view(-1, 1, 1)
    )
    expected = reference(model, x, labels, "Linf", 8 / 255, steps, seed)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, x)


@pytest.mark.parametrize("seed", [0, 7])
def test_l2_equals_torchattacks(batch, seed):
    x, labels = batch
    model = one_pixel_net()
    expected = reference(model, x, labels, "L2", 0.5, 25, seed)
    same_kernel = create_attack("apgd", model, flat_ce, 0.5, steps=25, seed=seed, norm="l2")
    assert torch.equal(same_kernel(x, labels.view(-1, 1, 1)), expected)
    # the registry's ce runs the (B, K, 1, 1) kernel, which rounds differently in the last bit
    ours = create_attack("apgd", model, "ce", 0.5, steps=25, seed=seed, norm="l2")
    torch.testing.assert_close(ours(x, labels.view(-1, 1, 1)), expected, rtol=0, atol=1e-5)


def test_restarts_equal_torchattacks(batch):
    x, labels = batch
    model = one_pixel_net()
    ours = create_attack("apgd", model, "ce", 4 / 255, steps=8, seed=3, restarts=3)
    expected = reference(model, x, labels, "Linf", 4 / 255, 8, 3, restarts=3)
    assert torch.equal(ours(x, labels.view(-1, 1, 1)), expected)


def test_step_size_schedule_on_a_hand_made_objective():
    """A linear objective that rises at every step: no checkpoint halves the step, so the first
    step goes 2 eps (clipped to the ball) and the best iterate is the far corner of the ball."""

    class Linear(nn.Module):
        def forward(self, x):
            return x.sum(dim=(1, 2, 3)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)

    def objective(logits, target):
        return logits.flatten(1).mean(1)

    x = torch.full((2, 1, 4, 4), 0.5)
    attack = create_attack("apgd", Linear(), objective, 0.1, steps=10, random_start=False)
    assert torch.allclose(attack(x, torch.zeros(2, 1, 1, 1)), x + 0.1)
    # an objective that never rises: every checkpoint halves the step and restarts from the best
    calls = []

    def falling(logits, target):
        calls.append(1)
        return logits.flatten(1).mean(1) * 0 - len(calls)

    run = create_attack("apgd", Linear(), falling, 0.1, steps=10, random_start=False)
    assert torch.equal(run(x, torch.zeros(2, 1, 1, 1)), x)  # the start stays the best point


def test_progressive_radius_stays_in_the_final_ball(batch):
    x, labels = batch
    model = one_pixel_net()
    attack = create_attack("apgd", model, "ce", 4 / 255, steps=10, progressive=True)
    x_adv = attack(x, labels.view(-1, 1, 1))
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-7
    ce = create_attack("apgd", model, "ce", 4 / 255, steps=10).objective
    with torch.no_grad():
        assert (
            ce(model(x_adv), labels.view(-1, 1, 1)).mean()
            > ce(model(x), labels.view(-1, 1, 1)).mean()
        )


@pytest.mark.parametrize(
    ("option", "value"), [("rho", 0), ("momentum", 1.5), ("restarts", 0), ("steps", 0)]
)
def test_bad_options_are_user_errors(option, value):
    with pytest.raises(UserError, match=option):
        create_attack("apgd", one_pixel_net(), "ce", 0.01, **{option: value})
