"""``--compat notebook`` against a transcription of the paper's notebook, run one slice at a time.

The transcription below copies the notebook's cells (``notebooks/utils.ipynb`` of
ZhongxuanWang/adv_attk: ``rle_decode``, the mask part of ``read``, ``FGSM_attack`` and the
evaluation loop) with only the file reading replaced by our cached image. advseg's batched compat
path must give the same adversarial images and the same per-slice Dice.
"""

import cv2
import monai
import numpy as np
import pytest
import torch

from advseg.data import DataConfig, PreprocessConfig, load_data
from advseg.errors import UserError
from advseg.evaluate import evaluate_cell
from advseg.evaluate.compat import create_compat_attack, notebook_loss, soft_masks
from advseg.losses import create_loss
from advseg.metrics import PAPER_SMOOTH, dice_from_counts
from advseg.models.zoo import create_model
from data_corpus import tiny_synthetic

SIZE = 32


# ---- the notebook, transcribed (its names and its argument order) ---------------------------
def nb_rle_decode(mask_rle, wid, hei):
    shape = (wid, hei)
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends, strict=True):
        img[lo:hi] = 1
    return img.reshape(shape)


def nb_mask(rles, img_width, img_height):
    # The notebook's img_width held the file name's height and img_height its width (two swaps
    # that cancel), so rle_decode(..., img_width, img_height) decodes an (H, W) mask.
    blank_mask = np.zeros((img_width, img_height, 3))
    for k in range(3):
        blank_mask[:, :, k] = nb_rle_decode(rles[k], img_width, img_height)
    mask = cv2.resize(blank_mask, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype("float32")
    return mask.transpose(2, 0, 1).reshape(1, 3, SIZE, SIZE)  # ours is not transposed H <-> W


def FGSM_attack(model, img, mask, eps=0.007, loss=None):
    loss = loss if loss is not None else monai.losses.DiceFocalLoss(sigmoid=True)
    img.requires_grad = True
    output = model(img)
    loss = loss(mask, output)
    model.zero_grad()
    loss.backward()
    data_grad = img.grad.data
    sign_data_grad = data_grad.sign()
    perturbed_image = (1 - eps) * img + eps * sign_data_grad
    return torch.clamp(perturbed_image, 0, 1)


NOTEBOOK_LOSSES = {
    "bce": lambda: torch.nn.BCEWithLogitsLoss(),
    "focal": lambda: monai.losses.FocalLoss(),
    "dicefocal": lambda: monai.losses.DiceFocalLoss(sigmoid=True),
}


def notebook_loop(model, data, rows, loss_name, eps):
    """The notebook's evaluation loop; returns {row: (x_adv, dice)} for slices with a mask."""
    model.eval()
    out = {}
    for a in rows:
        meta = data.index.iloc[a]
        img = torch.from_numpy(np.repeat(data.images[a][None], 3, 0)[None].copy())
        soft = torch.tensor(nb_mask([meta[c] for c in data.classes], meta.height, meta.width))
        if soft.max() != 0:
            poisoned_img = FGSM_attack(model, img, soft, eps, NOTEBOOK_LOSSES[loss_name]())
            poisoned_img[poisoned_img > 1] = 1
            pred = torch.sigmoid(model(poisoned_img))
            pred[pred > 0.5] = 1
            pred[pred == 0.5] = 1
            pred[pred < 0.5] = 0
            # scored against the cache's binary mask (advseg's records), see advseg.evaluate.compat
            hard = torch.from_numpy(data.masks[a][None].astype(np.float32))
            dl = monai.losses.DiceLoss()(hard, pred)
            out[a] = (poisoned_img.detach(), 1 - float(dl.detach()))
    return out


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tiny_synthetic(tmp_path_factory.mktemp("compat"), cases=2, scans=1, slices=10)
    # the notebook stretched every slice to the square
    data = load_data(
        DataConfig(path=root, preprocess=PreprocessConfig(size=SIZE, resize="stretch"))
    )
    torch.manual_seed(0)
    model = create_model("unet-tiny").eval()
    with torch.no_grad():  # a model whose predictions are not all one class
        for p in model.parameters():
            p.mul_(3.0)
    rows = [r for r in range(len(data)) if data.masks[r].any()][:6]
    return data, model, rows


@pytest.mark.parametrize("loss", ["bce", "focal", "dicefocal"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_compat_notebook_equals_the_transcribed_notebook(setup, loss, batch_size):
    data, model, rows = setup
    eps = 0.03
    reference = notebook_loop(model, data, rows, loss, eps)
    result = evaluate_cell(model, data, rows, "fgsm", [loss], eps, model_name="m",
                           arch="unet-tiny", batch_size=batch_size, examples=len(rows),
                           compat="notebook")  # fmt: skip
    records = result.records
    assert set(records["attack"]) == {"fgsm:notebook"}
    x_adv = torch.from_numpy(result.examples["x_adv"][0])  # (N, C, H, W)
    ours = torch.stack([x_adv[rows.index(r)] for r in reference])
    theirs = torch.cat([reference[r][0] for r in reference])
    assert (ours - theirs).abs().max().item() == 0.0
    for r, (_, dice) in reference.items():
        mine = records[records["slice_id"] == data.index["id"].iat[r]]
        counts = (mine[c].to_numpy() for c in ("tp_adv", "fp_adv", "fn_adv"))
        mean = dice_from_counts(*counts, smooth=PAPER_SMOOTH).mean()
        # The images are equal exactly (above); the Dice comes from a forward of a batch of
        # ``batch_size``, the reference's of one image: on some CPUs the two take other conv
        # kernels, and a logit within an ulp of 0 flips a pixel (seen: a Dice 3.7e-5 apart).
        assert mean == pytest.approx(dice, abs=1e-6 if batch_size == 1 else 1e-3)


def test_soft_masks_are_the_notebooks_area_resized_masks(setup):
    data, _, rows = setup
    soft = soft_masks(data.index, rows, data.classes, SIZE)
    for i, r in enumerate(rows):
        meta = data.index.iloc[r]
        expected = nb_mask([meta[c] for c in data.classes], meta.height, meta.width)[0]
        assert np.array_equal(soft[i].numpy(), expected)
    assert ((soft > 0) & (soft < 1)).any()  # borders hold fractions: never thresholded


def test_swapped_bce_pushes_logits_down_under_the_mask():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    mask = (torch.rand(2, 3, 8, 8) > 0.5).float()
    notebook_loss("bce")(logits, mask).sum().backward()
    # d/dlogits of BCEWithLogits(mask, logits) is -mask / N: a constant, whatever the model says
    assert torch.allclose(logits.grad, -mask / (3 * 64))
    correct = torch.autograd.grad(create_loss("bce", reduction="sum")(logits, mask), logits)[0]
    assert not torch.allclose(correct.sign(), logits.grad.sign())


def test_notebook_update_leaves_the_eps_ball():
    model = torch.nn.Conv2d(3, 3, 1)
    x = torch.full((1, 3, 8, 8), 0.9)
    attack = create_compat_attack("fgsm", model, "bce", 0.03, "notebook")
    x_adv = attack(x, torch.ones(1, 3, 8, 8))
    assert (x_adv - x).abs().max() > 0.03 + 1e-6  # the blend: (1 - eps) x + eps sign(g)


def test_compat_refuses_what_the_notebook_did_not_have():
    model = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(UserError, match="fgsm only"):
        create_compat_attack("pgd", model, "bce", 0.03, "notebook")
    with pytest.raises(UserError, match="was not in the notebook"):
        create_compat_attack("fgsm", model, "dice", 0.03, "notebook")
    with pytest.raises(UserError, match="norm"):
        create_compat_attack("fgsm", model, "bce", 0.03, "notebook", norm="l2")
    with pytest.raises(UserError, match="not one of"):
        create_compat_attack("fgsm", model, "bce", 0.03, "paper")


def test_soft_masks_follow_the_datas_padding(tmp_path):
    from advseg.data import write_synthetic_nifti

    write_synthetic_nifti(tmp_path / "ct", cases=1, slices=8, size=(48, 40), seed=0)
    config = PreprocessConfig(size=SIZE, mask_resize="area")  # pad (the default)
    data = load_data(DataConfig(path=tmp_path / "ct", cache_dir=tmp_path / "c", preprocess=config))
    rows = [r for r in range(len(data)) if data.masks[r].any()]
    soft = soft_masks(data.index, rows, data.classes, SIZE, "pad")
    # the same area resize into the same padded square as the data's masks, before thresholding
    assert np.array_equal((soft >= 0.5).numpy().astype(np.uint8), data.masks[rows])
    stretched = soft_masks(data.index, rows, data.classes, SIZE, "stretch")
    assert not np.array_equal((stretched >= 0.5).numpy().astype(np.uint8), data.masks[rows])
