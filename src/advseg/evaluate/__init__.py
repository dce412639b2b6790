"""The robustness evaluation: what ``advseg evaluate``, the experiment runner and the Python API
call. This package only hands its names on; each lives in the module of its idea:

- :mod:`advseg.evaluate.engine`: one batch attacked with one attack per loss, sharing the clean
  forward (and a single-step sweep's gradient): :class:`BatchOutput`, :func:`attack_batch`,
  :func:`sweep_batch`, :func:`sweep_images`, :func:`score_batch`, :func:`draw_seed`;
- :mod:`advseg.evaluate.scoring`: a batch's records and example arrays (the columns are built by
  :mod:`advseg.runs.record_rows`, shared with certification);
- :mod:`advseg.evaluate.cells`: one (model, attack, eps) cell over every loss on a split
  (:func:`evaluate_cell`), several eps in one pass (:func:`evaluate_sweep`), sharded under
  torchrun: :class:`CellResult`, :class:`SliceSource`, :data:`Crafted`;
- :mod:`advseg.evaluate.command`: the ``advseg evaluate`` sweep over checkpoints
  (:class:`EvaluateConfig`, :func:`evaluate`, :class:`EvaluateResult`).

A checkpoint's data and name (:func:`trained_data_config`, :func:`checkpoint_label`) are
:mod:`advseg.train.trained`'s, a cell's progress bar (:func:`cell_progress`)
:mod:`advseg.progress`'s, and :func:`pixel_mm` :mod:`advseg.runs.record_rows`'; they are handed on
here as before.
"""

from advseg.evaluate.cells import (
    DEFAULT_BATCH_SIZE,
    CellResult,
    Crafted,
    SliceSource,
    evaluate_cell,
    evaluate_sweep,
)
from advseg.evaluate.command import (
    EvaluateConfig,
    EvaluateResult,
    cell_name,
    evaluate,
    sweep_groups,
)
from advseg.evaluate.engine import (
    BatchOutput,
    attack_batch,
    draw_seed,
    score_batch,
    sweep_batch,
    sweep_images,
)
from advseg.progress import cell_progress
from advseg.runs.record_rows import pixel_mm
from advseg.train.trained import checkpoint_label, trained_data_config

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "BatchOutput",
    "CellResult",
    "Crafted",
    "EvaluateConfig",
    "EvaluateResult",
    "SliceSource",
    "attack_batch",
    "cell_name",
    "cell_progress",
    "checkpoint_label",
    "draw_seed",
    "evaluate",
    "evaluate_cell",
    "evaluate_sweep",
    "pixel_mm",
    "score_batch",
    "sweep_batch",
    "sweep_groups",
    "sweep_images",
    "trained_data_config",
]
