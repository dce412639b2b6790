"""A MONAI bundle judged by advseg against MONAI's own run of the same bundle.

The bundle is made here (tests/monai_bundle.py: a tiny trained 3D UNet, a spleen-style
inference.json). The reference is ``monai.bundle.run`` itself (ConfigParser, its evaluator,
its postprocessing with Invertd and SaveImaged): advseg's argmax on the source grid must equal
the segmentations it saves voxel for voxel, and its probabilities must equal those of the
bundle's own objects (MONAI's SlidingWindowInferer, Activationsd, Invertd).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("ignite")  # monai.bundle.run's evaluator

from advseg.cli import main
from advseg.errors import UserError
from advseg.models.external.bundle import BundleModel, check_differentiable, read_bundle
from advseg.models.external.bundle_cases import BundleCases
from advseg.runs.records import read_records
from monai_bundle import CLASSES, write_bundle, write_data


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from monai.bundle import run

    root = tmp_path_factory.mktemp("bundle")
    data = write_data(root / "data")
    bundle = write_bundle(root / "bundle", data)
    out = root / "monai-out"
    configs = bundle / "configs"
    run(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
        bundle_root=str(bundle), dataset_dir=str(data), output_dir=str(out))  # fmt: skip
    return bundle, data, out


def _opened(bundle: Path, data: Path) -> tuple[BundleModel, BundleCases]:
    model = BundleModel(read_bundle(bundle))
    cases = BundleCases(data, model.bundle)
    cases.bind(model)
    return model, cases


def test_segmentation_equals_monai_bundle_run_and_probabilities_its_objects(made):
    from monai.bundle import ConfigParser

    bundle, data, out = made
    model, cases = _opened(bundle, data)
    assert model.bundle.classes == CLASSES and model.activation == "softmax"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    network = model.bundle.network  # the same weights, loaded by advseg
    preprocessing, inferer = (
        parser.get_parsed_content("preprocessing"),
        parser.get_parsed_content("inferer"),
    )
    post = parser.get_parsed_content("postprocessing").transforms[:2]  # Activationsd, Invertd
    for row, case in enumerate(cases.index["id"]):
        cases.prepare([row])
        image, _ = cases.read(row)
        with torch.no_grad():
            logits = model(image[None])
            item = preprocessing({"image": cases.index["image_path"].iloc[row]})
            pred = inferer(item["image"][None], network)[0]
            item["pred"] = pred
            for transform in post:
                item = transform(item)
        ours = logits.softmax(1)[0]
        assert ours.shape == item["pred"].shape
        assert torch.allclose(ours, item["pred"].as_tensor(), atol=1e-5)
        theirs = np.asarray(nib.load(out / f"{case}_seg.nii.gz").dataobj)
        assert np.array_equal(logits.argmax(1)[0].numpy(), theirs.reshape(logits.shape[2:]))
    assert (logits.argmax(1) > 0).any()  # the trained model finds something


def test_gradient_reaches_the_raw_image_and_pgd_keeps_its_budget_in_hu(made):
    from advseg.attacks import create_attack

    bundle, data, _ = made
    model, cases = _opened(bundle, data)
    cases.prepare([0])
    image, mask = cases.read(0)
    x = image[None].clone().requires_grad_(True)
    model(x)[:, 1].sum().backward()
    assert x.grad.abs().sum() > 0
    attack = create_attack("pgd", model, loss="ce", eps=20.0, steps=2, activation="softmax",
                           valid_range=None)  # fmt: skip
    adv = attack(image[None], mask[None])
    assert (adv - image[None]).abs().max() <= 20.0 + 1e-3


def test_evaluate_a_bundle_from_the_cli(made, tmp_path, capsys):
    bundle, data, _ = made
    out = tmp_path / "run"
    args = ["evaluate", "--bundle", str(bundle), "--data", str(data), "--attack", "pgd",
            "--steps", "2", "--eps", "30", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0, capsys.readouterr().err
    records = read_records(out / "records")
    assert set(records["model"]) == {"bundle-bundle"} and set(records["arch"]) == {"bundle"}
    assert set(records["class"]) == set(CLASSES) and (records["slice"] == -1).all()
    assert records["slice_id"].nunique() == 3 and (records["linf"] <= 30 + 1e-3).all()
    assert records["hd95_mm_clean"].notna().any()
    provenance = json.loads((out / "external.json").read_text())["bundle-bundle"]
    assert provenance["kind"] == "bundle" and provenance["inferer"] == "SlidingWindowInferer"
    digest = provenance["sha256"]["model.pt"]
    assert len(digest) == 64
    with pytest.raises(SystemExit) as exit_:  # the report names the bundle and its weights' hash
        main(["report", str(out)])
    assert exit_.value.code == 0, capsys.readouterr().err
    page = (out / "report" / "report.md").read_text()
    assert "MONAI bundle" in page and digest in page and "SlidingWindowInferer" in page

    # export: the volume recomputed (same random start), on the source grid, in HU
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "export",
                str(out),
                "--slices",
                "ct_01",
                "--loss",
                "dicece",
                "--out",
                str(tmp_path / "x"),
            ]
        )
    assert exit_.value.code == 0, capsys.readouterr().err
    document = json.loads((tmp_path / "x" / "export.json").read_text())
    assert [c["same_counts"] for c in document["check"]] == [True]
    assert document["external"]["sha256"]["model.pt"] == digest
    source = nib.load(data / "imagesTs" / "ct_01.nii.gz")
    files = document["nifti"]["ct_01"]
    adv = nib.load(tmp_path / "x" / files["adversarial_0000"])
    assert np.allclose(adv.affine, source.affine) and adv.shape == source.shape
    delta = adv.get_fdata() - source.get_fdata()
    assert 0 < np.abs(delta).max() <= 30 + 1e-3
    truth = nib.load(tmp_path / "x" / files["truth_ball"]).get_fdata()
    label = np.asarray(nib.load(data / "labelsTs" / "ct_01.nii.gz").dataobj)
    assert np.array_equal(truth > 0, label == 1)


def test_a_torchscript_bundle_equals_the_weights(made, tmp_path):
    bundle, data, _ = made
    copy = tmp_path / "ts-bundle"
    shutil.copytree(bundle, copy)
    model, cases = _opened(bundle, data)
    torch.jit.save(torch.jit.script(model.bundle.network), copy / "models" / "model.ts")
    (copy / "models" / "model.pt").unlink()
    scripted, _ = _opened(copy, data)
    assert scripted.bundle.weights.name == "model.ts"
    cases.prepare([1])
    scripted.meta = model.meta
    image, _ = cases.read(1)
    with torch.no_grad():
        assert torch.allclose(scripted(image[None]), model(image[None]), atol=1e-5)


def test_bad_bundles_are_one_line(made, tmp_path, capsys):
    bundle, data, _ = made
    with pytest.raises(UserError, match=r"no configs/inference\.json"):
        read_bundle(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "models" / "model.pt").unlink()
    with pytest.raises(UserError, match=r"no models/model\.pt"):
        read_bundle(broken)
    torch.save({"other": torch.zeros(2)}, broken / "models" / "model.pt")
    with pytest.raises(UserError, match="does not fit network_def"):
        read_bundle(broken)
    torch.save({"net": torch.nn.Linear(1, 1)}, broken / "models" / "model.pt")  # a pickle
    with pytest.raises(UserError, match="weights_only"):
        read_bundle(broken)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    del config["network_def"]
    (broken / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no network_def"):
        read_bundle(broken)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["preprocessing"]["transforms"].insert(
        4, {"_target_": "EnsureTyped", "keys": "image", "data_type": "numpy"}
    )  # through numpy: no gradient
    shutil.copy(bundle / "models" / "model.pt", broken / "models" / "model.pt")
    (broken / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="EnsureTyped stops the gradient"):
        model, cases = _opened(broken, data)
        check_differentiable(model.bundle, cases.read(0)[0], cases.metas[0])
    base = ["evaluate", "--bundle", str(bundle), "--data", str(data), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--classes", "only-one"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "3 output channels" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "records").exists()


def test_a_bundle_in_an_experiment_grid_is_judged_on_its_own_images(made, tmp_path, capsys):
    """``advseg run`` with ``{name: b, bundle: DIR, data: DIR}``: not trained, its own images
    in HU, its provenance in ``external.json`` and the report."""
    import yaml

    bundle, data, _ = made
    config = {
        "name": "bundle-grid",
        "data": {"path": "synthetic", "cache_dir": str(tmp_path / "cache")},
        "models": [{"name": "b", "bundle": str(bundle), "data": str(data)}],
        "attacks": [{"name": "fgsm", "losses": ["ce"], "eps": [20]}],
        "evaluation": {"max_slices": 1, "examples": 0},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(path), "--out", str(tmp_path / "run")])
    assert exit_.value.code == 0, capsys.readouterr().err
    records = read_records(tmp_path / "run")
    assert set(records["model"]) == {"b"} and set(records["arch"]) == {"bundle"}
    assert records["case"].nunique() == 1 and 1 < records["linf"].max() <= 20 + 1e-3
    provenance = json.loads((tmp_path / "run" / "external.json").read_text())["b"]
    assert len(provenance["sha256"]["model.pt"]) == 64
    assert str(bundle) in (tmp_path / "run" / "report" / "report.md").read_text()
