"""advseg export: a tiny run on the phantom and one on NIfTI volumes, exported and checked."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from advseg.data import (
    DataConfig,
    PreprocessConfig,
    load_data,
    restore_slice,
    write_synthetic,
    write_synthetic_nifti,
)
from advseg.data.nifti import load_canonical, read_volume
from advseg.errors import UserError
from advseg.experiment import (
    AttackSpec,
    EvaluationSpec,
    ExperimentConfig,
    ModelSpec,
    SplitSpec,
    run_experiment,
)
from advseg.export import export_cell
from advseg.runs.records import read_records
from advseg.train import TrainConfig


def _run(data_path, tmp_path, name: str, attack: AttackSpec | None = None, batch_size: int = 4):
    from advseg.augment import AugmentConfig

    config = ExperimentConfig(
        name=name,
        data=DataConfig(
            path=data_path, cache_dir=tmp_path / "cache", preprocess=PreprocessConfig(size=32)
        ),
        split=SplitSpec(test_fraction=0.34, val_fraction=0.5),
        train=TrainConfig(
            epochs=1, batch_size=4, device="cpu", augment=AugmentConfig(enabled=False)
        ),
        models=[ModelSpec(arch="unet-tiny")],
        attacks=[attack or AttackSpec(name="fgsm", losses=["bce"], eps=[0.03])],
        evaluation=EvaluationSpec(batch_size=batch_size, examples=0),
        report=False,
    )
    run_dir = tmp_path / name
    run_experiment(config, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    write_synthetic(tmp / "data", cases=3, scans=1, slices=8, seed=0)
    return _run(tmp / "data", tmp, "phantom")


def test_export_writes_pngs_and_reproduces_fgsm_records(phantom_run, tmp_path):
    from PIL import Image

    result = export_cell(phantom_run, count=3, seed=1, out=tmp_path / "x", device="cpu")
    assert len(result.slices) == 3 and result.cell["attack"] == "fgsm"
    cases = {s.split("_")[0] for s in result.slices}
    assert len(cases) == min(3, read_records(phantom_run)["case"].nunique())  # spread
    assert result.reproduced == 3  # FGSM is deterministic: the evaluated images again
    document = json.loads((tmp_path / "x" / "export.json").read_text())
    entry = document["slices"][result.slices[0]]
    image = np.asarray(Image.open(tmp_path / "x" / entry["image"]))
    adversarial = np.asarray(Image.open(tmp_path / "x" / entry["adversarial"]))
    assert image.shape == (32, 32) and image.dtype == np.uint8
    assert 0 < np.abs(image.astype(int) - adversarial).max() <= round(0.03 * 255) + 1
    mask = np.asarray(Image.open(tmp_path / "x" / entry["adversarial_stomach"]))
    assert set(np.unique(mask)) <= {0, 255}
    assert document["nifti"] == {}  # PNG slices: no volumes

    again = export_cell(phantom_run, slices=result.slices[:1], out=tmp_path / "y", device="cpu")
    assert again.slices == result.slices[:1]
    first = (tmp_path / "x" / entry["adversarial"]).read_bytes()
    assert (tmp_path / "y" / entry["adversarial"]).read_bytes() == first  # deterministic


def test_export_reproduces_random_starts_by_running_the_runs_batches(tmp_path):
    from advseg.evaluate.cells import evaluate_cell
    from advseg.models import load_checkpoint

    write_synthetic(tmp_path / "data", cases=3, scans=1, slices=16, seed=0)
    pgd = AttackSpec(name="pgd", losses=["bce"], eps=[0.03], kwargs={"steps": 2})
    run_dir = _run(tmp_path / "data", tmp_path, "pgd", attack=pgd, batch_size=2)
    records = read_records(run_dir)
    evaluated = records["slice_id"].drop_duplicates().tolist()
    assert len(evaluated) >= 5
    picked = [evaluated[-1], evaluated[3], evaluated[0]]  # batches 0, 1 and the last
    result = export_cell(run_dir, slices=picked, out=tmp_path / "x", device="cpu")
    assert result.slices == picked
    assert result.reproduced == 3  # the very random starts of the run: every pixel count

    # the same slices attacked as one fresh batch draw other starts: the records differ
    net, meta = load_checkpoint(run_dir / "models" / "unet-tiny" / "checkpoints" / "best")
    data = load_data(DataConfig(path=tmp_path / "data", cache_dir=tmp_path / "cache",
                                preprocess=PreprocessConfig(size=32)))  # fmt: skip
    rows = [int(np.flatnonzero(data.index["id"] == s)[0]) for s in picked]
    fresh = evaluate_cell(net, data, rows, "pgd", ["bce"], 0.03, model_name="unet-tiny",
                          arch=meta.model, attack_kwargs={"steps": 2, "seed": 0})  # fmt: skip
    columns = ["slice_id", "class", "tp_adv", "fp_adv", "fn_adv"]
    ran = records[records["slice_id"].isin(picked)][columns].sort_values(columns[:2])
    drawn = fresh.records[columns].sort_values(columns[:2])
    assert not np.array_equal(ran.to_numpy(), drawn.to_numpy())


def test_export_rebuilds_a_targeted_random_start_cell_of_an_evaluate_output(phantom_run, tmp_path):
    from advseg.evaluate import EvaluateConfig, evaluate

    checkpoint = phantom_run / "models" / "unet-tiny" / "checkpoints" / "best"
    out = tmp_path / "erase"
    config = EvaluateConfig(checkpoints=[checkpoint], out=out, attacks=["pgd"], losses=["bce"],
                            eps=[0.03], erase=["stomach"], attack_options={"steps": 2},
                            batch_size=2, device="cpu")  # fmt: skip
    evaluate(config)
    assert (out / "evaluate.yaml").is_file()  # its settings, for export
    result = export_cell(out, count=3, out=tmp_path / "x", device="cpu")  # no --checkpoint
    assert result.cell["attack"] == "pgd:erase=stomach"
    document = json.loads((tmp_path / "x" / "export.json").read_text())
    assert document["attack"]["erase"] == ["stomach"]
    assert document["attack"]["kwargs"]["steps"] == 2 and document["attack"]["batch_size"] == 2
    assert result.reproduced == 3  # its random starts and target: the recorded counts again


def test_export_refuses_what_it_cannot_do_in_one_line(phantom_run, tmp_path):
    with pytest.raises(UserError, match=r"--slices: case9_day0_slice_0001 not evaluated"):
        export_cell(phantom_run, slices=["case9_day0_slice_0001"], out=tmp_path / "a")
    with pytest.raises(UserError, match=r"--loss focal: not in the run's records \(it has bce\)"):
        export_cell(phantom_run, loss="focal", out=tmp_path / "a")
    with pytest.raises(UserError, match=r"no checkpoint of model ghost"):
        from advseg.export import locate_checkpoint

        locate_checkpoint(phantom_run, "ghost", None, {})
    assert not (tmp_path / "a").exists()  # nothing half-written


def test_export_with_a_checkpoint_of_another_architecture_is_refused(phantom_run, tmp_path):
    from dataclasses import replace

    import torch

    from advseg.models import create_model, read_checkpoint
    from advseg.models.checkpoint import save_checkpoint

    _, meta, _ = read_checkpoint(phantom_run / "models" / "unet-tiny" / "checkpoints" / "best")
    torch.manual_seed(0)
    other = create_model("unet", classes=len(meta.classes))  # the same data, another model
    save_checkpoint(tmp_path / "other", other, replace(meta, model="unet"))
    with pytest.raises(UserError, match=r"other: a 'unet' model, but the cell's records were "
                       r"computed by a 'unet-tiny' model"):  # fmt: skip
        export_cell(phantom_run, checkpoint=tmp_path / "other", out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_export_of_nifti_slices_lands_on_the_source_grid(tmp_path):
    write_synthetic_nifti(tmp_path / "ct", cases=3, slices=6, size=(64, 48), seed=0)
    run_dir = _run(tmp_path / "ct", tmp_path, "ct")
    result = export_cell(run_dir, count=2, seed=0, out=tmp_path / "x", device="cpu")
    document = json.loads((tmp_path / "x" / "export.json").read_text())
    assert document["nifti"], "NIfTI sources give volumes"
    scan, volume = next(iter(document["nifti"].items()))
    source = load_canonical(volume["source"])
    truth = nib.load(tmp_path / "x" / volume["truth_mask"])
    assert np.allclose(truth.affine, source.affine) and truth.shape[:3] == source.shape
    labels = read_volume(volume["source"].replace("imagesTr", "labelsTr"))  # (H, W, Z)
    exported = np.asarray(truth.dataobj)  # (X, Y, Z, K), X = slice width
    others = [z for z in range(source.shape[2]) if z not in volume["z"]]
    assert not exported[:, :, others].any()  # only the exported slices are filled
    for z in volume["z"]:
        liver = labels[:, :, z].T == 1  # label 1 is class 0 (dataset.json), as (X, Y)
        back = exported[:, :, z, 0] > 0
        if liver.sum() >= 40:  # big enough to survive 32 px and back: on the source's liver
            assert (back & liver).sum() / liver.sum() > 0.7
            assert (back & liver).sum() / back.sum() > 0.7
    data = load_data(DataConfig(path=tmp_path / "ct", cache_dir=tmp_path / "cache",
                                preprocess=PreprocessConfig(size=32)))  # fmt: skip
    for slice_id in result.slices:
        row = int(np.flatnonzero(data.index["id"] == slice_id)[0])
        meta = data.index.iloc[row]
        if meta["scan"] != scan:
            continue
        expected = restore_slice(data.masks[row] > 0, data.geometry.iloc[row],
                                 int(meta["height"]), int(meta["width"]))  # fmt: skip
        got = exported[:, :, int(meta["image_z"]), :].transpose(2, 1, 0) > 0  # (K, H, W)
        assert np.array_equal(got, expected)  # exactly the data's mask, back on its grid
    assert result.reproduced == len(result.slices)

    # the source volume in its units, perturbed on the exported slices within eps x range
    attacked = nib.load(tmp_path / "x" / volume["adversarial_source"])
    assert np.allclose(attacked.affine, source.affine) and attacked.shape == source.shape
    raw = read_volume(volume["source"]).transpose(1, 0, 2).astype(np.float32)  # (X, Y, Z)
    moved = np.asarray(attacked.dataobj) - raw
    assert not moved[:, :, others].any()  # every other slice is the source itself
    for z in volume["z"]:
        scale = float(np.clip(raw[:, :, z], 0, None).max())  # intensity: max, as preprocessing
        assert volume["source_units_per_input_unit"][str(z)] == pytest.approx(scale)
        assert np.abs(moved[:, :, z]).max() <= 0.03 * scale * (1 + 1e-5)  # eps 0.03 kept
        assert np.abs(moved[:, :, z]).max() >= 0.5 * 0.03 * scale  # and spent (FGSM: +-eps)


def test_cli_export_says_what_it_wrote_and_how_it_checked(phantom_run, tmp_path, capsys):
    from advseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(phantom_run), "--count", "1", "--out", str(tmp_path / "e"),
              "--device", "cpu"])  # fmt: skip
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exported 1 slices of unet-tiny / fgsm / eps 0.03 / bce" in out
    assert "check: 1 of 1 slices give the recorded pixel counts exactly" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(phantom_run), "--eps", "0.5", "--out", str(tmp_path / "f")])
    assert exit_info.value.code == 2
    assert "--eps 0.5: not in the run's records (it has 0.03)" in capsys.readouterr().err
