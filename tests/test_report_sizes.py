"""Robustness by structure size: the size bins, the per-(model, class, bin) Dice drop recomputed
by hand from the per-slice records' pixel counts, and the report's section."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from advseg.cli import main
from advseg.config import to_dict
from advseg.data import UWMGI_CLASSES, PreprocessConfig, write_synthetic
from advseg.evaluate.corrupted import evaluate_corruptions
from advseg.models import create_model
from advseg.models.checkpoint import metadata_for, save_checkpoint
from advseg.report import write_report
from advseg.report.sizes import size_edges, size_table
from test_evaluate_corruptions import _Data  # tests/ is on sys.path


def test_size_edges_are_quantiles_of_the_present_structures():
    sizes = np.concatenate([np.zeros(50), np.arange(1, 101)])  # absent ones do not count
    assert size_edges(sizes, 4).tolist() == [0, 26, 50, 75, 100]  # quartiles 25.75, 50.5, 75.25
    assert size_edges(np.array([5, 5, 5, 5]), 4).tolist() == [0, 5]  # one size: one bin
    assert size_edges(np.zeros(3), 4).tolist() == [0]


@pytest.fixture(scope="module")
def records():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(10, 3, 16, 16, generator=g)
    masks = torch.zeros(10, 2, 16, 16)
    for i in range(10):  # squares of many sizes; class b absent on even slices
        side = 2 + i
        masks[i, 0, 2 : 2 + side, 3 : 3 + side] = 1
        if i % 2:
            masks[i, 1, 13:15, 1 : 1 + i] = 1
        images[i, 0] = 0.2 + 0.6 * masks[i, 0]
    model = torch.nn.Conv2d(3, 2, 3, padding=1)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[:, 0, 1, 1] = 10.0
        model.bias.fill_(-5.0)
    data = _Data(images, masks)
    data.classes = ("a", "b")
    results = evaluate_corruptions(
        model, data, range(10), [("blur", 5)],
        model_name="m", arch="c",
    )  # fmt: skip
    return pd.concat([r.records for r in results], ignore_index=True)


def test_drop_per_class_and_bin_by_hand(records):
    edges = np.array([0.0, 10, 40, 1000])
    table = size_table(records, edges=edges)
    expected = {}
    for _, row in records.iterrows():
        if row["gt_pixels"] <= 0:
            continue
        level = next(i for i in range(3) if edges[i] < row["gt_pixels"] <= edges[i + 1])
        tp, fp, fn = (row[f"{k}_clean"] for k in ("tp", "fp", "fn"))
        clean = 2 * tp / (2 * tp + fp + fn)  # the per-slice Dice, from the pixel counts
        tp, fp, fn = (row[f"{k}_adv"] for k in ("tp", "fp", "fn"))
        adv = 2 * tp / (2 * tp + fp + fn)
        for name in (row["class"], "all"):
            expected.setdefault((name, level), []).append((clean, adv))
    assert len(table) == len(expected)
    for _, row in table.iterrows():
        pairs = np.array(expected[row["class"], row["bin"]])
        assert row["slices"] == len(pairs)
        assert row["dsc_clean"] == pytest.approx(pairs[:, 0].mean())
        assert row["dsc_adv"] == pytest.approx(pairs[:, 1].mean())
        assert row["drop"] == pytest.approx((pairs[:, 0] - pairs[:, 1]).mean())
        assert row["pixels"] == f"({edges[row['bin']]:.0f}, {edges[row['bin'] + 1]:.0f}]"
    present = records[records["gt_pixels"] > 0]
    all_rows = table[table["class"] == "all"]
    assert all_rows["slices"].sum() == len(present)  # every present structure once, none absent
    assert table["class"].tolist()[:1] == ["a"] and table["class"].iloc[-1] == "all"


def test_default_bins_hold_about_equal_counts(records):
    table = size_table(records, bins=3)
    counts = table[table["class"] == "all"]["slices"].to_numpy()
    assert len(counts) == 3 and counts.max() - counts.min() <= 0.2 * counts.sum()


def test_the_report_has_the_size_section(tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=3)
    torch.manual_seed(0)
    model = create_model("unet-tiny")
    preprocessing = to_dict(PreprocessConfig(size=32))
    source = {"config": {"path": str(data), "cache_dir": str(tmp_path / "cache")},
              "test_fraction": 0.34, "split_seed": 0}  # fmt: skip
    meta = metadata_for(model, list(UWMGI_CLASSES), preprocessing=preprocessing, data=source)
    save_checkpoint(tmp_path / "tiny", model, meta)
    out = tmp_path / "run"
    args = ["evaluate", str(tmp_path / "tiny"), "--out", str(out), "--corruption", "blur:5"]
    args += ["--attack", "fgsm", "--loss", "bce", "--eps", "0.03", "--device", "cpu"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    report = write_report(out)
    assert "Robustness by structure size" in report.html.read_text()
    written = {p.name for p in report.files}
    assert {"size_attacks.csv", "size_corruptions.csv", "size_attacks.png"} <= written
    attacks = pd.read_csv(out / "report" / "size_attacks.csv")
    from advseg.runs.records import read_records

    records = read_records(out)
    fgsm = records[(records["attack"] == "fgsm") & (records["gt_pixels"] > 0)]
    assert attacks.loc[attacks["class"] == "all", "slices"].sum() == len(fgsm)
