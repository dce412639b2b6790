"""Experiment settings: the dataclasses an experiment file (YAML) is read into, and the facts
derived from them (which models are trained here, each model's training settings, names, the
attacks' compatibility modes, the encoders' one line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from advseg.config import from_dict, to_dict
from advseg.crossmodel.cells import (
    ENSEMBLE_PREFIX,
)
from advseg.data import DataConfig
from advseg.defences import defended_name
from advseg.defences.adversarial_training import AdversarialConfig
from advseg.errors import UserError
from advseg.evaluate.compat import NOTEBOOK_ATTACKS
from advseg.labels import DEFAULT_LOSS
from advseg.models.external import ExternalConfig
from advseg.runs.names import file_stem
from advseg.stats.summary import DEFAULT_PROTOCOL
from advseg.train import TrainConfig

PAPER_LOSSES = ["bce", "focal", "dicefocal"]


@dataclass
class ModelSpec:
    """One model of the grid.

    Attributes:
        arch: a model zoo name (``advseg models`` lists them), e.g. ``unet`` or ``smp:Unet:vgg13``.
        name: the model's label in the run (records, tables, checkpoint file); defaults to ``arch``
            with every character outside ``[A-Za-z0-9._-]`` replaced by ``-``.
        checkpoint: load this checkpoint (path without suffix) instead of training.
        train: this model's changes to the experiment's ``train`` settings, e.g.
            ``{noise_sigma: 0.25}`` (Gaussian-noise training) or ``{epochs: 5}``.
        defences: input defences (``median:3``, ``jpeg:75``, ``noise:0.1``, ...;
            :mod:`advseg.defences.transforms`): the grid also evaluates the model behind each
            one, as the model ``<name>+<defence>`` (trained once, attacked naively and, with
            ``pgd+bpda`` / ``pgd+eot`` attacks, adaptively).
        adversarial: this model's adversarial training, in place of ``train.adversarial``
            (:class:`advseg.defences.AdversarialConfig`), so that one grid holds defended and
            undefended models side by side.
        external: a model advseg did not train (:class:`advseg.models.external.ExternalConfig`;
            in the experiment file ``nnunet: DIR``, ``bundle: DIR``, ``torchscript: FILE`` or
            ``model_factory: pkg.mod:fn`` with its options beside it, :func:`external_entry`):
            not trained, judged as ``advseg evaluate --nnunet ...`` judges it.
        data: an external model's data: the nnU-Net raw data set or the Decathlon-style folder
            it is scored on (needed for ``nnunet`` and ``bundle``); a TorchScript or factory
            model is scored on the grid's own data and held-out slices.
    """

    arch: str = "unet"
    name: str = ""
    checkpoint: Path | None = None
    train: dict[str, Any] = field(default_factory=dict)
    defences: list[str] = field(default_factory=list)
    adversarial: AdversarialConfig | None = None
    external: ExternalConfig | None = None
    data: Path | None = None

    def __post_init__(self) -> None:
        if self.external is not None:
            self.arch = f"external:{self.external.kind}"
        self.name = self.name or (
            self.external.label if self.external is not None else file_stem(self.arch)
        )


@dataclass
class AttackSpec:
    """One attack of the grid, evaluated at every eps under every loss.

    Attributes:
        name: an attack registry name (``fgsm``, ``pgd``, ...).
        losses: loss registry names the attack maximises, one records set each.
        eps: L-inf budgets in image units ([0, 1] range).
        kwargs: further attack arguments (steps, step size, ...), passed as they are.
        transfer: also score every model's adversarial images on every other model of the grid
            (transfer cells, :mod:`advseg.crossmodel.transfer`).
        sources: models whose adversarial images are scored on every model of the grid; an
            entry ``a+b`` is one attack on the mean loss of models ``a`` and ``b`` (an ensemble
            attack).
        compat: ``notebook`` reproduces the paper's notebook code for this attack (FGSM only;
            :mod:`advseg.evaluate.compat`: blended update, swapped loss arguments, soft masks; a
            reproduction, not a recommended attack), ``none`` the attack as named; absent: the
            experiment's ``compat``. Its records and cells are labelled ``fgsm:notebook``, so one
            grid holds both modes side by side.
    """

    name: str = "fgsm"
    losses: list[str] = field(default_factory=lambda: list(PAPER_LOSSES))
    eps: list[float] = field(default_factory=lambda: [0.009])
    kwargs: dict[str, Any] = field(default_factory=dict)
    transfer: bool = False
    sources: list[str] = field(default_factory=list)
    compat: str | None = None


@dataclass
class SplitSpec:
    """How cases are divided; no case has slices on two sides.

    Attributes:
        test_fraction: share of the cases held out for evaluation (the paper: 0.1).
        val_fraction: share of the remaining cases used for early stopping while training.
        seed: the random draw of cases.
        folds: case-level cross-validation (``advseg run --folds K``): each model trained here
            is trained K times (``models/<name>/fold<k>/``), model ``k`` tested on fold ``k``
            of the cases (:func:`advseg.data.fold_train_val_test`), so every case is tested
            exactly once; the folds' records (``fold`` column, cells ``<model>__fold<k>__...``)
            pool as one model's in Table II and the report. ``test_fraction`` is then unused.
            None (the default): one split.
    """

    test_fraction: float = 0.1
    val_fraction: float = 0.1
    seed: int = 0
    folds: int | None = None


@dataclass
class EvaluationSpec:
    """Which slices are attacked and how the results are summarised.

    Attributes:
        slices: ``with_mask`` evaluates the test slices that have a mask (the paper's protocol);
            ``all`` evaluates every test slice.
        max_slices: evaluate at most this many test slices: a draw seeded by the experiment's
            ``seed`` and spread over the test cases (:func:`advseg.data.spread_rows`).
        batch_size: slices per attack batch.
        examples: slices per cell whose images and predictions are kept for the report's panels.
        protocol: the Dice protocol of the summary (``paper``, ``per-class``, ``global``).
        trace: keep iterative attacks' convergence traces (``traces/<cell>.csv``) for the
            report's "Did the attacks converge?".
        through: a grid of 3D models: each attack cell once per threat protocol
            (``inference``: end to end through the sliding window; ``tiles``: the published
            tile protocol; :mod:`advseg.experiment.volumes`). Slices ignore it.
        nsd_mm: a grid of 3D models: the normalised surface Dice's tolerance in mm.
    """

    slices: Literal["with_mask", "all"] = "with_mask"
    max_slices: int | None = None
    batch_size: int = 16
    examples: int = 2
    protocol: Literal["paper", "per-class", "global"] = DEFAULT_PROTOCOL
    trace: bool = False
    through: list[str] = field(default_factory=lambda: ["inference"])
    nsd_mm: float = 1.0


@dataclass
class ExperimentConfig:
    """A whole experiment, as read from its YAML file (every key optional).

    Attributes:
        name: a label for the run.
        seed: seeds each cell's attack (torch), so a resumed run gives the same numbers.
        data: the data set and its preprocessing (:class:`advseg.data.DataConfig`); no ``path``
            means the synthetic phantom.
        split: the case split into train, validation and test.
        train: training settings shared by every model trained here
            (:class:`advseg.train.TrainConfig`; ``train.model`` is set from each model's arch).
        models, attacks: the grid.
        evaluation: slices, batch size, examples and the Dice protocol.
        report: write the report when the grid is done.
        seeds: training seeds: each model trained here is trained once per seed (in
            ``models/<model>/seed<k>/``, seeded by ``k`` in place of ``train.seed``), its cells
            are named ``<model>__seed<k>__...`` and its records carry the seed, so that Table II
            shows the mean over seeds and their spread beside the case-bootstrap interval.
            Empty (the default): one training per model, seeded by ``train.seed``.
        compat: ``notebook`` for every attack that does not name its own ``compat`` (the
            paper's notebook reproduced, :mod:`advseg.evaluate.compat`; ``advseg run --compat``);
            ``none`` (the default): each attack as named.
        encoder_weights: pretrained encoders, one per model: a model's name (``models[i].name``,
            its arch by default) -> a local safetensors file of that encoder's weights (or
            ``imagenet``, downloaded by segmentation_models_pytorch); ``advseg run
            --encoder-weights NAME=PATH``. A model trained here and absent from it trains from
            random init (or from ``train.encoder_weights``, one file for every model); the run
            says which in one line, and a missing or unfitting file is refused before any
            training (:func:`advseg.experiment.preflight.check_experiment`).
        corruptions: corruption cells for every model (``motion:3``, ``noise`` for its five
            severities, ``all``; :func:`advseg.corruptions.parse_corruptions`): one cell per
            (model, corruption, severity), all of a model's computed in one pass over the
            slices (:func:`advseg.evaluate.corrupted.evaluate_corruptions`), seeded by ``seed``.
        corruption_baseline: the model (a ``models[i].name``) the report's corruption errors
            (CE, mCE) are relative to; None: the first model trained without a defence, else
            the first (:func:`advseg.report.corruptions.choose_baseline`).
    """

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitSpec = field(default_factory=SplitSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec()])
    attacks: list[AttackSpec] = field(default_factory=lambda: [AttackSpec()])
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    report: bool = True
    seeds: list[int] = field(default_factory=list)
    compat: str = "none"
    encoder_weights: dict[str, str] = field(default_factory=dict)
    corruptions: list[str] = field(default_factory=list)
    corruption_baseline: str | None = None


def trained_here(model: ModelSpec) -> bool:
    """Whether the grid trains ``model`` (not a checkpoint, not an ensemble of other models, not
    a model advseg did not train)."""
    return (
        model.checkpoint is None
        and model.external is None
        and not model.arch.startswith(ENSEMBLE_PREFIX)
    )


EXTERNAL_KEYS = {"nnunet": "nnunet", "bundle": "bundle", "torchscript": "torchscript",
                 "model_factory": "factory"}  # fmt: skip
"""The experiment file's key naming an external model -> its :attr:`ExternalConfig.kind`."""


def external_entry(raw: Any, where: str, size: Any = None) -> Any:
    """A model entry of the experiment file in its short form, e.g. ``{name: mine, nnunet: DIR,
    configuration: 2d, folds: [0]}``, rewritten as ``{name: mine, external: {kind: nnunet,
    path: DIR, configuration: 2d, folds: ["0"]}}`` (the form ``config.yaml`` keeps); the
    options beside the key are :class:`ExternalConfig`'s (``checkpoint`` is then nnU-Net's
    checkpoint file name; a TorchScript or factory model's ``size`` defaults to ``size``, the
    grid's). Other entries come back unchanged."""
    if not isinstance(raw, dict):
        return raw
    named = [key for key in EXTERNAL_KEYS if key in raw]
    if not named:
        return raw
    if len(named) > 1:
        raise UserError(f"{where}: names {' and '.join(named)}; one external model per entry")
    if "arch" in raw or "external" in raw:
        key = "arch" if "arch" in raw else "external"
        raise UserError(f"{where}.{key}: a {named[0]} model is not trained here; drop {key}")
    keep = {"name", "data", "train", "defences", "adversarial"}  # refused by check_config
    external = {k: v for k, v in raw.items() if k not in keep and k != named[0]}
    external = {"kind": EXTERNAL_KEYS[named[0]], "path": str(raw[named[0]]), **external}
    if external["kind"] in ("torchscript", "factory"):
        external.setdefault("size", size if size is not None else DataConfig().preprocess.size)
    if isinstance(external.get("folds"), list):
        external["folds"] = [str(fold) for fold in external["folds"]]
    return {**{k: v for k, v in raw.items() if k in keep}, "external": external}


def model_variants(model: ModelSpec) -> list[str]:
    """The grid's names of one model: as trained, then behind each of its input defences."""
    return [model.name, *(defended_name(model.name, spec) for spec in model.defences)]


def model_train_config(config: ExperimentConfig, model: ModelSpec) -> TrainConfig:
    """The experiment's training settings with this model's arch and its own ``train`` changes."""
    if "model" in model.train:
        raise UserError("model: a model's arch is its train.model; do not set it here")
    values = _merged(to_dict(config.train), model.train)
    if model.name in config.encoder_weights:  # the grid's per-model mapping
        values["encoder_weights"] = config.encoder_weights[model.name]
    if "loss" not in model.train and config.train.loss == DEFAULT_LOSS[config.train.activation]:
        values["loss"] = None  # the default loss of this model's activation
    return from_dict(TrainConfig, {**values, "model": model.arch}, where="train")


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied key by key, nested mappings merged, not replaced."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merged(out[key], value)
        out[key] = value
    return out


def attack_compat(attack: AttackSpec, config: ExperimentConfig) -> str:
    """The compatibility mode of one attack: its own ``compat``, else the experiment's (which
    reaches only the attacks the notebook had: a grid-wide ``notebook`` leaves PGD as it is)."""
    if attack.compat is not None:
        return attack.compat
    return config.compat if attack.name in NOTEBOOK_ATTACKS else "none"


def encoder_line(config: ExperimentConfig) -> str | None:
    """One line saying how each model trained here starts: from which encoder weights, or
    from random init; None when the grid trains no model."""
    pretrained, random = [], []
    for model in config.models:
        if trained_here(model):
            weights = model_train_config(config, model).encoder_weights
            if weights is None:
                random.append(model.name)
            else:
                pretrained.append(f"{model.name} from {weights}")
    if not pretrained and not random:
        return None
    parts = [*pretrained, *(["random init: " + ", ".join(random)] if random else [])]
    return "encoders: " + "; ".join(parts)
