import json
import pickle

import pytest
import torch

from advseg.errors import UserError
from advseg.models import create_model, load_checkpoint, metadata_for, read_checkpoint
from advseg.models.checkpoint import save_checkpoint

CLASSES = ["large_bowel", "small_bowel", "stomach"]


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=3)
    meta = metadata_for(model, CLASSES, preprocessing={"size": 32}, data={"split_seed": 7})
    save_checkpoint(tmp_path / "best", model, meta)
    return tmp_path / "best", model


@pytest.mark.parametrize("suffix", ["", ".safetensors", ".json"])
def test_round_trip_gives_the_same_outputs(saved, suffix):
    path, model = saved
    loaded, meta = load_checkpoint(f"{path}{suffix}")
    assert not loaded.training
    assert (meta.model, meta.in_channels, meta.classes) == ("unet-tiny", 3, CLASSES)
    assert meta.preprocessing == {"size": 32} and meta.data == {"split_seed": 7}
    assert meta.params == sum(p.numel() for p in model.parameters())
    assert torch.__version__.startswith(meta.versions["torch"])
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_training_state_round_trip_without_pickle(tmp_path):
    model = create_model("unet-tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    model(torch.rand(1, 3, 32, 32)).mean().backward()
    optimizer.step()
    scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": 3}
    save_checkpoint(tmp_path / "last", model, metadata_for(model, CLASSES), state)

    _, _, restored = read_checkpoint(tmp_path / "last")
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(restored["optimizer"])
    assert restored["epoch"] == 3
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for key, value in optimizer.state_dict()["state"].items():
        torch.testing.assert_close(fresh.state_dict()["state"][key]["exp_avg"], value["exp_avg"])
    assert restored["scheduler"] == scheduler.state_dict()


class _WritesAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors", "model.json"])
def test_malicious_pickle_is_refused_and_runs_no_code(tmp_path, name):
    marker = tmp_path / "pwned"
    evil = tmp_path / name
    evil.write_bytes(pickle.dumps(_WritesAFile(marker)))
    pickle.loads(evil.read_bytes())  # proof that unpickling it would write the marker
    assert marker.exists()
    marker.unlink()
    if name != "model.pt":  # give it a partner file so that only the pickle is at fault
        good = create_model("unet-tiny")
        partner = tmp_path / "good"
        save_checkpoint(partner, good, metadata_for(good, CLASSES))
        other = ".json" if name.endswith(".safetensors") else ".safetensors"
        (tmp_path / f"model{other}").write_bytes((tmp_path / f"good{other}").read_bytes())
    with pytest.raises(UserError) as err:
        load_checkpoint(evil)
    assert "\n" not in str(err.value)
    assert evil.name in str(err.value)  # the message names the file at fault
    assert not marker.exists()


def test_torch_save_file_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(create_model("unet-tiny").state_dict(), path)
    with pytest.raises(UserError, match="never unpickles"):
        load_checkpoint(path)


def test_mismatched_expectations_say_what_differs(saved):
    path, _ = saved
    with pytest.raises(UserError, match=r"classes: checkpoint 3, expected 2"):
        load_checkpoint(path, classes=2)
    with pytest.raises(UserError, match=r"model: checkpoint 'unet-tiny', expected 'unet'.*in_ch"):
        load_checkpoint(path, model="unet", in_channels=1)


def test_weights_for_another_model_are_refused(saved, tmp_path):
    path, _ = saved
    document = json.loads(path.with_suffix(".json").read_text())
    document["meta"]["model"] = "unet"
    path.with_suffix(".json").write_text(json.dumps(document))
    with pytest.raises(UserError, match="do not fit model 'unet'"):
        load_checkpoint(path)


def test_torn_pair_is_detected(saved, tmp_path):
    path, model = saved
    save_checkpoint(tmp_path / "other", model, metadata_for(model, CLASSES))
    (tmp_path / "best.json").write_bytes((tmp_path / "other.json").read_bytes())
    with pytest.raises(UserError, match="different saves"):
        load_checkpoint(path)


def test_missing_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
