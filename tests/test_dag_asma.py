"""DAG and ASMA against a few lines written straight from their papers' update rules.

The references below work one image at a time and one pixel at a time, as the papers write them
(Xie et al. 2017, Algorithm 1; Ozbulak et al. 2019, equations 2-4), with a budget and a valid
range so wide that the attacks' projection never acts: what is left to compare is the update.
The budget, range and model-state properties come from the registry-generated tests in
``test_attacks.py``, which cover every registered attack (these two included).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advseg.attacks import create_attack
from advseg.errors import UserError
from tiny_models import blobs, fit, tiny_net  # tests/ is on sys.path

WIDE = {"valid_range": (-100.0, 100.0)}  # with eps 50: no clipping, no projection


def net(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, classes, 3, padding=1)
    ).eval()


def images(n: int = 2, size: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def trained():
    """A tiny net trained on blobs (as in test_attacks.py) and a held-out batch."""
    return fit(tiny_net(), *blobs(64, seed=1), steps=60), *blobs(8, seed=2)


# ------------------------------------------------------------------------------------- DAG


def dag_reference(model, x, labels, adv_labels, logit, steps, gamma):
    """Algorithm 1 of Xie et al., per image and per pixel target ``t``.

    ``logit(f, t, label)`` is the logit ``f_label(X + r, t)`` of target ``t`` (a pixel, or a
    (pixel, class) pair for sigmoid outputs).
    """
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        r = torch.zeros_like(xb)
        with torch.no_grad():
            f = model(xb)
        targets = [t for t in labels[b] if logit.predicts(f, t, labels[b][t])]
        targets = [t for t in targets if labels[b][t] != adv_labels[b][t]]
        for _ in range(steps):
            xr = (xb + r).requires_grad_(True)
            f = model(xr)
            targets = [t for t in targets if logit.predicts(f.detach(), t, labels[b][t])]  # T_m
            if not targets:
                break
            r_m = torch.zeros_like(xb)
            for t in targets:
                up = logit(f, t, adv_labels[b][t])
                down = logit(f, t, labels[b][t])
                r_m += torch.autograd.grad(up - down, xr, retain_graph=True)[0]
            r = r + gamma / r_m.abs().max() * r_m  # r'_m = gamma / ||r_m||_inf * r_m
        out.append(xb + r)
    return torch.cat(out)


class SoftmaxLogit:
    """Targets are pixels ``(i, j)``; labels are classes."""

    def __call__(self, f, t, label):
        return f[0, label, t[0], t[1]]

    def predicts(self, f, t, label):
        return int(f[0, :, t[0], t[1]].argmax()) == label


class SigmoidLogit:
    """Targets are (class, i, j) bits; a bit is a two-way softmax with logits (0, z)."""

    def __call__(self, f, t, label):
        z = f[0, t[0], t[1], t[2]]
        return z if label == 1 else 0 * z

    def predicts(self, f, t, label):
        return int(f[0, t[0], t[1], t[2]] > 0) == label


def _as_dicts(tensor):
    """``(B, ...)`` labels -> per image a dict: index tuple -> int label."""
    return [{index: int(a[index]) for index in _indices(a.shape)} for a in tensor]


def _indices(shape):
    return [tuple(int(v) for v in i) for i in torch.nonzero(torch.ones(shape))]


def test_dag_softmax_untargeted_is_algorithm_1():
    model = net()
    x = images()
    with torch.no_grad():
        f = model(x)
    labels = f.argmax(1)  # the model's own prediction as the truth: every pixel is a target
    labels[:, 0, :] = (labels[:, 0, :] + 1) % 3  # ... but a few are wrong from the start
    others = f.scatter(1, labels.unsqueeze(1), float("-inf")).argmax(1)  # the likeliest other
    expected = dag_reference(
        model, x, _as_dicts(labels), _as_dicts(others), SoftmaxLogit(), 6, 0.05
    )
    attack = create_attack("dag", model, "ce", 50.0, steps=6, gamma=0.05, **WIDE)
    got = attack(x, labels)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, x)


def test_dag_sigmoid_targeted_is_algorithm_1_on_each_bit():
    model = net()
    x = images()
    with torch.no_grad():
        pred = (model(x) > 0).long()
    target = pred.clone()
    target[:, 1] = 1 - target[:, 1]  # flip class 1 everywhere, keep the others
    expected = dag_reference(model, x, _as_dicts(pred), _as_dicts(target), SigmoidLogit(), 5, 0.1)
    attack = create_attack("dag", model, "bce", 50.0, steps=5, gamma=0.1, targeted=True, **WIDE)
    got = attack(x, target.float())
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad():
        reached = ((model(got) > 0).long() == target)[:, 1].float().mean()
    assert reached > 0.2  # class 1 started with every bit away from the target (0)


def test_dag_untargeted_flips_most_right_bits_of_a_trained_model(trained):
    model, x, y = trained
    x_adv = create_attack("dag", model, "bce", 0.1, steps=10)(x, y)
    with torch.no_grad():
        right_before = ((model(x) > 0).float() == y).float().mean()
        right_after = ((model(x_adv) > 0).float() == y).float().mean()
    assert right_before > 0.99 and right_after < 0.85  # PGD-10 at this budget: 0.78
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


# ------------------------------------------------------------------------------------ ASMA


def asma_reference(model, x, target, steps, tau, beta, sigmoid):
    """Equations 2-4 of Ozbulak et al. per image: the adaptive mask, the multiplier, the L2 term.

    For sigmoid outputs each (pixel, class) bit is a two-way softmax with logits (-z/2, z/2).
    """
    out = []
    for b in range(x.shape[0]):
        x0, goal = x[b : b + 1], target[b : b + 1]
        xn, multiplier = x0.clone(), tau  # tau_0: "no overlap" at the start
        for n in range(steps):
            xr = xn.clone().requires_grad_(True)
            g = model(xr)
            if sigmoid:
                pred = (g > 0).long()
                if n:
                    inter, union = (pred & goal).sum(), (pred | goal).sum()
                    multiplier = beta * (inter / union if union else 1.0) + tau
                logit = torch.where(goal == 1, g / 2, -g / 2)  # g(x)_{Y^A}
                value = (logit * (pred != goal)).sum()
            else:
                pred = g.argmax(1)
                if n:
                    inter = ((pred != 0) & (goal != 0)).sum()
                    union = ((pred != 0) | (goal != 0)).sum()
                    multiplier = beta * (inter / union if union else 1.0) + tau
                value = 0
                for c in range(g.shape[1]):  # sum_c g_c * 1{Y^A = c} * 1{argmax g != c}
                    value = value + (g[:, c] * (goal == c) * (pred != c)).sum()
            value = value - ((x0 - xr) ** 2).sum()
            (grad,) = torch.autograd.grad(value, xr)
            xn = xn + multiplier * grad
        out.append(xn)
    return torch.cat(out)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_asma_is_equations_2_to_4(sigmoid):
    model = net()
    x = images()
    with torch.no_grad():
        g = model(x)
    if sigmoid:
        target = (g > 0).long()
        target[:, 2] = 0  # erase class 2
        loss, y = "bce", target.float()
    else:
        target = g.argmax(1)
        target[:, 1:4, 1:4] = 0  # a background hole in the middle
        loss, y = "ce", target
    kw = {"steps": 6, "tau": 0.01, "beta": 0.05, "scale": "paper", "targeted": True}
    got = create_attack("asma", model, loss, 50.0, **kw, **WIDE)(x, y)
    expected = asma_reference(model, x, target, 6, 0.01, 0.05, sigmoid)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, x)


def test_asma_makes_an_organ_of_a_trained_model_shrink_within_the_budget(trained):
    model, x, y = trained
    target = y.clone()
    target[:, 2] = 0  # the paper's use: a target mask with an organ erased
    x_adv = create_attack("asma", model, "bce", 0.1, steps=10, targeted=True)(x, target)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        before = (model(x)[:, 2] > 0).sum()
        after = (model(x_adv)[:, 2] > 0).sum()
    assert after < 0.9 * before  # PGD-10 at this budget: 0.82


def test_asma_and_dag_options_are_checked():
    with pytest.raises(UserError, match="scale"):
        create_attack("asma", net(), scale="raw")
    with pytest.raises(UserError, match="alpha must be"):
        create_attack("dag", net(), gamma=-1.0)
    with pytest.raises(UserError, match="steps must be"):
        create_attack("asma", net(), steps=0)
