"""Cross-model cells on volumes: transfer cells (adversarial volumes crafted on a source 3D model
through its own sliding-window inference, or by the tile protocol, scored on a target 3D model
through the target's inference) and universal perturbations (one window-sized pattern fitted on
the training volumes, laid out on every tile of each volume)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from advseg.attacks import create_attack
from advseg.attacks.universal import WindowTiles, lay_out
from advseg.catalogue import packaged_config
from advseg.cli import main
from advseg.crossmodel.transfer import crafted_dir, load_crafted, save_crafted
from advseg.data import load_volumes, write_synthetic_nifti
from advseg.errors import UserError
from advseg.experiment import check_config, load_experiment, run_experiment
from advseg.experiment.config import AttackSpec, ModelSpec
from advseg.inference import SlidingWindow
from advseg.models import load_checkpoint
from advseg.runs.records import read_records

EPS = 0.05


def tiny3d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1)
    ).eval()


class Volumes(Dataset):
    """Volumes of different shapes, ``{"image": (1, *S), "mask": (2, *S)}``."""

    def __init__(self, shapes):
        g = torch.Generator().manual_seed(0)
        self.items = [{"image": torch.rand(1, *s, generator=g) * 0.8 + 0.1,
                       "mask": (torch.rand(2, *s, generator=g) > 0.5).float()}
                      for s in shapes]  # fmt: skip

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _window_index(size: int, w: int) -> torch.Tensor:
    """Which window voxel each voxel of an axis holds: periodic, except the last ``w`` voxels,
    which hold the whole window (the tile moved back to end at the edge)."""
    p = torch.arange(size)
    return torch.where(p >= size - w, p - (size - w), p % w) if size >= w else p


def test_lay_out_puts_the_window_on_every_tile():
    delta = torch.randn(1, 4, 4, 4)
    shape = (10, 8, 3)  # tiles at 0, 4, 6 (moved back) x 0, 4 x one short tile
    d, h, w = (_window_index(s, 4) for s in shape)
    expected = delta[:, d][:, :, h][:, :, :, w]
    assert torch.equal(lay_out(delta, shape), expected)
    assert torch.equal(lay_out(delta, (4, 4, 4)), delta)
    last = [slice(s - min(s, 4), s) for s in shape]
    assert torch.equal(lay_out(delta, shape)[(slice(None), *last)], delta[..., :3])


def test_universal_on_volumes_is_one_window_shared_by_every_volume_within_budget():
    data = Volumes([(12, 8, 10), (8, 10, 8), (9, 8, 12)])
    inferer = SlidingWindow(tiny3d(), (4, 4, 4), overlap=0.5)
    attack = create_attack("universal", inferer, "bce", EPS, steps=3, fit_batch_size=2,
                           window=(4, 4, 4), seed=1)  # fmt: skip
    delta = attack.fit(data)
    assert delta.shape == (1, 4, 4, 4) and delta.abs().max() <= EPS + 1e-7
    for item in data.items:
        x, y = item["image"][None], item["mask"][None]
        applied = (attack(x, y) - x)[0]  # inside (0, 1): the valid range clips nothing
        assert torch.allclose(applied, lay_out(delta, x.shape[2:]), atol=1e-7)
        assert torch.allclose(applied[:, :4, :4, :4], delta, atol=1e-7)  # the same everywhere
    with pytest.raises(UserError, match="linf only"):
        create_attack("universal", inferer, "bce", 0.5, norm="l2", window=(4, 4, 4))


def test_universal_first_step_is_the_sign_of_the_volume_gradient_folded_on_the_window():
    """The reference, from the update rule: xi_1 = alpha * sign(sum over the volume's voxels
    holding each window voxel of the whole-volume input gradient) (Metzen et al., eq. 3)."""
    data = Volumes([(12, 8, 10)])
    inferer = SlidingWindow(tiny3d(), (4, 4, 4), overlap=0.5)
    attack = create_attack("universal", inferer, "bce", EPS, steps=1, fit_batch_size=1,
                           window=(4, 4, 4))  # fmt: skip
    delta = attack.fit(data)
    x, y = data.items[0]["image"][None].requires_grad_(True), data.items[0]["mask"][None]
    loss = nn.functional.binary_cross_entropy_with_logits(inferer(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    which = lay_out(torch.arange(64.0).reshape(1, 4, 4, 4), (12, 8, 10)).long().flatten()
    folded = torch.zeros(64).index_add_(0, which, grad.flatten()).reshape(1, 4, 4, 4)
    assert torch.equal(delta, (EPS / 10) * folded.sign())


def test_window_tiles_cut_volumes_into_padded_windows():
    tiles = WindowTiles(Volumes([(8, 4, 6), (3, 4, 4)]), (4, 4, 4))
    assert len(tiles) == 2 * 1 * 2 + 1
    first = tiles[0]
    assert first["image"].shape == (1, 4, 4, 4) and first["mask"].shape == (2, 4, 4, 4)
    short = tiles[len(tiles) - 1]["image"]  # the 3-slice volume, zero-padded at its end
    assert short.shape == (1, 4, 4, 4) and torch.all(short[:, 3] == 0)


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
    config.attacks = config.attacks[1:]  # pgd, and a universal perturbation
    config.attacks[0].kwargs, config.attacks[0].transfer = {"steps": 2}, True
    kwargs = {"steps": 2, "fit_batch_size": 2}
    config.attacks.append(AttackSpec(name="universal", losses=["bce"], eps=[EPS], kwargs=kwargs))
    config.report = False
    result = run_experiment(config, tmp / "run")
    return config, tmp / "run", result, read_records(tmp / "run")


def test_transfer_cells_on_volumes_name_source_target_and_protocol(grid):
    _, _, result, records = grid
    assert "b__pgd-inference__eps0.05__from-a" in result.grid.computed
    assert "a__pgd-tiles__eps0.05__from-b" in result.grid.computed
    pairs = set(zip(records["source"], records["model"], records["through"], strict=True))
    assert pairs == {(s, t, p) for s in "ab" for t in "ab" for p in ("inference", "tiles")}
    assert set(records["attack"]) >= {"pgd:inference", "pgd:tiles"}
    assert (records["linf"] <= EPS + 1e-6).all()
    records = records[records["attack"].str.startswith("pgd")]
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
                   & (records["attack"] == f"pgd:{protocol}")]  # fmt: skip
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


def test_universal_cells_on_volumes_score_the_saved_window_laid_out(grid):
    """A universal cell per protocol: one window fitted on the training volumes, saved, laid
    out on every held-out volume; its records recomputed here from the saved window."""
    config, run_dir, _, records = grid
    labels = {
        "universal:inference",
        "universal:tiles",
        "random-sign:inference",
        "random-sign:tiles",
    }
    assert labels <= set(records["attack"])
    data = load_volumes(config.data)
    net, _ = load_checkpoint(run_dir / "models" / "a" / "checkpoints" / "best")
    inferer = SlidingWindow(net.eval(), (16, 16, 16), overlap=0.5)
    low, high = data.valid_range
    for protocol in ("inference", "tiles"):
        delta = torch.from_numpy(np.load(run_dir / f"universal/a__eps0.05__bce__{protocol}.npy"))
        assert delta.shape == (1, 16, 16, 16) and delta.abs().max() <= EPS + 1e-7
        cell = records[(records["model"] == "a") & (records["attack"] == f"universal:{protocol}")]
        assert (cell["linf"] <= EPS + 1e-6).all() and (cell["through"] == protocol).all()
        for scan in dict.fromkeys(cell["slice_id"]):
            row = int(np.flatnonzero(data.index["id"].to_numpy() == scan)[0])
            image, mask = data.volume(row)
            x_adv = (image + lay_out(delta, image.shape[1:])).clamp(low, high)
            with torch.no_grad():
                pred = inferer(x_adv[None])[0] > 0
            tp = (pred & mask.bool()).sum((1, 2, 3)).tolist()
            rows = cell[cell["slice_id"] == scan].set_index("class").loc[list(data.classes)]
            assert rows["tp_adv"].tolist() == tp


@pytest.mark.slow
def test_report_shows_transfer_and_universal_on_volumes(grid):
    _, run_dir, _, _ = grid
    from advseg.report import write_report

    write_report(run_dir, protocol="per-class", eps=EPS)
    table = pd.read_csv(run_dir / "report" / "universal.csv")
    assert set(table["through"]) == {"inference", "tiles"}
    assert table["as_universal"].notna().all() and table["as_random_sign"].notna().all()
    assert (run_dir / "report" / "universal_a__eps0.05__bce__inference.png").is_file()
    matrix = pd.read_csv(run_dir / "report" / "transfer_matrix.csv")
    assert {"a", "b"} <= set(matrix["source"])


def test_evaluate_refuses_universal_on_a_3d_checkpoint(grid, tmp_path, capsys):
    """Without the training volumes it would fit on each held-out volume itself: not universal."""
    _, run_dir, _, _ = grid
    checkpoint = run_dir / "models" / "a" / "checkpoints" / "best"
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(checkpoint), "--out", str(tmp_path / "ev"), "--attack",
              "universal", "--eps", "0.05", "--device", "cpu"])  # fmt: skip
    assert exit_.value.code == 2
    assert "advseg run" in capsys.readouterr().err
    assert not (tmp_path / "ev" / "records").exists()
