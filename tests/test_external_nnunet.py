"""advseg's differentiable nnU-Net inference against nnU-Net's own predictor.

The results folder is made by nnU-Net's code (tests/nnunet_results.py): plans from its planner,
networks from its trainer's builder, checkpoints in its trainer's layout. The reference is
``nnUNetPredictor`` itself: its logits on preprocessed data (``predict_logits_from_preprocessed_
data``, which accumulates in float16, hence the tolerance) and its full segmentation on the
source grid (``predict_single_npy_array``: preprocessing, windows, mirroring, folds, the way
back), which advseg's argmax must equal voxel for voxel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

from advseg.errors import UserError
from advseg.models.external.nnunet import NnUNet, read_checkpoint, read_folder
from nnunet_results import DATASET, PLANS, write_raw, write_results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nnunet")
    raw = write_raw(root / "raw")
    return write_results(root, raw=raw), raw


def _reader_image(raw: Path, case: int = 0) -> tuple[np.ndarray, dict]:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return SimpleITKIO().read_images([str(raw / "imagesTr" / f"tiny_{case:03d}_0000.nii.gz")])


def _predictor(folder: Path, folds: tuple[int, ...], mirroring: bool):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    return predictor


CASES = [
    ("2d", (0, 1), True),
    ("3d_fullres", (0,), True),
    pytest.param("2d", (0,), False, marks=pytest.mark.slow),
    pytest.param("3d_fullres", (0, 1), False, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("configuration", "folds", "mirroring"), CASES)
def test_logits_and_segmentation_equal_nnunet_predictor(results, configuration, folds, mirroring):
    base, raw = results
    folder = base / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    image, properties = _reader_image(raw)
    predictor = _predictor(folder, folds, mirroring)
    found = read_folder(base, configuration=configuration, folds=[str(f) for f in folds])
    model = NnUNet(found, properties["spacing"], mirroring=mirroring)

    # the preprocessing equals nnU-Net's preprocessor on the same raw image
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    theirs, _, _ = DefaultPreprocessor().run_case_npy(
        image.copy(), None, dict(properties), predictor.plans_manager,
        predictor.configuration_manager, predictor.dataset_json,
    )  # fmt: skip
    ours, _ = model.preprocess(torch.from_numpy(image))
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)

    # the windows, mirroring and folds: with nnU-Net's float16 buffers, its logits exactly;
    # in float32 (what attacks use), equal wherever float16 resolves them
    reference = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(theirs)).float()
    for accumulate in (torch.float16, torch.float32):
        model.accumulate = accumulate
        with torch.no_grad():
            fold_logits = []
            for network in model.networks:
                fold_logits.append(model.sliding_window(torch.from_numpy(theirs), network))
            ours_logits = (sum(fold_logits) / len(fold_logits)).float()
        difference = (ours_logits - reference).abs()
        if accumulate == torch.float16:
            assert difference.max().item() <= 1e-3 * reference.abs().max().item()
        else:
            assert difference.median().item() <= 1e-2
    model.accumulate = torch.float32

    # the whole way: raw image -> segmentation on the source grid: voxel for voxel with float16
    # buffers; in float32 all but the voxels nnU-Net's float16 corners decide by rounding
    segmentation = predictor.predict_single_npy_array(image, dict(properties))
    assert np.unique(segmentation).size >= 2  # the comparison is not of two blank maps
    for accumulate, agreement in ((torch.float16, 1.0), (torch.float32, 0.995)):
        model.accumulate = accumulate
        with torch.no_grad():
            logits = model(torch.from_numpy(image)[None])[0]
        assert logits.shape[1:] == image.shape[1:] and logits.dtype == torch.float32
        assert (logits.argmax(0).numpy() == segmentation).mean() >= agreement


def test_input_gradient_flows_in_hounsfield_units(results):
    base, raw = results
    image, properties = _reader_image(raw)
    found = read_folder(base, configuration="3d_fullres", folds=["0"])
    model = NnUNet(found, properties["spacing"], mirroring=False)
    x = torch.from_numpy(image)[None].clone().requires_grad_(True)
    logits = model(x)
    logits[:, 1].mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.network.parameters())


def test_folder_errors_are_one_line(tmp_path, results):
    base, _ = results
    with pytest.raises(UserError, match="no such directory"):
        read_folder(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"plans\.json nor"):
        read_folder(tmp_path)
    with pytest.raises(UserError, match="--configuration"):
        read_folder(base, configuration="3d")
    with pytest.raises(UserError, match="fold_7"):
        read_folder(base, configuration="2d", folds=["7"])


def test_a_checkpoint_needing_a_full_unpickle_is_refused(tmp_path):
    torch.save({"network_weights": {}, "payload": Path("x")}, tmp_path / "checkpoint_final.pth")
    with pytest.raises(UserError, match="weights only"):
        read_checkpoint(tmp_path / "checkpoint_final.pth")


def test_missing_plans_configuration_and_weights_that_do_not_fit(tmp_path, results):
    base, _ = results
    folder = tmp_path / "m"
    source = base / "nnUNetTrainer__nnUNetPlans__2d"
    for name in ("dataset.json",):
        (folder).mkdir(exist_ok=True)
        (folder / name).write_bytes((source / name).read_bytes())
    plans = json.loads((source / "plans.json").read_text())
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "fold_0").mkdir()
    with pytest.raises(UserError, match="no fold_X"):
        read_folder(folder, configuration="2d")
    torch.save(
        {"network_weights": {"w": torch.zeros(1)}}, folder / "fold_0" / "checkpoint_final.pth"
    )
    found = read_folder(folder, configuration="2d")
    with pytest.raises(UserError, match="do not fit"):
        NnUNet(found, (3.0, 1.5, 1.5))


@pytest.mark.slow
def test_planner_reproduces_the_committed_plans(tmp_path):
    """nnU-Net's planner, run here on the same raw data, gives the committed plans."""
    import subprocess
    import sys

    raw_root = tmp_path / "nnUNet_raw"
    write_raw(raw_root)
    env = dict(os.environ, nnUNet_raw=str(raw_root), nnUNet_preprocessed=str(tmp_path / "pre"))
    env["nnUNet_results"] = str(tmp_path / "res")
    script = (
        "from nnunetv2.experiment_planning.plan_and_preprocess_api import "
        "extract_fingerprints, plan_experiments\n"
        "if __name__ == '__main__':\n"
        "    extract_fingerprints([901], num_processes=1, check_dataset_integrity=False)\n"
        "    plan_experiments([901])\n"
    )
    (tmp_path / "plan.py").write_text(script)
    subprocess.run([sys.executable, str(tmp_path / "plan.py")], env=env, check=True)
    made = json.loads((tmp_path / "pre" / DATASET / "nnUNetPlans.json").read_text())
    assert made["configurations"] == json.loads(PLANS.read_text())["configurations"]


def test_the_gradient_of_a_fold_ensemble_is_the_mean_of_the_folds(results):
    """Attacks differentiate through every fold at once (one network per fold)."""
    base, raw = results
    image, properties = _reader_image(raw)
    x = torch.from_numpy(image)[None]
    grads = []
    for folds in (["0", "1"], ["0"], ["1"]):
        model = NnUNet(read_folder(base, configuration="2d", folds=folds),
                       properties["spacing"], mirroring=False)  # fmt: skip
        z = x.clone().requires_grad_(True)
        model(z)[:, 1].sum().backward()
        grads.append(z.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], (grads[1] + grads[2]) / 2, atol=1e-5, rtol=1e-4)


def test_pgd_keeps_its_budget_in_hounsfield_units(results):
    from advseg.attacks import create_attack

    base, raw = results
    image, properties = _reader_image(raw)
    found = read_folder(base, configuration="2d", folds=["0"])
    model = NnUNet(found, properties["spacing"], mirroring=False)
    x = torch.from_numpy(image)[None]
    with torch.no_grad():
        clean = model(x).argmax(1)
    target = torch.nn.functional.one_hot(clean, 3).movedim(-1, 1).float()
    attack = create_attack(
        "pgd", model, loss="ce", eps=20.0, steps=2, valid_range=None, activation="softmax"
    )
    x_adv = attack(x, target)
    assert (x_adv - x).abs().max().item() <= 20.0 * (1 + 1e-6)
    assert (x_adv - x).abs().max().item() > 1.0


def test_evaluate_an_nnunet_folder_from_the_cli(results, tmp_path, capsys):
    from advseg.cli import main
    from advseg.runs.records import read_records

    base, raw = results
    out = tmp_path / "nn"
    args = ["evaluate", "--nnunet", str(base), "--configuration", "2d", "--folds", "0",
            "--no-mirroring", "--data", str(raw), "--attack", "fgsm", "--eps", "20",
            "--loss", "ce", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0, capsys.readouterr().err
    records = read_records(out / "records")
    assert set(records["model"]) == {"nnunet-2d-f0-nomirror"}
    assert set(records["slice"]) == {-1} and records["slice_id"].nunique() == 4  # volumes
    assert set(records["class"]) == {"ball", "small"}
    assert (records["linf"] <= 20.0 * (1 + 1e-6)).all() and (records["linf"] > 1).all()
    assert records["hd95_mm_clean"].notna().any()  # voxel spacing known: HD95 in mm
    provenance = json.loads((out / "external.json").read_text())["nnunet-2d-f0-nomirror"]
    assert provenance["folds"] == ["0"] and len(provenance["checkpoint_sha256"]["0"]) == 64
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--nnunet", str(base), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "needs --data" in capsys.readouterr().err


def test_a_volume_is_written_back_on_its_source_grid(results):
    """What ``advseg export`` writes of an nnU-Net case: NIfTI on the source's own geometry."""
    import SimpleITK as sitk

    from advseg.models.external.nnunet_cases import NnUNetCases

    base, raw = results
    cases = NnUNetCases(raw, read_folder(base, configuration="2d", folds=["0"]))
    image, _ = cases.read(1)
    payload = cases.nifti(1, image[0].numpy() + 5.0)
    written = Path(cases.location) / ".." / "written.nii.gz"
    written.write_bytes(payload)
    back = sitk.ReadImage(str(written))
    source = sitk.ReadImage(cases.index["image_paths"].iloc[1][0])
    assert back.GetSpacing() == source.GetSpacing() and back.GetOrigin() == source.GetOrigin()
    assert back.GetDirection() == source.GetDirection()
    assert np.allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(source) + 5.0)


@pytest.mark.slow  # ~2 min on the loaded 2-core machine
def test_two_folds_and_transfer_between_them_from_the_cli(results, tmp_path, capsys):
    """``--folds 0 --folds 1 --transfer``: each fold attacked white-box, and each fold's
    adversarial volumes scored on the other (records' ``source``)."""
    from advseg.cli import main
    from advseg.runs.records import read_records

    base, raw = results
    out = tmp_path / "folds"
    args = ["evaluate", "--nnunet", str(base), "--configuration", "2d", "--folds", "0",
            "--folds", "1", "--transfer", "--no-mirroring", "--max-slices", "1", "--data",
            str(raw), "--attack", "fgsm", "--eps", "20", "--loss", "ce",
            "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0, capsys.readouterr().err
    records = read_records(out / "records")
    f0, f1 = "nnunet-2d-f0-nomirror", "nnunet-2d-f1-nomirror"
    pairs = set(zip(records["source"], records["model"], strict=True))
    assert pairs == {(f0, f0), (f1, f1), (f0, f1), (f1, f0)}
    for source, target in ((f0, f1), (f1, f0)):
        crafted = records[(records["source"] == source) & (records["model"] == source)]
        moved = records[(records["source"] == source) & (records["model"] == target)]
        own = records[(records["source"] == target) & (records["model"] == target)]
        assert np.allclose(moved["linf"].to_numpy(), crafted["linf"].to_numpy())  # same images
        assert np.allclose(moved["l2"].to_numpy(), crafted["l2"].to_numpy())
        assert np.allclose(moved["dice_clean"].to_numpy(), own["dice_clean"].to_numpy())
    assert set(json.loads((out / "external.json").read_text())) == {f0, f1}
    with pytest.raises(SystemExit) as exit_:
        main([*args[:7], *args[9:-1], str(tmp_path / "one")])  # one model: nothing to transfer to
    assert exit_.value.code == 2 and "--transfer: needs two models" in capsys.readouterr().err


def test_configurations_times_fold_groups_are_the_models_listed(tmp_path):
    """``--configuration 2d --configuration 3d_fullres --folds 0 --folds 1``: four models,
    configuration first, each with its own label; a repeat or a non-nnU-Net model refused."""
    from advseg.cli.evaluate import _external

    def listed(configurations, folds, **kinds):
        options = {"nnunet": tmp_path, "torchscript": None, "model_factory": None}
        options.update(kinds)
        return _external(options["nnunet"], configurations, folds, "checkpoint_final.pth",
                         True, options["torchscript"], options["model_factory"], None, None, 1,
                         None, 224)  # fmt: skip

    models = listed(["2d", "3d_fullres"], ["0", "1"])
    assert [(m.configuration, m.folds) for m in models] == [
        ("2d", ["0"]),
        ("2d", ["1"]),
        ("3d_fullres", ["0"]),
        ("3d_fullres", ["1"]),
    ]
    assert [m.label for m in models] == [
        "nnunet-2d-f0",
        "nnunet-2d-f1",
        "nnunet-3d_fullres-f0",
        "nnunet-3d_fullres-f1",
    ]
    assert [m.label for m in listed([], [])] == ["nnunet-3d_fullres-fall"]  # the default
    with pytest.raises(UserError, match="--configuration: each once"):
        listed(["2d", "2d"], [])
    with pytest.raises(UserError, match="--configuration: goes with --nnunet"):
        listed(["2d"], [], nnunet=None, torchscript=tmp_path / "m.pt")
    with pytest.raises(UserError, match="--configuration: goes with --nnunet"):
        listed(["2d"], [], nnunet=None)


def test_two_configurations_and_transfer_between_them_from_the_cli(results, tmp_path, capsys):
    """``--configuration 2d --configuration 3d_fullres --transfer``: each configuration judged on
    the same raw volumes (HU) and attacked white-box, and each one's adversarial volumes scored
    on the other (records' ``source``): the same images, the target's own clean Dice."""
    from advseg.cli import main
    from advseg.runs.records import read_records

    base, raw = results
    out = tmp_path / "configurations"
    args = ["evaluate", "--nnunet", str(base), "--configuration", "2d", "--configuration",
            "3d_fullres", "--folds", "0", "--transfer", "--no-mirroring", "--max-slices", "1",
            "--data", str(raw), "--attack", "fgsm", "--eps", "20", "--loss", "ce",
            "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0, capsys.readouterr().err
    records = read_records(out / "records")
    two, three = "nnunet-2d-f0-nomirror", "nnunet-3d_fullres-f0-nomirror"
    pairs = set(zip(records["source"], records["model"], strict=True))
    assert pairs == {(two, two), (three, three), (two, three), (three, two)}
    assert records["slice_id"].nunique() == 1 and set(records["slice"]) == {-1}  # one volume
    for source, target in ((two, three), (three, two)):
        crafted = records[(records["source"] == source) & (records["model"] == source)]
        moved = records[(records["source"] == source) & (records["model"] == target)]
        own = records[(records["source"] == target) & (records["model"] == target)]
        assert list(moved["slice_id"]) == list(crafted["slice_id"]) == list(own["slice_id"])
        assert np.allclose(moved["linf"].to_numpy(), crafted["linf"].to_numpy())  # same images
        assert (moved["linf"] <= 20.0 * (1 + 1e-6)).all()  # the budget, in HU
        assert np.allclose(moved["dice_clean"].to_numpy(), own["dice_clean"].to_numpy())
    provenance = json.loads((out / "external.json").read_text())
    assert set(provenance) == {two, three}
    assert {provenance[two]["configuration"], provenance[three]["configuration"]} == {
        "2d",
        "3d_fullres",
    }
