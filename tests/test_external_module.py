"""A user's own model: TorchScript files and module factories, judged by ``advseg evaluate``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from advseg.cli import main
from advseg.data import UWMGI_CLASSES, write_synthetic
from advseg.errors import UserError
from advseg.models.external.module import check_outputs, load_factory, load_torchscript
from advseg.runs.records import read_records
from tiny_models import tiny_net


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


def scripted_factory() -> torch.nn.Module:
    """What ``--model-factory test_external_module:scripted_factory`` builds (3 classes)."""
    return tiny_net(classes=3, seed=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("external-module")
    write_synthetic(root / "data", cases=2, scans=1, slices=3)
    model = tiny_net(classes=3, seed=5).eval()
    torch.jit.save(torch.jit.script(model), root / "model.ts")
    save_file(model.state_dict(), root / "weights.safetensors")
    return root, model


def test_torchscript_equals_the_eager_module_with_gradients(files):
    root, eager = files
    scripted = load_torchscript(root / "model.ts")
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, ref = scripted(x), eager(x2)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


def test_factory_with_weights_equals_the_module(files):
    root, eager = files
    model = load_factory("test_external_module:scripted_factory", root / "weights.safetensors")
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(model(x), eager(x))


def test_bad_models_are_one_line(tmp_path, files):
    root, _ = files
    (tmp_path / "not.ts").write_bytes(b"not torchscript")
    with pytest.raises(UserError, match="not a TorchScript module"):
        load_torchscript(tmp_path / "not.ts")
    with pytest.raises(UserError, match=r"expected package\.module:function"):
        load_factory("no-colon")
    with pytest.raises(UserError, match="cannot import"):
        load_factory("no_such_package_xyz:make")
    with pytest.raises(UserError, match="no function"):
        load_factory("test_external_module:missing")
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="does not fit the module"):
        load_factory("test_external_module:scripted_factory", tmp_path / "other.safetensors")
    save_file({"w": torch.tensor([float("nan")])}, tmp_path / "nan.safetensors")
    with pytest.raises(UserError, match="NaN"):
        load_factory("test_external_module:scripted_factory", tmp_path / "nan.safetensors")
    model = load_torchscript(root / "model.ts")
    with pytest.raises(UserError, match="need 4"):
        check_outputs(model, 3, ["a", "b", "c"], "softmax", "m.ts")
    with pytest.raises(UserError, match="input channel"):
        check_outputs(model, 4, list(UWMGI_CLASSES), "sigmoid", "m.ts")


def test_evaluate_a_torchscript_model_from_the_cli(files, tmp_path, capsys):
    root, _ = files
    out = tmp_path / "ts"
    args = ["evaluate", "--torchscript", str(root / "model.ts"), "--data", str(root / "data"),
            "--classes", ",".join(UWMGI_CLASSES), "--in-channels", "3", "--size", "32",
            "--attack", "pgd",
            "--steps", "2", "--eps", "0.03", "--loss", "bce", "--out", str(out)]  # fmt: skip
    assert cli(args) == 0
    records = read_records(out / "records")
    assert set(records["model"]) == {"ts-model"} and set(records["arch"]) == {"torchscript"}
    assert records["slice_id"].nunique() == 6  # every slice of the data: no split is known
    assert (records["linf"] <= 0.03 + 1e-6).all()
    provenance = json.loads((out / "external.json").read_text())["ts-model"]
    assert provenance["kind"] == "torchscript" and len(next(iter(provenance["sha256"].values())))
    assert cli(["export", str(out), "--loss", "bce", "--out", str(tmp_path / "x")]) == 2
    assert "slices are not exported" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_evaluate_refuses_bad_external_options_in_one_line(files, tmp_path, capsys):
    root, _ = files
    base = ["evaluate", "--out", str(tmp_path / "o"), "--data", str(root / "data")]
    assert cli([*base, "--torchscript", str(root / "model.ts")]) == 2
    assert "--classes" in capsys.readouterr().err
    assert cli([*base, "--torchscript", "x.ts", "--nnunet", str(root)]) == 2
    assert "one external model at a time" in capsys.readouterr().err
    assert cli([*base, "--weights", str(root / "weights.safetensors")]) == 2
    assert "--model-factory" in capsys.readouterr().err
    args = [*base, "--torchscript", str(root / "model.ts"), "--classes", "a,b,c", "--size", "32",
            "--in-channels", "3"]  # fmt: skip
    assert cli(args) == 2
    assert "the data's classes are" in capsys.readouterr().err
    assert not (tmp_path / "o" / "records").exists()


def test_the_report_names_an_external_models_provenance(tmp_path):
    from advseg.report.provenance import _external_rows

    facts = {
        "kind": "nnunet", "folder": "/r/Dataset001_X", "configuration": "2d", "folds": ["0", "1"],
        "checkpoint": "checkpoint_final.pth", "trainer": "nnUNetTrainer", "mirroring": False,
        "checkpoint_sha256": {"0": "a" * 64, "1": "b" * 64}, "units": "HU",
    }  # fmt: skip
    (tmp_path / "external.json").write_text(json.dumps({"nnunet-2d-f0f1-nomirror": facts}))
    ((name, text),) = _external_rows(tmp_path)
    assert name == "model: nnunet-2d-f0f1-nomirror"
    for part in ("/r/Dataset001_X", "configuration 2d", "folds 0, 1", "checkpoint_final.pth",
                 "mirroring off", "a" * 64, "b" * 64, "eps in HU"):  # fmt: skip
        assert part in text


def test_kept_volumes_of_different_shapes_are_read_back_one_by_one():
    """--transfer keeps each volume's adversarial image; volumes differ in shape."""
    import numpy as np

    from advseg.evaluate.cells import _joined
    from advseg.evaluate.command import crafted_reader

    same = _joined([np.zeros((1, 1, 2, 3)), np.ones((1, 1, 2, 3))])
    assert isinstance(same, np.ndarray) and same.shape == (2, 1, 2, 3)
    kept = _joined([np.zeros((1, 1, 2, 3)), np.ones((1, 1, 4, 5))])
    assert [k.shape for k in kept] == [(1, 2, 3), (1, 4, 5)]
    read = crafted_reader({"ce": kept})
    (image,) = read(torch.zeros(1), None, np.array([1]))
    assert image.shape == (1, 1, 4, 5) and bool((image == 1).all())
