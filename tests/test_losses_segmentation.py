"""SEA's attack losses against a few lines written from each formula, both output kinds."""

import math

import pytest
import torch

from advseg.errors import UserError
from advseg.losses import create_loss, loss_activation


@pytest.fixture
def sigmoid_batch():
    g = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(3, 3, 5, 5, generator=g)
    target = (torch.rand(3, 3, 5, 5, generator=g) > 0.7).float()
    target[1, 2] = 0  # a class absent from a sample
    return logits, target


@pytest.fixture
def softmax_batch():
    g = torch.Generator().manual_seed(4)
    logits = 2 * torch.randn(3, 4, 5, 5, generator=g)
    labels = torch.randint(0, 4, (3, 5, 5), generator=g)
    labels[2] = 1  # a sample with one class only
    return logits, labels


def loop_reference(name, logits, target):
    """Element by element, straight from the formulas (slow on purpose)."""
    b, k, h, w = logits.shape
    out = []
    for i in range(b):
        total = 0.0
        if name == "masked-bce":
            for c in range(k):
                for r in range(h):
                    for s in range(w):
                        z, t = logits[i, c, r, s].item(), target[i, c, r, s].item()
                        if (z > 0) == (t > 0.5):
                            p = 1 / (1 + math.exp(-z))
                            total -= t * math.log(p) + (1 - t) * math.log(1 - p)
            out.append(total / (k * h * w))
        elif name == "balanced-bce":
            per_class = []
            for c in range(k):
                groups = {0: [], 1: []}
                for r in range(h):
                    for s in range(w):
                        z, t = logits[i, c, r, s].item(), int(target[i, c, r, s].item())
                        p = 1 / (1 + math.exp(-z))
                        groups[t].append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
                means = [sum(v) / len(v) for v in groups.values() if v]
                per_class.append(sum(means) / len(means))
            out.append(sum(per_class) / k)
        elif name == "js-sigmoid":
            for c in range(k):
                for r in range(h):
                    for s in range(w):
                        p = 1 / (1 + math.exp(-logits[i, c, r, s].item()))
                        t = target[i, c, r, s].item()
                        total += js_pair([p, 1 - p], [t, 1 - t])
            out.append(total / (k * h * w))
        elif name == "masked-spherical-sigmoid":
            for r in range(h):
                for s in range(w):
                    z = logits[i, :, r, s].tolist()
                    norm = math.sqrt(sum(v * v for v in z))
                    for c in range(k):
                        t = target[i, c, r, s].item()
                        if (z[c] > 0) == (t > 0.5):
                            total -= (2 * t - 1) * z[c] / norm
            out.append(total / (k * h * w))
    return torch.tensor(out)


def loop_reference_softmax(name, logits, labels):
    b, k, h, w = logits.shape
    out = []
    for i in range(b):
        terms, by_class = 0.0, {}
        for r in range(h):
            for s in range(w):
                z = logits[i, :, r, s].tolist()
                y = int(labels[i, r, s])
                exp = [math.exp(v) for v in z]
                probs = [e / sum(exp) for e in exp]
                ce = -math.log(probs[y])
                correct = max(range(k), key=lambda c: z[c]) == y
                if name == "masked-ce":
                    terms += ce if correct else 0.0
                elif name == "balanced-ce":
                    by_class.setdefault(y, []).append(ce)
                elif name == "js-softmax":
                    terms += js_pair(probs, [float(c == y) for c in range(k)])
                elif name == "masked-spherical-softmax":
                    norm = math.sqrt(sum(v * v for v in z))
                    terms += -z[y] / norm if correct else 0.0
        if name == "balanced-ce":
            out.append(sum(sum(v) / len(v) for v in by_class.values()) / len(by_class))
        else:
            out.append(terms / (h * w))
    return torch.tensor(out)


def js_pair(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    kl = lambda u: sum(a * math.log(a / c) for a, c in zip(u, m, strict=True) if a > 0)  # noqa: E731
    return (kl(p) + kl(q)) / 2


@pytest.mark.parametrize(
    ("name", "kw", "reference"),
    [
        ("masked-bce", {}, "masked-bce"),
        ("balanced-bce", {}, "balanced-bce"),
        ("js", {"activation": "sigmoid"}, "js-sigmoid"),
        ("masked-spherical", {"activation": "sigmoid"}, "masked-spherical-sigmoid"),
    ],
)
def test_sigmoid_forms_match_the_formula(sigmoid_batch, name, kw, reference):
    logits, target = sigmoid_batch
    ours = create_loss(name, reduction="none", **kw)(logits, target)
    expected = loop_reference(reference, logits.double(), target.double()).float()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "kw", "reference"),
    [
        ("masked-ce", {}, "masked-ce"),
        ("balanced-ce", {}, "balanced-ce"),
        ("js", {"activation": "softmax"}, "js-softmax"),
        ("masked-spherical", {"activation": "softmax"}, "masked-spherical-softmax"),
    ],
)
def test_softmax_forms_match_the_formula(softmax_batch, name, kw, reference):
    logits, labels = softmax_batch
    loss = create_loss(name, reduction="none", **kw)
    expected = loop_reference_softmax(reference, logits.double(), labels).float()
    torch.testing.assert_close(loss(logits, labels), expected, rtol=1e-5, atol=1e-6)
    one_hot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(loss(logits, one_hot), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["masked-bce", "masked-spherical"])
def test_sigmoid_masked_losses_ignore_exactly_the_flipped_elements(sigmoid_batch, name):
    logits, target = sigmoid_batch
    logits = logits.clone().requires_grad_(True)
    create_loss(name, reduction="sum")(logits, target).backward()
    correct = (logits > 0) == (target > 0.5)
    assert 0 < correct.float().mean() < 1  # both kinds are there
    if name == "masked-bce":  # (the spherical projection couples a pixel's classes)
        assert torch.all(logits.grad[~correct] == 0)
    assert torch.all(logits.grad[correct] != 0)
    all_wrong = torch.where(target > 0.5, -logits.detach().abs() - 0.1, logits.detach().abs() + 0.1)
    assert create_loss(name)(all_wrong, target).item() == 0.0  # nothing left to count


def test_masked_ce_ignores_exactly_the_flipped_pixels(softmax_batch):
    logits, labels = softmax_batch
    logits = logits.clone().requires_grad_(True)
    create_loss("masked-ce", reduction="sum")(logits, labels).backward()
    flipped = logits.argmax(1) != labels  # (B, H, W)
    assert flipped.any() and (~flipped).any()
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[flipped] == 0)
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[~flipped].abs().sum(-1) > 0)


def test_masked_softmax_spherical_ignores_flipped_pixels(softmax_batch):
    logits, labels = softmax_batch
    logits = logits.clone().requires_grad_(True)
    create_loss("masked-spherical", reduction="sum", activation="softmax")(
        logits, labels
    ).backward()
    flipped = logits.argmax(1) != labels  # (B, H, W)
    assert flipped.any() and (~flipped).any()
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[flipped] == 0)
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[~flipped].abs().sum(-1) > 0)


def test_without_flips_the_masked_losses_are_the_plain_ones(sigmoid_batch, softmax_batch):
    logits, target = sigmoid_batch
    agreeing = torch.where(target > 0.5, logits.abs() + 0.1, -logits.abs() - 0.1)
    torch.testing.assert_close(
        create_loss("masked-bce")(agreeing, target), create_loss("bce")(agreeing, target)
    )
    logits, labels = softmax_batch
    one_hot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    right = logits + 100 * one_hot
    torch.testing.assert_close(
        create_loss("masked-ce")(right, labels), create_loss("ce")(right, labels)
    )


def test_balanced_losses_weigh_a_small_class_like_a_large_one():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 0, 0] = 1  # one pixel of class 1 among 63 of class 0
    logits = torch.zeros(1, 2, 8, 8)
    logits[0, 0] = 10.0  # the large class is predicted well ...
    logits[0, :, 0, 0] = torch.tensor([0.0, -5.0])  # ... the one small pixel badly (CE ~ 5)
    ce, balanced = create_loss("ce")(logits, labels), create_loss("balanced-ce")(logits, labels)
    assert ce < 0.1  # its error is 1/64 of the plain mean
    assert balanced > 0.45 * 5  # and half of the balanced one


def test_js_is_bounded_by_log_2_and_zero_at_the_label():
    labels = torch.randint(0, 3, (2, 4, 4))
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    js = create_loss("js", activation="softmax", reduction="none")
    assert torch.all(js(200 * one_hot, labels) < 1e-6)
    assert torch.all(js(-200 * one_hot, labels) <= math.log(2) + 1e-6)
    sig = create_loss("js", reduction="none")
    assert torch.all(sig(-50 * (2 * one_hot - 1), one_hot) <= math.log(2) + 1e-6)


def test_activation_kinds_and_bad_activation():
    assert loss_activation("masked-ce") == "softmax"
    assert loss_activation("balanced-bce") == "sigmoid"
    assert loss_activation("js") is None and loss_activation("masked-spherical") is None
    with pytest.raises(UserError, match="activation 'tanh'"):
        create_loss("js", activation="tanh")
