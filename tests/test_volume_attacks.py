"""Every registry attack on volumes (B, C, D, H, W) through the sliding-window inferer, and the
two threat protocols (through the inference, through non-overlapping tiles)."""

import pytest
import torch
from torch import nn

from advseg.attacks import ATTACKS, attack_options, create_attack
from advseg.attacks.through import attack_through_tiles, attack_volume
from advseg.inference import SlidingWindow
from advseg.models import count_parameters, create_model, model_info, model_spec

NAMES = ATTACKS.names()
PIXEL_NAMES = [name for name in NAMES if ATTACKS.get(name).pixel_budget]
"""Attacks whose eps bounds pixels; biasfield, elastic and gamma (their own budgets, linf only)
are tested on volumes in tests/test_plausible_attacks.py."""
VOLUME_MODELS = ["unet3d", "segresnet", "unetr", "swinunetr", "unet3d-tiny"]


def tiny3d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 3, 1)
    )


def volumes(seed: int = 0, shape=(2, 1, 8, 6, 9)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g)
    y = (torch.rand(shape[0], 3, *shape[2:], generator=g) > 0.5).float()
    return x, y


def _args(name: str, norm: str) -> dict:
    kw = {"norm": norm}
    if "steps" in attack_options(name):
        kw["steps"] = 4 if name == "sea" else 2
    return kw


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", PIXEL_NAMES)
def test_every_attack_keeps_its_budget_on_volumes_through_the_inference(name, norm):
    """The registry's budget test in 3D: 2 volumes, windows 6^3 with overlap (4 per volume)."""
    x, y = volumes(2 * NAMES.index(name) + (norm == "l2"))
    eps = 0.05 if norm == "linf" else 0.4
    inferer = SlidingWindow(tiny3d(), (6, 6, 6), batch_size=4)
    x_adv = create_attack(name, inferer, "bce", eps, **_args(name, norm))(x, y)
    assert x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= eps * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("loss", ["ce", "dicece", "masked-ce"])
def test_softmax_losses_take_volumes_and_class_indices(loss):
    x, y = volumes(1)
    labels = y.argmax(1)  # (B, D, H, W)
    inferer = SlidingWindow(tiny3d(), (6, 6, 6))
    for target in (y, labels):
        x_adv = create_attack("pgd", inferer, loss, 0.03, steps=2)(x, target)
        assert (x_adv - x).abs().max() <= 0.03 + 1e-6


@pytest.mark.parametrize("through", ["inference", "tiles"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_both_protocols_keep_the_budget(through, norm):
    x, y = volumes(2, shape=(1, 1, 12, 12, 7))
    eps = 0.05 if norm == "linf" else 0.5
    inferer = SlidingWindow(tiny3d(), (6, 6, 6))
    x_adv = attack_volume("pgd", inferer, x, y, through=through, eps=eps, norm=norm, steps=2)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max() if norm == "linf" else delta.norm(dim=1).max()
    assert 0 < size <= eps * (1 + 1e-5) + 1e-6


def test_tiles_are_attacked_one_by_one_through_the_bare_network():
    """The published protocol written out: each non-overlapping tile (the last moved back to the
    edge) is the attack of that tile alone on the network, with one generator across tiles."""
    x, y = volumes(3, shape=(1, 1, 12, 6, 8))
    net = tiny3d()
    inferer = SlidingWindow(net, (6, 6, 6), mirror_axes=(0,))
    ours = attack_through_tiles("pgd", inferer, x, y, eps=0.05, steps=2)
    attack = create_attack("pgd", net, "bce", 0.05, steps=2)
    generator = torch.Generator().manual_seed(attack.seed)
    expected = x.clone()
    for d, w in [(0, 0), (0, 2), (6, 0), (6, 2)]:  # D: 0, 6; W: 0, then 2 (8 - 6)
        tile = (slice(None), slice(None), slice(d, d + 6), slice(0, 6), slice(w, w + 6))
        expected[tile] = attack(x[tile], y[tile], generator=generator)
    assert torch.equal(ours, expected)


def test_through_inference_is_the_attack_on_the_inferer():
    x, y = volumes(4)
    inferer = SlidingWindow(tiny3d(), (6, 6, 6))
    ours = attack_volume("pgd", inferer, x, y, eps=0.05, steps=2)
    assert torch.equal(ours, create_attack("pgd", inferer, "bce", 0.05, steps=2)(x, y))
    with pytest.raises(ValueError, match="inference, tiles"):
        attack_volume("pgd", inferer, x, y, through="slices")


def test_the_attack_freezes_the_network_behind_the_inferer():
    net = tiny3d().train()
    x, y = volumes(5)
    create_attack("fgsm", SlidingWindow(net, (6, 6, 6)), "bce", 0.05)(x, y)
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())


@pytest.mark.parametrize("name", VOLUME_MODELS)
def test_volume_models_are_listed_with_parameter_counts(name):
    info = model_info(name, in_channels=1, classes=3)
    assert info.params > 0 and "3D" in info.description


def test_tiny_3d_unet_maps_volumes_to_logits():
    model = create_model("unet3d-tiny", in_channels=1, classes=2).eval()
    with torch.no_grad():
        out = SlidingWindow(model, (32, 32, 32))(torch.rand(1, 1, 40, 32, 36))
    assert out.shape == (1, 2, 40, 32, 36)
    assert model_spec(model).name == "unet3d-tiny"
    assert count_parameters(model) == model_info("unet3d-tiny", 1, 2).params
