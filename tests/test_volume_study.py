"""benchmarks/volume_study.py end to end at toy sizes (slow: two trainings and every attack cell):
each attack at each eps through both protocols and on the 2D model, VAFA held to PGD's SSIM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "volume_study.py"


@pytest.mark.slow  # about two minutes on a shared 2-core machine
def test_volume_study_writes_every_cell(tmp_path):
    out = tmp_path / "mri.json"
    toy = ["--kind", "mri", "--shape", "16,32,32", "--roi", "16", "--train", "2", "--test", "1",
           "--steps3d", "2", "--steps2d", "2", "--sea-steps", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    done = subprocess.run([sys.executable, str(SCRIPT), *toy], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cells = json.loads(out.read_text())["cells"]
    seen = {(c["model"], c["attack"], round(c["eps"] * 255), c["through"]) for c in cells}
    for attack in ("fgsm", "pgd", "apgd", "sea", "vafa"):
        for eps in (4, 8):
            assert {("3d", attack, eps, "inference"), ("3d", attack, eps, "tiles"),
                    ("2d", attack, eps, "slices")} <= seen  # fmt: skip
    for c in cells:
        if c["attack"] in ("fgsm", "pgd", "apgd", "sea"):
            assert c["linf"] <= c["eps"] + 1e-6
    pgd = {
        c["eps"]: c["ssim"] for c in cells if (c["attack"], c["through"]) == ("pgd", "inference")
    }
    for c in cells:
        if (c["attack"], c["through"]) == ("vafa", "inference"):
            assert c["ssim"] >= pgd[c["eps"]] - 1e-3  # at least PGD's SSIM (its floor, rounded)
    assert "| model | attack | eps | through |" in done.stdout
