"""Cross-model cells on volumes: transfer cells (adversarial volumes crafted on a source 3D model
through its own sliding-window inference, or by the tile protocol, scored on a target 3D model
through the target's inference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advseg.catalogue import packaged_config
from advseg.crossmodel.transfer import crafted_dir, load_crafted, save_crafted
from advseg.data import load_volumes, write_synthetic_nifti
from advseg.errors import UserError
from advseg.experiment import check_config, load_experiment, run_experiment
from advseg.experiment.config import ModelSpec
from advseg.inference import SlidingWindow
from advseg.models import load_checkpoint
from advseg.runs.records import read_records

EPS = 0.05


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """configs/volumes.yaml at a tiny size with two 3D models and PGD transferred both ways."""
    tmp = tmp_path_factory.mktemp("volcross")
    write_synthetic_nifti(tmp / "ct", cases=5, slices=16, size=(32, 24), seed=0)
    config = load_experiment(packaged_config("volumes"))
    config.data.path, config.data.cache_dir = tmp / "ct", tmp / "cache"
    volume = config.data.volume
    volume.spacing, volume.patch, volume.samples = None, (16, 16, 16), 2
    config.train.epochs, config.train.device = 1, "cpu"
    config.split.test_fraction = config.split.val_fraction = 0.3
    config.models = [ModelSpec(arch="unet3d-tiny", name="a"),
                     ModelSpec(arch="unet3d-tiny", name="b", train={"seed": 1})]  # fmt: skip
    config.attacks = config.attacks[1:]  # pgd only
    config.attacks[0].kwargs, config.attacks[0].transfer = {"steps": 2}, True
    config.report = False
    result = run_experiment(config, tmp / "run")
    return config, tmp / "run", result, read_records(tmp / "run")


def test_transfer_cells_on_volumes_name_source_target_and_protocol(grid):
    _, _, result, records = grid
    assert "b__pgd-inference__eps0.05__from-a" in result.grid.computed
    assert "a__pgd-tiles__eps0.05__from-b" in result.grid.computed
    pairs = set(zip(records["source"], records["model"], records["through"], strict=True))
    assert pairs == {(s, t, p) for s in "ab" for t in "ab" for p in ("inference", "tiles")}
    assert set(records["attack"]) == {"pgd:inference", "pgd:tiles"}
    assert (records["linf"] <= EPS + 1e-6).all()
    # the target's clean predictions are its own; the perturbation is the source's
    for protocol in ("inference", "tiles"):
        at = records[records["through"] == protocol].set_index(["slice_id", "class"])
        on_b = at[at["model"] == "b"]
        own, from_a = on_b[on_b["source"] == "b"], on_b[on_b["source"] == "a"]
        assert from_a["tp_clean"].tolist() == own["tp_clean"].tolist()
        source = at[(at["model"] == "a") & (at["source"] == "a")]
        assert from_a["linf"].tolist() == pytest.approx(source["linf"].tolist())


@pytest.mark.parametrize("protocol", ["inference", "tiles"])
def test_transfer_dice_on_volumes_equals_a_direct_recomputation(grid, protocol):
    """The target's Dice on the source's saved volumes, recomputed here: the target's own
    sliding-window inference, thresholded, counted against the masks."""
    config, run_dir, _, records = grid
    data = load_volumes(config.data)
    cell = records[(records["model"] == "b") & (records["source"] == "a")
                   & (records["through"] == protocol)]  # fmt: skip
    ids = list(dict.fromkeys(cell["slice_id"]))
    folder = crafted_dir(run_dir, "a", f"pgd-{protocol}", EPS)
    volumes = load_crafted(folder, ["bce"], ids)["bce"]
    net, _ = load_checkpoint(run_dir / "models" / "b" / "checkpoints" / "best")
    inferer = SlidingWindow(net.eval(), (16, 16, 16), overlap=0.5)
    for i, scan in enumerate(ids):
        row = int(np.flatnonzero(data.index["id"].to_numpy() == scan)[0])
        _, mask = data.volume(row)
        with torch.no_grad():
            pred = inferer(torch.as_tensor(np.array(volumes[i]))[None])[0] > 0  # sigmoid > 0.5
        truth = mask.bool()
        tp = (pred & truth).sum((1, 2, 3)).numpy()
        fp = (pred & ~truth).sum((1, 2, 3)).numpy()
        fn = (~pred & truth).sum((1, 2, 3)).numpy()
        rows = cell[cell["slice_id"] == scan].set_index("class").loc[list(data.classes)]
        assert rows["tp_adv"].tolist() == tp.tolist()
        assert rows["fp_adv"].tolist() == fp.tolist() and rows["fn_adv"].tolist() == fn.tolist()
        dice = np.where(tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
        assert rows["dice_adv"].to_numpy() == pytest.approx(dice, abs=1e-12)


def test_volumes_of_different_shapes_are_saved_and_read_back(tmp_path):
    volumes = [np.random.default_rng(i).random((1, 4 + i, 5, 6), dtype=np.float32)
               for i in range(3)]  # fmt: skip
    save_crafted(tmp_path, ["x", "y", "z"], {"bce": volumes})
    back = load_crafted(tmp_path, ["bce"], ["x", "y", "z"])["bce"]
    assert [v.shape for v in back] == [v.shape for v in volumes]
    assert all(np.array_equal(a, b) for a, b in zip(back, volumes, strict=True))
    assert load_crafted(tmp_path, ["bce"], ["x", "y"]) is None  # crafted for other volumes


def test_a_3d_grid_refuses_ensemble_sources(grid):
    config, *_ = grid
    attack = config.attacks[0]
    attack.transfer, attack.sources = False, ["a+b"]
    try:
        with pytest.raises(UserError, match=r"sources\[0\]: ensemble sources on volumes"):
            check_config(config)
    finally:
        attack.transfer, attack.sources = True, []
