"""The run directory's bookkeeping: its resolved ``config.yaml`` (a different experiment is refused,
a resume may change :data:`RESUMABLE_KEYS`), whether it holds finished work, its ``data.json`` (the
data resolved, and its fingerprint: a resume on other data is refused) and where models train.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from advseg.atomic import write_text_atomic
from advseg.config import load_yaml, save_yaml, to_dict
from advseg.data import DataConfig, SliceData
from advseg.data.record import run_data_record, same_data
from advseg.errors import UserError
from advseg.experiment.config import ExperimentConfig
from advseg.models.checkpoint import checkpoint_exists
from advseg.runs.records import RUN_FILE

RESUMABLE_KEYS = frozenset(
    {
        "train.num_workers",
        "train.tensorboard",
        "evaluation.protocol",
        "evaluation.trace",
        "report",
        "data.cache_dir",  # where the arrays are cached: the data fingerprint checks the data
    }
)
"""Config keys a resume may change: they decide how the work is done or shown, not its records
(the summary and the report are recomputed from the records at every run)."""


LEGACY_VALUES: dict[str, object] = {
    "data.strict_labels": False,
    "data.preprocess.resize": "stretch",
    "data.path": "synthetic",  # an empty path meant the phantom before it had to be named
    "train.activation": "sigmoid",  # every model was sigmoid before softmax training
}
"""Settings added since runs began, with the value a saved config that lacks them meant (a run
begun before aspect-preserving resize stretched its slices)."""


def prepare_run_dir(config: ExperimentConfig, run_dir: str | Path) -> Path:
    """Create ``run_dir`` with the resolved config, or check that it holds this same experiment.

    A resume may change the :data:`RESUMABLE_KEYS`; the saved config then takes the new values.

    Raises:
        UserError: ``run_dir/config.yaml`` holds a different experiment (naming the first key that
            differs), since resuming it with this config would mix two experiments' records.
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    resolved = to_dict(config)
    if saved_path.exists():
        differences = _differences(load_yaml(saved_path), resolved)
        refused = [key for key in differences if key not in RESUMABLE_KEYS]
        if refused and holds_work(run_dir):
            legacy = (
                f"; it began before {refused[0]} existed, with {LEGACY_VALUES[refused[0]]!r}: "
                "set that to resume it"
                if refused[0] in LEGACY_VALUES
                else ""
            )
            raise UserError(
                f"{saved_path}: this run directory holds another experiment ({refused[0]} "
                f"differs{legacy}); use a new run directory"
            )
        if differences:  # resumable keys, or a directory with nothing finished in it
            save_yaml(resolved, saved_path)
    elif holds_work(run_dir):
        raise UserError(
            f"{run_dir}: holds finished work but no config.yaml (deleted?), so its records "
            "cannot be tied to this experiment; restore config.yaml or use a new run directory"
        )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(resolved, saved_path)
    return run_dir


# RUN_FILE (advseg.runs.records): the run's identity, written once when its first records are
# due: ``{"config": hash}``; read_records checks every records file against it.


def config_hash(config: ExperimentConfig) -> str:
    """SHA-256 (16 hex digits) of the resolved config without the :data:`RESUMABLE_KEYS`."""
    resolved = to_dict(config)
    for key in RESUMABLE_KEYS:
        *parents, last = key.split(".")
        node = resolved
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_identity(config: ExperimentConfig, run_dir: Path, fingerprint: str) -> dict[str, str]:
    """What every records file of this run carries (:func:`advseg.experiment.run_cells`):
    ``run``, the config hash saved in ``run.json`` when the run began (a resume keeps it: the
    config was checked equal by :func:`prepare_run_dir`), and ``data``, the data fingerprint."""
    path = run_dir / RUN_FILE
    try:
        saved = json.loads(path.read_text()).get("config") if path.is_file() else None
    except (ValueError, AttributeError):
        saved = None
    if not isinstance(saved, str):
        saved = config_hash(config)
        write_text_atomic(path, json.dumps({"config": saved}) + "\n")
    return {"run": saved, "data": fingerprint}


def holds_work(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds finished work: a cell's records or a model's checkpoint.

    A directory holding only ``config.yaml`` (an experiment refused or stopped before its first
    save) holds none: it may be reused with a corrected experiment.
    """
    run_dir = Path(run_dir)
    if any((run_dir / "records").glob("*.parquet")):
        return True
    found = [*(run_dir / "models").glob("*/checkpoints/*.json")]
    found += (run_dir / "models").glob("*/seed*/checkpoints/*.json")  # a grid with seeds
    return any(checkpoint_exists(path.with_name(path.name.removesuffix(".json"))) for path in found)


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """The dotted keys (``train.lr``, ``models[0].arch``) whose values differ, in key order."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else key)
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True))
                for d in _differences(a, b, f"{where}[{i}]")]  # fmt: skip
    if old is None and isinstance(new, (dict, list)) and not new:
        return []  # a key added to the config since the run began, at its empty default
    if old is None and where in LEGACY_VALUES and new == LEGACY_VALUES[where]:
        return []  # a key added since the run began, at the value the run had
    return [] if old == new else [where or "the whole config"]


def check_data_fingerprint(run_dir: Path, data: SliceData, config: DataConfig) -> None:
    """Record the data in ``run_dir/data.json`` (resolved locations, fingerprint, size, classes,
    label source, cache: :func:`advseg.data.record.run_data_record`); refuse a resume on other
    data. A resume on the same data rewrites the record (the cache may have moved).

    Raises:
        UserError: the run holds finished work computed on data with another fingerprint (the
            data at the path was replaced, edited or copied anew since).
    """
    path = run_dir / "data.json"
    now = run_data_record(data, config)
    if path.is_file() and holds_work(run_dir):
        try:
            saved = json.loads(path.read_text())["fingerprint"]
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{path}: damaged (no data fingerprint); use a new run directory"
            ) from None
        if not same_data(saved, data):
            raise UserError(
                f"{path}: the data changed since this run computed on it (fingerprint {saved}, "
                f"now {now['fingerprint']}: files replaced, edited or copied anew, or "
                "preprocessed by an advseg whose cache version differs); restore the "
                "data or use a new run directory"
            )
    write_text_atomic(path, json.dumps(now, indent=1) + "\n")


def model_dir(run_dir: str | Path, name: str, seed: int | None = None) -> Path:
    """Where a grid model trains: ``models/<name>/``, or ``models/<name>/seed<k>/`` with seeds."""
    out = Path(run_dir) / "models" / name
    return out if seed is None else out / f"seed{seed}"
