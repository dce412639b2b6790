import pytest
import torch

from advseg.augment import Augment, AugmentConfig
from advseg.errors import UserError

OFF = dict(p_affine=0.0, p_hflip=0.0, p_vflip=0.0, p_intensity=0.0, p_elastic=0.0)


def _item(size=64):
    mask = torch.zeros(2, size, size)
    mask[0, 10:30, 12:40] = 1
    mask[1, 35:55, 20:30] = 1
    image = torch.cat([mask, 0.5 * mask[:1]])  # (3, S, S): the image is the mask's picture
    return {"image": image, "mask": mask, "row": 7}


def test_flip_moves_image_and_mask_together():
    item = _item()
    out = Augment(AugmentConfig(**{**OFF, "p_hflip": 1.0}), 64)(item)
    torch.testing.assert_close(out["mask"], item["mask"].flip(-1))
    torch.testing.assert_close(out["image"], item["image"].flip(-1))
    assert out["row"] == 7


@pytest.mark.parametrize("kind", ["p_affine", "p_elastic"])
def test_geometry_is_shared_and_masks_stay_binary(kind):
    torch.manual_seed(3)
    item = _item()
    out = Augment(AugmentConfig(**{**OFF, kind: 1.0}), 64)(item)
    assert out["image"].shape == (3, 64, 64) and out["mask"].shape == (2, 64, 64)
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out["mask"], item["mask"])  # it did move
    moved_image = out["image"][:2] > 0.5  # bilinear picture of the mask, thresholded
    agreement = (moved_image == out["mask"].bool()).float().mean()
    assert agreement > 0.98


def test_intensity_changes_the_image_only_and_stays_in_range():
    torch.manual_seed(0)
    item = _item()
    item["image"] = torch.rand(3, 64, 64)
    config = AugmentConfig(**{**OFF, "p_intensity": 1.0, "brightness": 0.5, "contrast": 0.5})
    out = Augment(config, 64)(item)
    assert not torch.equal(out["image"], item["image"])
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    torch.testing.assert_close(out["mask"], item["mask"])


def test_same_seed_same_draw_new_seed_new_draw():
    augment = Augment(AugmentConfig(), 64)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(torch.stack([augment(_item())["mask"] for _ in range(4)]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_disabled_and_bad_configs():
    item = _item()
    assert Augment(AugmentConfig(enabled=False), 64)(item) is item
    with pytest.raises(UserError, match=r"augment\.p_hflip"):
        AugmentConfig(p_hflip=1.5)
