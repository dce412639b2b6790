"""SEA and VAFA through `advseg evaluate` on MRI volumes: z-scored per volume, whose valid range is
the data set's lowest and highest z-scored value (finite, so VAFA's table and SSIM have a unit).
Tiny: unet3d-tiny trained 1 epoch on five 16-slice synthetic brain MRI volumes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from advseg.attacks.through import attack_volume
from advseg.data import load_volumes
from advseg.evaluate import EvaluateConfig, evaluate
from advseg.inference import SlidingWindow
from advseg.labels import class_prediction
from advseg.metrics import dice_score, ssim
from advseg.models import load_checkpoint
from tiny_volumes import PATCH, train_tiny_volume_model  # tests/ is on sys.path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("volsea")
    return train_tiny_volume_model(root, "mri")


def _records(result) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in result.record_files], ignore_index=True)


def test_vafa_on_mri_volumes_keeps_its_ssim_in_the_data_sets_range(trained, tmp_path):
    config, checkpoint = trained
    data = load_volumes(config)
    low, high = data.valid_range  # the z-scored volumes' extremes
    assert np.isfinite([low, high]).all() and low < 0 < high
    options = {"steps": 2, "ssim_min": 0.97}
    sweep = EvaluateConfig(checkpoints=[checkpoint], out=tmp_path / "out", attacks=["vafa"],
                           losses=["bce"], eps=[20 / 255], through=["inference", "tiles"],
                           attack_options=options, device="cpu")  # fmt: skip
    records = _records(evaluate(sweep))
    model, meta = load_checkpoint(checkpoint)
    assert meta.data["volumes"]["valid_range"] == [low, high]  # the checkpoint names it too
    assert set(records["attack"]) == {"vafa:inference", "vafa:tiles"}
    assert set(records["attack_setting"]) == {
        f"steps=2 alpha=0.00392 q_min=0.0196 block=8 ssim_min=0.97 range={low:.6g},{high:.6g}"
    }
    assert (records["ssim"] >= 0.97 - 1e-6).all()
    # the inference cell again, directly: VAFA is deterministic, so the records must match
    inferer = SlidingWindow(model, PATCH, overlap=0.5)
    case = int(records["case"].iloc[0])
    row = int(np.flatnonzero(data.index["case"] == case)[0])
    x, y = (t[None] for t in data.volume(row))
    x_adv = attack_volume("vafa", inferer, x, y, through="inference", loss="bce", eps=20 / 255,
                          valid_range=data.valid_range, **options)  # fmt: skip
    assert low <= float(x_adv.min()) and float(x_adv.max()) <= high
    with torch.no_grad():
        adv = class_prediction(inferer(x_adv), "sigmoid")
    got = records[(records["case"] == case) & (records["through"] == "inference")]
    assert got["dice_adv"].to_numpy() == pytest.approx(
        dice_score(adv, y > 0.5).numpy().ravel(), abs=1e-6)  # fmt: skip
    assert got["ssim"].iloc[0] == pytest.approx(float(ssim(x, x_adv, high - low)), abs=1e-6)


def test_sea_on_volumes_names_its_setting_and_keeps_eps(trained, tmp_path):
    _, checkpoint = trained
    eps = 0.1  # z-units
    sweep = EvaluateConfig(checkpoints=[checkpoint], out=tmp_path / "out", attacks=["sea"],
                           losses=["bce"], eps=[eps], through=["inference"],
                           attack_options={"preset": "fast", "steps": 1}, device="cpu")  # fmt: skip
    records = _records(evaluate(sweep))
    assert set(records["attack"]) == {"sea:inference"}
    assert set(records["attack_setting"]) == {
        "preset=fast steps=1 members=masked-bce+segpgd-bce+js+masked-spherical"
    }
    assert (records["member"] != "").all() and (records["linf"] <= eps + 1e-6).all()
    assert (records["slice"] == -1).all() and len(records) == 3 * records["case"].nunique()
