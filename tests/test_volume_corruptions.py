"""Corruption cells on volumes: each whole volume corrupted in 3D by TorchIO with its voxel size in
mm and its valid range, scored through the sliding-window inference; records per (volume, class,
cell) equal to TorchIO + the inferer run by hand; ``advseg evaluate --corruption`` and a 3D grid
with ``corruptions:`` (tiny: unet3d-tiny trained 1 epoch on five 16-slice synthetic CT volumes)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio

from advseg.cli import main
from advseg.corruptions import CORRUPTIONS, Geometry, corrupt, corruption_seed, create_corruption
from advseg.data import load_volumes
from advseg.evaluate.corrupted import evaluate_corruptions
from advseg.inference import SlidingWindow
from advseg.labels import class_prediction
from advseg.metrics import dice_score, surface_dice
from advseg.models import load_checkpoint
from tiny_volumes import PATCH, train_tiny_volume_model  # tests/ is on sys.path

SPACING = (2.5, 0.8, 0.8)  # (D, H, W) mm: thick axial slices, as the synthetic CT


def _volume(depth: int = 12, size: int = 24) -> torch.Tensor:
    """A bright ball and a gradient in a dark box, ``(1, 1, D, H, W)`` in [0, 1]."""
    d, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (depth, size, size)),
                             indexing="ij")  # fmt: skip
    ball = (((d - depth / 2) * 2.5) ** 2 + ((h - size / 2) * 0.8) ** 2
            + ((w - size / 2) * 0.8) ** 2 < 7.0**2).float()  # fmt: skip
    return (0.1 + 0.6 * ball + 0.2 * w / size)[None, None]


def _draw(name: str, severity: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return create_corruption(name).draw(severity, generator, Geometry(True, SPACING))


def _torchio(transform: tio.Transform, volume: torch.Tensor) -> torch.Tensor:
    """``transform`` on one volume ``(C, D, H, W)`` whose voxels are SPACING mm."""
    image = tio.ScalarImage(tensor=volume, affine=np.diag([*SPACING, 1.0]))
    return transform(image)["data"].clamp(0, 1)


def test_a_volume_s_corruption_is_torchio_s_transform_in_mm():
    x = _volume()
    for severity in (1, 5):
        p = {name: _draw(name, severity, 3) for name in ("blur", "motion", "ghosting", "spike")}
        mm = p["blur"]["std"]
        assert mm[0] == mm[1] == mm[2]  # one length in mm along every axis
        twins = {
            "blur": tio.Blur(**p["blur"]),
            "motion": tio.Motion(**p["motion"]),
            "ghosting": tio.Ghosting(**p["ghosting"]),
            "spike": tio.Spike(**p["spike"]),
        }
        for name, transform in twins.items():
            ours = corrupt(x, name, severity, generator=torch.Generator().manual_seed(3),
                           spacing=SPACING)  # fmt: skip
            torch.testing.assert_close(ours[0], _torchio(transform, x[0]), atol=1e-6, rtol=0)
    # anisotropy thickens the real slices: 2.5 mm x factor, back to the grid (RandomAnisotropy)
    p = _draw("anisotropy", 4, 0)
    twin = tio.RandomAnisotropy(axes=(0,), downsampling=[p["downsampling"]] * 2)
    ours = corrupt(x, "anisotropy", 4, generator=torch.Generator().manual_seed(0), spacing=SPACING)
    torch.testing.assert_close(ours[0], _torchio(twin, x[0]), atol=1e-6, rtol=0)


def test_blur_on_thick_slices_spreads_fewer_voxels_through_the_plane():
    """Spacing-aware: a 2.5 mm slice is blurred by the same mm as a 0.8 mm pixel, so the
    through-plane profile changes less than without the spacing (one unit per voxel)."""
    x = _volume()
    with_mm = corrupt(x, "blur", 4, seed=0, spacing=SPACING)
    voxels = corrupt(x, "blur", 4, seed=0)
    through = [float((v - x).diff(dim=2).abs().mean()) for v in (with_mm, voxels)]
    assert not torch.equal(with_mm, voxels)
    assert (with_mm - x).abs().mean() < (voxels - x).abs().mean()
    assert through[0] != through[1]


@pytest.mark.parametrize("name", CORRUPTIONS.names())
def test_on_a_volume_severity_5_changes_it_more_than_severity_1(name):
    x = _volume(depth=24)
    change = [np.mean([float((corrupt(x, name, s, seed=seed, spacing=SPACING) - x).abs().mean())
                       for seed in range(3)]) for s in (1, 3, 5)]  # fmt: skip
    assert change[2] > change[0] > 0
    if name not in ("spike", "anisotropy"):  # a drawn spike position / resampling phase: the
        assert change[2] >= change[1] >= change[0]  # damage of one draw is not monotone


def test_a_volume_without_a_valid_range_is_corrupted_in_its_own_range():
    x = _volume() * 7 - 2  # an MRI-like z-scored volume: no fixed range
    own = corrupt(x, "noise", 3, seed=1, valid_range=None, spacing=SPACING)
    low, high = float(x.min()), float(x.max())
    unit = corrupt((x - low) / (high - low), "noise", 3, seed=1, spacing=SPACING)
    torch.testing.assert_close(own, unit * (high - low) + low, atol=1e-5, rtol=0)
    assert own.min() >= x.min() and own.max() <= x.max()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("volcorrupt")
    config, best = train_tiny_volume_model(root)
    return root, config, best


def test_a_corruption_cell_equals_torchio_and_the_inference_by_hand(trained):
    _, config, checkpoint = trained
    data = load_volumes(config)
    model, meta = load_checkpoint(checkpoint)
    model.eval()
    inferer = SlidingWindow(model, PATCH, overlap=0.5)
    rows = [int(np.flatnonzero(data.index["case"] == c)[0])
            for c in meta.data["split"]["cases"]["test"]]  # fmt: skip
    cells = [("blur", 3), ("noise", 5)]
    results = evaluate_corruptions(inferer, data, rows, cells, model_name="m", arch="unet3d-tiny",
                                   seed=4, batch_size=1, volumes=True, nsd_mm=2.0)  # fmt: skip
    low, high = data.valid_range
    for (name, severity), result in zip(cells, results, strict=True):
        records = result.records
        assert len(records) == len(rows) * len(data.classes)
        assert (records["attack"] == f"corruption:{name}:{severity}").all()
        assert (records["corruption"] == name).all() and (records["severity"] == severity).all()
        assert (records["through"] == "inference").all() and (records["slice"] == -1).all()
        for row in rows:
            x, y = data.volume(row)
            x, y = x[None], y[None]
            volume_id = str(data.index["id"].iloc[row])
            params = create_corruption(name).draw(
                severity, torch.Generator().manual_seed(corruption_seed(4, name, severity,
                                                                        volume_id)),
                Geometry(True, data.spacing(row)),
            )  # fmt: skip
            unit = (x[0] - low) / (high - low)
            image = tio.ScalarImage(tensor=unit, affine=np.diag([*data.spacing(row), 1.0]))
            transform = tio.Blur(**params) if name == "blur" else tio.Noise(**params)
            x_c = (transform(image)["data"].clamp(0, 1) * (high - low) + low)[None]
            with torch.no_grad():
                clean = class_prediction(inferer(x), "sigmoid")
                hit = class_prediction(inferer(x_c), "sigmoid")
            got = records[records["slice_id"] == volume_id]
            truth = y > 0.5
            assert got["dice_clean"].to_numpy() == pytest.approx(
                dice_score(clean, truth).numpy().ravel(), abs=1e-6)  # fmt: skip
            assert got["dice_adv"].to_numpy() == pytest.approx(
                dice_score(hit, truth).numpy().ravel(), abs=1e-6)  # fmt: skip
            spacing = np.array([data.spacing(row)])
            assert got["nsd_adv"].to_numpy() == pytest.approx(
                surface_dice(hit, truth, 2.0, spacing).numpy().ravel(), abs=1e-6)  # fmt: skip
            assert got["linf"].iloc[0] == pytest.approx(float((x_c - x).abs().max()), abs=1e-5)


def test_evaluate_and_a_grid_run_corruptions_on_volumes(trained, tmp_path, capsys):
    _, config, checkpoint = trained
    args = ["evaluate", str(checkpoint), "--out", str(tmp_path / "cli"), "--attack", "fgsm",
            "--eps", "0.1", "--loss", "bce", "--through", "inference", "--through", "tiles",
            "--corruption", "motion:2", "--corruption", "gamma:5", "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    files = sorted(p.name for p in (tmp_path / "cli/records").iterdir())
    assert files == [
        "run__corruption-gamma-5__eps0.parquet",
        "run__corruption-motion-2__eps0.parquet",
        "run__fgsm-inference__eps0.1.parquet",
        "run__fgsm-tiles__eps0.1.parquet",
    ]  # fmt: skip  (corruptions scored once)
    motion = pd.read_parquet(tmp_path / "cli/records/run__corruption-motion-2__eps0.parquet")
    fgsm = pd.read_parquet(tmp_path / "cli/records/run__fgsm-inference__eps0.1.parquet")
    assert np.array_equal(motion["dice_clean"], fgsm["dice_clean"])  # one clean reference
    assert motion["nsd_adv"].between(0, 1).all() and motion["hd95_mm_clean"].notna().all()
    assert "corruption:motion:2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # no attack to rebuild: one line, not a traceback
        main(["export", str(tmp_path / "cli"), "--attack", "corruption:motion:2"])
    assert exit_.value.code == 2
    assert "a corruption cell; export rebuilds attack cells" in capsys.readouterr().err

    from advseg.catalogue import packaged_config
    from advseg.experiment import load_experiment, run_experiment

    grid = load_experiment(packaged_config("volumes"))
    grid.data.path, grid.data.cache_dir = config.path, config.cache_dir
    grid.data.volume.spacing, grid.data.volume.patch, grid.data.volume.samples = None, PATCH, 2
    grid.train.epochs, grid.train.device = 1, "cpu"
    grid.split.test_fraction = grid.split.val_fraction = 0.3
    grid.attacks, grid.corruptions, grid.report = [], ["biasfield:4"], False
    result = run_experiment(grid, tmp_path / "grid")
    assert result.grid.computed == ["unet3d-tiny__corruption-biasfield-4__eps0"]
    records = pd.read_parquet(tmp_path / "grid/records/unet3d-tiny__corruption-biasfield-4__eps0"
                              ".parquet")  # fmt: skip
    assert len(records) == 2 * 4 and (records["through"] == "inference").all()
    assert (records["corruption"] == "biasfield").all() and records["nsd_adv"].notna().all()


def test_the_plausible_attacks_run_on_volumes_and_elastic_moves_the_truth(trained, tmp_path):
    """biasfield by tiles (gamma is the same machinery: a bounded parameter per volume);
    elastic through the inference, scored against the truth moved by its field;
    elastic by tiles (a field per tile) refused."""
    from advseg.errors import UserError
    from advseg.evaluate import EvaluateConfig, evaluate

    _, _, checkpoint = trained
    out = tmp_path / "plausible"
    sweep = EvaluateConfig(checkpoints=[checkpoint], out=out, attacks=["biasfield"],
                           losses=["bce"], eps=[0.3], through=["tiles"],
                           attack_options={"steps": 2}, device="cpu")  # fmt: skip
    records = pd.concat([pd.read_parquet(f) for f in evaluate(sweep).record_files])
    assert set(records["attack"]) == {"biasfield:tiles"}
    assert (records["linf"] > 0).all()
    elastic = EvaluateConfig(checkpoints=[checkpoint], out=tmp_path / "elastic",
                             attacks=["elastic"], losses=["bce"], eps=[2.0],
                             attack_options={"steps": 2}, device="cpu")  # fmt: skip
    moved = pd.concat([pd.read_parquet(f) for f in evaluate(elastic).record_files])
    truth_adv = moved["tp_adv"] + moved["fn_adv"]  # the deformed truth's voxels
    assert (truth_adv != moved["gt_pixels"]).any()
    elastic.out, elastic.through = tmp_path / "tiles", ["tiles"]
    with pytest.raises(UserError, match="elastic through tiles: each tile would get its own"):
        evaluate(elastic)
