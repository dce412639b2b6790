"""``--encoder-weights imagenet`` with no network (issue 25): one line at once, not twelve lines
of huggingface_hub retries after half a minute; weights already in the local cache still load."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import save_file

from advseg.cli import main
from advseg.data import write_synthetic
from advseg.errors import UserError
from advseg.models import create_model


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a network that refuses every connection (counted)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    tries = []

    def refuse(address, *args, **kwargs):
        tries.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return tries


def test_imagenet_weights_offline_are_one_line_at_once(offline):
    with pytest.raises(UserError) as caught:
        create_model("smp:Unet:resnet18", encoder_weights="imagenet")
    message = str(caught.value)
    assert "\n" not in message
    assert (
        "imagenet weights of encoder 'resnet18' are not in the local Hugging Face cache" in message
    )
    assert "huggingface.co cannot be reached (Network is unreachable)" in message
    assert "--encoder-weights PATH" in message
    # one probe and no download (huggingface_hub's client connects through the same call:
    # five retries with back-off were 12 lines and ~25 s)
    assert offline == [("huggingface.co", 443)]


def test_hf_hub_offline_is_named(offline, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        create_model("smp:Unet:resnet18", encoder_weights="imagenet")
    assert offline == []


def test_cached_imagenet_weights_load_with_no_network(offline, tmp_path):
    """Files in the cache at the revision segmentation_models_pytorch pins: loaded, no probe."""
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders["resnet18"]["pretrained_settings"]["imagenet"]
    folder = "models--" + settings["repo_id"].replace("/", "--")
    snapshot = tmp_path / "hub" / folder / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    torch.manual_seed(1)
    encoder = create_model("smp:Unet:resnet18").encoder.state_dict()
    save_file({k: v.contiguous() for k, v in encoder.items()}, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({}))
    loaded = create_model("smp:Unet:resnet18", encoder_weights="imagenet").encoder.state_dict()
    assert offline == []
    conv = "conv1.weight"
    assert torch.equal(loaded[conv], encoder[conv])


def test_train_offline_imagenet_is_one_line_and_writes_nothing(offline, tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=2)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), "--size", "32", "--epochs", "1",
            "--model", "smp:Unet:resnet18", "--encoder-weights", "imagenet"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "cannot be reached" in err[0], err  # before the data is read
    assert not out.exists()
