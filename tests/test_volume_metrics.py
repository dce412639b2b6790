"""Per-volume Dice, HD95 and normalised surface Dice in millimetres, against MONAI and by hand."""

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance, compute_surface_dice

from advseg.metrics import surface_dice, volume_scores


def cube(shape=(12, 12, 12), at=(3, 3, 3), size=5) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[tuple(slice(a, a + size) for a in at)] = True
    return mask


def test_a_one_voxel_shift_is_within_a_tolerance_of_its_spacing_only():
    """Shifted one voxel along D, whose voxels are 2 mm: within 2.5 mm, not within 1.5 mm."""
    pred = cube(at=(4, 3, 3))[None, None]
    target = cube()[None, None]
    spacing = np.array([[2.0, 1.0, 1.0]])
    assert surface_dice(pred, target, 2.5, spacing).item() == 1.0
    assert surface_dice(pred, target, 1.5, spacing).item() < 1.0
    # with 1 mm voxels the same shift is within 1.5 mm
    assert surface_dice(pred, target, 1.5, np.array([[1.0, 1.0, 1.0]])).item() == 1.0


def test_volume_scores_equal_monai_per_class_and_volume():
    g = torch.Generator().manual_seed(0)
    target = torch.stack(
        [torch.stack([cube(at=(a, 2, 3)), cube(at=(2, a, 4), size=4)]) for a in (2, 5)]
    )  # (2 volumes, 2 classes, 12^3); fmt: skip
    pred = target ^ (torch.rand(target.shape, generator=g) < 0.03)
    spacing = np.array([[2.5, 0.8, 0.8], [1.0, 1.2, 0.7]])
    scores = volume_scores(pred, target, spacing, tolerance_mm=2.0)
    dice = DiceMetric(include_background=True, reduction="none")(pred.float(), target.float())
    assert torch.allclose(scores["dice"], dice.double())
    for b in range(2):
        hd = compute_hausdorff_distance(pred[b : b + 1].float(), target[b : b + 1].float(),
                                        include_background=True, percentile=95,
                                        spacing=spacing[b].tolist())  # fmt: skip
        nsd = compute_surface_dice(pred[b : b + 1].float(), target[b : b + 1].float(),
                                   [2.0, 2.0], include_background=True,
                                   spacing=spacing[b].tolist())  # fmt: skip
        assert torch.allclose(scores["hd95_mm"][b], hd[0].double())
        assert torch.allclose(scores["nsd"][b], nsd[0].double())


def test_empty_masks_follow_the_dice_convention():
    empty = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    full = cube((6, 6, 6), (1, 1, 1), 3)[None, None]
    spacing = np.ones((1, 3))
    assert surface_dice(empty, empty, 1.0, spacing).item() == 1.0
    assert surface_dice(full, empty, 1.0, spacing).item() == 0.0
    assert surface_dice(empty, full, 1.0, spacing).item() == 0.0
    scores = volume_scores(empty, full, spacing)
    assert scores["dice"].item() == 0.0 and np.isnan(scores["hd95_mm"].item())


def test_soft_masks_are_refused():
    with pytest.raises(ValueError, match="not a hard mask"):
        volume_scores(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), np.ones((1, 3)))
