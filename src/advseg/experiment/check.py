"""Reading and checking an experiment: what the dataclass types cannot check (names, ranges,
duplicates, encoder mappings, softmax models in cross-model studies), each a one-line
:class:`~advseg.errors.UserError` naming the key; the shipped experiment files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from advseg.attacks import attack_options, check_eps, check_option_values
from advseg.config import from_dict, load_yaml
from advseg.crossmodel.cells import (
    ENSEMBLE_PREFIX,
    check_cross_model,
)
from advseg.defences import defended_name
from advseg.errors import UserError
from advseg.evaluate.compat import NOTEBOOK_ATTACKS, check_compat, compat_label
from advseg.experiment.config import (
    ExperimentConfig,
    attack_compat,
    external_entry,
    model_train_config,
    model_variants,
    trained_here,
)
from advseg.experiment.external import check_external, in_source_units
from advseg.experiment.volumes import check_volumes
from advseg.limits import check_seed
from advseg.losses import LOSSES, loss_activation
from advseg.models.zoo import resolve as resolve_model
from advseg.runs.names import file_stem
from advseg.train import TrainConfig


def check_config(config: ExperimentConfig) -> ExperimentConfig:
    """Check what the dataclass types cannot: names, ranges and duplicates, naming the key."""
    if not config.models:
        raise UserError("models: at least one model is needed")
    if not config.attacks and not config.corruptions:
        raise UserError("attacks: at least one attack (or corruption) is needed")
    if config.corruptions:
        from advseg.corruptions import parse_corruptions

        parse_corruptions(config.corruptions, "corruptions")
    if config.corruption_baseline is not None:
        names = [name for model in config.models for name in model_variants(model)]
        if not config.corruptions:
            raise UserError("corruption_baseline: does nothing without corruptions")
        if config.corruption_baseline not in names:
            raise UserError(f"corruption_baseline: {config.corruption_baseline!r} is not a "
                            f"model of the grid ({', '.join(names)})")  # fmt: skip
    check_file_name(config.name, "name")
    seen: dict[str, int] = {}
    for i, model in enumerate(config.models):
        check_file_name(model.name, f"models[{i}].name")
        if model.arch.startswith(ENSEMBLE_PREFIX):
            pass  # members are checked by check_cross_model
        elif model.checkpoint is None and model.external is None:
            try:
                resolve_model(model.arch)
            except UserError as err:
                raise UserError(f"models[{i}].arch: {err}") from None
        if model.adversarial is not None and not trained_here(model):
            raise UserError(
                f"models[{i}].adversarial: only a model trained here takes a training defence "
                "(not a checkpoint or an ensemble)"
            )
        if model.name in seen:
            raise UserError(
                f"models[{i}].name: {model.name!r} is also models[{seen[model.name]}]; "
                "give one of them another name"
            )
        seen[model.name] = i
        if "encoder_weights" in model.train and model.name in config.encoder_weights:
            raise UserError(
                f"models[{i}].train.encoder_weights: encoder_weights.{model.name} names "
                "this model's weights too; keep one of them"
            )
        try:
            if trained_here(model):
                model_train_config(config, model)
        except UserError as err:
            raise UserError(f"models[{i}].train: {err}") from None
        for j, spec in enumerate(model.defences):
            try:
                label = defended_name(model.name, spec)
            except UserError as err:
                raise UserError(f"models[{i}].defences[{j}]: {err}") from None
            if label == model.name or label in seen:
                raise UserError(f"models[{i}].defences[{j}]: {spec!r} is listed twice (or none)")
            seen[label] = i
    check_encoder_mapping(config)
    check_external(config)  # before the eps, folds and volumes checks' more general lines
    activations = trained_activations(config)
    kwargs_of: dict[str, tuple[int, dict[str, Any]]] = {}
    check_compat(config.compat, "compat")
    for i, attack in enumerate(config.attacks):
        mode = attack_compat(attack, config)
        check_compat(mode, f"attacks[{i}].compat")
        if mode != "none" and attack.name not in NOTEBOOK_ATTACKS:  # named on the attack
            raise UserError(
                f"attacks[{i}].compat: {mode!r} reproduces the paper's notebook, which "
                f"attacked with {', '.join(NOTEBOOK_ATTACKS)} only, not {attack.name!r}"
            )
        if mode != "none" and (attack.transfer or attack.sources):
            raise UserError(
                f"attacks[{i}].compat: the notebook's attack is white-box only (no transfer "
                "or sources); list a plain attack for transfer"
            )  # its losses and options are checked by preflight.check_attacks
        if not attack.losses:
            raise UserError(f"attacks[{i}].losses: at least one loss is needed")
        for j, loss in enumerate(attack.losses):
            if loss not in LOSSES:
                raise UserError(f"attacks[{i}].losses[{j}]: {LOSSES.unknown_message(loss)}")
            kind = loss_activation(loss)
            other = [(name, a) for name, a in activations.items() if kind not in (None, a)]
            if other:
                raise UserError(
                    f"attacks[{i}].losses[{j}]: {loss!r} is for {kind} models; model "
                    f"{other[0][0]!r} has {other[0][1]} outputs (train.activation)"
                )
        try:
            attack_options(attack.name)  # a registry name, maybe with +bpda / +eot
        except UserError as err:
            raise UserError(f"attacks[{i}].name: {err}") from None
        unknown = sorted(set(attack.kwargs) - set(attack_options(attack.name)))
        if unknown:
            raise UserError(
                f"attacks[{i}].kwargs.{unknown[0]}: {attack.name} takes "
                f"{', '.join(attack_options(attack.name))}"
            )
        check_option_values(attack.name, attack.kwargs, f"attacks[{i}].kwargs.")
        if not attack.eps:
            raise UserError(f"attacks[{i}].eps: at least one eps is needed")
        for j, eps in enumerate(attack.eps):
            try:
                span = float("inf") if in_source_units(config) else 1.0  # HU: any width
                check_eps(eps, attack.kwargs.get("norm", "linf"), span, attack.name)
            except UserError as err:
                raise UserError(f"attacks[{i}].eps[{j}]: {err}") from None
        first = kwargs_of.setdefault(compat_label(attack.name, mode), (i, attack.kwargs))
        if first[1] != attack.kwargs:
            raise UserError(
                f"attacks[{i}].kwargs: attack {attack.name!r} appears in attacks[{first[0]}] with "
                "other kwargs; the records could not tell them apart"
            )
    for key in ("test_fraction", "val_fraction"):
        value = getattr(config.split, key)
        if not 0 < value < 1:
            raise UserError(f"split.{key}: {value} is not between 0 and 1")
    check_folds(config)
    check_seeds(config)
    if len(set(config.seeds)) != len(config.seeds):
        raise UserError(f"seeds: each seed once, got {config.seeds}")
    for i, model in enumerate(config.models):
        if config.seeds and "seed" in model.train:
            raise UserError(f"models[{i}].train.seed: the grid's seeds: decide the training seed")
    if config.train.model != TrainConfig.model:
        raise UserError("train.model: name the models under models: (each one's arch)")
    ev = config.evaluation
    for key in ("batch_size", "max_slices"):
        value = getattr(ev, key)
        if value is not None and value < 1:
            raise UserError(f"evaluation.{key}: {value} must be at least 1")
    if ev.examples < 0:
        raise UserError(f"evaluation.examples: {ev.examples} must be 0 or more")
    check_cross_model(config)
    check_volumes(config)
    return config


def check_folds(config: ExperimentConfig) -> None:
    """``split.folds``: 2 or more, on a grid whose every model is trained here and whose cells
    score each model on its own fold (no transfer, ensemble or universal cells, no seeds)."""
    from advseg.crossmodel.cells import UNIVERSAL

    folds = config.split.folds
    if folds is None:
        return
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise UserError(f"split.folds: need a whole number of 2 or more folds, got {folds!r}")
    for i, model in enumerate(config.models):
        if not trained_here(model):
            what = "a checkpoint" if model.checkpoint is not None else "an ensemble"
            raise UserError(
                f"models[{i}]: {what} has one split, not {folds} folds; with split.folds every "
                "model is trained here"
            )
    for i, attack in enumerate(config.attacks):
        if attack.transfer or attack.sources or attack.name == UNIVERSAL:
            raise UserError(
                f"attacks[{i}]: transfer, sources and universal cells cross models or training "
                "slices, which differ by fold; not with split.folds"
            )
    if config.seeds:
        raise UserError("seeds: not with split.folds (one training seed per fold model)")


def check_encoder_mapping(config: ExperimentConfig) -> None:
    """Refuse an ``encoder_weights`` entry naming no model trained here, or an empty file name;
    and the mapping beside ``train.encoder_weights`` (one file for every model): keep one."""
    if not config.encoder_weights:
        return
    if config.train.encoder_weights is not None:
        raise UserError(
            "train.encoder_weights: one file for every model, beside encoder_weights (one per "
            "model); keep one of them"
        )
    names = [m.name for m in config.models if trained_here(m)]
    for name, path in config.encoder_weights.items():
        if name not in names:
            raise UserError(
                f"encoder_weights.{name}: no model trained here is named {name!r} (models "
                f"trained here: {', '.join(names) or 'none'})"
            )
        if not str(path).strip():
            raise UserError(f"encoder_weights.{name}: empty file name")


def trained_activations(config: ExperimentConfig) -> dict[str, str]:
    """Each model trained here -> its ``train.activation`` (sources and targets, ensemble
    members, must share theirs: :meth:`advseg.crossmodel.cells.CrossModel.check_io`)."""
    return {
        m.name: model_train_config(config, m).activation for m in config.models if trained_here(m)
    }


def check_seeds(config: ExperimentConfig) -> None:
    """Every seed of a grid in the one seed range (:func:`advseg.limits.check_seed`)."""
    check_seed(config.seed, "seed")
    check_seed(config.split.seed, "split.seed")
    check_seed(config.train.seed, "train.seed")
    for i, seed in enumerate(config.seeds):
        check_seed(seed, f"seeds[{i}]")
    for i, model in enumerate(config.models):
        if "seed" in model.train:
            check_seed(model.train["seed"], f"models[{i}].train.seed")


def check_file_name(name: str, where: str) -> None:
    """Refuse a name that becomes a folder or file name but is not one: empty, ``.``/``..``,
    or holding a separator (``../x`` would write outside the runs folder)."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: an empty name; give a name of letters, digits, '.', '_', '-'")
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(
            f"{where}: {name!r} is not a file name (no '/', '\\', '.' or '..'); it would "
            "write outside its folder"
        )


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment file; a bad key or value is a UserError naming key and file."""
    data = load_yaml(path)
    if isinstance(data, dict) and isinstance(data.get("models"), list):
        size = ((data.get("data") or {}).get("preprocess") or {}).get("size")
        try:
            data = {**data, "models": [external_entry(raw, f"models[{i}]", size)
                                       for i, raw in enumerate(data["models"])]}  # fmt: skip
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
    try:
        config = check_config(from_dict(ExperimentConfig, data or {}))
        check_given_arch(data or {}, config)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    return config


def check_given_arch(data: dict[str, Any], config: ExperimentConfig) -> None:
    """Refuse a model that names both an ``arch`` and a checkpoint of another architecture.

    A checkpoint's architecture is the one it was trained as (its metadata) and is what is
    loaded; an ``arch`` written beside it that says otherwise would label the records with a
    model that was never run (issue 25: ``arch: unet`` on a ``unet-tiny`` checkpoint). Only the
    metadata JSON is read; an unreadable checkpoint is left to the preflight to name.
    """
    from advseg.models.checkpoint import newest_complete, read_metadata

    for i, (raw, model) in enumerate(zip(data.get("models") or [], config.models, strict=False)):
        if not isinstance(raw, dict) or model.checkpoint is None:
            continue
        try:
            saved = read_metadata(newest_complete(model.checkpoint)).model
        except UserError:
            continue
        if "arch" not in raw:  # the checkpoint's, so config.yaml and the records name it
            model.arch = saved
            if "name" not in raw:
                model.name = file_stem(saved)
            continue
        if saved != model.arch:
            raise UserError(
                f"models[{i}].arch: {model.arch!r}, but its checkpoint {model.checkpoint} holds "
                f"a {saved!r} model; drop arch (the checkpoint's is used) or correct it"
            )
