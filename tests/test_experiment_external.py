"""Models advseg did not train named in an experiment grid (``advseg run``): not trained, judged
as ``advseg evaluate`` judges them, their provenance in ``external.json``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from advseg.cli import main
from advseg.data import UWMGI_CLASSES, write_synthetic
from advseg.errors import UserError
from advseg.experiment import load_experiment
from advseg.runs.records import read_records
from tiny_models import tiny_net


def run(config: dict, tmp_path, capsys) -> tuple[int, str]:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(path), "--out", str(tmp_path / "run")])
    return exit_.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid-external")
    write_synthetic(root / "data", cases=3, scans=1, slices=4)
    torch.jit.save(torch.jit.script(tiny_net(classes=3, seed=5).eval()), root / "model.ts")
    return root


def grid(root, models: list, **more) -> dict:
    return {
        "name": "ext",
        "data": {"path": str(root / "data"), "cache_dir": str(root / "cache"),
                 "preprocess": {"size": 32, "channels": 3}},
        "split": {"test_fraction": 0.34, "val_fraction": 0.5},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "augment": {"enabled": False}},
        "models": models,
        "attacks": [{"name": "fgsm", "losses": ["bce"], "eps": [0.03]}],
        "evaluation": {"batch_size": 4, "examples": 0},
        "report": False,
        **more,
    }  # fmt: skip


def test_a_torchscript_model_beside_a_zoo_model_scores_the_grids_test_slices(
    files, tmp_path, capsys
):
    ts = {"name": "mine", "torchscript": str(files / "model.ts"), "classes": list(UWMGI_CLASSES),
          "in_channels": 3}  # fmt: skip
    config = grid(files, [{"arch": "unet-tiny"}, ts], report=True)
    code, err = run(config, tmp_path, capsys)
    assert code == 0, err
    records = read_records(tmp_path / "run")
    mine, zoo = records[records["model"] == "mine"], records[records["model"] == "unet-tiny"]
    assert set(mine["arch"]) == {"torchscript"} and len(mine)
    assert sorted(set(mine["slice_id"])) == sorted(set(zoo["slice_id"]))  # the grid's test rows
    assert (mine["linf"] <= 0.03 + 1e-6).all()
    provenance = json.loads((tmp_path / "run" / "external.json").read_text())["mine"]
    assert provenance["kind"] == "torchscript" and provenance["path"] == str(files / "model.ts")
    assert not (tmp_path / "run" / "models" / "mine").exists()  # not trained
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert str(files / "model.ts") in report  # its provenance row
    saved = load_experiment(tmp_path / "run" / "config.yaml")  # the long form round-trips
    assert saved.models[1].external.kind == "torchscript" and saved.models[1].external.size == 32


def test_what_does_not_apply_to_an_external_model_is_refused_in_one_line(files, tmp_path):
    ts = {"name": "mine", "torchscript": str(files / "model.ts"), "classes": list(UWMGI_CLASSES),
          "in_channels": 3}  # fmt: skip
    nn = {"nnunet": str(files / "results"), "configuration": "2d"}
    cases = [
        ({**ts, "train": {"epochs": 2}}, {}, r"models\[0\]\.train: a torchscript model"),
        ({**ts, "arch": "unet"}, {}, r"models\[0\]\.arch: a torchscript model is not trained"),
        ({**ts, "bundle": "b"}, {}, "names bundle and torchscript"),
        (nn, {}, r"models\[0\]\.data: a nnunet model needs its data"),
        ({**nn, "data": "raw"}, {"split": {"folds": 2}}, "not with split.folds"),
        (ts, {"corruptions": ["noise:1"]}, "corruptions: not built"),
    ]
    for i, (entry, more, message) in enumerate(cases):
        path = tmp_path / f"g{i}.yaml"
        path.write_text(yaml.safe_dump({**grid(files, [entry]), **more}))
        with pytest.raises(UserError, match=message) as error:
            load_experiment(path)
        assert "\n" not in str(error.value)
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(grid(files, [{"arch": "unet-tiny"}, {**nn, "data": "raw"}])))
    with pytest.raises(UserError, match=r"eps are in its source's units .* run them in two grids"):
        load_experiment(path)
    refused = [
        ({**ts, "size": 64}, r"attacks\[0\]: mine reads slices of size 64 with 3 channel\(s\), "
                             "the grid's models 32 with 3: they share no images"),
        ({**ts, "data": str(files / "data")}, "mine is scored on its own data, not the grid's"),
    ]  # fmt: skip
    for entry, message in refused:
        path = tmp_path / "transfer.yaml"
        config = grid(files, [{"arch": "unet-tiny"}, entry])
        config["attacks"][0]["transfer"] = True
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(UserError, match=message):
            load_experiment(path)


def test_transfer_between_a_torchscript_model_and_a_zoo_model_on_the_same_slices(
    files, tmp_path, capsys
):
    ts = {"name": "mine", "torchscript": str(files / "model.ts"), "classes": list(UWMGI_CLASSES),
          "in_channels": 3}  # fmt: skip
    config = grid(files, [{"arch": "unet-tiny"}, ts])
    config["attacks"][0]["transfer"] = True
    code, err = run(config, tmp_path, capsys)
    assert code == 0, err
    records = read_records(tmp_path / "run")
    keys = ["slice_id", "class", "loss"]
    for source, target in [("mine", "unet-tiny"), ("unet-tiny", "mine")]:
        crafted = records[(records["model"] == source) & (records["source"] == source)]
        scored = records[(records["model"] == target) & (records["source"] == source)]
        own = records[(records["model"] == target) & (records["source"] == target)]
        assert len(scored) == len(own) > 0  # every test slice the target scores white-box
        pair = scored.merge(crafted, on=keys, suffixes=("", "_src"))
        assert len(pair) == len(scored)
        assert (pair["linf"] - pair["linf_src"]).abs().max() < 1e-6  # the source's images
        clean = scored.merge(own, on=keys, suffixes=("", "_own"))
        assert (clean["dice_clean"] - clean["dice_clean_own"]).abs().max() < 1e-6


def test_an_nnunet_model_in_a_grid_is_judged_on_its_own_volumes_in_hu(tmp_path, capsys):
    pytest.importorskip("nnunetv2")
    from nnunet_results import write_raw, write_results

    raw = write_raw(tmp_path / "raw", cases=2)
    base = write_results(tmp_path, configurations=("2d",), folds=(0,), raw=raw)
    model = {"name": "nn", "nnunet": str(base), "configuration": "2d", "folds": [0],
             "mirroring": False, "data": str(raw)}  # fmt: skip
    config = grid(tmp_path, [model])
    config["data"] = {"path": "synthetic", "cache_dir": str(tmp_path / "cache")}
    config["attacks"] = [{"name": "fgsm", "losses": ["ce"], "eps": [20]}]
    config["evaluation"]["max_slices"] = 1
    code, err = run(config, tmp_path, capsys)
    assert code == 0, err
    records = read_records(tmp_path / "run")
    assert set(records["model"]) == {"nn"} and set(records["arch"]) == {"nnunet:2d"}
    assert records["case"].nunique() == 1 and (records["linf"] <= 20 + 1e-3).all()
    assert records["linf"].max() > 1  # HU, not [0, 1]
    provenance = json.loads((tmp_path / "run" / "external.json").read_text())["nn"]
    assert provenance["folds"] == ["0"] and provenance["mirroring"] is False
    case = str(records["slice_id"].iloc[0])  # advseg export: the volume, on its source grid
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path / "run"), "--slices", case, "--out", str(tmp_path / "x")])
    assert exit_.value.code == 0, capsys.readouterr().err
    document = json.loads((tmp_path / "x" / "export.json").read_text())
    assert [c["same_counts"] for c in document["check"]] == [True]
    assert document["external"]["folds"] == ["0"] and set(document["nifti"]) == {case}
