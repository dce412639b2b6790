"""benchmarks/volume_study.py end to end at toy sizes (slow: three trainings and every attack cell,
each an `advseg` command): every attack at each eps through both protocols on the 3D model and on
the 2D model's slices, the VAFT model beside the clean one, VAFA held to PGD's SSIM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "volume_study.py"


@pytest.mark.slow  # a few minutes on a shared 2-core machine
def test_volume_study_writes_every_cell(tmp_path):
    toy = ["--out", str(tmp_path), "--kinds", "mri", "--vaft", "mri", "--cases", "5",
           "--slices", "16", "--spacing", "1.2,6,6", "--patch", "16", "--size", "32",
           "--epochs3d", "1", "--epochs2d", "1", "--steps", "1", "--sea-steps", "1",
           "--vafa-eps", "0.1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    done = subprocess.run([sys.executable, str(SCRIPT), *toy], capture_output=True, text=True,
                          env=env, timeout=1500, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    cells = json.loads((tmp_path / "study.json").read_text())["cells"]
    seen = {(c["model"], c["attack"], round(c.get("matched_eps", c["eps"]) * 255), c["through"])
            for c in cells}  # fmt: skip
    for attack in ("fgsm", "pgd", "apgd", "sea", "vafa"):
        for eps in (4, 8):
            assert {("3d", attack, eps, "inference"), ("3d", attack, eps, "tiles"),
                    ("2d", attack, eps, "slices")} <= seen  # fmt: skip
    for attack in ("pgd", "vafa"):
        assert {("3d-vaft", attack, 4, "inference"), ("3d-vaft", attack, 8, "inference")} <= seen
    for c in cells:
        assert c["volumes"] == 2 and 0 <= c["dice_adv"] <= 1
        if c["attack"] in ("fgsm", "pgd", "apgd", "sea"):  # eps in units of the inputs' range
            assert c["linf"] <= c["eps"] + 1e-6
    pgd = {(c["model"], round(c["eps"] * 255)): c["ssim_min"] for c in cells
           if c["attack"] == "pgd" and c["through"] in ("inference", "slices")}  # fmt: skip
    for c in cells:
        if c["attack"] == "vafa":  # every volume at least PGD's lowest SSIM (floored to 1e-4)
            source = "3d" if c["model"] == "3d-vaft" else c["model"]
            assert c["ssim_min"] >= pgd[(source, round(c["matched_eps"] * 255))] - 1e-4
    assert "| kind | model | attack | eps | through |" in done.stdout
