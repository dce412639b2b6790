"""The grid side of the experiment runner: one training path, seeds, compat, torchrun, --data."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from rich.console import Console
from safetensors.torch import load_file

from advseg import distributed
from advseg.augment import AugmentConfig
from advseg.cli import main
from advseg.cli.table_ii import table_ii
from advseg.config import save_yaml
from advseg.errors import UserError
from advseg.evaluate import EvaluateConfig, evaluate
from advseg.experiment import (
    AttackSpec,
    ExperimentConfig,
    ModelSpec,
    check_config,
    load_experiment,
    model_train_config,
    plan_cells,
    run_experiment,
)
from advseg.models import read_checkpoint
from advseg.runs.records import read_records
from advseg.stats.summary import summarize_cells
from advseg.train import train_on_data
from test_distributed import _free_port
from test_experiment_run import _config, phantom  # noqa: F401 (phantom: the module's fixture)


def _advseg(*args: str) -> int:
    """``advseg ARGS`` in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def _evaluated_alone(checkpoint, out, **options) -> pd.DataFrame:
    """The records of ``advseg evaluate CHECKPOINT`` (its test cases) with the grid's cell."""
    config = EvaluateConfig(
        checkpoints=[checkpoint], out=out, losses=["bce"], eps=[0.01], device="cpu", **options
    )
    evaluate(config)
    return read_records(out)


def _assert_same_counts(ours: pd.DataFrame, theirs: pd.DataFrame) -> None:
    """The same slices and classes with the same pixel counts and L-inf norms."""
    keys = ["slice_id", "class"]
    columns = [*keys, "tp_clean", "fp_clean", "fn_clean", "tp_adv", "fp_adv", "fn_adv", "linf"]
    ours, theirs = (r.sort_values(keys).reset_index(drop=True)[columns] for r in (ours, theirs))
    assert len(ours) > 0
    pd.testing.assert_frame_equal(ours, theirs)


def _one_cell(config):
    return replace(
        config, attacks=[AttackSpec(name="fgsm", losses=["bce"], eps=[0.01])], report=False
    )


def test_a_grid_trains_its_model_through_train_on_data(phantom, tmp_path):  # noqa: F811
    config = _one_cell(_config(phantom, tmp_path))
    config.train = replace(config.train, augment=AugmentConfig())  # augmentation on
    run_experiment(config, tmp_path / "run")
    grid = tmp_path / "run" / "models" / "unet-tiny" / "checkpoints" / "best"

    alone = tmp_path / "alone"
    split = config.split
    train_on_data(
        config.data,
        model_train_config(config, config.models[0]),
        alone,
        test_fraction=split.test_fraction,
        val_fraction=split.val_fraction,
        split_seed=split.seed,
    )
    ours, theirs = (load_file(f"{p}.safetensors") for p in (grid, alone / "checkpoints" / "best"))
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key  # bit for bit
    _, meta, _ = read_checkpoint(grid)
    _, meta_alone, _ = read_checkpoint(alone / "checkpoints" / "best")
    assert meta.data == meta_alone.data and set(meta.data["rows"]) == {"train", "val", "test"}
    assert meta.train == meta_alone.train


def test_seeds_train_each_model_per_seed_and_table_ii_shows_their_spread(phantom, tmp_path):  # noqa: F811
    config = replace(_one_cell(_config(phantom, tmp_path)), seeds=[0, 1])
    assert [c.slug for c in plan_cells(config)] == [
        "unet-tiny__seed0__fgsm__eps0.01",
        "unet-tiny__seed1__fgsm__eps0.01",
    ]
    run_dir = tmp_path / "run"
    result = run_experiment(config, run_dir)
    assert result.trained == ["unet-tiny (seed 0)", "unet-tiny (seed 1)"]
    models = run_dir / "models" / "unet-tiny"
    weights = [load_file(models / f"seed{k}" / "checkpoints" / "best.safetensors") for k in (0, 1)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert read_checkpoint(models / "seed1" / "checkpoints" / "best")[1].train["seed"] == 1
    records = read_records(run_dir)
    assert sorted(records["seed"].unique()) == [0, 1]

    # Table II: the mean over seeds, its sd and the case-bootstrap interval, in the three places.
    per_seed = [summarize_cells(records[records["seed"] == k], "per-class").iloc[0] for k in (0, 1)]
    row = result.cells.iloc[0]
    for column in ("dsc_clean", "dsc_adv", "as"):
        values = [s[column] for s in per_seed]
        assert row[column] == pytest.approx(np.mean(values))
        assert row[f"{column}_sd"] == pytest.approx(np.std(values, ddof=1))
    assert row["seeds"] == 2
    summary = pd.read_csv(run_dir / "summary.csv")
    label = "DSC fgsm bce eps=0.01"
    assert summary["seeds"].tolist() == [2]
    assert summary[label].iloc[0] == pytest.approx(row["dsc_adv"])
    assert summary[f"{label} seed sd"].iloc[0] == pytest.approx(row["dsc_adv_sd"])
    if summary["cases"].iloc[0] < 5:  # too few test cases: no interval, and it says why
        assert summary[[f"{label} low", f"{label} high"]].isna().all(axis=None)
        assert summary["interval"].iloc[0].startswith("not meaningful: ")
    else:
        assert summary[f"{label} low"].iloc[0] <= summary[f"{label} high"].iloc[0]
    console = Console(record=True, width=200)
    for table in table_ii(result.cells, "per-class"):
        console.print(table)
    shown = console.export_text()
    assert "mean ± sd over 2 training seeds" in shown
    assert f"{row['dsc_adv']:.4f}±{row['dsc_adv_sd']:.4f}" in shown

    # Resumed per cell: a missing cell is redone from its seed's model, nothing retrained.
    (run_dir / "records" / "unet-tiny__seed1__fgsm__eps0.01.parquet").unlink()
    again = run_experiment(config, run_dir)
    assert again.trained == [] and again.grid.computed == ["unet-tiny__seed1__fgsm__eps0.01"]
    pd.testing.assert_frame_equal(read_records(run_dir), records)


def test_a_grid_without_seeds_keeps_its_names_and_fills_the_training_seed(phantom, tmp_path):  # noqa: F811
    config = _one_cell(_config(phantom, tmp_path))
    config.train = replace(config.train, seed=3)
    assert [c.slug for c in plan_cells(config)] == ["unet-tiny__fgsm__eps0.01"]
    result = run_experiment(config, tmp_path / "run")
    assert result.trained == ["unet-tiny"] and "seeds" not in result.cells.columns
    assert (tmp_path / "run" / "models" / "unet-tiny" / "checkpoints" / "best.json").exists()
    assert read_records(tmp_path / "run")["seed"].unique().tolist() == [3]


def test_compat_notebook_in_yaml_and_on_the_command_line(phantom, tmp_path, capsys):  # noqa: F811
    config = _one_cell(_config(phantom, tmp_path))
    config.evaluation.slices = "all"  # the slices `advseg evaluate --split test` takes
    config.attacks += [AttackSpec(name="fgsm", losses=["bce"], eps=[0.01], compat="notebook")]
    path = tmp_path / "grid.yaml"
    save_yaml(config, path)
    run_dir = tmp_path / "run"
    assert _advseg("run", str(path), "--out", str(run_dir)) == 0
    assert sorted(p.stem for p in (run_dir / "records").iterdir()) == [
        "unet-tiny__fgsm-notebook__eps0.01",
        "unet-tiny__fgsm__eps0.01",
    ]
    records = read_records(run_dir)
    assert set(records["attack"]) == {"fgsm", "fgsm:notebook"}  # the mode, in the attack label

    # The grid's notebook cell is what `advseg evaluate --compat notebook` gives its checkpoint.
    best = run_dir / "models" / "unet-tiny" / "checkpoints" / "best"
    theirs = _evaluated_alone(best, tmp_path / "eval", compat="notebook")
    assert (theirs["attack"] == "fgsm:notebook").all()
    _assert_same_counts(records[records["attack"] == "fgsm:notebook"], theirs)

    # `advseg run --compat notebook`: the grid's FGSM attacks become the notebook's.
    loaded = replace(config, models=[ModelSpec(name="loaded", arch="unet-tiny", checkpoint=best)])
    loaded.attacks = loaded.attacks[:1]
    save_yaml(loaded, path)
    assert _advseg("run", str(path), "--out", str(tmp_path / "loaded"), "--compat", "notebook") == 0
    again = read_records(tmp_path / "loaded")
    assert set(again["attack"]) == {"fgsm:notebook"}
    assert load_experiment(tmp_path / "loaded" / "config.yaml").compat == "notebook"
    capsys.readouterr()
    assert _advseg("run", str(path), "--out", str(tmp_path / "bad"), "--compat", "paper") == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --compat: compat: 'paper' is not one of none, notebook"
    assert "\n" not in err


def test_compat_is_refused_where_the_notebook_had_no_such_attack():
    pgd = AttackSpec(name="pgd", losses=["bce"], eps=[0.01], compat="notebook")
    with pytest.raises(UserError, match=r"attacks\[0\]\.compat: 'notebook' .* not 'pgd'"):
        check_config(ExperimentConfig(attacks=[pgd]))
    grid = ExperimentConfig(compat="notebook", attacks=[replace(pgd, compat=None)])
    assert [c.label for c in plan_cells(check_config(grid))] == ["pgd"]  # left as it is
    spread = AttackSpec(name="fgsm", compat="notebook", transfer=True)
    with pytest.raises(UserError, match=r"attacks\[0\]\.compat: .*white-box only"):
        check_config(ExperimentConfig(models=[ModelSpec(), ModelSpec(name="b")], attacks=[spread]))


def _ddp_worker(rank: int, world: int, port: int, config, run_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    assert distributed.init(backend="gloo")
    try:
        result = run_experiment(config, run_dir)
        result.cells.to_csv(f"{out}/rank{rank}.csv", index=False)
    finally:
        distributed.shutdown()


def test_run_under_torchrun_trains_with_ddp_and_shards_the_cells(phantom, tmp_path):  # noqa: F811
    config = _one_cell(_config(phantom, tmp_path))
    config.evaluation.slices = "all"  # the slices `advseg evaluate --split test` takes
    config.evaluation.batch_size = 2  # several batches, dealt out over the two ranks
    run_dir = tmp_path / "run"
    args = (2, _free_port(), config, str(run_dir), str(tmp_path))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")

    ranks = [pd.read_csv(tmp_path / f"rank{r}.csv") for r in (0, 1)]
    pd.testing.assert_frame_equal(ranks[0], ranks[1])  # every rank holds the merged results
    log = (run_dir / "models" / "unet-tiny" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 1 + 1  # one training (DDP), written once
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert (run_dir / "summary.csv").exists()

    # The sharded cell holds every test slice once: the records of one process evaluating it.
    best = run_dir / "models" / "unet-tiny" / "checkpoints" / "best"
    _assert_same_counts(read_records(run_dir), _evaluated_alone(best, tmp_path / "eval"))
