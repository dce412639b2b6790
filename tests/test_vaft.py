"""VAFT (frequency-consistency adversarial training, Hanif et al. 2023) as ``--adv-train vaft``:
its loss is the paper's formula, its adversarial images are VAFA's, and it trains through the
one training loop on slices and volumes."""

import numpy as np
import scipy.fft
import torch
from torch import nn

from advseg.defences import AdversarialConfig, AdversarialTraining, describe
from advseg.defences.vaft import frequency_consistency
from advseg.losses import create_loss
from advseg.metrics import ssim
from advseg.models import create_model
from advseg.train import train
from test_train import CLASSES, Blobs, tiny_config

EPS = 20 / 255


def test_frequency_consistency_is_the_normalised_l1_of_scipys_dct():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 6, 5, 7, generator=g), torch.randn(2, 3, 6, 5, 7, generator=g)
    dct = lambda t: scipy.fft.dctn(t.double().numpy(), axes=(2, 3, 4), norm="ortho")  # noqa: E731
    expected = np.abs(dct(a) - dct(b)).sum() / np.abs(dct(a)).sum()
    np.testing.assert_allclose(float(frequency_consistency(a, b)), expected, rtol=1e-5)
    assert float(frequency_consistency(a, a)) == 0


def _batch(n: int = 4):
    items = [Blobs(n)[i] for i in range(n)]
    return torch.stack([i["image"] for i in items]), torch.stack([i["mask"] for i in items])


def test_vaft_loss_is_the_papers_formula_on_vafa_images():
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=2).train()
    config = AdversarialConfig(method="vaft", eps=EPS, steps=2, fraction=0.5)
    loss_fn = create_loss("dicefocal")
    defence = AdversarialTraining(config, model, loss_fn, train_loss="dicefocal")
    x, y = _batch(4)
    seen = {}
    perturb = defence.perturb

    def record(*args):
        seen["x_adv"] = perturb(*args)
        return seen["x_adv"]

    defence.perturb = record
    loss = defence.loss(model, x, y, epoch=1, step=0, steps=1)
    loss.backward()
    x_adv = seen["x_adv"]
    assert x_adv.shape == x[:2].shape and not torch.equal(x_adv, x[:2])
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (ssim(x[:2], x_adv) >= 0.95).all()
    # The formula, written out: L(f(x), y) + L(f(x'), y) + |DCT f(x) - DCT f(x')|_1 / |DCT f(x)|_1
    clean, adv = model(x), model(x_adv)
    dct = lambda t: scipy.fft.dctn(t.detach().double().numpy(), axes=(2, 3), norm="ortho")  # noqa: E731
    spectrum = np.abs(dct(clean[:2]) - dct(adv)).sum() / np.abs(dct(clean[:2])).sum()
    expected = loss_fn(clean, y) + loss_fn(adv, y[:2]) + spectrum
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    assert model.training and all(p.grad is not None for p in model.parameters())
    assert describe(config).startswith("vaft eps 0.0784314, 2 steps of 0.00392, VAFA SSIM >= 0.95")


def test_vaft_on_volumes_attacks_the_patch_and_trains():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).train()
    config = AdversarialConfig(method="vaft", eps=EPS, steps=2)
    defence = AdversarialTraining(config, net, create_loss("dicefocal"), train_loss="dicefocal")
    x = torch.rand(2, 1, 12, 16, 10, generator=torch.Generator().manual_seed(1))
    y = (torch.rand(2, 2, 12, 16, 10) > 0.5).float()
    loss = defence.loss(net, x, y, epoch=1, step=0, steps=1)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.abs().sum() > 0 for p in net.parameters())
    assert defence.attack.q_table.shape == (2, 1, 2, 2, 2, 8, 8, 8)  # 8^3 blocks of the patch


def test_the_loop_trains_with_vaft(tmp_path):
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=2)
    before = [p.detach().clone() for p in model.parameters()]
    config = tiny_config(epochs=1, adversarial=AdversarialConfig(method="vaft", eps=EPS, steps=1))
    train(model, Blobs(8), Blobs(4, seed=1), config, tmp_path, classes=CLASSES)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
