"""A report that fits its run: training facts from checkpoints, slice counts beside certified
numbers, eps in /255, the radiological convention and one colour per class in panels."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from advseg.errors import AdvsegWarning
from advseg.evaluate.certify import warn_untrained_noise
from advseg.models import create_model
from advseg.models.checkpoint import metadata_for, save_checkpoint
from advseg.report import write_report
from advseg.report.figures import CLASS_COLOURS, _class_overlay, radiological
from advseg.report.html import eps_text
from advseg.report.training import run_checkpoints, training_facts
from advseg.runs.records import RECORD_COLUMNS, write_records

CLASSES = ["large_bowel", "small_bowel", "stomach"]


def _rows(model, attack, loss, eps, share, slices):
    rows = []
    for s in range(slices):
        for k, name in enumerate(CLASSES):
            gt = 100 * (k + 1)
            tp, tp_adv = int(0.9 * gt), int(share * gt)
            row = dict.fromkeys(RECORD_COLUMNS, 0.0)
            row.update(model=model, source=model, arch="unet-tiny", params=10, attack=attack)
            row.update(loss=loss, eps=eps, gt_pixels=gt, tp_clean=tp, fn_clean=gt - tp)
            row.update(slice_id=f"case{s}_day0_slice_0001", case=s, scan=f"case{s}_day0", slice=1)
            row.update({"class": name, "tp_adv": tp_adv, "fn_adv": gt - tp_adv})
            row["dice_clean"] = 2 * tp / (2 * tp + gt - tp)
            row["dice_adv"] = 2 * tp_adv / (2 * tp_adv + gt - tp_adv)
            rows.append(row)
    return pd.DataFrame(rows)


def test_eps_is_also_shown_in_grey_levels():
    assert eps_text(8 / 255) == "0.0314 (8/255)"
    assert eps_text(0.009) == "0.009 (2.29/255)"


def test_an_evaluate_output_shows_each_models_training_and_slice_counts(tmp_path):
    """The adversarially trained model's training cell is filled from its checkpoint (method,
    eps, seconds), in the provenance, the training table and the defence table; certified
    numbers from fewer slices than the attacks say so."""
    torch.manual_seed(0)
    net = create_model("unet-tiny")
    adversarial = {"method": "pgd", "eps": 8 / 255, "steps": 3}
    meta = metadata_for(
        net, CLASSES, train={"adversarial": adversarial, "seed": 0},
        metrics={"best": {"epoch": 2, "val_dice": 0.7}, "train_seconds": 293.0},
    )  # fmt: skip
    save_checkpoint(tmp_path / "ckpt" / "robust", net, meta)
    (tmp_path / "evaluate.yaml").write_text(
        yaml.safe_dump({"checkpoints": [str(tmp_path / "ckpt" / "robust")], "out": "."})
    )
    write_records(_rows("robust", "pgd", "bce", 0.03, 0.5, 6), tmp_path / "records" / "a.parquet")
    certified = pd.concat([_rows("robust", "certify", "sigma=0.25", r, 0.6, 2) for r in (0, 0.1)])
    write_records(certified, tmp_path / "certified" / "robust__sigma0.25.parquet")

    assert run_checkpoints(tmp_path) == [("robust", tmp_path / "ckpt" / "robust")]
    facts = training_facts(tmp_path / "ckpt" / "robust")
    assert (facts["method"], facts["eps"], facts["seconds"]) == ("pgd", 8 / 255, 293.0)

    report = write_report(tmp_path)
    defences = pd.read_csv(tmp_path / "report" / "defences.csv").set_index("model")
    assert defences.loc["robust", "training"] == f"pgd eps {8 / 255:g}"
    assert defences.loc["robust", "train_s"] == pytest.approx(293.0)
    assert defences.loc["robust", "slices"] == 6 and defences.loc["robust", "certified_slices"] == 2
    html = report.html.read_text()
    assert "Not the same sample: robust: attacks on 6 slices, certified on 2" in html
    training = pd.read_csv(tmp_path / "report" / "training.csv")
    assert training["adversarial_training"].iloc[0].startswith("pgd eps 0.0314")
    assert training["train_seconds"].iloc[0] == pytest.approx(293.0)
    provenance = pd.read_csv(tmp_path / "report" / "provenance.csv").set_index("what")
    assert provenance.loc["trained: robust", "value"].startswith("pgd eps 0.0314 (8/255)")
    assert "trained in 293 s" in provenance.loc["trained: robust", "value"]
    certified_table = pd.read_csv(tmp_path / "report" / "certified.csv")
    assert set(certified_table["slices"]) == {2}


def test_certify_warns_on_a_model_not_trained_with_noise():
    with pytest.warns(AdvsegWarning, match="not trained with Gaussian noise"):
        warn_untrained_noise({}, 0.25, "m")
    with pytest.warns(
        AdvsegWarning, match="trained with noise sigma 0.5, certified under sigma 0.25"
    ):
        warn_untrained_noise({"noise_sigma": 0.5}, 0.25, "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_untrained_noise({"noise_sigma": 0.25}, 0.25, "m")  # trained as certified: quiet


def test_panels_show_ras_slices_radiologically_and_each_class_in_its_colour():
    # A canonical (RAS+) slice: rows run posterior -> anterior, columns left -> right. A mark at
    # the anterior, right corner (last row, last column) belongs top-left on the screen.
    slice_ = np.zeros((4, 5))
    slice_[-1, -1] = 1
    shown = radiological(slice_)
    assert shown[0, 0] == 1 and shown.sum() == 1
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = masks[1, 3, 3] = True
    rgb = _class_overlay(np.zeros((4, 4)), masks)
    assert not np.allclose(rgb[0, 0], rgb[3, 3])  # two classes, two colours
    assert np.allclose(rgb[0, 0] / rgb[0, 0].max(), np.asarray(CLASS_COLOURS[0]) / 1.0)


def test_examples_mark_the_slices_of_canonical_volumes():
    """``ras`` follows ``image_z``: a NIfTI slice (index >= 0) is RAS+, a PNG slice (-1) not."""
    from advseg.evaluate.engine import BatchOutput
    from advseg.evaluate.scoring import example_arrays, merge_examples

    x, y = torch.rand(3, 1, 4, 4), torch.zeros(3, 2, 4, 4)
    out = BatchOutput(torch.zeros(3, 2, 4, 4), [x], [torch.zeros(3, 2, 4, 4)])
    meta = pd.DataFrame({"id": ["a", "b", "c"], "image_z": [5, -1, 0]})
    part = example_arrays(out, x, y, meta, "sigmoid", [0, 1, 2])
    assert part["ras"].tolist() == [1, 0, 1]
    merged = merge_examples([(1, example_arrays(out, x, y, meta, "sigmoid", [1]))], ["bce"])
    assert merged["ras"].tolist() == [0]
