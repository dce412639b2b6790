"""Corruptions: each is TorchIO's transform (its Random* class with a degenerate range where one
exists), seeded and reproducible, monotone in strength, in range, on slices and volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio

from advseg.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    Geometry,
    corrupt,
    corruption_seed,
    create_corruption,
    parse_corruptions,
)
from advseg.corruptions.base import to_torchio
from advseg.errors import UserError

NAMES = ["anisotropy", "biasfield", "blur", "gamma", "ghosting", "motion", "noise", "spike"]


def _phantom(batch: int = 2, channels: int = 3, size: int = 48) -> torch.Tensor:
    """Discs of different brightness on a dark background, ``(B, C, H, W)`` in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for b in range(batch):
        disc = ((xx - size // 2 - 3 * b) ** 2 + (yy - size // 2) ** 2 < (size // 3) ** 2).float()
        images.append((0.15 + 0.6 * disc + 0.1 * (xx / size))[None].repeat(channels, 1, 1))
    return torch.stack(images)


def test_the_registry_holds_the_eight_corruptions():
    assert CORRUPTIONS.names() == NAMES
    with pytest.raises(UserError, match="did you mean 'motion'"):
        create_corruption("motoin")


@pytest.mark.parametrize("name", NAMES)
def test_the_severity_table_rises_on_its_own_parameter(name):
    levels = create_corruption(name).levels
    assert len(levels) == len(SEVERITIES) == 5
    lows, highs = np.array(levels).T
    assert (lows < highs).all()
    assert (np.diff(lows) > 0).all() and (np.diff(highs) > 0).all()
    assert (highs[:-1] <= lows[1:]).all()  # a severity's range never overlaps the next one's


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(2, 3, 40, 40), (2, 1, 8, 24, 24)])
def test_the_same_seed_gives_the_same_images_in_range(name, shape):
    x = torch.rand(shape)
    a, b = corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=7)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    other = corrupt(x, name, 3, seed=8)
    if name not in ("blur",):  # blur draws nothing but its strength
        assert not torch.equal(a, other)


@pytest.mark.parametrize("name", NAMES)
def test_a_valid_range_other_than_0_1_means_the_same(name):
    x = _phantom()
    unit = corrupt(x, name, 2, seed=1)
    scaled = corrupt(x * 200 - 100, name, 2, seed=1, valid_range=(-100.0, 100.0))
    torch.testing.assert_close(scaled, unit * 200 - 100, atol=1e-3, rtol=0)


def _draw(name: str, severity: int, seed: int, volume: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return create_corruption(name).draw(severity, generator, Geometry(volume))


def _torchio(transform: tio.Transform, image: torch.Tensor) -> torch.Tensor:
    """``transform`` on one slice ``(C, H, W)`` in TorchIO's slice layout ``(C, 1, H, W)``."""
    return transform(tio.ScalarImage(tensor=image[:, None]))["data"][:, 0].clamp(0, 1)


def _ours(name: str, image: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return corrupt(image[None], name, severity, generator=generator)[0]


@pytest.mark.parametrize("severity", [1, 5])
def test_each_corruption_is_torchio_s_transform(severity):
    image = _phantom(1)[0]  # (C, H, W)
    seed = 3
    p = {name: _draw(name, severity, seed) for name in NAMES}
    # the Random* classes with a range of one value: TorchIO draws what we drew
    random_twins = {
        "ghosting": tio.RandomGhosting(
            num_ghosts=(4, 4),
            axes=(p["ghosting"]["axis"],),
            intensity=[p["ghosting"]["intensity"]] * 2,
            restore=0.02,
        ),
        "anisotropy": tio.RandomAnisotropy(
            axes=(p["anisotropy"]["axis"],), downsampling=[p["anisotropy"]["downsampling"]] * 2
        ),
        "gamma": tio.RandomGamma(log_gamma=[float(np.log(p["gamma"]["gamma"]))] * 2),
        "blur": tio.RandomBlur(std=(0, 0, *[p["blur"]["std"][1]] * 4)),
    }
    for name, transform in random_twins.items():
        expected = _torchio(transform, image)
        torch.testing.assert_close(_ours(name, image, severity, seed), expected, atol=1e-6, rtol=0)
    deterministic = {
        "motion": tio.Motion(**p["motion"]),
        "spike": tio.Spike(**p["spike"]),
        "biasfield": tio.BiasField(**p["biasfield"]),
        "noise": tio.Noise(**p["noise"]),
    }
    for name, transform in deterministic.items():
        expected = _torchio(transform, image)
        torch.testing.assert_close(_ours(name, image, severity, seed), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("volume", [False, True])
def test_the_drawn_strength_lies_in_its_severity_s_range(name, volume):
    corruption = create_corruption(name)
    strength = {
        "motion": lambda p: abs(p["degrees"][0, 0]),
        "ghosting": lambda p: p["intensity"],
        "spike": lambda p: p["intensity"],
        "biasfield": lambda p: max(abs(c) for c in p["coefficients"]),
        "noise": lambda p: p["std"],
        "blur": lambda p: p["std"][1],
        "gamma": lambda p: abs(np.log(p["gamma"])),
        "anisotropy": lambda p: p["downsampling"],
    }[name]
    for severity in SEVERITIES:
        low, high = corruption.levels[severity - 1]
        for seed in range(5):
            value = strength(_draw(name, severity, seed, volume))
            assert value <= high + 1e-9
            if name != "biasfield":  # its bound is the level's value; draws lie inside it
                assert value >= low - 1e-9


@pytest.mark.parametrize("name", NAMES)
def test_severity_5_changes_an_image_more_than_severity_1(name):
    x = _phantom(4)
    change = [float((corrupt(x, name, s, seed=0) - x).abs().mean()) for s in (1, 5)]
    assert change[1] > change[0] > 0


def test_slices_keep_torchio_s_k_space_artefacts_in_the_plane():
    """A slice goes to TorchIO as (C, 1, H, W): ghosts along an in-plane axis repeat the disc
    within the slice (its spectrum's last axis is the slice's W, not a one-voxel axis)."""
    image = _phantom(1)[0]
    assert to_torchio(image).shape == (3, 1, 48, 48)
    ghosted = _ours("ghosting", image, 5, 0)
    background = image < 0.3
    assert (ghosted - image)[background].abs().max() > 0.05  # ghosts reach the background


def test_parse_corruptions_expands_names_and_all():
    assert parse_corruptions(["motion:3"]) == [("motion", 3)]
    assert parse_corruptions(["noise"]) == [("noise", s) for s in SEVERITIES]
    assert len(parse_corruptions(["all"])) == 40
    for bad, words in [
        (["motoin:3"], "unknown corruption 'motoin'"),
        (["motion:6"], "severity must be"),
        (["motion:x"], "severity 'x'"),
        (["motion:2", "motion"], "given twice"),
        (["all:2"], "takes no severity"),
    ]:
        with pytest.raises(UserError, match=words):
            parse_corruptions(bad)


def test_corruption_seeds_depend_on_the_slice_not_the_batch():
    assert corruption_seed(0, "motion", 3, "case1_slice_0001") == corruption_seed(
        0, "motion", 3, "case1_slice_0001"
    )
    assert corruption_seed(0, "motion", 3, "a") != corruption_seed(0, "motion", 4, "a")


def test_the_catalogue_refuses_a_mistyped_corruption_as_the_library_does():
    from advseg import catalogue

    catalogue.check_names("corruption", ["motion:3", "all", "noise"], "--corruption")
    with pytest.raises(UserError) as fast:
        catalogue.check_names("corruption", ["motoin:3"], "--corruption")
    with pytest.raises(UserError) as slow:
        parse_corruptions(["motoin:3"])
    assert str(fast.value) == str(slow.value)
