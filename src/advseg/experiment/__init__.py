"""An experiment: a grid of models x attacks x eps values, each evaluated under several losses.

An experiment file (YAML) names the data, the models (trained here or loaded from checkpoints),
the attacks with their losses and eps values, and the evaluation protocol. :func:`run_experiment`
works through the grid one *cell* at a time (one model, one attack, one eps, every loss of that
attack) and writes each cell's records atomically, so that a run stopped at any point and started
again skips the finished cells and redoes only the unfinished one. The run directory holds::

    config.yaml              the resolved experiment (a different experiment is refused)
    models/<model>/          each training run: checkpoints/best and last, log.csv (a finished
                             training is not redone; an interrupted one is resumed)
    records/<cell>.parquet   one file per finished cell
    examples/<cell>.npz      a few slices' images and predictions, for the report's panels
    summary.csv              Table II at the headline eps
    data.json                the data, resolved (location, fingerprint, classes, cache)
    report/                  report.html, report.md, CSV, PNG and SVG files

The package, one idea per module (every name importable from ``advseg.experiment``):

- :mod:`.config`: the settings dataclasses and what follows from them;
- :mod:`.check`: reading and checking an experiment file (one line per mistake);
- :mod:`.grid`: the cells, their plan and :func:`run_cells` (resumable, atomic);
- :mod:`.rundir`: the run directory's ``config.yaml`` and ``data.json`` bookkeeping;
- :mod:`.run`: :func:`run_experiment`, from the checks to the report.
"""

from advseg.catalogue import find_experiment, packaged_config
from advseg.experiment.check import (
    check_config,
    check_encoder_mapping,
    load_experiment,
    trained_activations,
)
from advseg.experiment.config import (
    PAPER_LOSSES,
    AttackSpec,
    EvaluationSpec,
    ExperimentConfig,
    ModelSpec,
    SplitSpec,
    attack_compat,
    encoder_line,
    model_train_config,
    model_variants,
    trained_here,
)
from advseg.experiment.grid import (
    Cell,
    CellOutput,
    GridResult,
    plan_cells,
    run_cells,
    sweep_key,
)
from advseg.experiment.preflight import check_held_out
from advseg.experiment.run import (
    RunResult,
    evaluation_rows,
    run_experiment,
)
from advseg.experiment.rundir import (
    LEGACY_VALUES,
    RESUMABLE_KEYS,
    check_data_fingerprint,
    holds_work,
    model_dir,
    prepare_run_dir,
)

__all__ = [
    "LEGACY_VALUES",
    "PAPER_LOSSES",
    "RESUMABLE_KEYS",
    "AttackSpec",
    "Cell",
    "CellOutput",
    "EvaluationSpec",
    "ExperimentConfig",
    "GridResult",
    "ModelSpec",
    "RunResult",
    "SplitSpec",
    "attack_compat",
    "check_config",
    "check_data_fingerprint",
    "check_encoder_mapping",
    "check_held_out",
    "encoder_line",
    "evaluation_rows",
    "find_experiment",
    "holds_work",
    "load_experiment",
    "model_dir",
    "model_train_config",
    "model_variants",
    "packaged_config",
    "plan_cells",
    "prepare_run_dir",
    "run_cells",
    "run_experiment",
    "sweep_key",
    "trained_activations",
    "trained_here",
]
