"""``advseg demo``: the README's main command, end to end (slow: it trains the plain U-Net)."""

from __future__ import annotations

from pathlib import Path

import pytest

from advseg.demo import default_run_dir, run_demo
from advseg.report import applies
from advseg.runs.records import read_records


def test_demo_run_dir_names_the_data():
    assert default_run_dir(None) == Path("runs/demo") == default_run_dir("synthetic")
    assert default_run_dir("/data/uw-madison-gi-tract/") == Path("runs/demo-uw-madison-gi-tract")


@pytest.mark.slow
def test_demo_trains_attacks_and_reports(tmp_path):
    result = run_demo(run_dir=tmp_path / "demo")
    table = result.summary
    assert table["model"].tolist() == ["unet"]
    assert table["DSC clean"].iloc[0] > 0.7
    for loss in ("bce", "focal", "dicefocal"):
        assert table[f"DSC fgsm {loss} eps=0.009"].iloc[0] < table["DSC clean"].iloc[0]
    assert (tmp_path / "demo" / "data" / "synthetic" / "train.csv").exists()  # not in the repo
    assert result.report is not None
    # one model: the report leaves out (and says why) the sections needing 3 or more; nothing else
    left_out = applies(read_records(tmp_path / "demo" / "records"), 0.009)
    assert sorted(result.report.notes) == sorted(left_out.values())
    assert set(left_out) == {"params", "luminosity"}
    assert result.report.locations == ["synthetic"]  # the report says it: the synthetic phantom
    assert "Data: the synthetic phantom" in result.report.markdown.read_text()
    again = run_demo(run_dir=tmp_path / "demo")  # a second run only rewrites the report
    assert again.trained == [] and again.grid.computed == []
