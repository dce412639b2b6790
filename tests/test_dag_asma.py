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


def miou(pred, goal, classes):
    """adv-lib's ``iou_masks`` on one image: the mean over every class of its IoU (+1e-6)."""
    ious = []
    for c in range(classes):
        inter = ((pred == c) & (goal == c)).sum()
        ious.append(inter / ((pred == c).sum() + (goal == c).sum() - inter + 1e-6))
    return torch.stack(ious).mean()


def asma_reference(model, x, target, steps, tau, beta, sigmoid, threshold=0.99):
    """Equations 2-4 of Ozbulak et al. per image: the adaptive mask, the multiplier (adv-lib's
    mean IoU over every class), the L2 term; returned, adv-lib's choice: the smallest-L2 iterate
    at least ``threshold`` at the target, else the one closest to it (scored before each step).

    For sigmoid outputs each (pixel, class) bit is a two-way softmax with logits (-z/2, z/2).
    """
    out = []
    for b in range(x.shape[0]):
        x0, goal = x[b : b + 1], target[b : b + 1]
        xn, multiplier = x0.clone(), tau  # tau_0: "no overlap" at the start
        best, best_dist, best_share, found = x0, float("inf"), 0.0, False
        for n in range(steps):
            xr = xn.clone().requires_grad_(True)
            g = model(xr)
            if sigmoid:
                pred = (g > 0).long()
                if n:
                    bits = [miou(pred[:, k], goal[:, k], 2) for k in range(g.shape[1])]
                    multiplier = beta * torch.stack(bits).mean() + tau
                logit = torch.where(goal == 1, g / 2, -g / 2)  # g(x)_{Y^A}
                value = (logit * (pred != goal)).sum()
            else:
                pred = g.argmax(1)
                if n:
                    multiplier = beta * miou(pred, goal, g.shape[1]) + tau
                value = 0
                for c in range(g.shape[1]):  # sum_c g_c * 1{Y^A = c} * 1{argmax g != c}
                    value = value + (g[:, c] * (goal == c) * (pred != c)).sum()
            share = (pred == goal).float().mean().item()
            dist = ((xn - x0) ** 2).sum().item()
            if (share >= threshold and dist <= best_dist) or (
                not found and share >= min(best_share, threshold)
            ):
                best, best_dist, best_share = xn.detach(), dist, share
            found = found or share >= threshold
            value = value - ((x0 - xr) ** 2).sum()
            (grad,) = torch.autograd.grad(value, xr)
            xn = xn + multiplier * grad
        out.append(best)
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
    # the returned iterate is adv-lib's choice, not the last one
    last = create_attack("asma", model, loss, 50.0, **kw, **WIDE, adv_threshold=1.0)(x, y)
    assert torch.allclose(last, asma_reference(model, x, target, 6, 0.01, 0.05, sigmoid, 1.0))


def test_asma_equals_adv_libs_on_one_slice_and_is_batch_independent():
    """adv-lib's asma (softmax, targeted, its own tau and beta, raw gradient, valid range [0, 1])
    image by image; advseg's ball of eps 1 (L-inf) is the whole range, so nothing else clips.
    adv-lib pools the multiplier's IoU over the batch: ours is per slice, so a batch of two
    gives each slice what it gets alone (the one departure, documented in ASMA)."""
    adv_lib = pytest.importorskip("adv_lib.attacks.segmentation")
    model = net(4)
    x = images(3, 8)
    with torch.no_grad():
        target = model(x).argmax(1)
    target[:, 2:6, 2:6] = 3  # a square of class 3 to create
    kw = {"steps": 30, "tau": 1e-3, "beta": 1e-2, "scale": "paper", "targeted": True}
    ours = create_attack("asma", model, "ce", 1.0, **kw)(x, target)
    theirs = torch.cat(
        [
            adv_lib.asma(
                model, x[i : i + 1], target[i : i + 1], targeted=True, num_steps=30, τ=1e-3, β=1e-2
            )
            for i in range(3)
        ]
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, x)
    alone = create_attack("asma", model, "ce", 1.0, **kw)(x[1:2], target[1:2])
    torch.testing.assert_close(ours[1:2], alone, rtol=0, atol=1e-6)


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
    with pytest.raises(UserError, match="adv_threshold"):
        create_attack("asma", net(), adv_threshold=0)
