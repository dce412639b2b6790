"""The cross-model cells of an experiment grid: transfer, ensemble models, universal attacks.

:mod:`advseg.experiment` plans and runs the grid; this module holds what it needs to know about
cells that involve more than one model or more than the test slices:

- ``ensemble:<a>+<b>`` models (:class:`~advseg.models.ensemble.EnsembleModel` of grid models);
- transfer cells (``transfer: true`` or ``sources:`` on an attack,
  :mod:`advseg.crossmodel.transfer`): the white-box cell of every source keeps its adversarial
  images in ``adversarial/``, each transfer cell scores them on its target; an ensemble source
  ``a+b`` is crafted once, on the first cell that needs it;
- ``universal`` cells (:mod:`advseg.attacks.universal`): one perturbation per (model, eps, loss)
  fitted on the training slices, saved in ``universal/``, scored beside a random-sign
  perturbation of the same norm (attack label ``random-sign``) in the same cell.

Every cell is still one :func:`~advseg.evaluate.evaluate_cell` call per attack label, writing
records in the one format, so resuming works exactly as for the other cells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from torch import nn

from advseg import distributed
from advseg.crossmodel.transfer import (
    LossEnsemble,
    ModelIO,
    check_same_io,
    craft,
    crafted_dir,
    load_crafted,
    reader,
    save_crafted,
    source_members,
    transfer_pairs,
)
from advseg.errors import UserError
from advseg.evaluate.cells import evaluate_cell, evaluate_sweep
from advseg.inference import SlidingWindow
from advseg.labels import checkpoint_activation
from advseg.models.ensemble import ENSEMBLE_PREFIX, build_ensemble, ensemble_members
from advseg.models.zoo import resolve
from advseg.progress import cell_progress

__all__ = ["ENSEMBLE_PREFIX", "CrossModel", "check_cross_model", "model_seeds", "transfer_cells"]

UNIVERSAL = "universal"
RANDOM_SIGN = "random-sign"


def check_cross_model(config: Any) -> None:
    """Check ensemble models and transfer sources of an experiment config, naming the key."""
    names = [m.name for m in config.models]
    plain = [m.name for m in config.models if not m.arch.startswith(ENSEMBLE_PREFIX)]
    for i, model in enumerate(config.models):
        if not model.arch.startswith(ENSEMBLE_PREFIX):
            continue
        try:
            members = ensemble_members(model.arch)
        except UserError as err:
            raise UserError(f"models[{i}].arch: {err}") from None
        if model.checkpoint is not None:
            raise UserError(f"models[{i}].checkpoint: an ensemble is built from its members")
        for member in members:
            if member not in plain:
                raise UserError(
                    f"models[{i}].arch: ensemble member {member!r} is not a (non-ensemble) model "
                    f"of the grid; models: {', '.join(plain)}"
                )
        if len(set(members)) != len(members):
            raise UserError(f"models[{i}].arch: {model.arch!r} names a member twice")
    for i, attack in enumerate(config.attacks):
        if not (attack.transfer or attack.sources):
            continue
        if attack.name == UNIVERSAL:
            raise UserError(f"attacks[{i}]: universal perturbations are not transferred here")
        if attack.transfer and len(names) < 2:
            raise UserError(f"attacks[{i}].transfer: needs at least two models in the grid")
        for j, source in enumerate(attack.sources):
            members = source_members(source)
            unknown = [m for m in members if m not in names]
            if not members or unknown:
                raise UserError(
                    f"attacks[{i}].sources[{j}]: {source!r} is not a model of the grid (or "
                    f"models joined by +); models: {', '.join(names)}"
                )
            if len(set(members)) != len(members):
                raise UserError(f"attacks[{i}].sources[{j}]: {source!r} names a model twice")


def model_seeds(config: Any, name: str) -> list[int | None]:
    """The training seeds of the grid model ``name``: the grid's ``seeds`` for a model trained
    here (or an ensemble with such a member), ``[None]`` for one trained once (no ``seeds:``)
    or loaded from a checkpoint (one model, whatever the seeds)."""
    if not config.seeds:
        return [None]
    spec = next(m for m in config.models if m.name == name)
    if spec.arch.startswith(ENSEMBLE_PREFIX):
        seeded = any(model_seeds(config, m) != [None] for m in ensemble_members(spec.arch))
    else:
        seeded = spec.checkpoint is None and spec.external is None
    return list(config.seeds) if seeded else [None]


def transfer_cells(config: Any, planned: Sequence[Any]) -> list[Any]:
    """The transfer cells of the grid, target by target, after the white-box ``planned`` ones.

    Each is its target's white-box cell (same attack, eps, losses, options, training seed) with
    ``source`` set; the source is taken at the same seed. A target trained once (a checkpoint)
    attacked from a source trained per seed gets one transfer cell per seed of the source.
    """
    names = [m.name for m in config.models]
    cells: list[Any] = []
    for attack in config.attacks:
        for source, target in transfer_pairs(names, attack.sources, attack.transfer):
            seeds = sorted(
                {k for m in source_members(source) for k in model_seeds(config, m)} - {None}
            )
            for eps in attack.eps:
                for base in planned:
                    same = (base.model, base.attack, base.eps) == (target, attack.name, eps)
                    if not same or base.compat != "none":  # notebook cells: white-box only
                        continue
                    at = [base.seed] if base.seed is not None or not seeds else seeds
                    for seed in at:
                        cell = replace(base, source=source, seed=seed)
                        if cell not in cells:
                            cells.append(cell)
    return sorted(cells, key=lambda c: names.index(c.model))


class CrossModel:
    """Runs the cross-model cells of one grid run (see the module docstring).

    Args:
        config: the experiment; data, rows: the data and the evaluated test rows;
        train_rows: the training rows (universal perturbations are fitted on them);
        run_dir: the run directory; model_for: ``(name, seed) -> (model, arch)``, the runner's
        loader (``seed``: a cell's training seed, None for a grid without seeds);
        console: where progress goes; activation_of: ``(name, seed) -> activation`` of a loaded
        model (how its logits are read; default sigmoid).
    """

    def __init__(
        self,
        config: Any,
        data: Any,
        rows: np.ndarray,
        train_rows: np.ndarray,
        run_dir: Path,
        model_for: Callable[[str, int | None], tuple[nn.Module, str]],
        console: Console,
        activation_of: Callable[[str, int | None], str] | None = None,
    ) -> None:
        self.config, self.data, self.rows, self.train_rows = config, data, rows, train_rows
        self.run_dir, self.model_for, self.console = Path(run_dir), model_for, console
        self.activation_of = activation_of or (lambda name, seed: "sigmoid")
        self.slice_ids = data.index["id"].iloc[rows].astype(str).tolist()
        names = [m.name for m in config.models]
        self.sources = {
            (source, attack.name)
            for attack in config.attacks
            for source, _ in transfer_pairs(names, attack.sources, attack.transfer)
        }
        self.crafted_now = 0  # attack runs made for transfer cells (not white-box ones)

    # --- ensembles -------------------------------------------------------------------------

    def ensemble(
        self, arch: str, load: Callable[[str], tuple[nn.Module, str]], activation: str = "sigmoid"
    ) -> nn.Module:
        """The ensemble model ``ensemble:a+b`` from the grid's models (one member: itself); its
        members share ``activation`` (:meth:`check_io`)."""
        members = ensemble_members(arch)
        nets = [load(name)[0] for name in members]
        return build_ensemble(nets, activation, names=members)

    def check_io(self, planned_activation: Callable[[Any], str]) -> None:
        """Refuse ensemble members and (source, target) pairs that take different images or
        predict different classes (checkpoints may come from other data), naming both.
        ``planned_activation``: a model spec trained here -> the activation it will train with
        (the experiment's training settings for it)."""
        pairs = [
            (member, m.name, "ensemble members")
            for m in self.config.models
            if m.arch.startswith(ENSEMBLE_PREFIX)
            for member in ensemble_members(m.arch)
        ]
        pairs += [
            (member, target, "source and target")
            for attack in self.config.attacks
            for source, target in transfer_pairs(
                [m.name for m in self.config.models], attack.sources, attack.transfer
            )
            for member in source_members(source)
        ]
        io: dict[str, ModelIO] = {}  # models trained here: no file read
        for first, second, role in pairs:
            check_same_io(
                self._io(first, io, planned_activation),
                self._io(second, io, planned_activation),
                role,
            )
        for attack in self.config.attacks:
            names = [m.name for m in self.config.models]
            for source, _ in transfer_pairs(names, attack.sources, attack.transfer):
                members = source_members(source)
                if (
                    len(members) > 1
                    and self._io(members[0], io, planned_activation).activation != "sigmoid"
                ):
                    raise UserError(
                        f"sources: {source!r} is an ensemble source of softmax models; an "
                        "ensemble source takes sigmoid models only"
                    )

    def _spec(self, name: str) -> Any:
        return next(m for m in self.config.models if m.name == name)

    def _io(self, name: str, cache: dict[str, ModelIO], planned: Callable[[Any], str]) -> ModelIO:
        if name not in cache:
            spec = self._spec(name)
            if spec.arch.startswith(ENSEMBLE_PREFIX):
                cache[name] = replace(
                    self._io(ensemble_members(spec.arch)[0], cache, planned), name=name
                )
            elif getattr(spec, "external", None) is not None:  # the classes, size it declares
                ext = spec.external
                cache[name] = ModelIO(
                    name, ext.in_channels, tuple(ext.classes), ext.size, ext.activation
                )
            elif spec.checkpoint is not None:
                from advseg.models import read_checkpoint

                meta = read_checkpoint(spec.checkpoint)[1]
                size = meta.preprocessing.get("size")
                cache[name] = ModelIO(
                    name, meta.in_channels, tuple(meta.classes), size, meta.activation
                )
            elif not hasattr(self.data, "preprocess"):  # volumes: one channel, any shape
                cache[name] = ModelIO(name, 1, tuple(self.data.classes), None, planned(spec))
            else:
                preprocess = self.data.preprocess
                classes = tuple(self.data.classes)
                activation = planned(spec)
                cache[name] = ModelIO(
                    name, preprocess.channels, classes, preprocess.size, activation
                )
        return cache[name]

    # --- transfer --------------------------------------------------------------------------

    def is_source(self, cell: Any) -> bool:
        """Whether a white-box cell's adversarial images are scored on other models."""
        plain = cell.compat == "none"  # notebook cells are white-box only (check_config)
        return plain and not cell.source and (cell.model, cell.attack) in self.sources

    def keep(self, cell: Any, adversarial: dict[str, np.ndarray]) -> None:
        """Save a source's white-box images for its transfer cells (before its records)."""
        if self.is_source(cell) and distributed.is_main():  # rank 0 writes
            save_crafted(_crafted_folder(self.run_dir, cell.model, cell), self.slice_ids,
                         adversarial)  # fmt: skip

    def handles(self, cell: Any) -> bool:
        """True for the cells this class computes: transfer and universal cells."""
        return bool(cell.source) or cell.attack == UNIVERSAL

    def compute(self, cell: Any) -> pd.DataFrame:
        """The records of a transfer or universal cell."""
        return self._transfer(cell) if cell.source else self._universal(cell)

    def _kwargs(self, cell: Any, model: str | None = None) -> dict[str, Any]:
        """The attack's options, with the activation of ``model`` (default: the cell's; a
        source and its targets share one: :meth:`check_io`)."""
        model = model or cell.model
        given = dict(cell.kwargs).get("activation")
        own = self.activation_of(model, cell.seed)
        activation = checkpoint_activation(own, given, f"model {model!r}")
        return {"seed": self.config.seed, **dict(cell.kwargs), "activation": activation}

    def _transfer(self, cell: Any) -> pd.DataFrame:
        if cell.through:
            return self._transfer_volumes(cell)
        folder = _crafted_folder(self.run_dir, cell.source, cell)
        images = load_crafted(folder, cell.losses, self.slice_ids)
        if images is None:  # an ensemble source, or a source whose images were removed
            nets = [self.model_for(name, cell.seed)[0] for name in source_members(cell.source)]
            source = nets[0] if len(nets) == 1 else LossEnsemble(nets)
            with self.console.status(f"crafting on {cell.source}, {cell.attack} eps {cell.eps:g}"):
                crafted = craft(
                    source, self.data, self.rows, cell.attack, cell.losses, cell.eps,
                    attack_kwargs=self._kwargs(cell, source_members(cell.source)[0]),
                    batch_size=self.config.evaluation.batch_size,
                )  # fmt: skip
            self.crafted_now += 1
            if distributed.is_main():  # crafted sharded, gathered on every rank; rank 0 writes
                save_crafted(folder, self.slice_ids, crafted)
            distributed.barrier()
            images = load_crafted(folder, cell.losses, self.slice_ids)
        net, arch = self.model_for(cell.model, cell.seed)
        what = f"scoring {cell.source}'s {cell.attack} eps {cell.eps:g} images on {cell.model}"
        with cell_progress(self.console, what) as on_batch:
            result = evaluate_cell(
                net, self.data, self.rows, cell.attack, list(cell.losses), cell.eps,
                model_name=cell.model, arch=arch, attack_kwargs=self._kwargs(cell),
                batch_size=self.config.evaluation.batch_size, on_batch=on_batch,
                crafted=reader(images, cell.losses), source=cell.source,
            )  # fmt: skip
        return result.records

    def _transfer_volumes(self, cell: Any) -> pd.DataFrame:
        """A transfer cell on volumes: the source's adversarial volumes (crafted through its own
        sliding-window inference, or by the tile protocol: ``cell.through``) scored on the
        target through the target's inference. Volumes the source's white-box cell did not
        leave (removed) are made again by that cell's own evaluation (same random starts)."""
        folder = _crafted_folder(self.run_dir, cell.source, cell)
        images = load_crafted(folder, cell.losses, self.slice_ids)
        if images is None:
            source, arch = self.model_for(cell.source, cell.seed)
            what = f"crafting on {cell.source}, {cell.attack}:{cell.through} eps {cell.eps:g}"
            with self.console.status(what):
                images = evaluate_sweep(
                    volume_inferer(self.config, source, arch), self.data, self.rows,
                    cell.attack, {cell.eps: list(cell.losses)}, model_name=cell.source,
                    arch=arch, attack_kwargs=self._volume_kwargs(cell, cell.source),
                    batch_size=1, keep_adversarial=True, through=cell.through,
                    nsd_mm=self.config.evaluation.nsd_mm,
                )[0].adversarial  # fmt: skip
            self.crafted_now += 1
            if distributed.is_main():
                save_crafted(folder, self.slice_ids, images)
            distributed.barrier()
        net, arch = self.model_for(cell.model, cell.seed)
        what = f"scoring {cell.source}'s {cell.attack}:{cell.through} eps {cell.eps:g} volumes"
        with cell_progress(self.console, f"{what} on {cell.model}") as on_batch:
            result = evaluate_sweep(
                volume_inferer(self.config, net, arch), self.data, self.rows, cell.attack,
                {cell.eps: list(cell.losses)}, model_name=cell.model, arch=arch,
                attack_kwargs=self._volume_kwargs(cell), batch_size=1, on_batch=on_batch,
                crafted=reader(images, cell.losses), source=cell.source, through=cell.through,
                nsd_mm=self.config.evaluation.nsd_mm,
            )[0]  # fmt: skip
        return result.records

    def _volume_kwargs(self, cell: Any, model: str | None = None) -> dict[str, Any]:
        """:meth:`_kwargs` with the volumes' valid range (what the white-box cells take)."""
        return {**self._kwargs(cell, model), "valid_range": self.data.valid_range}

    # --- universal perturbations -----------------------------------------------------------

    def _universal(self, cell: Any) -> pd.DataFrame:
        from advseg.attacks import create_attack
        from advseg.attacks.universal import WindowTiles, save_perturbation

        net, arch = self.model_for(cell.model, cell.seed)
        kwargs, volume, scored = self._kwargs(cell), {}, net
        fit_net, fit_data = net, self.data.dataset(self.train_rows)
        if cell.through:  # volumes: a window-sized perturbation laid out over each volume
            scored = volume_inferer(self.config, net, arch)
            kwargs = {**self._volume_kwargs(cell), "window": scored.roi_size}
            volume = {"through": cell.through, "nsd_mm": self.config.evaluation.nsd_mm}
            if cell.through == "inference":  # fitted through the inference that scores it
                fit_net = scored
            else:  # tiles: through the bare network, on the training volumes' tiles
                fit_data = WindowTiles(fit_data, scored.roi_size)
        fitted = []
        for loss in cell.losses:
            attack = create_attack(UNIVERSAL, fit_net, loss, cell.eps, **kwargs)
            with self.console.status(f"fitting a universal perturbation on {cell.model} ({loss})"):
                attack.fit(fit_data)
            stem = f"{_seeded(cell.model, cell)}__eps{cell.eps:g}__{loss}"
            stem += f"__{cell.through}" if cell.through else ""
            if distributed.is_main():
                save_perturbation(attack.perturbation, self.run_dir / "universal" / stem)
            fitted.append(attack)
        frames = []
        for label in (UNIVERSAL, RANDOM_SIGN):
            deltas = [
                a.perturbation if label == UNIVERSAL else a.random_sign(self.config.seed)
                for a in fitted
            ]

            def add(x: torch.Tensor, y: torch.Tensor, positions: np.ndarray, deltas=deltas):
                return [a.clip(x + a.laid_out(d.to(x.device), x.shape[2:]))
                        for a, d in zip(fitted, deltas, strict=True)]  # fmt: skip

            result = evaluate_sweep(
                scored, self.data, self.rows, label, {cell.eps: list(cell.losses)},
                model_name=cell.model, arch=arch, attack_kwargs=kwargs, crafted=add,
                batch_size=1 if volume else self.config.evaluation.batch_size, **volume,
            )[0]  # fmt: skip
            frames.append(result.records)
        return pd.concat(frames, ignore_index=True)


def volume_inferer(config: Any, net: nn.Module, arch: str) -> SlidingWindow:
    """The sliding-window inference that scores a 3D grid's volumes with ``net``: the grid's
    patch (default the model's window, ``advseg models``) and overlap, Gaussian blending."""
    patch = config.data.volume.patch or resolve(arch).roi
    return SlidingWindow(net, patch, overlap=config.data.volume.overlap)


def _crafted_folder(run_dir: Path, source: str, cell: Any) -> Path:
    """Where the images ``source`` crafted for ``cell`` live; on volumes the threat protocol
    is part of the name (``<attack>-<through>``): each protocol crafts its own."""
    attack = f"{cell.attack}-{cell.through}" if cell.through else cell.attack
    return crafted_dir(run_dir, _seeded(source, cell), attack, cell.eps)


def _seeded(name: str, cell: Any) -> str:
    """``name`` in file names of a cell: ``<name>__seed<k>`` in a grid with seeds."""
    return name if cell.seed is None else f"{name}__seed{cell.seed}"
