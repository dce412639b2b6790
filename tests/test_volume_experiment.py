"""configs/volumes.yaml: the 3D study end to end through ``advseg run`` (training on patches,
both threat protocols, records with the surface Dice, the report's slice through a volume),
at a tiny size; and what a 3D grid refuses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from advseg.catalogue import packaged_config
from advseg.data import write_synthetic_nifti
from advseg.errors import UserError
from advseg.experiment import check_config, load_experiment, run_experiment
from advseg.experiment.config import ModelSpec


@pytest.fixture
def tiny(tmp_path):
    write_synthetic_nifti(tmp_path / "ct", cases=5, slices=16, size=(32, 24), seed=0)
    config = load_experiment(packaged_config("volumes"))
    config.data.path, config.data.cache_dir = tmp_path / "ct", tmp_path / "cache"
    volume = config.data.volume
    volume.spacing, volume.patch, volume.samples = None, (16, 16, 16), 2
    config.train.epochs, config.train.device = 1, "cpu"
    config.split.test_fraction = config.split.val_fraction = 0.3
    config.attacks = config.attacks[1:]  # pgd only
    config.attacks[0].kwargs = {"steps": 2}
    config.report = False
    return config, tmp_path


def test_volumes_yaml_runs_end_to_end(tiny):
    config, tmp = tiny
    assert [m.arch for m in config.models] == ["unet3d-tiny"]
    result = run_experiment(config, tmp / "run")
    assert result.grid.computed == ["unet3d-tiny__pgd-inference__eps0.05",
                                    "unet3d-tiny__pgd-tiles__eps0.05"]  # fmt: skip
    records = pd.concat(
        [pd.read_parquet(tmp / "run/records" / f"{s}.parquet") for s in result.grid.computed]
    )
    assert set(records["through"]) == {"inference", "tiles"}
    assert len(records) == 2 * 2 * 4  # protocols x held-out volumes x classes
    assert records["nsd_adv"].between(0, 1).all() and (records["nsd_mm"] == 6.0).all()
    assert (records["linf"] <= 0.05 + 1e-6).all()
    assert records["hd95_mm_clean"].notna().all()
    example = np.load(tmp / "run/examples/unet3d-tiny__pgd-tiles__eps0.05.npz")
    assert example["image"].shape == (1, 1, 24, 32)  # one axial slice of the volume
    assert example["slice_ids"][0].startswith("case") and "_slice_" in example["slice_ids"][0]
    again = run_experiment(config, tmp / "run")  # resumes: nothing left to compute
    assert again.grid.computed == [] and len(again.grid.skipped) == 2


@pytest.mark.slow
def test_volumes_report_draws_a_slice_through_the_volume(tiny):
    config, tmp = tiny
    config.report = True
    run_experiment(config, tmp / "run")
    html = (tmp / "run/report/report.html").read_text()
    assert "pgd:tiles" in html and "pgd:inference" in html
    assert (tmp / "run/report/panel_unet3d-tiny_pgd-tiles.png").is_file()


def test_a_3d_grid_refuses_what_volumes_lack(tiny):
    config, _ = tiny
    config.models = [ModelSpec(arch="unet3d-tiny"), ModelSpec(arch="unet-tiny")]
    with pytest.raises(UserError, match="2D or 3D models, not both"):
        check_config(config)
    config.models = [ModelSpec(arch="unet3d-tiny")]
    config.evaluation.through = ["inference", "windows"]
    with pytest.raises(UserError, match=r"evaluation\.through"):
        check_config(config)
