"""Seeds in the grid, the one training path, and `advseg run` under torchrun (two gloo ranks)."""

from __future__ import annotations

import os
import socket
from dataclasses import replace

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from advseg import distributed
from advseg.experiment import AttackSpec, plan_cells, run_experiment
from advseg.models import read_checkpoint
from advseg.records import read_records
from advseg.train import train_on_data
from test_experiment_run import _config, phantom  # noqa: F401 (the phantom fixture)


def test_each_model_is_trained_per_seed_and_records_carry_the_seed(phantom, tmp_path):  # noqa: F811
    config = replace(
        _config(phantom, tmp_path),
        seeds=[0, 1],
        attacks=[AttackSpec(name="fgsm", losses=["bce", "focal"], eps=[0.01])],
        report=False,
    )
    assert [c.slug for c in plan_cells(config)] == [
        "unet-tiny__seed0__fgsm__eps0.01",
        "unet-tiny__seed1__fgsm__eps0.01",
    ]
    run_dir = tmp_path / "run"
    result = run_experiment(config, run_dir)
    assert result.trained == ["unet-tiny (seed 0)", "unet-tiny (seed 1)"]
    records = read_records(run_dir)
    assert sorted(records["seed"].unique()) == [0, 1]
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["seeds"].tolist() == [2]
    assert {"DSC clean seed sd", "DSC clean low", "DSC clean high"} <= set(summary.columns)
    weights = [
        load_file(
            run_dir / "models" / "unet-tiny" / f"seed{s}" / "checkpoints" / "best.safetensors"
        )
        for s in (0, 1)
    ]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    _, meta, _ = read_checkpoint(
        run_dir / "models" / "unet-tiny" / "seed1" / "checkpoints" / "best"
    )
    assert meta.train["seed"] == 1

    # One training path: `advseg train` (train_on_data) with the same settings gives the same model.
    alone = tmp_path / "alone"
    train_config = replace(config.train, model="unet-tiny", seed=1)
    split = config.split
    train_on_data(config.data, train_config, alone, test_fraction=split.test_fraction,
                  val_fraction=split.val_fraction, split_seed=split.seed)  # fmt: skip
    same = load_file(alone / "checkpoints" / "best.safetensors")
    assert all(torch.equal(same[k], weights[1][k]) for k in same)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, config, run_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    assert distributed.init(backend="gloo")
    try:
        result = run_experiment(config, run_dir)
        result.cells.to_csv(f"{out}/rank{rank}.csv", index=False)
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_run_under_torchrun_trains_with_ddp_and_shards_the_cells(phantom, tmp_path):  # noqa: F811
    config = replace(
        _config(phantom, tmp_path),
        attacks=[AttackSpec(name="fgsm", losses=["bce"], eps=[0.01])],
        report=False,
    )
    run_dir = tmp_path / "run"
    mp.spawn(_worker, args=(2, _free_port(), config, str(run_dir), str(tmp_path)), nprocs=2)
    ranks = [pd.read_csv(tmp_path / f"rank{r}.csv") for r in (0, 1)]
    pd.testing.assert_frame_equal(ranks[0], ranks[1])  # every rank holds the merged records
    records = read_records(run_dir)
    assert records["slice_id"].is_unique or len(records) == 3 * records["slice_id"].nunique()
    assert (run_dir / "models" / "unet-tiny" / "checkpoints" / "best.json").exists()
    assert (run_dir / "summary.csv").exists()
