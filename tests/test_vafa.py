"""VAFA (frequency-domain attack on volumes): the block DCT against SciPy, the SSIM bound, the
quantisation table's bound and valid range, and that it breaks a tiny 3D model through both
threat protocols."""

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn

from advseg.attacks import create_attack
from advseg.attacks.dct import dctn, from_blocks, idctn, to_blocks
from advseg.attacks.through import attack_volume
from advseg.attacks.vafa import soft_round
from advseg.errors import UserError
from advseg.inference import SlidingWindow
from advseg.losses import create_loss
from advseg.metrics import dice_score, hard_prediction, ssim


@pytest.mark.parametrize("dims", [2, 3])
def test_dct_and_its_inverse_equal_scipys(dims):
    x = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    axes = tuple(range(-dims, 0))
    ours = dctn(x, dims)
    np.testing.assert_allclose(ours, scipy.fft.dctn(x.numpy(), axes=axes, norm="ortho"), atol=1e-12)
    np.testing.assert_allclose(idctn(x, dims), scipy.fft.idctn(x.numpy(), axes=axes, norm="ortho"),
                               atol=1e-12)  # fmt: skip
    torch.testing.assert_close(idctn(ours, dims), x, rtol=0, atol=1e-12)


def test_blocks_round_trip_exactly_and_hold_the_volumes_cubes():
    x = torch.randn(2, 1, 11, 8, 13)
    blocks = to_blocks(x, 4)  # axes padded to 12, 8, 16
    assert blocks.shape == (2, 1, 3, 2, 4, 4, 4, 4)
    assert torch.equal(blocks[:, :, 1, 0, 2], x[:, :, 4:8, 0:4, 8:12])
    assert torch.equal(blocks[:, :, 2, 1, 3, :3, :, :1], x[:, :, 8:11, 4:8, 12:13])
    assert torch.equal(from_blocks(blocks, x.shape), x)
    image = torch.randn(1, 2, 9, 16)
    assert torch.equal(from_blocks(to_blocks(image, 8), image.shape), image)


def test_block_dct_is_scipys_dct_of_each_block():
    x = torch.rand(1, 1, 16, 8, 24, dtype=torch.float64)
    coeffs = dctn(to_blocks(x, 8), 3)
    block = x[0, 0, 8:16, 0:8, 16:24].numpy()
    np.testing.assert_allclose(coeffs[0, 0, 1, 0, 2], scipy.fft.dctn(block, norm="ortho"),
                               atol=1e-12)  # fmt: skip


def test_soft_rounding_is_continuous_and_tends_to_rounding():
    r = torch.tensor([-1.0, 0.0, 0.2, 0.3, 0.7, 1.0, 2.8])
    torch.testing.assert_close(soft_round(r, 1e-12), torch.round(r), rtol=0, atol=1e-4)
    integers = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(soft_round(integers, 0.1), integers)
    near = torch.tensor([1.0 - 1e-6, 1.0 + 1e-6])  # either side of an integer: no jump
    low, high = soft_round(near, 0.1)
    assert abs(float(high - low)) < 1e-4


def cubes(n: int, size: int = 16, seed: int = 0):
    """Noisy volumes with a faint cube and its mask (one class)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(n, 1, size, size, size, generator=g)
    y = torch.zeros(n, 1, size, size, size)
    for i in range(n):
        a, b, c = torch.randint(0, size - 6, (3,), generator=g).tolist()
        x[i, 0, a : a + 6, b : b + 6, c : c + 6] += 0.25
        y[i, 0, a : a + 6, b : b + 6, c : c + 6] = 1
    return x, y


@pytest.fixture(scope="module")
def trained3d():
    """A two-layer 3D net fitted 40 Adam steps on faint cubes (under a second)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 1))
    x, y = cubes(8)
    optimizer, loss = torch.optim.Adam(net.parameters(), lr=2e-2), create_loss("dicefocal")
    for _ in range(40):
        optimizer.zero_grad()
        loss(net(x), y).backward()
        optimizer.step()
    return net.eval()


@pytest.mark.parametrize("through", ["inference", "tiles"])
def test_vafa_lowers_dice_through_both_protocols(trained3d, through):
    x, y = cubes(2, seed=1)
    inferer = SlidingWindow(trained3d, (8, 8, 8), batch_size=8)
    dice_loss = create_loss("dice", reduction="none")

    def scores(volume):
        with torch.no_grad():
            logits = inferer(volume)
            dice = dice_score(hard_prediction(logits, "sigmoid"), y > 0.5).mean()
            return float(dice), dice_loss(logits, y)

    kw = {"loss": "dice", "eps": 80 / 255, "ssim_min": 0.0, "ssim_weight": 0.0}
    plain = attack_volume("vafa", inferer, x, y, through=through, steps=0, **kw)
    learned = attack_volume("vafa", inferer, x, y, through=through, steps=20, alpha=4 / 255, **kw)
    (clean_dice, clean_loss), (_, plain_loss) = scores(x), scores(plain)
    learned_dice, learned_loss = scores(learned)
    assert learned_dice < clean_dice - 0.05
    assert (learned_loss > plain_loss).all()  # the learned table beats the plain quantisation
    assert (learned_loss > clean_loss).all()


@pytest.mark.parametrize("shape", [(2, 1, 16, 12, 18), (2, 1, 20, 20)])
def test_outputs_meet_the_ssim_bound(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
    dims = len(shape) - 2
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    torch.manual_seed(0)
    model = conv(1, 2, 3, padding=1)
    y = (torch.rand(shape[0], 2, *shape[2:]) > 0.5).float()
    plain = create_attack("vafa", model, "bce", 60 / 255, steps=0, ssim_min=0.0)(x, y)
    assert (ssim(x, plain) < 0.99).all()  # the quantisation alone breaks the bound
    attack = create_attack("vafa", model, "bce", 60 / 255, steps=3, ssim_min=0.99)
    x_adv = attack(x, y)
    values = ssim(x, x_adv)
    assert (values >= 0.99).all() and (values < 0.995).all()  # met, and spent (not x itself)
    assert attack.q_table is not None
    assert attack.q_table.min() >= attack.q_min and attack.q_table.max() <= 60 / 255 + 1e-7


def test_the_tables_bound_and_another_valid_range_are_kept():
    x = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(4)) * 3 - 1
    torch.manual_seed(0)
    model = nn.Conv3d(1, 2, 3, padding=1)
    y = (torch.rand(1, 2, 8, 8, 8) > 0.5).float()
    attack = create_attack("vafa", model, "bce", 30 / 255, steps=4, alpha=5 / 255, q_min=10 / 255,
                           valid_range=(-1.0, 2.0), ssim_min=0.0)  # fmt: skip
    x_adv = attack(x, y)
    assert x_adv.min() >= -1 and x_adv.max() <= 2 and not torch.equal(x_adv, x)
    assert attack.q_table.min() >= 10 / 255 - 1e-7 and attack.q_table.max() <= 30 / 255 + 1e-7
    assert len(attack.q_table.unique()) > 1  # the table was learned, not left at eps


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"valid_range": None}, "finite valid_range"),
        ({"norm": "l2"}, "norm"),
        ({"q_min": 0.5}, "q_min"),
        ({"ssim_min": 1.5}, "ssim_min"),
        ({"block": 1}, "block"),
        ({"steps": -1}, "steps"),
    ],
)
def test_bad_options_are_one_line_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        create_attack("vafa", nn.Conv2d(1, 2, 1), "bce", 20 / 255, **kwargs)
