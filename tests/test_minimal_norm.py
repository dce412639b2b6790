"""The minimal-norm attacks (alma-prox, pdpgd): against adv-lib, against the exact minimal norm of
a model where it can be computed, their budget, valid range, criteria and volumes."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advseg.attacks import create_attack
from advseg.attacks.metric import sample_dice
from advseg.attacks.prox import l1_ball_projection, l2_prox, l2_prox_box, linf_prox, linf_prox_box
from advseg.errors import UserError
from tiny_models import blobs, fit, tiny_net  # tests/ is on sys.path

adv_lib = pytest.importorskip("adv_lib.attacks.segmentation")
MINIMAL = ["alma-prox", "pdpgd"]


class Bands(nn.Module):
    """A tiny segmentation model whose classes are periodic bands of (slightly smoothed)
    intensity: ``logit_c = 10 cos(2 pi f s(x) - 2 pi c / K)``, ``s`` a fixed 3x3 (3x3x3) filter
    keeping ``1 - mix`` of the pixel. Every pixel is within ``1 / (2 K f)`` of another class, so
    small perturbations break it; with ``mix = 0`` the exact minimal norm is known."""

    def __init__(self, classes: int = 4, freq: float = 5.0, mix: float = 0.3, dims: int = 2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.smooth = conv(1, 1, 3, padding=1, bias=False, padding_mode="replicate")
        with torch.no_grad():
            size = 3**dims
            weight = torch.full(self.smooth.weight.shape, mix / (size - 1))
            weight.view(-1)[size // 2] = 1 - mix
            self.smooth.weight.copy_(weight)
        self.freq, self.classes = freq, classes
        self.register_buffer("phase", torch.arange(classes) * 2 * math.pi / classes)

    def forward(self, x):
        angle = self.smooth(x) * 2 * math.pi * self.freq
        return 10 * torch.cos(angle - self.phase.view(1, -1, *([1] * (x.dim() - 2))))


def band_batch(model: nn.Module, n: int = 6, size: int = 12, seed: int = 0, dims: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, *([size] * dims), generator=g)
    with torch.no_grad():
        labels = model(x).argmax(1)
    return x, labels, F.one_hot(labels, model.classes).movedim(-1, 1).float()


def no_compile(monkeypatch):
    """adv-lib's L-inf prox is torch.compile'd; run it eagerly (no compiler on a CPU box)."""
    module = importlib.import_module("adv_lib.attacks.segmentation.alma_prox")
    monkeypatch.setattr(module, "prox_linf_indicator", module.prox_linf_indicator.__wrapped__)


def norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


# ----------------------------------------------------------------- adv-lib, same model and seed


def reference_norms(model, ref, x, labels, norm: str, share: float) -> torch.Tensor:
    """adv-lib's minimal norms ``(B,)``: the norm of what it returned, inf where that misses."""
    with torch.no_grad():
        wrong = (model(ref).argmax(1) != labels).float().flatten(1).mean(1)
    return torch.where(wrong >= share, norms(ref - x, norm), torch.inf)


def alma_against_adv_lib(monkeypatch, mix: float, n: int, size: int, seed: int) -> None:
    """Both ALMA proxes on the same model and images: medians of the minimal norms within 5%
    (single-precision differences in the proximal searches grow over 500 steps, so individual
    samples drift apart: the distributions are compared)."""
    no_compile(monkeypatch)
    model = Bands(mix=mix).requires_grad_(False)
    x, labels, onehot = band_batch(model, n=n, size=size, seed=seed)
    ref = adv_lib.alma_prox(model, x, labels, adv_threshold=0.9, num_steps=500)
    attack = create_attack("alma-prox", model, "ce", 1.0, activation="softmax", threshold=0.9,
                           steps=500, refine=False)  # fmt: skip
    ours = attack(x, onehot)
    reference = reference_norms(model, ref, x, labels, "linf", 0.9)
    found = torch.isfinite(attack.min_eps)
    assert found.sum() >= 0.75 * n and torch.isfinite(reference).sum() >= 0.75 * n
    assert torch.allclose(attack.min_eps[found], norms(ours - x, "linf")[found])
    assert abs(attack.min_eps.median() / reference.median() - 1) < 0.05


def test_alma_prox_agrees_with_adv_lib(monkeypatch):
    alma_against_adv_lib(monkeypatch, mix=0.1, n=12, size=8, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_alma_prox_agrees_with_adv_lib_on_more_images(monkeypatch, seed):
    alma_against_adv_lib(monkeypatch, mix=0.3, n=48, size=12, seed=seed)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pdpgd_agrees_with_adv_lib_softmax(norm):
    model = Bands().requires_grad_(False)
    x, labels, onehot = band_batch(model)
    p = math.inf if norm == "linf" else 2
    ref = adv_lib.pdpgd(model, x, labels, norm=p, adv_threshold=0.9, num_steps=150)
    attack = create_attack("pdpgd", model, "ce", None, norm=norm, activation="softmax",
                           threshold=0.9, steps=150, refine=False)  # fmt: skip
    attack(x, onehot)
    reference = reference_norms(model, ref, x, labels, norm, 0.9)
    assert torch.isfinite(reference).all() and torch.isfinite(attack.min_eps).all()
    assert abs(attack.min_eps.median() / reference.median() - 1) < 0.05


class TwoWay(nn.Module):
    """A sigmoid model's K logits as adv-lib's softmax input: two channels ``(-z/2, z/2)`` per
    (pixel, class), the classes stacked along the height: ``(B, 2, K * H, W)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        z = self.model(x)  # (B, K, H, W)
        z = z.reshape(z.shape[0], 1, -1, z.shape[-1])
        return torch.cat([-z / 2, z / 2], dim=1)


def test_pdpgd_agrees_with_adv_lib_on_a_trained_sigmoid_net():
    model = fit(tiny_net(), *blobs(64, seed=1), steps=60).requires_grad_(False)
    x, y = blobs(6, seed=2)
    bits = (y > 0.5).long().reshape(6, -1, y.shape[-1])  # (B, K * H, W)
    ref = adv_lib.pdpgd(TwoWay(model), x, bits, norm=math.inf, adv_threshold=0.6, num_steps=100)
    attack = create_attack("pdpgd", model, "bce", 1.0, threshold=0.6, steps=100, refine=False)
    attack(x, y)
    assert torch.isfinite(attack.min_eps).all()
    reference = norms(ref - x, "linf")
    assert abs(attack.min_eps.median() / reference.median() - 1) < 0.05


# ---------------------------------------------- the exact minimal norm of a pixel-wise model


def exact_minimal_norms(model: Bands, x: torch.Tensor, share: float) -> tuple[np.ndarray, ...]:
    """Per sample, the smallest L-inf and L2 perturbations that flip ``share`` of the pixels of
    the pixel-wise band model: each pixel's distance to its class's nearest edge (within [0, 1]),
    the ceil(share N) smallest taken."""
    period = 1 / model.freq
    width = period / model.classes  # each class's band
    position = (x.flatten(1).double() / period * model.classes + 0.5) % model.classes
    inside = position - position.floor()  # where in its band the pixel is, 0..1
    up = (1 - inside) * width
    down = inside * width
    up = torch.where(x.flatten(1) + up <= 1, up, torch.inf)
    down = torch.where(x.flatten(1) - down >= 0, down, torch.inf)
    distance = torch.minimum(up, down).sort(1).values
    needed = math.ceil(share * distance.shape[1])
    linf = distance[:, needed - 1]
    l2 = distance[:, :needed].pow(2).sum(1).sqrt()
    return linf.numpy(), l2.numpy()


@pytest.mark.parametrize(("name", "norm", "options"), [
    ("alma-prox", "linf", {"steps": 500}),
    ("pdpgd", "linf", {"steps": 300, "primal_lr": 0.01}),  # the default 0.1 overshoots to ~4x
    ("pdpgd", "l2", {"steps": 300, "primal_lr": 0.01}),
])  # fmt: skip
def test_minimal_norm_is_close_to_the_exact_one(name, norm, options):
    model = Bands(mix=0.0).requires_grad_(False)
    x, _, onehot = band_batch(model, n=4, size=10)
    linf, l2 = exact_minimal_norms(model, x, 0.9)
    exact = linf if norm == "linf" else l2
    attack = create_attack(name, model, "ce", None, norm=norm, activation="softmax", threshold=0.9,
                           refine=False, **options)  # fmt: skip
    attack(x, onehot)
    found = attack.min_eps.numpy()
    assert (found >= exact * (1 - 1e-3)).all()  # nothing smaller exists
    assert (found <= exact * (1.05 if norm == "linf" else 1.3)).all()  # and comes close


# ---------------------------------------------------------- budget, range, criteria, volumes


@pytest.mark.parametrize("name", MINIMAL)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_budget_and_range_hold_and_min_eps_is_the_unbudgeted_norm(name, norm):
    model = Bands(mix=0.0).requires_grad_(False)
    x, _, _ = band_batch(model, n=2, size=6)
    x = 0.2 + 0.6 * x  # inside a valid range narrower than [0, 1]
    with torch.no_grad():
        onehot = F.one_hot(model(x).argmax(1), 4).movedim(-1, 1).float()
    options = {
        "norm": norm,
        "activation": "softmax",
        "threshold": 0.8,
        "valid_range": (0.2, 0.8),
        "steps": 500 if name == "alma-prox" else 120,
    }  # ALMA's step decay needs its 500
    free = create_attack(name, model, "ce", None, **options)
    free_images = free(x, onehot)
    assert torch.isfinite(free.min_eps).all()
    assert torch.allclose(norms(free_images - x, norm), free.min_eps, rtol=1e-5)
    eps = float(free.min_eps.min()) / 2
    capped = create_attack(name, model, "ce", eps, **options)
    images = capped(x, onehot)
    assert torch.allclose(capped.min_eps, free.min_eps)  # the same search, reported the same
    assert (norms(images - x, norm) <= eps * (1 + 1e-5)).all()
    assert images.min() >= 0.2 and images.max() <= 0.8


@pytest.mark.parametrize("name", MINIMAL)
def test_volumes_are_attacked_as_volumes(name):
    model = Bands(dims=3).requires_grad_(False)
    x, labels, onehot = band_batch(model, n=2, size=6, dims=3)  # (2, 1, 6, 6, 6)
    attack = create_attack(name, model, "ce", None, activation="softmax", threshold=0.8,
                           steps=500 if name == "alma-prox" else 150)  # fmt: skip
    images = attack(x, onehot)
    assert images.shape == x.shape and torch.isfinite(attack.min_eps).all()
    with torch.no_grad():
        wrong = (model(images).argmax(1) != labels).float().flatten(1).mean(1)
    assert (wrong >= 0.8).all()
    assert torch.allclose(norms(images - x, "linf"), attack.min_eps)
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("name", MINIMAL)
def test_dice_criterion_on_a_trained_sigmoid_net(name):
    model = fit(tiny_net(), *blobs(64, seed=1), steps=60)
    x, y = blobs(6, seed=2)
    steps = 300 if name == "alma-prox" else 150
    attack = create_attack(name, model, "bce", 1.0, criterion="dice", threshold=0.3, steps=steps)
    assert attack.criterion_label == "dice<=0.3"
    images = attack(x, y)
    found = torch.isfinite(attack.min_eps)
    assert found.sum() >= 4
    with torch.no_grad():
        dice = sample_dice(model(images), y, "sigmoid")
        clean = sample_dice(model(x), y, "sigmoid")
    assert (dice[found] <= 0.3).all() and (clean > 0.3).all()
    assert torch.allclose(norms(images - x, "linf")[found], attack.min_eps[found])


def test_a_slice_already_broken_needs_no_perturbation():
    model = Bands().requires_grad_(False)
    x, _, onehot = band_batch(model, n=2, size=8)
    wrong = torch.roll(onehot, 1, dims=1)  # every pixel labelled with another class
    attack = create_attack("alma-prox", model, "ce", None, activation="softmax", steps=5)
    assert torch.equal(attack(x, wrong), x)
    assert (attack.min_eps == 0).all()


def test_pixels_criterion_counts_each_class_bit_of_a_sigmoid_model():
    model = fit(tiny_net(), *blobs(64, seed=1), steps=60)
    x, y = blobs(4, seed=2)
    attack = create_attack("pdpgd", model, "bce", None, threshold=0.7, steps=150)
    images = attack(x, y)
    with torch.no_grad():
        wrong = ((model(images) > 0) != (y > 0.5)).float().flatten(1).mean(1)
    found = torch.isfinite(attack.min_eps)
    assert found.all() and (wrong >= 0.7).all()


def test_bad_options_are_refused_in_one_line():
    model = tiny_net()
    with pytest.raises(UserError, match="criterion 'iou'"):
        create_attack("alma-prox", model, criterion="iou")
    with pytest.raises(UserError, match="threshold must be"):
        create_attack("pdpgd", model, threshold=1.5)
    with pytest.raises(UserError, match="untargeted"):
        create_attack("pdpgd", model, criterion="dice", targeted=True)
    with pytest.raises(UserError, match="lr_reduction"):
        create_attack("alma-prox", model, lr_reduction=0)


# ---------------------------------------------------------------------- proximal operators


def test_box_proximal_points_minimise_their_objectives():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(5, 7, generator=g) * 0.3
    lower, upper = -torch.rand(5, 7, generator=g) * 0.2, torch.rand(5, 7, generator=g) * 0.2
    metric = torch.rand(5, 7, generator=g) + 0.1
    lam = torch.rand(5, generator=g) * 0.05
    for prox, p in ((linf_prox_box, math.inf), (l2_prox_box, 2)):
        z = prox(d, lam, lower, upper, metric)
        assert (z >= lower - 1e-7).all() and (z <= upper + 1e-7).all()

        def objective(v, p=p):
            return 0.5 * (metric * (v - d) ** 2).sum(1) + lam * v.norm(p=p, dim=1)

        best = objective(z)
        for _ in range(300):  # no feasible point nearby is better
            trial = torch.minimum(torch.maximum(z + 0.01 * torch.randn(5, 7, generator=g),
                                                lower), upper)  # fmt: skip
            assert (objective(trial) >= best - 1e-6).all()


def test_plain_proximal_points_equal_adv_lib():
    pdgd = importlib.import_module("adv_lib.attacks.primal_dual_gradient_descent")
    projections = importlib.import_module("adv_lib.utils.projections")
    d = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    lam = torch.tensor([0.0, 0.05, 0.3, 2.0])
    safe = lam.clamp(min=1e-12)[:, None]
    assert torch.allclose(linf_prox(d, lam)[1:], pdgd.linf_proximal_(d.clone(), safe)[1:],
                          atol=1e-6)  # fmt: skip
    assert torch.equal(linf_prox(d, lam)[0], d[0])
    assert torch.allclose(l2_prox(d, lam), pdgd.l2_proximal_(d.clone(), lam[:, None]), atol=1e-6)
    assert torch.allclose(l1_ball_projection(d), projections.l1_ball_euclidean_projection(d, 1.0),
                          atol=1e-6)  # fmt: skip
