"""Per-slice robustness records: the one data format between evaluation and reports.

One row per (slice, class, model, source, attack, loss, eps). ``source`` is the model the
adversarial images were crafted on: equal to ``model`` for a white-box cell, another model (or
``a+b``, an ensemble of sources) for a transfer cell (:mod:`advseg.crossmodel.transfer`).
Records written before the column existed are read as white-box (``source`` = ``model``). Pixel
counts are kept beside the metrics so that every Dice protocol can be recomputed from the records
alone, without a model. A file of
records is written atomically (one experiment cell at a time), and reading checks every file,
naming the one that is broken.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from advseg.atomic import atomic_path
from advseg.errors import UserError

RECORD_COLUMNS: dict[str, str] = {
    "model": "string",  # the model's label in the run (a checkpoint name)
    "source": "string",  # the model the images were crafted on (= model: white-box)
    "arch": "string",  # the zoo name it was built from
    "params": "int64",
    "seed": "int64",  # the model's training seed (0 in records written before seeds existed)
    "fold": "int64",  # the cross-validation fold whose model scored the slice; -1: no folds
    "attack": "string",
    "attack_setting": "string",  # the named budget beyond eps (sea: preset, members; vafa: SSIM)
    "loss": "string",
    "member": "string",  # sea: the member (loss) whose image won the slice; "" for other attacks
    "eps": "float64",
    "corruption": "string",  # a corrupted cell's corruption (advseg.corruptions); "" for attacks
    "severity": "int64",  # its severity, 1 to 5; 0 for attacks
    "slice_id": "string",
    "case": "int64",
    "scan": "string",
    "slice": "int64",
    "class": "string",
    "gt_pixels": "int64",
    "tp_clean": "int64",
    "fp_clean": "int64",
    "fn_clean": "int64",
    "tp_adv": "int64",
    "fp_adv": "int64",
    "fn_adv": "int64",
    "dice_clean": "float64",
    "dice_adv": "float64",
    "iou_clean": "float64",
    "iou_adv": "float64",
    "hd95_clean": "float64",
    "hd95_adv": "float64",
    "hd95_mm_clean": "float64",  # the same distances in mm (pixel spacing x resize factor)
    "hd95_mm_adv": "float64",
    "linf": "float64",
    "l2": "float64",
    "psnr": "float64",
    "ssim": "float64",
    "luminosity": "float64",
    "abstained": "float64",  # share of the pixels left undecided (randomized smoothing), else 0
    "min_eps": "float64",  # minimal-norm attacks: smallest breaking norm (inf: none found)
    "min_eps_upper": "float64",  # the search's own norm before refine (= min_eps when off)
    "min_eps_criterion": "string",  # what "breaking" meant (dice<=0.5, pixels>=0.99); "" else
    "through": "string",  # volumes: the threat protocol (inference, tiles); "" for slices
    "nsd_clean": "float64",  # volumes: normalised surface Dice at nsd_mm; NaN for slices
    "nsd_adv": "float64",
    "nsd_mm": "float64",  # its tolerance in mm
}

DEFAULTS: dict[str, object] = {
    "attack_setting": "",
    "fold": -1,
    "corruption": "",
    "severity": 0,
    "abstained": 0.0,
    "hd95_mm_clean": float("nan"),
    "hd95_mm_adv": float("nan"),
    "min_eps": float("nan"),
    "min_eps_upper": float("nan"),
    "min_eps_criterion": "",
    "through": "",
    "nsd_clean": float("nan"),
    "nsd_adv": float("nan"),
    "nsd_mm": float("nan"),
}
"""Columns a producer may leave out (and older files lack): filled with these values. An
ordinary prediction decides every pixel, so only certification (``advseg certify``) abstains;
records written before HD95 in millimetres have none (NaN); attack cells, and records written
before corruptions, have no corruption ("", severity 0); only an attack with a named budget
(``sea``: its preset, steps per member and members; ``vafa``: its table's steps, SSIM bound and
valid range) has an ``attack_setting`` ("" for the rest
and for records written before the column existed); records of a model not cross-validated
(and older files) have no fold (-1); only minimal-norm attacks (``alma-prox``,
``pdpgd``) have a ``min_eps``, the search's upper bound ``min_eps_upper`` it was refined from,
and their criterion (NaN, "" for the rest and for older records);
only volumes (a 3D checkpoint's cells) have a threat protocol ``through`` and the normalised
surface Dice ``nsd_*`` at the tolerance ``nsd_mm`` ("" and NaN for slices and older records)."""


def check_records(frame: pd.DataFrame, source: str = "records") -> pd.DataFrame:
    """Return ``frame`` with the record columns in order and typed; a missing column is an error.

    ``seed`` may be missing (an evaluation of one checkpoint, records from before seeds existed):
    it is then 0. A frame without ``source`` (records from before transfer attacks) is white-box:
    its ``source`` is its ``model``. A frame without ``member`` (records from before the ``sea``
    attack) had no ensemble attack: its ``member`` is ``""``. Columns of :data:`DEFAULTS` that
    are missing are filled with their default.
    """
    if "seed" not in frame.columns:
        frame = frame.assign(seed=0)
    if "source" not in frame.columns and "model" in frame.columns:
        frame = frame.assign(source=frame["model"])
    if "member" not in frame.columns:
        frame = frame.assign(member="")
    frame = frame.assign(**{c: v for c, v in DEFAULTS.items() if c not in frame.columns})
    missing = [c for c in RECORD_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{source}: missing record columns: {', '.join(missing)}")
    try:
        return frame[list(RECORD_COLUMNS)].astype(RECORD_COLUMNS)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: a record column has the wrong type ({err})") from None


def white_box(records: pd.DataFrame) -> pd.DataFrame:
    """The rows whose images were crafted on the scored model itself (``source == model``)."""
    return records[records["source"] == records["model"]]


RUN_FILE = "run.json"
"""A run directory's identity (``advseg run``'s and ``advseg evaluate``'s): ``{"config": hash}``,
the ``run`` every records file of the directory carries."""

IDENTITY_KEY = b"advseg.identity"
"""The Parquet schema metadata key holding a records file's identity (JSON)."""


def write_records(
    frame: pd.DataFrame, path: str | Path, identity: dict[str, str] | None = None
) -> Path:
    """Write records to a Parquet file atomically: it exists complete, or not at all.

    Args:
        identity: what the file belongs to (a grid cell's ``run`` config hash, ``data``
            fingerprint, ``cell`` name), kept in the file's Parquet metadata so that a file
            copied from another run or cell is recognised (:func:`records_identity`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    frame = check_records(frame, str(path))
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if identity is not None:
        metadata = {**(table.schema.metadata or {}), IDENTITY_KEY: json.dumps(identity).encode()}
        table = table.replace_schema_metadata(metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def records_identity(path: str | Path) -> dict[str, str] | None:
    """The identity a records file was written with (its schema only is read), or None for a
    file written without one (before identities existed, or by ``advseg evaluate``).

    Raises:
        UserError: the file is not readable Parquet, or its identity is not a JSON object.
    """
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception as err:  # pyarrow raises several types for truncated files
        raise UserError(f"{path}: not a complete Parquet records file ({err})") from None
    if IDENTITY_KEY not in metadata:
        return None
    try:
        identity = json.loads(metadata[IDENTITY_KEY])
    except ValueError:
        identity = None
    if not isinstance(identity, dict):
        raise UserError(f"{path}: its records identity is damaged")
    return identity


def check_identity(path: Path, expected: dict[str, str]) -> None:
    """Refuse a records file whose identity differs from ``expected`` (naming the file and the
    first field that differs); a file without one (written before identities) passes."""
    found = records_identity(path)
    if found is None:
        return
    for key, value in expected.items():
        if key not in found:  # a field newer than the file (``model``): nothing to compare
            continue
        if found[key] != value:
            raise UserError(
                f"{path}: records of another {_WHAT.get(key, key)} ({key} {found.get(key)!r}, "
                f"this one's is {value!r}); remove the file to compute the cell here"
            )


_WHAT = {
    "run": "run (another config)",
    "data": "data set",
    "cell": "cell",
    "model": "model (another checkpoint)",
    "source_model": "source model (another checkpoint)",
}

VALUE_RANGES: dict[str, tuple[float, float]] = {
    **{c: (0.0, 1.0) for c in ("dice_clean", "dice_adv", "iou_clean", "iou_adv", "abstained")},
    **{c: (0, float("inf")) for c in ("gt_pixels", "tp_clean", "fp_clean", "fn_clean", "tp_adv",
                                      "fp_adv", "fn_adv", "params", "seed", "severity")},
    **{c: (0.0, float("inf")) for c in ("eps", "linf", "l2", "hd95_clean", "hd95_adv",
                                        "hd95_mm_clean", "hd95_mm_adv", "min_eps",
                                        "min_eps_upper")},
    "ssim": (-1.0, 1.0),
    "fold": (-1, float("inf")),
}  # fmt: skip
"""The closed range of each numeric column's values (NaN passes: an empty mask's Dice, a
distance to nothing): records read with a value outside are refused, not reported."""


def check_values(frame: pd.DataFrame, source: str) -> None:
    """Refuse records holding impossible values (a Dice of 7, a negative pixel count), naming the
    file, the row and the column."""
    for column, (low, high) in VALUE_RANGES.items():
        values = frame[column].to_numpy(dtype="float64")
        bad = ~((values >= low - 1e-6) & (values <= high + 1e-6)) & ~pd.isna(values)
        if bad.any():
            row = int(bad.argmax())
            raise UserError(
                f"{source}: row {row}: {column} {values[row]:g} is not in [{low:g}, {high:g}] "
                f"({int(bad.sum())} such rows); the file is damaged or not advseg's"
            )


def read_records(path: str | Path) -> pd.DataFrame:
    """Read one records file, or every ``*.parquet`` under a run's ``records/`` folder.

    Raises:
        UserError: no records found, or a file that is not complete Parquet records (naming it).
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "records" if (path / "records").is_dir() else path
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise UserError(f"{path}: no records (*.parquet) found")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"{path}: no such file or directory")
    run = _run_of(path) if path.is_dir() else None
    frames = []
    for file in files:
        if path.is_dir():
            check_belongs(file, run)
        try:
            frame = pd.read_parquet(file)
        except Exception as err:  # pyarrow raises several types for truncated files
            raise UserError(f"{file}: not a complete Parquet records file ({err})") from None
        frame = check_records(frame, str(file))
        check_values(frame, str(file))
        frames.append(frame)
    records = pd.concat(frames, ignore_index=True)
    _refuse_repeats(records, [f for f, frame in zip(files, frames, strict=True)
                              for _ in range(len(frame))])  # fmt: skip
    return records


def _run_of(run_dir: Path) -> str | None:
    """The ``config`` hash of ``run_dir``'s :data:`RUN_FILE`, or None (none, or unreadable)."""
    try:
        saved = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return saved if isinstance(saved, str) else None


def check_belongs(file: Path, run: str | None) -> None:
    """Refuse a records file of a run directory whose identity says it was written elsewhere:
    by another run (its ``run`` is not the directory's ``run.json`` config) or for another cell
    (its ``cell`` is not its file name: a file copied under another name). A file without an
    identity (written before identities) passes."""
    found = records_identity(file)
    if not found:
        return
    if run is not None and "run" in found and found["run"] != run:
        raise UserError(
            f"{file}: records of another run (another config) (run {found['run']!r}, this "
            f"directory's {RUN_FILE} says {run!r}); remove the file"
        )
    if "cell" in found and found["cell"] != file.stem:
        raise UserError(
            f"{file}: records of another cell ({found['cell']!r}) under this name; remove the "
            "file or give it back its name"
        )


KEY_COLUMNS = ("model", "seed", "source", "attack", "loss", "eps", "slice_id", "class")
"""What identifies a record: no two rows of a set of records may share these."""


def _refuse_repeats(records: pd.DataFrame, files: list[Path]) -> None:
    """Refuse records whose key repeats (a records file copied or written twice)."""
    repeated = records.duplicated(list(KEY_COLUMNS), keep=False).to_numpy()
    if not repeated.any():
        return
    first = int(repeated.argmax())
    key = records.iloc[first][list(KEY_COLUMNS)]
    same = (records[list(KEY_COLUMNS)] == key).all(axis=1).to_numpy() & repeated
    where = sorted({str(files[i]) for i in same.nonzero()[0]})
    text = ", ".join(f"{k}={key[k]}" for k in KEY_COLUMNS)
    raise UserError(
        f"{where[0]}: records repeat ({text}) in {' and '.join(where)}; a records file copied or "
        "written twice would be counted twice: remove the copy"
    )
