"""``advseg demo``: the whole pipeline on a fresh machine, in a few minutes, with no download.

The demo is the shipped experiment ``configs/demo.yaml`` (the paper's plain U-Net, FGSM at eps
0.009 under BCE, Focal and Dice + Focal) run by :func:`advseg.experiment.run_experiment`. With no
data given, the synthetic phantom is written inside the run directory; with ``data``, the same
experiment runs on that data set.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from advseg.data import SYNTHETIC
from advseg.data.location import is_synthetic
from advseg.experiment import RunResult, load_experiment, packaged_config, run_experiment


def default_run_dir(data: str | Path | None) -> Path:
    """``runs/demo`` for the phantom, ``runs/demo-<data folder name>`` for a real data set."""
    phantom = data is None or is_synthetic(data)
    return Path("runs") / ("demo" if phantom else f"demo-{Path(data).resolve().name}")


def run_demo(
    data: str | Path | None = None, run_dir: str | Path | None = None, *, progress: bool = False
) -> RunResult:
    """Run (or resume) the demo experiment.

    Args:
        data: a data directory (Kaggle layout or NIfTI); None (or ``synthetic``) writes the
            phantom into the run directory and uses it.
        run_dir: where to run; default :func:`default_run_dir`.
        progress: show progress on the terminal.
    """
    config = load_experiment(packaged_config("demo"))
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(data)
    if data is None or is_synthetic(data):  # the phantom, written into the run directory
        config.data = replace(config.data, path=Path(SYNTHETIC), cache_dir=run_dir / "data")
    else:
        config.data = replace(config.data, path=Path(data))
    return run_experiment(config, run_dir, progress=progress)
