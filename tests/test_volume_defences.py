"""Input defences on volumes: the 3D transforms against scipy, the defence in front of the
sliding-window inference (once per volume), BPDA/EOT through it (a gradient where rounding masks
it), the budget kept in the records, and what is refused (JPEG, tiles, bit depth without a range)
(tiny: unet3d-tiny, 16^3 windows)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from advseg.attacks import create_attack
from advseg.cli import main
from advseg.data import load_volumes
from advseg.defences import DefendedModel, create_defence
from advseg.defences.volumes import check_volume_defence, defend_volume, volume_defences
from advseg.errors import UserError
from advseg.inference import SlidingWindow
from advseg.labels import class_prediction
from advseg.metrics import dice_score
from advseg.models import create_model, load_checkpoint
from tiny_volumes import PATCH, train_tiny_volume_model  # tests/ is on sys.path

RANGE = (-2.0, 3.0)  # a CT volume's valid range in z units


def test_the_3d_median_and_blur_are_scipy_s():
    x = torch.rand(1, 1, 9, 11, 10, dtype=torch.float64)
    median = create_defence("median:3")(x).numpy()
    ref = ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3, 3), mode="mirror")
    np.testing.assert_allclose(median, ref, atol=1e-12)
    blur = create_defence("blur:1.0")(x).numpy()
    ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1, 1, 1), mode="mirror", truncate=3)
    np.testing.assert_allclose(blur, ref, atol=1e-12)  # sigma 1: the same radius (3)


def test_bit_depth_quantises_the_volumes_valid_range():
    transform = create_defence("bitdepth:3")
    transform.value_range = RANGE
    x = torch.rand(1, 1, 6, 7, 8) * 6 - 2.5  # beyond the range on both sides
    out = transform(x)
    steps = (out - RANGE[0]) / (RANGE[1] - RANGE[0]) * 7
    torch.testing.assert_close(steps, steps.round(), atol=1e-5, rtol=0)  # 8 levels
    assert out.min() >= RANGE[0] - 1e-6 and out.max() <= RANGE[1] + 1e-6
    inside = (x >= RANGE[0]) & (x <= RANGE[1])
    assert (out - x)[inside].abs().max() <= (RANGE[1] - RANGE[0]) / 14 + 1e-5


def test_what_volumes_refuse_is_one_line_naming_it():
    assert volume_defences() == ["bitdepth", "blur", "median", "noise"]
    with pytest.raises(
        UserError, match="ckpt: defence jpeg is inherently 2D; on volumes use bitdepth, blur"
    ):
        check_volume_defence("jpeg:75", "ckpt")
    with pytest.raises(UserError, match="through the inference only"):
        check_volume_defence("median:3", "ckpt", ("inference", "tiles"))
    inferer = SlidingWindow(create_model("unet3d-tiny", in_channels=1, classes=2), PATCH)
    with pytest.raises(UserError, match="needs a fixed intensity range"):
        defend_volume(inferer, "bitdepth:4", None)
    assert defend_volume(inferer, "none", RANGE) is inferer


@pytest.fixture(scope="module")
def defended():
    torch.manual_seed(0)
    net = create_model("unet3d-tiny", in_channels=1, classes=2).eval()
    inferer = SlidingWindow(net, PATCH, overlap=0.5)
    x = (torch.rand(1, 1, 24, 16, 20) * 5 - 2).requires_grad_(True)
    return net, inferer, x


def test_the_defence_filters_the_whole_volume_before_the_inference(defended):
    net, inferer, x = defended
    model = defend_volume(inferer, "median:3", RANGE)
    assert isinstance(model, DefendedModel) and model.model is inferer
    with torch.no_grad():
        torch.testing.assert_close(model(x), inferer(create_defence("median:3")(x)))
        per_window = SlidingWindow(DefendedModel(net, create_defence("median:3")), PATCH)(x)
        assert not torch.allclose(model(x), per_window)  # not window by window


def test_bpda_gives_a_gradient_through_the_inference_where_rounding_masks_it(defended):
    _, inferer, x = defended
    model = defend_volume(inferer, "bitdepth:4", RANGE)
    (naive,) = torch.autograd.grad(model(x).sum(), x)
    assert naive.abs().max() == 0  # rounding: no gradient
    view = model.adaptive_view(bpda=True)
    (straight,) = torch.autograd.grad(view(x).sum(), x)
    z = model.transform(x).detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(inferer(z).sum(), z)  # the inference's gradient at t(x)
    assert straight.abs().max() > 0
    torch.testing.assert_close(straight, expected)


def test_eot_averages_the_inference_over_noise_draws(defended):
    _, inferer, x = defended
    view = defend_volume(inferer, "noise:0.3", RANGE).adaptive_view(bpda=False, eot_samples=3)
    again = defend_volume(inferer, "noise:0.3", RANGE)  # the same seed: the same draws
    with torch.no_grad():
        expected = sum(again(x) for _ in range(3)) / 3
        torch.testing.assert_close(view(x), expected)


@pytest.mark.parametrize("spec,attack", [("bitdepth:4", "pgd+bpda"), ("noise:0.2", "pgd+eot")])
def test_an_adaptive_attack_on_a_defended_volume_keeps_its_budget(defended, spec, attack):
    _, inferer, x = defended
    model = defend_volume(inferer, spec, RANGE)
    y = torch.zeros(1, 2, *x.shape[2:])
    y[:, 0, 6:18, 4:12, 5:15] = 1
    eps = 0.1
    eot = {"eot_samples": 2} if attack.endswith("eot") else {}
    adversary = create_attack(attack, model, "bce", eps, steps=2, valid_range=RANGE, **eot)
    x_adv = adversary(x.detach(), y)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and (x_adv - x).abs().max() > eps / 2
    assert x_adv.min() >= RANGE[0] and x_adv.max() <= RANGE[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("voldefence")
    config, best = train_tiny_volume_model(root)
    return root, config, best


def test_evaluate_and_a_grid_run_defences_on_volumes(trained, tmp_path, capsys):
    _, config, checkpoint = trained
    args = ["evaluate", str(checkpoint), "--out", str(tmp_path / "cli"), "--attack", "pgd+bpda",
            "--steps", "2", "--eps", "0.1", "--loss", "bce", "--defence", "none",
            "--defence", "bitdepth:5", "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    records = pd.read_parquet(tmp_path / "cli/records/run-bitdepth-5__pgd+bpda-inference__eps0.1"
                              ".parquet")  # fmt: skip
    assert (records["model"] == "run+bitdepth:5").all() and (records["linf"] <= 0.1 + 1e-6).all()
    data = load_volumes(config)  # the clean columns: the defence, then the inference, by hand
    model, _ = load_checkpoint(checkpoint)
    inferer = defend_volume(SlidingWindow(model.eval(), PATCH, overlap=0.5), "bitdepth:5",
                            data.valid_range)  # fmt: skip
    for case, got in records.groupby("case"):
        x, y = data.volume(int(np.flatnonzero(data.index["case"] == case)[0]))
        with torch.no_grad():
            clean = class_prediction(inferer(x[None]), "sigmoid")
        assert got["dice_clean"].to_numpy() == pytest.approx(
            dice_score(clean, y[None] > 0.5).numpy().ravel(), abs=1e-6)  # fmt: skip
    for bad, words in [
        (["--defence", "jpeg:75"], "defence jpeg is inherently 2D"),
        (["--defence", "median:3", "--through", "tiles"], "inference only"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main([*args[:12], *bad, "--out", str(tmp_path / "bad"), "--device", "cpu"])
        assert exit_.value.code == 2
        assert words in capsys.readouterr().err

    from advseg.catalogue import packaged_config
    from advseg.experiment import load_experiment, run_experiment
    from advseg.experiment.config import AttackSpec

    grid = load_experiment(packaged_config("volumes"))
    grid.data.path, grid.data.cache_dir = config.path, config.cache_dir
    grid.data.volume.spacing, grid.data.volume.patch, grid.data.volume.samples = None, PATCH, 2
    grid.train.epochs, grid.train.device = 1, "cpu"
    grid.split.test_fraction = grid.split.val_fraction = 0.3
    grid.models[0].defences = ["noise:0.1"]
    grid.evaluation.through = ["inference"]
    grid.attacks = [AttackSpec(name="fgsm+eot", eps=[0.05], losses=["bce"],
                               kwargs={"eot_samples": 2})]  # fmt: skip
    grid.corruptions, grid.report = ["gamma:2"], False
    result = run_experiment(grid, tmp_path / "grid")
    assert sorted(result.grid.computed) == [
        "unet3d-tiny-noise-0.1__corruption-gamma-2__eps0",
        "unet3d-tiny-noise-0.1__fgsm-eot-inference__eps0.05",
        "unet3d-tiny__corruption-gamma-2__eps0",
        "unet3d-tiny__fgsm-eot-inference__eps0.05",
    ]
    records = pd.read_parquet(tmp_path / "grid/records/unet3d-tiny-noise-0.1__fgsm-eot-inference"
                              "__eps0.05.parquet")  # fmt: skip
    assert (records["linf"] <= 0.05 + 1e-6).all() and (
        records["model"] == "unet3d-tiny+noise:0.1"
    ).all()
