"""Input defences (model wrappers) and the adaptive attacks BPDA / EOT that see through them."""

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from advseg.attacks import attack_options, create_attack, parse_attack_name
from advseg.defences import DEFENCES, AdaptiveView, DefendedModel, create_defence, defend
from advseg.defences.transforms import defended_name
from advseg.errors import UserError
from advseg.metrics import dice_score, hard_prediction
from tiny_models import blobs, fit, tiny_net  # tests/ is on sys.path


@pytest.fixture(scope="module")
def trained():
    return fit(tiny_net(batch_norm=False), *blobs(64, seed=1), steps=60), *blobs(8, seed=2)


def _dice(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(dice_score(hard_prediction(model(x)), y > 0.5).mean())


# ------------------------------------------------------------------------- the transforms


@pytest.mark.parametrize("name", DEFENCES.names())
def test_every_defence_keeps_shape_and_range(name):
    transform = create_defence(name)
    x = torch.rand(2, 3, 13, 18)
    out = transform(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    if not transform.random:
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, transform(x))  # deterministic
    assert create_defence(transform.spec).spec == transform.spec


def test_median_matches_scipy():
    x = torch.rand(2, 3, 11, 9)
    ours = create_defence("median:3")(x).numpy()
    ref = ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="mirror")
    np.testing.assert_allclose(ours, ref, atol=1e-7)


def test_blur_matches_scipy():
    x = torch.rand(1, 2, 20, 17, dtype=torch.float64)
    ours = create_defence("blur:1.5")(x).numpy()
    ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1.5, 1.5), mode="mirror", truncate=3)
    np.testing.assert_allclose(ours, ref, atol=1e-3)  # scipy's radius rounds, ours ceils


def test_bitdepth_levels_and_idempotence():
    x = torch.rand(1, 3, 8, 8)
    out = create_defence("bitdepth:2")(x)
    assert set(torch.unique(out * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert torch.equal(create_defence("bitdepth:2")(out), out)
    assert (out - x).abs().max() <= 0.5 / 3 + 1e-6


@pytest.mark.parametrize("quality", [90, 50, 20])
def test_jpeg_close_to_libjpeg(quality):
    """Against Pillow's libjpeg: the difference is a small fraction of the compression error."""
    g = torch.Generator().manual_seed(0)
    x = nn.functional.avg_pool2d(torch.rand(1, 1, 64, 48, generator=g), 5, 1, 2)
    x = (x - x.min()) / (x.max() - x.min())
    ours = create_defence(f"jpeg:{quality}")(x)[0, 0].numpy()
    pixels = np.round(x[0, 0].numpy() * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="JPEG", quality=quality)
    ref = np.asarray(Image.open(buffer)).astype(np.float32) / 255
    compression = np.abs(ref - pixels / 255).mean()
    assert np.abs(ours - ref).mean() < 0.2 * compression


def test_noise_is_seeded_and_fresh_at_every_call():
    x = torch.zeros(2, 3, 32, 32)
    a, b = create_defence("noise:0.2"), create_defence("noise:0.2")
    first = a(x)
    assert torch.equal(first, b(x))  # same seed, same draws
    assert not torch.equal(first, a(x))  # a new draw every forward
    assert abs(first.std().item() - 0.2) < 0.02


@pytest.mark.parametrize(
    "spec, message",
    [("median:4", "odd"), ("bitdepth:0", "1..16"), ("jpeg:101", "1..100"), ("blur:0", "sigma"),
     ("noise:-1", "sigma"), ("jpeg:high", "not a number"), ("mediam:3", "did you mean")],
)  # fmt: skip
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        create_defence(spec)


def test_defend_and_names():
    net = tiny_net(batch_norm=False)
    assert defend(net, "none") is net
    wrapped = defend(net, "median:3")
    assert isinstance(wrapped, DefendedModel) and wrapped.spec == "median:3"
    assert sum(p.numel() for p in wrapped.parameters()) == sum(p.numel() for p in net.parameters())
    assert defended_name("unet", "jpeg") == "unet+jpeg:75"
    assert defended_name("unet", "none") == "unet"


def test_bit_depth_quantises_the_inputs_range_and_refuses_inputs_without_one():
    """An external model's inputs are in the source's units (HU): bit depth quantises the range
    the evaluation passes, and a source with no fixed range is refused in one line."""
    net = tiny_net(batch_norm=False)
    hu = defend(net, "bitdepth:2", (-1000.0, 1000.0)).transform
    x = torch.tensor([-1500.0, -1000.0, -400.0, 300.0, 1000.0]).view(1, 1, 1, 5)
    levels = torch.tensor([-1000.0, -1000.0, -1000.0 / 3, 1000.0 / 3, 1000.0]).view(1, 1, 1, 5)
    assert torch.allclose(hu(x), levels)
    assert defend(net, "bitdepth:2").transform.value_range == (0.0, 1.0)
    with pytest.raises(UserError, match=r"^model\.ts: defence bitdepth:2 needs a fixed intensity"):
        defend(net, "bitdepth:2", None, "model.ts")
    assert isinstance(defend(net, "median:3", None, "model.ts"), DefendedModel)


# ------------------------------------------------------------------- adaptive attacks


def test_attack_names_with_adaptive_suffixes():
    assert parse_attack_name("pgd+bpda+eot") == ("pgd", ("bpda", "eot"))
    assert "eot_samples" in attack_options("pgd+eot")
    assert "eot_samples" not in attack_options("pgd+bpda")
    with pytest.raises(UserError, match="unknown adaptive suffix"):
        parse_attack_name("pgd+magic")
    with pytest.raises(UserError, match="unknown attack"):
        attack_options("pgx+bpda")
    with pytest.raises(UserError, match="eot_samples"):
        create_attack("pgd+bpda", tiny_net(batch_norm=False), eot_samples=4)


def test_bpda_view_forward_is_the_defence_and_backward_the_identity():
    net = tiny_net(batch_norm=False)
    defended = defend(net, "bitdepth:3")
    view = defended.adaptive_view(bpda=True)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    assert torch.equal(view(x), defended(x))
    (naive,) = torch.autograd.grad(defended(x).sum(), x)
    (straight,) = torch.autograd.grad(view(x).sum(), x)
    assert naive.abs().max() == 0  # rounding masks the gradient
    z = create_defence("bitdepth:3")(x).detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(net(z).sum(), z)
    torch.testing.assert_close(straight, expected)  # the model's gradient at t(x)


def test_eot_view_averages_logits_over_draws():
    linear = nn.Conv2d(3, 3, 1, bias=False)
    defended = DefendedModel(linear, create_defence("noise:0.5"))
    view = defended.adaptive_view(bpda=False, eot_samples=400)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        single = (defended(x) - linear(x)).abs().mean()
        averaged = (view(x) - linear(x)).abs().mean()
    assert averaged < single / 10  # the mean of 400 draws is 20x closer to the expectation
    assert AdaptiveView(defend(linear, "median:3"), bpda=True, eot_samples=9).samples == 1


@pytest.mark.parametrize("spec", ["bitdepth:3", "jpeg:60"])
@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_bpda_breaks_a_defence_the_naive_attack_cannot(trained, spec, attack):
    model, x, y = trained
    defended = defend(model, spec)
    options = {"steps": 10} if attack == "pgd" else {}
    naive = create_attack(attack, defended, "bce", 0.1, **options)(x, y)
    adaptive = create_attack(f"{attack}+bpda", defended, "bce", 0.1, **options)(x, y)
    clean = _dice(defended, x, y)
    assert clean > 0.6
    assert _dice(defended, adaptive, y) < _dice(defended, naive, y) - 0.15


def test_eot_is_at_least_as_strong_on_a_random_defence(trained):
    model, x, y = trained
    defended = defend(model, "noise:0.15")
    naive = create_attack("pgd", defended, "bce", 0.05, steps=5)(x, y)
    eot = create_attack("pgd+eot", defended, "bce", 0.05, steps=5, eot_samples=8)(x, y)
    scores = [np.mean([_dice(defended, images, y) for _ in range(8)]) for images in (naive, eot)]
    assert scores[1] <= scores[0] + 0.02


# ------------------------------------------------------------- through the evaluation engine


def test_evaluate_cell_records_naive_and_adaptive_side_by_side(trained):
    from advseg.evaluate import evaluate_cell
    from test_evaluate import MemoryData

    model, _, _ = trained
    data = MemoryData(6, size=16, seed=3)
    defended = defend(model, "bitdepth:3")
    dice = {}
    for attack in ("fgsm", "fgsm+bpda", "pgd+bpda+eot"):
        result = evaluate_cell(
            defended, data, range(6), attack, ["bce"], 0.1, model_name="net+bitdepth:3",
            arch="tiny", attack_kwargs={"steps": 3} if "pgd" in attack else {},
        )  # fmt: skip
        records = result.records
        assert set(records["attack"]) == {attack} and set(records["model"]) == {"net+bitdepth:3"}
        assert records["linf"].max() <= 0.1 + 1e-6
        dice[attack] = records["dice_adv"].mean()
    assert dice["fgsm+bpda"] < dice["fgsm"] - 0.1  # the shared-forward path is not used by BPDA


def test_evaluate_cli_defences_and_adaptive_attacks(tmp_path, capsys):
    from advseg.config import to_dict
    from advseg.data import UWMGI_CLASSES, PreprocessConfig, write_synthetic
    from advseg.models import create_model
    from advseg.models.checkpoint import metadata_for, save_checkpoint
    from advseg.runs.records import read_records
    from test_evaluate_cli import cli

    write_synthetic(tmp_path / "data", cases=3, scans=1, slices=4)
    torch.manual_seed(0)
    net = create_model("unet-tiny")
    source = {"config": {"path": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")},
              "test_fraction": 0.34, "split_seed": 0}  # fmt: skip
    meta = metadata_for(net, list(UWMGI_CLASSES), preprocessing=to_dict(PreprocessConfig(size=32)),
                        data=source)  # fmt: skip
    save_checkpoint(tmp_path / "tiny", net, meta)
    out = tmp_path / "run"
    args = ["evaluate", str(tmp_path / "tiny"), "--out", str(out), "--loss", "bce", "--eps", "0.03"]
    args += ["--defence", "none", "--defence", "noise:0.1", "--attack", "pgd", "--steps", "2"]
    args += ["--attack", "pgd+eot", "--eot-samples", "2", "--device", "cpu"]
    assert cli(args) == 0
    records = read_records(out)
    cells = records.drop_duplicates(["model", "attack"])[["model", "attack"]]
    assert sorted(map(tuple, cells.to_numpy())) == [
        ("tiny", "pgd"), ("tiny", "pgd+eot"), ("tiny+noise:0.1", "pgd"),
        ("tiny+noise:0.1", "pgd+eot"),
    ]  # fmt: skip
    assert (out / "records" / "tiny-noise-0.1__pgd+eot__eps0.03.parquet").exists()
    assert cli([*args[:2], "--out", str(tmp_path / "bad"), "--defence", "jpeg:0"]) == 2
    assert "quality must be an integer" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------- Gaussian-noise augmentation


def test_noise_sigma_trains_on_noisy_images_and_validates_on_clean_ones(tmp_path):
    from advseg.models import create_model, load_checkpoint
    from advseg.train import train
    from test_train import Blobs, tiny_config

    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=2)
    seen = {True: [], False: []}
    model.register_forward_pre_hook(lambda m, args: seen[m.training].append(args[0].detach()))
    config = tiny_config(epochs=1, noise_sigma=0.3, batch_size=12)
    result = train(model, Blobs(12), Blobs(6, seed=1), config, tmp_path, classes=["a", "b"])
    clean = torch.stack([Blobs(12)[i]["image"] for i in range(12)])
    trained_on = seen[True][0]  # (12, 3, 32, 32), shuffled
    assert trained_on.min() < 0  # noise, not clipped to the valid range
    assert trained_on.var() - clean.var() == pytest.approx(0.3**2, abs=0.01)  # var adds up
    validated_on = torch.stack([Blobs(6, seed=1)[i]["image"] for i in range(6)])
    assert torch.equal(seen[False][0], validated_on)  # validation stays clean
    _, meta = load_checkpoint(result.best_path)
    assert meta.train["noise_sigma"] == 0.3
    with pytest.raises(UserError, match="noise_sigma"):
        tiny_config(noise_sigma=-0.1)


# ------------------------------------------------------------------------ in a YAML grid


def test_grid_holds_defended_and_undefended_models_side_by_side(tmp_path):
    import yaml

    from advseg.data import write_synthetic
    from advseg.experiment import load_experiment, run_experiment
    from advseg.runs.records import read_records

    write_synthetic(tmp_path / "data", cases=3, scans=1, slices=6, seed=0)
    grid = {
        "data": {"path": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"),
                 "preprocess": {"size": 32}},
        "split": {"test_fraction": 0.34, "val_fraction": 0.5},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "augment": {"enabled": False}},
        "models": [
            {"arch": "unet-tiny", "name": "plain", "defences": ["bitdepth:3"]},
            {"arch": "unet-tiny", "name": "noisy", "train": {"noise_sigma": 0.2}},
        ],
        "attacks": [{"name": "pgd", "losses": ["bce"], "eps": [0.03], "kwargs": {"steps": 2}},
                    {"name": "pgd+bpda", "losses": ["bce"], "eps": [0.03],
                     "kwargs": {"steps": 2}}],
        "evaluation": {"batch_size": 4, "examples": 0, "max_slices": 4},
    }  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    result = run_experiment(load_experiment(path), tmp_path / "run")
    assert result.trained == ["plain", "noisy"]  # the defended variant reuses plain's training
    records = read_records(tmp_path / "run")
    cells = set(map(tuple, records[["model", "attack"]].drop_duplicates().to_numpy()))
    assert cells == {(m, a) for m in ("plain", "plain+bitdepth:3", "noisy")
                     for a in ("pgd", "pgd+bpda")}  # fmt: skip
    meta = json.loads((tmp_path / "run/models/noisy/checkpoints/best.json").read_text())
    assert meta["meta"]["train"]["noise_sigma"] == 0.2
    table = pd.read_csv(tmp_path / "run" / "report" / "defences.csv").set_index("model")
    assert (
        table.loc["noisy", "training"] == "noise 0.2" and table.loc["plain", "training"] == "none"
    )
    assert table.loc["plain+bitdepth:3", "adaptive"] == "pgd+bpda / bce"

    grid["models"][0]["defences"] = ["bitdepth:33"]
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(UserError, match=r"models\[0\].defences\[0\]: .*bits"):
        load_experiment(path)
    grid["models"][0] = {"arch": "unet-tiny", "train": {"noise_sigma": -1}}
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(UserError, match=r"models\[0\].train: train.noise_sigma"):
        load_experiment(path)
