"""Our FGSM and PGD against torchattacks' (the reference) on a softmax model with cross-entropy."""

import pytest
import torch
from torch import nn

torchattacks = pytest.importorskip("torchattacks")

from advseg.attacks import create_attack  # noqa: E402


def softmax_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 4, 3, padding=1))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, 3, 12, 12, generator=g)
    labels = torch.randint(0, 4, (4, 12, 12), generator=g)  # (B, H, W) class indices
    return x, labels


@pytest.mark.parametrize("eps", [0.009, 8 / 255, 0.1])
def test_fgsm_equals_torchattacks(batch, eps):
    x, labels = batch
    model = softmax_net()
    ours = create_attack("fgsm", model, "ce", eps)(x, labels)
    reference = torchattacks.FGSM(model, eps=eps)(x, labels)
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, x)


@pytest.mark.parametrize("seed", [0, 7])
def test_pgd_with_the_same_random_start_equals_torchattacks(batch, seed):
    x, labels = batch
    model = softmax_net()
    eps, alpha, steps = 8 / 255, 2 / 255, 5
    ours = create_attack("pgd", model, "ce", eps, alpha=alpha, steps=steps, seed=seed)(x, labels)
    torch.manual_seed(seed)  # torchattacks draws its start from the global generator
    reference = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(
        x, labels
    )
    assert torch.equal(ours, reference)


def test_bim_equals_torchattacks_up_to_rounding(batch):
    # torchattacks' BIM clips with its own formula (min/max masks), which rounds differently
    x, labels = batch
    model = softmax_net()
    eps, alpha = 0.05, 0.01
    ours = create_attack("bim", model, "ce", eps, alpha=alpha, steps=4)(x, labels)
    reference = torchattacks.BIM(model, eps=eps, alpha=alpha, steps=4)(x, labels)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-6)
    assert (ours - x).abs().max() > 0.04
