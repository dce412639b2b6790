"""``advseg evaluate``'s driver: checkpoints x defences x attacks x eps, records and Table II.

:func:`evaluate` checks the whole sweep before any work (names, options, the output directory:
one that already holds a run is refused), loads each checkpoint with the data it was trained on
(:func:`advseg.train.trained.trained_data_config`) and its held-out cases, runs the cells
(:func:`~advseg.evaluate.cells.evaluate_sweep`, the eps of a single-step attack together:
:func:`sweep_groups`) and writes ``records/<cell>.parquet``, ``examples/``, ``traces/``,
``summary.csv`` (Table II with case-bootstrap intervals), ``data.json``, ``provenance.json`` and
``evaluate.yaml`` (the :class:`EvaluateConfig` itself: batch size, attack options, erase, compat,
which ``advseg export`` needs to rebuild the very images).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from advseg import distributed
from advseg.attacks import ATTACKS, parse_attack_name
from advseg.attacks.sea import DEFAULT_PRESET
from advseg.config import save_yaml
from advseg.errors import UserError
from advseg.evaluate.cells import DEFAULT_BATCH_SIZE, check_losses, evaluate_sweep
from advseg.evaluate.compat import NOTEBOOK_ATTACKS, check_compat, compat_label
from advseg.losses import LOSSES
from advseg.models.external import ExternalConfig
from advseg.progress import cell_progress
from advseg.stats.summary import DEFAULT_PROTOCOL
from advseg.train.trained import checkpoint_label, model_label, trained_data_config

SETTINGS_FILE = "evaluate.yaml"
"""Where an ``advseg evaluate`` output keeps its :class:`EvaluateConfig`."""


@dataclass
class EvaluateConfig:
    """An evaluation sweep: checkpoints x attacks x eps values, every loss in each cell.

    Attributes:
        checkpoints: checkpoint paths (``PATH``, ``PATH.safetensors`` or ``PATH.json``).
        out: the run directory: ``records/*.parquet`` (one file per cell), ``summary.csv``.
        data: the data directory (or ``synthetic``); by default the one each checkpoint was
            trained on (its resolved location, or ``synthetic``).
        cache_dir: the preprocessing cache; default: the checkpoint's where it exists, else
            :func:`advseg.data.cache_root`.
        split: ``test`` (the cases the checkpoint held out, its own ``test_fraction`` and
            ``split_seed``) or ``all``.
        attacks, losses, eps: the sweep; ``losses`` None: each checkpoint's activation's
            (:data:`advseg.labels.DEFAULT_ATTACK_LOSSES`: bce, focal, dicefocal for sigmoid;
            ce, dicece for softmax).
        attack_options: options for the attacks (``steps``, ``norm``, ...); each attack gets the
            ones it accepts, and an option no attack of the sweep accepts is an error.
        protocol: the Dice protocol of the summary (``paper``, ``per-class``, ``global``).
        batch_size: slices per batch.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        examples: slices per cell saved as ``examples/<cell>.npz`` for figures.
        erase: classes the attacks try to make vanish (targeted; see :func:`evaluate_cell`).
        compat: ``none`` or ``notebook`` (the paper's notebook reproduced,
        :mod:`advseg.evaluate.compat`). defences: input defences each checkpoint is evaluated
            behind (``none``, ``median:3``, ...; :mod:`advseg.defences.transforms`); the records
            name the model ``<checkpoint>+<defence>``.
        trace: keep iterative attacks' convergence traces as ``traces/<cell>.csv``.
        corruptions: corruption cells (``motion:3``, ``noise`` for its five severities, ``all``;
            :func:`advseg.corruptions.parse_corruptions`), evaluated beside the attacks with one
            clean forward per batch (:func:`~advseg.evaluate.corrupted.evaluate_corruptions`).
        external: a model advseg did not train (``--nnunet``, ``--bundle``, ``--torchscript``,
            ``--model-factory``; :class:`~advseg.models.external.ExternalConfig`), judged on
            every slice or volume of ``data`` (:mod:`advseg.evaluate.external`).
        more_external: further models of the same kind judged on the same data (nnU-Net: each
            ``--configuration`` times each ``--folds`` group, e.g. fold 0, fold 1 and their
            ensemble ``0,1``; ``2d`` and ``3d_fullres`` on the same raw volumes).
        transfer: also score each external model's adversarial images on every other external
            model of the run (transfer cells: the records' ``source`` is the crafting model).
        corruption_seed: seeds every slice's corruption draw (with its slice id).
        max_slices: evaluate at most this many slices of the split per checkpoint, drawn with
            the checkpoint's split seed and spread over its cases
            (:func:`advseg.data.spread_rows`), never the first N (one case's bottom slices).
        through: a 3D checkpoint's threat protocols (:mod:`advseg.attacks.through`):
            ``inference`` (end to end through the sliding window that scores the volume) and/or
            ``tiles`` (the published protocol); each its own cells, ``<attack>:<through>``.
        nsd_mm: a 3D checkpoint's records also hold the normalised surface Dice at this
            tolerance in mm.
    """

    checkpoints: list[Path]
    out: Path
    data: Path | None = None
    cache_dir: Path | None = None
    split: str = "test"
    attacks: list[str] = field(default_factory=lambda: ["fgsm"])
    losses: list[str] | None = None
    eps: list[float] = field(default_factory=lambda: [0.009])
    attack_options: dict[str, Any] = field(default_factory=dict)
    protocol: str = DEFAULT_PROTOCOL
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "auto"
    examples: int = 0
    erase: list[str] = field(default_factory=list)
    compat: str = "none"
    defences: list[str] = field(default_factory=lambda: ["none"])
    trace: bool = False
    corruptions: list[str] = field(default_factory=list)
    corruption_seed: int = 0
    max_slices: int | None = None
    external: ExternalConfig | None = None
    more_external: list[ExternalConfig] = field(default_factory=list)
    transfer: bool = False
    through: list[str] = field(default_factory=lambda: ["inference"])
    nsd_mm: float = 1.0


@dataclass
class EvaluateResult:
    """What a sweep produced: Table II, per-cell summaries, the record files, the slices used
    and the data sets (``synthetic`` or absolute paths, as in ``data.json``)."""

    table: pd.DataFrame
    cells: pd.DataFrame
    record_files: list[Path]
    summary_path: Path
    slices: dict[str, int]
    locations: list[str] = field(default_factory=list)


def sweep_groups(attack: str, eps_values: Sequence[float]) -> list[list[float]]:
    """The eps values one :func:`evaluate_sweep` call should take together, in order.

    A single-step attack's cells share one gradient, so all its eps values form one group; an
    iterative attack gains nothing from grouping, so each eps is its own cell (its own progress,
    its own file as soon as it is done).
    """
    values = list(dict.fromkeys(float(e) for e in eps_values))
    base, modes = parse_attack_name(attack)
    return [values] if ATTACKS.get(base).single_step and not modes else [[e] for e in values]


def cell_name(model_name: str, attack: str, eps: float) -> str:
    """The file stem of one cell's records, e.g. ``best__fgsm__eps0.009``."""
    return f"{model_name}__{attack}__eps{eps:g}"


def _unit(judged: Any) -> str:
    return "volumes" if judged.batch_size == 1 else "slices"


def _refuse_existing_run(out: Path) -> None:
    """Refuse an ``--out`` that already holds a run: its records would mix with the new summary.

    Raises:
        UserError: one line naming the directory and what to do instead.
    """
    held = [name for name in ("records/*.parquet", "summary.csv") if any(out.glob(name))]
    if held:
        raise UserError(
            f"--out {out}: already holds a run ({', '.join(held)}); give a new directory, or "
            f"delete this one (advseg run resumes a grid; advseg report rereads its records)"
        )


def check_labels(checkpoints: Sequence[Path]) -> dict[Path, tuple[str, int | None] | None]:
    """Each checkpoint's (name, fold) in the records (:func:`model_label`), refusing two that
    would write the same records; the folds of one cross-validated run share a name (their
    records pool as one model), each fold at most once, and a partial set is warned about.
    An unreadable checkpoint maps to None (:func:`load_checkpoint` says why, later)."""
    import warnings

    from advseg.errors import AdvsegWarning
    from advseg.models.checkpoint import newest_complete, read_metadata

    labels: dict[Path, tuple[str, int | None] | None] = {}
    folds_of: dict[str, dict[int | None, Path]] = {}
    counts: dict[str, int] = {}
    for checkpoint in checkpoints:
        try:
            data_meta = read_metadata(newest_complete(checkpoint)).data
        except UserError:  # load_checkpoint says why later; its file name still must be unique
            labels[checkpoint] = None
            name, fold = checkpoint_label(checkpoint), None
        else:
            name, fold = labels[checkpoint] = model_label(checkpoint, data_meta)
        seen = folds_of.setdefault(name, {})
        if fold in seen or (seen and (fold is None) != (None in seen)):
            other = seen.get(fold, next(iter(seen.values())))
            raise UserError(
                f"{checkpoint}: {other} is also named {name!r}"
                + ("" if fold is None else f" (fold {fold})")
                + "; the records of one model would overwrite (or mix with) the other's "
                "(rename or copy one of them)"
            )
        seen[fold] = checkpoint
        if fold is not None:
            counts[name] = int(data_meta["folds"]["folds"])
    for name, count in counts.items():
        if len(folds_of[name]) < count:
            warnings.warn(
                f"{name}: {len(folds_of[name])} of its {count} cross-validation folds given; "
                "the pooled numbers cover only their test cases",
                AdvsegWarning,
                stacklevel=3,
            )
    return labels


def evaluate(config: EvaluateConfig, *, progress: bool = False) -> EvaluateResult:
    """Run a sweep: every cell's records to ``out/records``, Table II to ``out/summary.csv``.

    Under torchrun each cell is sharded over the ranks; rank 0 writes the files. ``progress``
    shows each cell's batches on stderr (rank 0's). ``out`` is locked while the sweep runs
    (:func:`advseg.lock.output_lock`): a second evaluation into it is refused in one line.

    Raises:
        UserError: as :func:`_evaluate`, or another advseg process writing ``out``.
    """
    from advseg.lock import output_lock

    with output_lock(Path(config.out), "advseg evaluate"):
        return _evaluate(config, progress=progress)


def _evaluate(config: EvaluateConfig, *, progress: bool = False) -> EvaluateResult:
    """:func:`evaluate`'s work, with ``out`` locked.

    Raises:
        UserError: no checkpoint, an unknown attack, loss, option or protocol, a bad eps, a
            checkpoint that does not fit the data, or an empty split.
    """
    from advseg.atomic import atomic_path, check_output_dir, write_text_atomic
    from advseg.attacks import attack_options, check_option_values
    from advseg.corruptions import parse_corruptions
    from advseg.data import held_out_rows, load_data, load_volumes, saved_preprocess, spread_rows
    from advseg.data.record import data_note, first_line
    from advseg.defences import create_defence, defend, defended_name
    from advseg.defences.volumes import defend_volume
    from advseg.evaluate.corrupted import evaluate_corruptions
    from advseg.evaluate.external import open_external
    from advseg.inference import SlidingWindow
    from advseg.labels import DEFAULT_ATTACK_LOSSES, checkpoint_activation
    from advseg.models.checkpoint import (
        check_compatible,
        checkpoint_id,
        load_checkpoint,
        newest_complete,
        read_metadata,
    )
    from advseg.models.zoo import resolve
    from advseg.runs.examples import save_examples
    from advseg.runs.names import file_stem
    from advseg.runs.provenance import record_session
    from advseg.runs.records import RUN_FILE, write_records
    from advseg.runs.traces import write_trace
    from advseg.stats.bootstrap import with_intervals
    from advseg.stats.summary import PROTOCOLS, summarize_cells
    from advseg.train import resolve_device
    from advseg.train.from_volumes import is_volumetric

    if not config.checkpoints and config.external is None:
        raise UserError(
            "evaluate: no checkpoint given (or --nnunet, --bundle, --torchscript, --model-factory)"
        )
    if config.protocol not in PROTOCOLS:
        raise UserError(f"protocol: {config.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    check_compat(config.compat, "--compat")
    if config.compat != "none":
        for name in config.attacks:
            if name not in NOTEBOOK_ATTACKS:
                raise UserError(f"--compat {config.compat}: the notebook had fgsm only, not "
                                f"{name!r}")  # fmt: skip
    if config.split not in ("test", "all"):
        raise UserError(f"split: {config.split!r} is not 'test' or 'all'")
    if config.max_slices is not None and config.max_slices < 1:
        raise UserError(f"max_slices: must be at least 1, got {config.max_slices}")
    for name in config.attacks:
        attack_options(name)  # unknown names fail before any model or data is loaded
    corrupted = parse_corruptions(config.corruptions) if config.corruptions else []
    if not config.attacks and not corrupted:
        raise UserError("evaluate: no attack and no corruption given")
    for name in config.losses or []:
        if name not in LOSSES:
            raise UserError(f"--loss: {LOSSES.unknown_message(name)}")
    for spec in config.defences:
        create_defence(spec)
    if len({defended_name("", spec) for spec in config.defences}) != len(config.defences):
        raise UserError(f"defences: each defence once, got {', '.join(config.defences)}")
    accepted = {name: set(attack_options(name)) for name in config.attacks}
    for name in config.attacks:
        check_option_values(name, config.attack_options, "--attack-option ")
    unused = sorted(set(config.attack_options) - set().union(set(), *accepted.values()))
    unused = [key for key in unused if key != "activation"]  # the checkpoints' own, for both
    if unused:
        takes = "; ".join(f"{name}: {', '.join(sorted(keys))}" for name, keys in accepted.items())
        raise UserError(
            f"attack options {', '.join(unused)}: no attack of the sweep takes them ({takes})"
        )

    bad = [name for name in config.through if name not in ("inference", "tiles")]
    if bad or not config.through or len(set(config.through)) != len(config.through):
        raise UserError(f"--through: {', '.join(config.through) or 'none'}: give inference "
                        "and/or tiles, each once")  # fmt: skip
    if not 0 < config.nsd_mm < 1000:
        raise UserError(f"--nsd-tolerance: {config.nsd_mm} mm must lie in (0, 1000)")
    if config.examples < 0:
        raise UserError(f"--examples: {config.examples} must be 0 or more")
    if config.batch_size < 1:
        raise UserError(f"--batch-size: {config.batch_size} must be at least 1")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    check_output_dir(out, "--out directory")  # under a file, or not writable: before any work
    _refuse_existing_run(out)
    labels = check_labels(config.checkpoints)  # one name (and fold) each, before any work
    for checkpoint in config.checkpoints:  # each one's outputs against the losses, before work
        try:
            own = read_metadata(newest_complete(checkpoint)).activation
        except UserError:
            continue  # not readable: load_checkpoint says why, in its own words, below
        given = config.attack_options.get("activation")
        where = str(checkpoint)
        activation = checkpoint_activation(own, given, where)
        check_losses(config.losses or DEFAULT_ATTACK_LOSSES[activation], activation, where)
    distributed.init()
    console = Console(stderr=True, quiet=not (progress and distributed.is_main()))
    device = resolve_device(config.device)
    loaded: dict[tuple, Any] = {}
    externals: dict[str, dict] = {}
    frames, files, slices = [], [], {}

    run_hash = settings_hash(config)
    model_ids: dict[str, str] = {}  # a checkpoint's records name -> its save_id

    def identity_of(checkpoint_name: str, stem: str, data: Any) -> dict[str, str]:
        """A records file's identity: these settings (``run.json``), its cell, its model and
        the data it was scored on (its fingerprint, as ``data.json`` names it)."""
        model = model_ids.get(checkpoint_name)
        found = getattr(data, "fingerprint", None) or getattr(data, "cache_path", None)
        fingerprint = found.name if isinstance(found, Path) else found
        return {"run": run_hash, "cell": stem, **({"model": model} if model else {}),
                **({"data": str(fingerprint)} if fingerprint else {})}  # fmt: skip

    def run_cells(bare, checkpoint_name, arch, seed, activation, losses, data, rows, batch_size,
                  extra, examples, fold=None, through=None, keep=None):  # fmt: skip
        """Every (defence, attack, eps) cell and every corruption cell of one model (of one
        cross-validation fold: its records carry ``fold``, its files ``__fold<k>``); volumes
        (``through`` given: ``bare`` is the sliding-window inferer) under that protocol."""
        folded = {} if fold is None else {"fold": fold}
        stem_of = file_stem if fold is None else (lambda name: f"{file_stem(name)}__fold{fold}")
        unit = "slices" if through is None else "volumes"
        volume = {} if through is None else {"through": through, "nsd_mm": config.nsd_mm}

        def defended(spec: str) -> Any:  # volumes: the defence filters the whole volume
            if through is None:  # external models in their source's units: their range
                return defend(bare, spec, extra.get("valid_range", (0.0, 1.0)), checkpoint_name)
            return defend_volume(bare, spec, data.valid_range, str(checkpoint_name))

        for spec, attack in itertools.product(config.defences, config.attacks):
            model, model_name = defended(spec), defended_name(checkpoint_name, spec)
            options = {k: v for k, v in config.attack_options.items() if k in accepted[attack]}
            options["activation"] = activation  # the checkpoint's; --activation may repeat it
            options.update(extra)
            for group in sweep_groups(attack, config.eps):
                what = f"{model_name}, {attack} eps {','.join(f'{e:g}' for e in group)}"
                if through is not None:
                    what += f" through {through}"
                with cell_progress(console, f"{what} on {len(rows)} {unit}") as on_batch:
                    results = evaluate_sweep(
                        model, data, rows, attack, dict.fromkeys(group, losses),
                        model_name=model_name,
                        arch=arch, attack_kwargs=options, batch_size=batch_size,
                        examples=examples, erase=config.erase, on_batch=on_batch,
                        trace=config.trace, compat=config.compat, **volume,
                        keep_adversarial=keep is not None,
                    )  # fmt: skip
                for eps, result in zip(group, results, strict=True):
                    if keep is not None:  # --transfer: scored on the other models below
                        keep[(model_name, attack, eps)] = result.adversarial
                    records = result.records.assign(seed=seed, **folded)
                    frames.append(records)
                    if not distributed.is_main():
                        continue
                    label = f"{attack}-erase-{'+'.join(config.erase)}" if config.erase else attack
                    if config.compat != "none":  # records say fgsm:notebook, files fgsm-notebook
                        label = compat_label(attack, config.compat)
                    if through is not None:
                        label = f"{label}:{through}"
                    name = cell_name(stem_of(model_name), label.replace(":", "-"), eps)
                    identity = identity_of(checkpoint_name, name, data)
                    files.append(write_records(records, out / "records" / f"{name}.parquet",
                                               identity))  # fmt: skip
                    if result.examples:
                        npz = out / "examples" / f"{name}.npz"
                        save_examples(result.examples, npz, model=model_name, attack=label, eps=eps)
                    if result.trace is not None:
                        write_trace(result.trace, out / "traces" / f"{name}.csv")
        once = through in (None, config.through[0])  # volumes: scored once, by the inference
        for spec in config.defences if corrupted and once else ():
            model, model_name = defended(spec), defended_name(checkpoint_name, spec)
            what = f"{model_name}, {len(corrupted)} corruption cells on {len(rows)} {unit}"
            with cell_progress(console, what) as on_batch:
                results = evaluate_corruptions(
                    model, data, rows, corrupted, model_name=model_name, arch=arch,
                    activation=activation, seed=config.corruption_seed,
                    batch_size=batch_size, examples=examples, on_batch=on_batch,
                    volumes=through is not None, nsd_mm=volume.get("nsd_mm"),
                )  # fmt: skip
            for (name, severity), result in zip(corrupted, results, strict=True):
                records = result.records.assign(seed=seed, **folded)
                frames.append(records)
                if not distributed.is_main():
                    continue
                stem = cell_name(stem_of(model_name), f"corruption-{name}-{severity}", 0.0)
                files.append(write_records(records, out / "records" / f"{stem}.parquet",
                                           identity_of(checkpoint_name, stem, data)))  # fmt: skip
                if result.examples:
                    label = str(records["attack"].iloc[0])
                    npz = out / "examples" / f"{stem}.npz"
                    save_examples(result.examples, npz, model=model_name, attack=label, eps=0.0)

    for checkpoint in config.checkpoints:
        bare, meta = load_checkpoint(checkpoint, device)
        unknown = [name for name in config.erase if name not in meta.classes]
        if unknown:  # before its data set is built
            raise UserError(
                f"--erase: unknown class {unknown[0]!r}; valid: {', '.join(meta.classes)} "
                f"(the classes of {checkpoint})"
            )
        activation = checkpoint_activation(
            meta.activation, config.attack_options.get("activation"), str(checkpoint)
        )
        losses = list(config.losses or DEFAULT_ATTACK_LOSSES[activation])
        checkpoint_name, fold = labels[checkpoint] or model_label(checkpoint, meta.data)
        preprocess = saved_preprocess(meta.preprocessing, f"{checkpoint} preprocessing")
        data_config = trained_data_config(
            meta.data, checkpoint, preprocess, config.data, config.cache_dir
        )
        volumetric = is_volumetric(meta.model)
        if volumetric:
            _refuse_for_volumes(config, checkpoint)
        key = (repr(data_config), volumetric)
        if key not in loaded:  # rank 0 fills the preprocessing cache before the others read it
            console.print(first_line(data_config), highlight=False, soft_wrap=True)
            if not distributed.is_main():
                distributed.barrier()
            loaded[key] = (load_volumes if volumetric else load_data)(data_config)
            if distributed.is_main():
                distributed.barrier()
        data = loaded[key]
        check_compatible(
            meta, checkpoint, in_channels=1 if volumetric else preprocess.channels,
            classes=list(data.classes),
        )  # fmt: skip
        rows = np.arange(len(data.index))
        if config.split == "test":
            rows = held_out_rows(data.index, meta.data, str(checkpoint))
        if config.max_slices is not None:  # seeded by the split's seed, spread over the cases
            rows = spread_rows(
                data.index, rows, config.max_slices, int(meta.data.get("split_seed", 0))
            )
        if len(rows) == 0:
            raise UserError(f"{checkpoint}: the {config.split} split has no slices")
        slices[checkpoint_name] = slices.get(checkpoint_name, 0) + len(rows)  # folds: pooled
        saved = checkpoint_id(checkpoint)
        if saved is not None:  # the folds of one run pool under one name: their ids, joined
            known = model_ids.get(checkpoint_name)
            model_ids[checkpoint_name] = saved if known is None else f"{known}+{saved}"
        seed = int(meta.train.get("seed", 0))
        if volumetric:  # whole volumes, one at a time, through the window that scores them
            inferer = SlidingWindow(bare, data_config.volume.patch or resolve(meta.model).roi,
                                    overlap=data_config.volume.overlap)  # fmt: skip
            for through in config.through:
                run_cells(
                    inferer, checkpoint_name, meta.model, seed, activation, losses, data, rows,
                    1, {"valid_range": data.valid_range}, config.examples, fold, through,
                )  # fmt: skip
            continue
        run_cells(
            bare, checkpoint_name, meta.model, seed, activation, losses,
            data, rows, config.batch_size, {}, config.examples, fold,
        )  # fmt: skip
    opened = [open_external(external, config.data, cache_dir=config.cache_dir, device=device)
              for external in ([config.external, *config.more_external]
                               if config.external is not None else [])]  # fmt: skip
    check_transfer(opened, config.transfer)
    kept_images: dict[str, dict] = {}
    for judged in opened:
        if config.max_slices is not None:  # seeded (0), spread over the cases
            judged.rows = spread_rows(judged.data.index, judged.rows, config.max_slices, 0)
        console.print(f"model: {judged.name} ({judged.arch}); data: {judged.data.location}, "
                      f"{len(judged.rows)} {_unit(judged)} scored (the model's training split "
                      "is unknown to advseg)", highlight=False, soft_wrap=True)  # fmt: skip
        losses = list(config.losses or DEFAULT_ATTACK_LOSSES[judged.activation])
        check_losses(losses, judged.activation, judged.name)
        loaded[("external",)] = judged.data
        slices[judged.name] = len(judged.rows)
        externals[judged.name] = judged.provenance
        run_cells(
            judged.model, judged.name, judged.arch, 0, judged.activation, losses, judged.data,
            judged.rows, judged.batch_size or config.batch_size,
            {"valid_range": judged.valid_range}, 0 if judged.batch_size == 1 else config.examples,
            keep=kept_images.setdefault(judged.name, {}) if config.transfer else None,
        )  # fmt: skip
    for source, target in itertools.permutations(opened, 2) if config.transfer else ():
        for (name, attack, eps), images in kept_images[source.name].items():
            what = f"{name} -> {target.name}, {attack} eps {eps:g} (transfer)"
            with cell_progress(console, f"{what} on {len(target.rows)} {_unit(target)}") as tick:
                result = evaluate_sweep(
                    target.model, target.data, target.rows, attack, {eps: list(images)},
                    model_name=target.name, arch=target.arch, on_batch=tick,
                    attack_kwargs={"activation": target.activation,
                                   "valid_range": target.valid_range},
                    batch_size=target.batch_size or config.batch_size,
                    crafted=crafted_reader(images), source=name,
                )[0]  # fmt: skip
            records = result.records.assign(seed=0)
            frames.append(records)
            if distributed.is_main():
                stem = f"{file_stem(target.name)}__from-{file_stem(name)}"
                path = out / "records" / f"{cell_name(stem, attack, eps)}.parquet"
                files.append(write_records(records, path))
    records = pd.concat(frames, ignore_index=True)
    table = with_intervals(records, config.protocol)  # Table II with case-bootstrap intervals
    summary_path = out / "summary.csv"
    locations = list(dict.fromkeys(data.location for data in loaded.values()))
    if distributed.is_main():
        with atomic_path(summary_path) as tmp:
            table.assign(protocol=config.protocol).to_csv(tmp, index=False)
        write_text_atomic(out / "data.json", json.dumps(data_note(list(loaded.values()))))
        where = [Path(c).absolute() for c in config.checkpoints]  # export finds them again
        kept = replace(config, checkpoints=where, attack_options=named_budget(config))
        save_yaml(kept, out / SETTINGS_FILE)
        record_session(out, "advseg evaluate", device)
        write_text_atomic(out / RUN_FILE, json.dumps({"config": run_hash}) + "\n")
        if externals:  # a model advseg did not train: what it is, and the units of its eps
            write_text_atomic(out / "external.json", json.dumps(externals, indent=2))
    cells = summarize_cells(records, config.protocol)
    return EvaluateResult(table, cells, files, summary_path, slices, locations)


def settings_hash(config: EvaluateConfig) -> str:
    """SHA-256 (16 hex digits) of an evaluation's settings, checkpoints made absolute: the
    ``run`` of its records files and of its ``run.json`` (:func:`advseg.runs.records.read_records`
    refuses a file of another evaluation copied in)."""
    import hashlib

    settings = replace(config, checkpoints=[Path(c).absolute() for c in config.checkpoints])
    text = json.dumps(settings, default=lambda o: getattr(o, "__dict__", str(o)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _refuse_for_volumes(config: EvaluateConfig, checkpoint: Path) -> None:
    """What a 3D checkpoint's evaluation does not do yet, refused in one line each."""
    from advseg.defences.volumes import check_volume_defence

    for spec in config.defences:  # JPEG is 2D; the tile protocol has no place for a defence
        check_volume_defence(spec, f"{checkpoint}: a 3D model", tuple(config.through))
    if config.compat != "none" or config.erase:
        raise UserError(f"{checkpoint}: a 3D model; --compat and --erase are for slices")
    if any(str(name).split("+")[0] == "universal" for name in config.attacks):
        raise UserError(f"{checkpoint}: --attack universal on volumes is fitted on the training "
                        "volumes: run it in an experiment grid (advseg run)")  # fmt: skip


def check_transfer(opened: Sequence[Any], transfer: bool) -> None:
    """Refuse ``--transfer`` without two external models, or between models that do not score
    the same images (cases, classes, units): one line naming both."""
    if not transfer:
        return
    if len(opened) < 2:
        raise UserError("--transfer: needs two models judged on the same data (e.g. --folds 0 "
                        "--folds 1, or --configuration 2d --configuration 3d_fullres, of one "
                        "nnU-Net folder)")  # fmt: skip
    first = opened[0]
    for other in opened[1:]:
        same = (list(first.data.index["id"]) == list(other.data.index["id"])
                and list(first.data.classes) == list(other.data.classes)
                and first.valid_range == other.valid_range
                and list(first.rows) == list(other.rows))  # fmt: skip
        if not same:
            raise UserError(f"--transfer: {first.name} and {other.name} do not score the same "
                            "cases, classes and units")  # fmt: skip


def crafted_reader(images: dict[str, Any]) -> Any:
    """The ``crafted`` callable of :func:`evaluate_sweep` over kept adversarial images (an array
    per loss, or for volumes of different shapes a list of per-volume arrays)."""
    import torch

    def read(x: Any, y: Any, positions: np.ndarray) -> list:
        return [torch.stack([torch.as_tensor(np.asarray(images[loss][int(p)]))
                             for p in positions]).to(x.device) for loss in images]  # fmt: skip

    return read


def named_budget(config: EvaluateConfig) -> dict[str, Any]:
    """The attack options to keep in the settings: as given, and for ``sea`` its ``preset``
    even when left to the default, so that the run says which budget its worst case had."""
    options = dict(config.attack_options)
    if any(parse_attack_name(name)[0] == "sea" for name in config.attacks):
        options.setdefault("preset", DEFAULT_PRESET)
    return options
