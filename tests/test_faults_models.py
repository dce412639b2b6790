"""Model weights checked on load, and the checkpoint's architecture over a contradicting name
(issue 25): a damaged checkpoint never evaluates to numbers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from advseg.cli import main
from advseg.config import to_dict
from advseg.data import UWMGI_CLASSES, PreprocessConfig, write_synthetic
from advseg.errors import UserError
from advseg.experiment import load_experiment
from advseg.models import create_model, load_checkpoint, metadata_for
from advseg.models.checkpoint import checkpoint_files, save_checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    data = root / "data"
    write_synthetic(data, cases=3, scans=1, slices=4)
    torch.manual_seed(0)
    model = create_model("unet-tiny")
    source = {"config": {"path": str(data), "cache_dir": str(root / "cache")},
              "test_fraction": 0.34, "split_seed": 0}  # fmt: skip
    meta = metadata_for(model, list(UWMGI_CLASSES), data=source,
                        preprocessing=to_dict(PreprocessConfig(size=32)))  # fmt: skip
    save_checkpoint(root / "good", model, meta)
    return root


def _rewrite(root, name: str, edit) -> object:
    """A copy of the good checkpoint as ``name`` with ``edit(tensors)`` applied, same save id."""
    weights, meta_file = checkpoint_files(root / "good")
    with safe_open(str(weights), framework="pt") as handle:
        header = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    edit(tensors)
    new_weights, new_meta = checkpoint_files(root / name)
    save_file(tensors, str(new_weights), metadata=header)
    new_meta.write_text(meta_file.read_text())
    return root / name


def _first_conv(tensors) -> str:
    return next(k for k, v in tensors.items() if v.ndim == 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(saved, bad):
    def poison(tensors):
        tensors[_first_conv(tensors)].view(-1)[:3] = bad

    path = _rewrite(saved, f"poisoned-{bad}", poison)
    with pytest.raises(UserError, match=r"3 weights are not finite numbers \(NaN or inf\) in 1"):
        load_checkpoint(path)


def test_all_nan_weights_are_refused_by_evaluate_in_one_line(saved, capfd):
    path = _rewrite(saved, "all-nan", lambda t: [v.fill_(float("nan")) for v in t.values()
                                                 if v.is_floating_point()])  # fmt: skip
    out = saved / "eval-nan"
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", str(path), "--out", str(out), "--eps", "0.01", "--device", "cpu"])
    assert stop.value.code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "all-nan" in err[0] and "not finite numbers" in err[0], err
    assert not (out / "records").exists()


def test_a_reshaped_tensor_is_refused(saved):
    def reshape(tensors):
        key = _first_conv(tensors)
        tensors[key] = tensors[key].reshape(tensors[key].shape[0], -1, 1, 1).contiguous()

    with pytest.raises(
        UserError, match=r"weights do not fit model 'unet-tiny' .*1 of another shape"
    ):
        load_checkpoint(_rewrite(saved, "reshaped", reshape))


def test_an_arch_contradicting_the_checkpoint_is_refused(saved, tmp_path):
    path = tmp_path / "exp.yaml"
    text = f"models:\n  - arch: unet\n    checkpoint: {saved / 'good'}\nattacks:\n  - name: fgsm\n"
    path.write_text(text)
    with pytest.raises(UserError, match=r"models\[0\]\.arch: 'unet', but its checkpoint .*good "
                       r"holds a 'unet-tiny' model"):  # fmt: skip
        load_experiment(path)
    path.write_text(text.replace("arch: unet", "arch: unet-tiny"))
    assert load_experiment(path).models[0].arch == "unet-tiny"  # the same name: accepted
    path.write_text(text.replace("  - arch: unet\n    checkpoint", "  - checkpoint"))
    load_experiment(path)  # no arch: the checkpoint's is used


def test_the_meta_json_is_untouched_by_the_rewrite(saved):
    """The fixture's rewrites change the weights only: the refusals are the weights' doing."""
    path = _rewrite(saved, "copy", lambda tensors: None)
    _, meta = load_checkpoint(path)
    assert meta.model == "unet-tiny"
    good = json.loads(checkpoint_files(saved / "good")[1].read_text())
    assert json.loads(checkpoint_files(path)[1].read_text()) == good


@pytest.mark.parametrize("damage", ["reshaped", "nan"])
def test_a_resume_state_of_wrong_shapes_is_one_line(tmp_path, damage):
    """An optimiser state whose moments do not fit their parameters (load_state_dict took it;
    the first step was a traceback) is refused naming the checkpoint and the entry."""
    from advseg.models import read_checkpoint
    from test_train import run as train_blobs
    from test_train import tiny_config

    train_blobs(tmp_path, tiny_config(epochs=1))
    last = tmp_path / "checkpoints" / "last"
    weights, meta, state = read_checkpoint(last)
    moment = state["optimizer"]["state"][0]["exp_avg"]
    if damage == "reshaped":
        state["optimizer"]["state"][0]["exp_avg"] = moment.reshape(-1)
        said = rf"optimizer.state.0.exp_avg has shape \({moment.numel()},\), its parameter"
    else:
        state["optimizer"]["state"][0]["exp_avg"] = torch.full_like(moment, float("nan"))
        said = "optimizer.state.0.exp_avg holds NaN or inf"
    model = create_model("unet-tiny", in_channels=3, classes=2)
    model.load_state_dict(weights)
    save_checkpoint(last, model, meta, training_state=state)
    with pytest.raises(UserError, match=rf"last.json: training_state {said}") as caught:
        train_blobs(tmp_path, tiny_config(epochs=1), resume=True)
    assert "\n" not in str(caught.value)


def test_evaluate_outputs_carry_their_identity_and_refuse_a_foreign_file(saved, capfd):
    """``advseg evaluate`` writes run.json and each records file's run, cell and model (the
    checkpoint's save_id); a records file of another evaluation copied in is refused by
    every later reader (report, export), naming it."""
    import shutil

    from advseg.models.checkpoint import checkpoint_id
    from advseg.runs.records import read_records, records_identity

    outs = []
    for eps in ("0.01", "0.02"):
        outs.append(saved / f"eval-{eps}")
        with pytest.raises(SystemExit) as stop:
            main(["evaluate", str(saved / "good"), "--out", str(outs[-1]), "--eps", eps,
                  "--attack", "fgsm", "--loss", "bce", "--device", "cpu"])  # fmt: skip
        assert stop.value.code == 0
    files = sorted((outs[0] / "records").glob("*.parquet"))
    run = json.loads((outs[0] / "run.json").read_text())["config"]
    fingerprint = json.loads((outs[0] / "data.json").read_text())["fingerprint"]
    assert records_identity(files[0]) == {
        "run": run, "cell": files[0].stem, "model": checkpoint_id(saved / "good"),
        "data": fingerprint}  # fmt: skip
    assert len(read_records(outs[0])) > 0
    foreign = sorted((outs[1] / "records").glob("*.parquet"))[0]
    shutil.copy(foreign, outs[0] / "records" / foreign.name)
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["report", str(outs[0])])
    assert stop.value.code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"{foreign.name}: records of another run (another config)" in err[0]
