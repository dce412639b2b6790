"""The report's defence table and certified-Dice curve, from records made here (no model)."""

import json

import numpy as np
import pandas as pd
import pytest

from advseg.report import write_report
from advseg.runs.records import RECORD_COLUMNS, write_records

CLASSES = ["large_bowel", "small_bowel", "stomach"]


def _rows(model, attack, loss, eps, adv_share, abstained=0.0, slices=3):
    rows = []
    for s in range(slices):
        for k, name in enumerate(CLASSES):
            gt = 100 * (k + 1)
            tp, tp_adv = int(0.9 * gt), int(adv_share * gt)
            row = dict.fromkeys(RECORD_COLUMNS, 0.0)
            row.update(model=model, source=model, arch="unet", params=10, attack=attack)
            row.update(loss=loss, eps=eps)
            row.update(slice_id=f"case1_day0_slice_{s:04d}", case=1, scan="case1_day0", slice=s)
            row.update({"class": name, "gt_pixels": gt, "tp_clean": tp, "fn_clean": gt - tp})
            row.update(tp_adv=tp_adv, fn_adv=gt - tp_adv, abstained=abstained)
            row["dice_clean"] = 2 * tp / (2 * tp + gt - tp)
            row["dice_adv"] = 2 * tp_adv / (2 * tp_adv + gt - tp_adv)
            rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture
def run_dir(tmp_path):
    cells = [
        ("unet", "pgd", 0.5), ("unet", "fgsm", 0.7), ("unet+bitdepth:3", "pgd", 0.85),
        ("unet+bitdepth:3", "pgd+bpda", 0.3), ("noisy", "pgd", 0.6),
    ]  # fmt: skip
    for model, attack, share in cells:
        records = _rows(model, attack, "bce", 0.03, share)
        write_records(records, tmp_path / "records" / f"{model}__{attack}__eps0.03.parquet")
    certified = pd.concat(
        [
            _rows("noisy", "certify", "sigma=0.25", r, 0.8 - r, abstained=0.1 + r)
            for r in (0.0, 0.1, 0.2, 0.5)
        ]
    )
    write_records(certified, tmp_path / "certified" / "noisy__sigma0.25.parquet")
    for model, seconds, train in (
        ("unet", [1.5, 2.5], {}),
        ("noisy", [3.0], {"noise_sigma": 0.25}),
    ):
        folder = tmp_path / "models" / model
        (folder / "checkpoints").mkdir(parents=True)
        pd.DataFrame({"epoch": range(1, len(seconds) + 1), "seconds": seconds}).to_csv(
            folder / "log.csv", index=False
        )
        (folder / "checkpoints" / "best.json").write_text(json.dumps({"meta": {"train": train}}))
    return tmp_path


def test_defence_table_shows_naive_adaptive_certified_and_training(run_dir):
    report = write_report(run_dir, protocol="per-class")
    table = pd.read_csv(run_dir / "report" / "defences.csv").set_index("model")
    assert list(table.index) == ["noisy", "unet", "unet+bitdepth:3"]
    defended = table.loc["unet+bitdepth:3"]
    assert defended["strongest"] == "pgd / bce" and defended["adaptive"] == "pgd+bpda / bce"
    assert defended["dsc_strongest"] > defended["dsc_adaptive"]  # gradient masking exposed
    expected = np.mean([2 * 0.3 / 1.3] * 9)
    assert defended["dsc_adaptive"] == pytest.approx(expected)
    assert table.loc["unet", "strongest"] == "pgd / bce"  # the lower of pgd and fgsm
    assert table.loc["unet", "train_s"] == pytest.approx(4.0)
    assert table.loc["unet+bitdepth:3", "train_s"] == pytest.approx(4.0)  # its trained model's
    assert table.loc["noisy", "training"] == "noise 0.25"
    assert table.loc["unet", "training"] == "none"
    assert table.loc["noisy", "certified@0.1"] == pytest.approx(2 * 0.7 / 1.7)
    assert table.loc["noisy", "certified@0.2"] == pytest.approx(2 * 0.6 / 1.6)
    assert np.isnan(table.loc["unet", "certified@0.1"])
    assert (run_dir / "report" / "certified_dice.png").exists()
    certified = pd.read_csv(run_dir / "report" / "certified.csv")
    assert certified["radius"].tolist() == [0.0, 0.1, 0.2, 0.5]
    assert certified["abstained"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.6])
    assert "Defences" in report.html.read_text()
    assert "certify" not in set(pd.read_csv(run_dir / "report" / "cells.csv")["attack"])


def test_no_defence_section_without_defences(run_dir):
    import shutil

    shutil.rmtree(run_dir / "certified")
    for file in (run_dir / "records").glob("unet+*"):
        file.unlink()
    write_report(run_dir)
    assert not (run_dir / "report" / "defences.csv").exists()
