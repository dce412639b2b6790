"""PAdam (Halmosi et al., ECCV 2024): AMSGrad on the perturbation, projected; the cosine loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from advseg.attacks import create_attack
from advseg.attacks.metric import sample_dice
from advseg.errors import UserError
from advseg.losses import create_loss
from tiny_models import tiny_net  # tests/ is on sys.path


def _batch(n=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = (torch.rand(n, 3, size, size, generator=g) > 0.5).float()
    return x, y


def amsgrad_by_hand(model, loss, x, y, eps, lr, steps, b1=0.9, b2=0.999, tiny=1e-8):
    """The paper's update written out: AMSGrad ascent on delta, then the L-inf clip and the
    valid range [0, 1] (Reddi et al. 2018's max of the second moments, Adam's bias corrections)."""
    delta = torch.zeros_like(x)
    m, v, v_max = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)
    for t in range(1, steps + 1):
        d = delta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(model(x + d), y).mean(), d)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_max = torch.maximum(v_max, v)
        m_hat = m / (1 - b1**t)
        delta = delta + lr * m_hat / (v_max.sqrt() / math.sqrt(1 - b2**t) + tiny)
        delta = delta.clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return x + delta


@pytest.mark.parametrize("loss", ["bce", "cosine"])
def test_padam_is_the_amsgrad_update_rule(loss):
    model = tiny_net(batch_norm=False, seed=2)
    model.requires_grad_(False)
    x, y = _batch()
    attack = create_attack("padam", model, loss, 0.05, steps=6, random_start=False)
    ours = attack(x, y)
    expected = amsgrad_by_hand(model, create_loss(loss, reduction="none"), x, y, 0.05, 0.0125, 6)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert attack.lr is None  # the default: eps / 4, here 0.0125
    assert not torch.equal(ours, x)


def test_padam_keeps_its_budget_and_range_and_the_lowest_dice():
    model = tiny_net(batch_norm=False, seed=1)
    x, y = _batch(3, seed=4)
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        for best in ("last", "dice"):
            attack = create_attack("padam", model, "bce", eps, steps=5, norm=norm, best=best)
            x_adv = attack(x, y)
            assert x_adv.min() >= 0 and x_adv.max() <= 1
            delta = (x_adv - x).flatten(1)
            size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
            assert (size <= eps * (1 + 1e-5) + 1e-6).all()
    # best="dice" is never worse than the last iterate (same seed, same path)
    last = create_attack("padam", model, "bce", 0.1, steps=5)(x, y)
    low = create_attack("padam", model, "bce", 0.1, steps=5, best="dice")(x, y)
    with torch.no_grad():
        assert torch.all(
            sample_dice(model(low), y, "sigmoid") <= sample_dice(model(last), y, "sigmoid")
        )


def test_cosine_loss_is_one_minus_the_cosine():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    labels = torch.randint(0, 4, (2, 5, 5), generator=g)
    one_hot = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    cos = (logits * one_hot).sum(1) / logits.norm(dim=1)  # |one-hot| = 1
    ours = create_loss("cosine", reduction="none", activation="softmax")(logits, labels)
    torch.testing.assert_close(ours, (1 - cos).flatten(1).mean(1))
    p = torch.sigmoid(logits)
    t = (torch.rand(2, 4, 5, 5, generator=g) > 0.5).float()
    pairs_p, pairs_t = torch.stack([p, 1 - p]), torch.stack([t, 1 - t])
    cos = (pairs_p * pairs_t).sum(0) / pairs_p.norm(dim=0)
    ours = create_loss("cosine", reduction="none", activation="sigmoid")(logits, t)
    torch.testing.assert_close(ours, (1 - cos).flatten(1).mean(1))


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"lr": 0}, "lr must be"), ({"best": "loss"}, "best 'loss'"), ({"steps": 0}, "steps")],
)
def test_bad_padam_options_are_user_errors(kw, message):
    with pytest.raises(UserError, match=message):
        create_attack("padam", tiny_net(batch_norm=False), "bce", 0.03, **kw)
