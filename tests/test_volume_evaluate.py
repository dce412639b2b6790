"""advseg evaluate on a 3D checkpoint: whole held-out volumes attacked through the sliding window
(--through inference) or tile by tile (--through tiles), one record per (volume, class, cell)
with Dice, HD95 in mm and the normalised surface Dice, each checked against a direct computation
(tiny: unet3d-tiny trained 1 epoch on five 16-slice synthetic CT volumes)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from advseg.attacks.through import attack_volume
from advseg.cli import main
from advseg.data import load_volumes
from advseg.evaluate import EvaluateConfig, evaluate
from advseg.inference import SlidingWindow
from advseg.labels import class_prediction
from advseg.metrics import dice_score, surface_dice
from advseg.models import load_checkpoint
from tiny_volumes import PATCH, train_tiny_volume_model  # tests/ is on sys.path

EPS = 0.1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("voleval")
    config, best = train_tiny_volume_model(root)
    return root, config, best


def test_records_per_volume_class_and_protocol(trained, tmp_path):
    _, config, checkpoint = trained
    sweep = EvaluateConfig(checkpoints=[checkpoint], out=tmp_path / "out", attacks=["fgsm"],
                           losses=["bce"], eps=[EPS], through=["inference", "tiles"],
                           nsd_mm=2.0, device="cpu")  # fmt: skip
    result = evaluate(sweep)
    records = pd.concat([pd.read_parquet(f) for f in result.record_files], ignore_index=True)
    model, meta = load_checkpoint(checkpoint)
    test_cases = meta.data["split"]["cases"]["test"]
    assert sorted(records["case"].unique()) == test_cases
    assert len(records) == 2 * len(test_cases) * 4  # (protocol, volume, class)
    assert set(records["through"]) == {"inference", "tiles"}
    assert set(records["attack"]) == {"fgsm:inference", "fgsm:tiles"}
    assert (records["slice"] == -1).all() and (records["nsd_mm"] == 2.0).all()
    assert (records["linf"] <= EPS + 1e-6).all()
    assert set(result.table["model"]) == {"run"} and len(result.cells) == 2
    # every number again, directly: the volume, the inferer, the attack, MONAI's metrics
    data = load_volumes(config)
    inferer = SlidingWindow(model, PATCH, overlap=0.5)
    for through in ("inference", "tiles"):
        for case in test_cases:
            row = int(np.flatnonzero(data.index["case"] == case)[0])
            x, y = data.volume(row)
            x, y = x[None], y[None]
            x_adv = attack_volume("fgsm", inferer, x, y, through=through, loss="bce", eps=EPS,
                                  valid_range=data.valid_range)  # fmt: skip
            with torch.no_grad():
                clean = class_prediction(inferer(x), "sigmoid")
                adv = class_prediction(inferer(x_adv), "sigmoid")
            spacing = np.array([data.spacing(row)])
            got = records[(records["case"] == case) & (records["through"] == through)]
            truth = y > 0.5
            assert got["dice_clean"].to_numpy() == pytest.approx(
                dice_score(clean, truth).numpy().ravel(), abs=1e-6)  # fmt: skip
            assert got["dice_adv"].to_numpy() == pytest.approx(
                dice_score(adv, truth).numpy().ravel(), abs=1e-6)  # fmt: skip
            assert got["nsd_adv"].to_numpy() == pytest.approx(
                surface_dice(adv, truth, 2.0, spacing).numpy().ravel(), abs=1e-6)  # fmt: skip
            assert got["linf"].iloc[0] == pytest.approx(float((x_adv - x).abs().max()), abs=1e-6)


def test_evaluate_command_names_the_protocol(trained, tmp_path, capsys):
    _, _, checkpoint = trained
    args = ["evaluate", str(checkpoint), "--out", str(tmp_path / "cli"), "--attack", "pgd",
            "--steps", "2", "--eps", str(EPS), "--loss", "bce", "--through", "tiles",
            "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    assert "pgd:tiles" in capsys.readouterr().out
    records = pd.read_parquet(tmp_path / "cli/records/run__pgd-tiles__eps0.1.parquet")
    assert (records["through"] == "tiles").all() and records["nsd_clean"].notna().all()
    with pytest.raises(SystemExit) as exit_:
        main([*args[:-5], "--through", "windows", "--out", str(tmp_path / "bad")])
    assert exit_.value.code == 2
    assert "--through" in capsys.readouterr().err


def test_export_writes_volumes_on_the_source_grid(trained, tmp_path):
    import nibabel as nib

    from advseg.export_volumes import export_any

    root, config, checkpoint = trained
    sweep = EvaluateConfig(checkpoints=[checkpoint], out=tmp_path / "out", attacks=["pgd"],
                           losses=["bce"], eps=[EPS], through=["tiles"],
                           attack_options={"steps": 2}, device="cpu")  # fmt: skip
    evaluate(sweep)
    result = export_any(tmp_path / "out", count=1, checkpoint=checkpoint, device="cpu")
    assert result.reproduced == 1  # the random starts of the evaluation's batch, again
    scan = result.slices[0]
    case = int(scan.removeprefix("case").split("_")[0])
    source = nib.load(root / f"ct/imagesTr/abct_{case:03d}.nii.gz")
    label = np.asarray(nib.load(root / f"ct/labelsTr/abct_{case:03d}.nii.gz").dataobj)
    folder = result.out / "nifti"
    truth = nib.load(folder / f"{scan}_truth_mask.nii.gz")
    assert truth.shape == (*source.shape, 4)
    assert np.allclose(truth.affine, source.affine)
    assert np.array_equal(np.asarray(truth.dataobj)[..., 1], label == 2)  # spleen
    delta = np.asarray(nib.load(folder / f"{scan}_perturbation_source.nii.gz").dataobj)
    std = float(load_volumes(config).index["std"].iloc[0])  # CT: one z-score for the set
    assert 0 < np.abs(delta).max() <= EPS * std * (1 + 1e-5)  # within eps, in HU
