"""Evaluation cells: one (model, attack, eps) over every loss, on a split's slices, batched.

:func:`evaluate_cell` is what the experiment runner and ``advseg evaluate`` call once per cell;
:func:`evaluate_sweep` runs several eps of one (model, attack) in one pass over the batches. The
batch work (shared clean forward, shared gradient of a single-step sweep) is the engine's
(:mod:`advseg.evaluate.engine`); the records and examples of a batch are
:mod:`advseg.evaluate.scoring`'s. On a GPU the model runs with channels_last memory.

Under ``torchrun`` (``torch.distributed`` initialised) the batches are dealt out over the ranks
(batch ``i`` to rank ``i % world``) and the records gathered back in batch order, so every rank
returns exactly the records of a one-process run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from advseg import distributed
from advseg.attacks import ATTACKS, create_attack, frozen, model_logits, parse_attack_name
from advseg.attacks.sea import WORST_CASE_LOSS
from advseg.data.split import spread_positions
from advseg.errors import UserError
from advseg.evaluate.compat import check_compat, compat_label, create_compat_attack, soft_masks
from advseg.evaluate.engine import attack_batch, score_batch, start_generators, sweep_batch
from advseg.evaluate.scoring import (
    batch_records,
    clean_scores,
    example_arrays,
    merge_examples,
    volume_slices,
)
from advseg.labels import model_target, output_channels
from advseg.losses import SOFTMAX_LOSSES, loss_activation
from advseg.runs.record_rows import pixel_mm
from advseg.runs.records import check_records
from advseg.runs.traces import BatchTrace, cell_trace

DEFAULT_BATCH_SIZE = 16


class SliceSource(Protocol):
    """What :func:`evaluate_cell` needs of the data (``advseg.data.SliceData`` has it).

    ``index`` has one row per slice with the columns ``id``, ``case``, ``scan``, ``slice``;
    ``dataset(rows)`` yields dicts ``{"image": (C, H, W), "mask": (K, H, W), "row": int}``. A
    ``geometry`` table (``mm_h``, ``mm_w`` per index row, as ``SliceData.geometry``) gives HD95 in
    millimetres (``mm_d`` too for volumes); without it the records' ``hd95_mm_*`` are NaN.
    Optional: ``prepare(rows)``, called before each batch is attacked (an nnU-Net source hands
    the volume's spacing to its model), and ``data_range`` (PSNR/SSIM; default 1.0, None: each
    batch's own max - min, for images in the source's units).
    """

    index: pd.DataFrame
    classes: Sequence[str]

    def dataset(self, rows: Sequence[int]) -> Dataset: ...


@dataclass
class CellResult:
    """The outcome of one cell.

    Attributes:
        records: one row per (loss, slice, class) in the :data:`~advseg.runs.records.RECORD_COLUMNS`
            format, ordered by loss (as given), then slice (as in ``rows``), then class.
        examples: up to ``examples`` slices to draw, as numpy arrays: ``slice_ids`` ``(N,)``,
            ``losses`` ``(L,)``, ``image`` ``(N, C, H, W)`` float32, ``mask`` and ``pred_clean``
            ``(N, K, H, W)`` uint8, ``x_adv`` ``(L, N, C, H, W)`` float32 and ``pred_adv``
            ``(L, N, K, H, W)`` uint8 (one entry per loss, in the order of ``losses``).
            Empty when no example was asked for. ``np.savez(path, **examples)`` stores it.
    """

    records: pd.DataFrame
    examples: dict[str, np.ndarray] = field(default_factory=dict)
    adversarial: dict[str, np.ndarray] = field(default_factory=dict)
    """With ``keep_adversarial``: per loss, the adversarial images ``(N, C, H, W)`` of every
    slice of ``rows``, in that order (what a transfer study scores on other models); for volumes
    of different shapes, a list of ``(C, *S)`` arrays."""
    trace: pd.DataFrame | None = None
    """With ``trace``: the cell's convergence trace (:data:`advseg.runs.traces.TRACE_COLUMNS`), for
    iterative attacks; None otherwise."""


Crafted = Callable[[Tensor, Tensor, np.ndarray], list[Tensor]]
"""Adversarial images made elsewhere: ``(x (B, C, H, W), y (B, K, H, W), positions (B,) in
``rows``) -> one ``(B, C, H, W)`` tensor per loss``. A transfer cell reads the images crafted on
another model; a universal perturbation adds its fitted pattern (:mod:`advseg.crossmodel.transfer`,
:mod:`advseg.attacks.universal`)."""


def evaluate_cell(
    model: nn.Module,
    data: SliceSource,
    rows: Sequence[int],
    attack: str,
    losses: Sequence[str],
    eps: float,
    *,
    model_name: str,
    arch: str,
    attack_kwargs: dict[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    examples: int | Sequence[int] = 0,
    workers: int = 0,
    erase: Sequence[str] = (),
    on_batch: Callable[[int, int], None] | None = None,
    compat: str = "none",
    crafted: Crafted | None = None,
    source: str | None = None,
    keep_adversarial: bool = False,
    only_batches: Sequence[int] | None = None,
) -> CellResult:
    """Evaluate one (model, attack, eps) cell over every loss on the slices ``rows``.

    Args:
        model: a segmentation model (logits ``(B, K, H, W)``), on the device to use.
        data: the slices (see :class:`SliceSource`).
        rows: positional rows of ``data.index`` to evaluate (a split).
        attack: an attack name (``fgsm``, ``pgd``, ...).
        losses: loss names; each gives its own adversarial images and records.
        eps: the budget.
        model_name: the model's label in the records (a checkpoint name).
        arch: the zoo name the model was built from.
        attack_kwargs: options of the attack (``steps``, ``norm``, ``activation``, ...).
            ``activation`` (``sigmoid`` unless given) also decides the hard predictions and
            the attack's target (:mod:`advseg.labels`: softmax models have a background
            channel first and are attacked toward the masks' one-hot partition); records
            always score against the multi-label masks.
        batch_size: slices per batch.
        examples: how many slices to return as arrays for figures: a seeded draw spread over
            the cases (:func:`advseg.data.spread_rows`, seed 0), in the order of ``rows``; or
            the positions in ``rows`` of the slices to return.
        workers: DataLoader worker processes.
        erase: class names to make vanish: the attack becomes targeted, its target the true
            mask with these classes emptied. The records still score against the true mask,
            and their ``attack`` column reads e.g. ``pgd:erase=stomach``.
        on_batch: called after each batch with (batches done, batches in all) on this rank,
            for progress (see :func:`advseg.progress.cell_progress`).
        compat: ``none`` (the attack as named) or ``notebook``: the paper's notebook reproduced
            (:mod:`advseg.evaluate.compat`: blended FGSM, swapped loss arguments, soft masks as the
            attack's target); the records' ``attack`` column then reads ``fgsm:notebook``.
        crafted: adversarial images made elsewhere (see :data:`Crafted`): the cell scores them
            on ``model`` instead of attacking it; ``attack`` is then only the records' label.
        source: the ``source`` column of the records (default ``model_name``: white-box).
        keep_adversarial: return every slice's adversarial images (``CellResult.adversarial``),
            so that other models can be scored on them without crafting them again.
        only_batches: run only these batches of ``rows`` (cut into ``batch_size`` batches),
            numbered as in the whole pass: random starts are seeded by batch number
            (:func:`advseg.evaluate.engine.draw_seed`), so their images and records are those
            of the whole evaluation (what ``advseg export`` recomputes). Default: every batch.

    Returns:
        A :class:`CellResult`; under ``torch.distributed`` every rank gets the merged records.
        On a GPU the model is switched to channels_last memory (in place; same outputs).

    Raises:
        UserError: an empty split, an unknown attack or loss, a bad eps, or a model whose input
            channels or classes do not fit the data.
    """
    return evaluate_sweep(
        model, data, rows, attack, {eps: losses}, model_name=model_name, arch=arch,
        attack_kwargs=attack_kwargs, batch_size=batch_size, examples=examples, workers=workers,
        erase=erase, on_batch=on_batch, crafted=crafted, source=source,
        keep_adversarial=keep_adversarial, compat=compat, only_batches=only_batches,
    )[0]  # fmt: skip


def evaluate_sweep(
    model: nn.Module,
    data: SliceSource,
    rows: Sequence[int],
    attack: str,
    cells: Mapping[float, Sequence[str]],
    *,
    model_name: str,
    arch: str,
    attack_kwargs: dict[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    examples: int | Sequence[int] = 0,
    workers: int = 0,
    erase: Sequence[str] = (),
    on_batch: Callable[[int, int], None] | None = None,
    crafted: Crafted | None = None,
    source: str | None = None,
    keep_adversarial: bool = False,
    trace: bool = False,
    compat: str = "none",
    only_batches: Sequence[int] | None = None,
    through: str | None = None,
    nsd_mm: float | None = None,
) -> list[CellResult]:
    """Evaluate several cells of one (model, attack), one per eps, in one pass over the data.

    Each batch is read once and attacked at every eps. For a single-step attack (FGSM) the cells
    share the gradient (:func:`sweep_batch`): one forward with input gradient and one backward per
    loss serve every eps, and each (loss, eps) adds one adversarial forward. An iterative attack
    is run at each eps on its own. Either way the records are those of :func:`evaluate_cell` at
    each eps, cell for cell.

    Args:
        cells: eps -> the losses of that cell (e.g. ``{0.009: ["bce", "focal"], 0.03: ["bce"]}``).
        model, data, rows, attack, model_name, arch, attack_kwargs, batch_size, examples,
            workers, erase, source, keep_adversarial, only_batches: as for
            :func:`evaluate_cell`.
        on_batch: called after each batch (attacked at every eps) with (done, total).
        crafted: as for :func:`evaluate_cell`, for a single cell only.
        trace: keep each cell's convergence trace (``CellResult.trace``): per loss and step the
            mean loss and Dice over the slices. Iterative attacks only: a single-step sweep
            (which shares one gradient) and crafted images have no steps to trace.
        through: volumes only (``model`` is then a :class:`advseg.inference.SlidingWindow`):
            ``inference`` (the attack's model is the inferer, end to end) or ``tiles`` (the
            published protocol, :class:`advseg.attacks.through.TiledAttack`); the records'
            ``through`` column, and their attack label ``<attack>:<through>``, so that Table II
            keeps the two apart. Tiles keep no convergence trace.
        nsd_mm: volumes: the records' normalised surface Dice tolerance in mm.

    Returns:
        One :class:`CellResult` per eps, in the order of ``cells``.
    """
    rows = [int(r) for r in rows]
    if not rows:
        raise UserError(f"{model_name}: the split has no slices to evaluate")
    if not cells:
        raise UserError(f"{model_name}: no eps given")
    if crafted is not None and len(cells) != 1:
        raise ValueError("evaluate_sweep: crafted images belong to one cell (one eps)")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    kwargs = dict(attack_kwargs or {})
    preprocess = getattr(data, "preprocess", None)  # SliceData: the range its inputs live in
    if preprocess is not None and crafted is None:
        kwargs.setdefault("valid_range", preprocess.value_range)
    activation = kwargs.get("activation") or "sigmoid"
    classes = list(data.classes)
    label, erased = _target_spec(attack, kwargs, erase, classes)
    check_compat(compat)
    if compat != "none" and activation != "sigmoid":
        raise UserError(f"compat {compat}: the notebook's models were sigmoid, not {activation}")
    if compat != "none" and erase:
        raise UserError(f"compat {compat}: the notebook's attack was untargeted (no erase)")
    label = compat_label(label, compat)
    if through is not None:
        if through not in ("inference", "tiles"):
            raise UserError(f"through: {through!r} is not inference or tiles")
        label = f"{label}:{through}"
    tiles = through == "tiles"
    for losses in cells.values():
        check_losses(losses, activation, model_name)
    # crafted images carry a label (universal, random-sign), not necessarily a registry name
    base_attack = None if crafted is not None else ATTACKS.get(parse_attack_name(attack)[0])
    traced = trace and base_attack is not None and not base_attack.single_step and not tiles
    if traced:
        kwargs["record_trace"] = True
    if crafted is None and tiles:  # the bare network tile by tile (model is the inferer)
        from advseg.attacks.through import TiledAttack

        if getattr(base_attack, "moves_anatomy", False):  # one field per tile: no one truth
            raise UserError(f"{attack} through tiles: each tile would get its own deformation, "
                            "torn at the tile borders, with no truth moved alike; use "
                            "through inference")  # fmt: skip

        ensemble = getattr(base_attack, "loss_ensemble", False)
        sweep = [[TiledAttack(attack, model, eps=eps, **kwargs)] if ensemble else
                 [TiledAttack(attack, model, loss=loss, eps=eps, **kwargs) for loss in losses]
                 for eps, losses in cells.items()]  # fmt: skip
        names = [[WORST_CASE_LOSS] if ensemble else [a.loss.name for a in attacks]
                 for attacks in sweep]  # fmt: skip
    elif crafted is None and getattr(base_attack, "loss_ensemble", False):
        # sea: one attack per cell whose members carry their own losses; one set of records
        sweep = [[create_attack(attack, model, eps=eps, **kwargs)] for eps in cells]
        names = [[WORST_CASE_LOSS] for _ in cells]
    elif crafted is None:
        sweep = [[create_compat_attack(attack, model, loss, eps, compat, **kwargs)
                  for loss in losses] for eps, losses in cells.items()]  # fmt: skip
        names = [[a.loss.name for a in attacks] for attacks in sweep]
    else:
        sweep, names = [], [list(losses) for losses in cells.values()]
    settings = [attacks[0].setting for attacks in sweep] or [""] * len(cells)
    named = str(attack).split("+")[0]  # crafted images' label may name no attack
    ensemble = named in ATTACKS.names() and getattr(ATTACKS.get(named), "loss_ensemble", False)
    if crafted is not None and ensemble:  # e.g. a transfer cell of sea: which sea crafted them
        settings = [create_attack(attack, model, eps=eps, **kwargs).setting for eps in cells]
    shared = bool(sweep) and all(
        a.single_step and a.model is model for attacks in sweep for a in attacks
    )  # an adaptive attack (+bpda/+eot) differentiates a view of the model, not the model
    device = next(model.parameters()).device
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    wanted = list(range(len(batches)))
    if only_batches is not None:
        wanted = sorted({int(b) for b in only_batches})
        if not wanted or wanted[0] < 0 or wanted[-1] >= len(batches):
            raise ValueError(f"only_batches {only_batches}: not within 0..{len(batches) - 1}")
    mine = list(distributed.shard(wanted))  # whole batches, strided over ranks
    positions = [p for b in mine for p in range(b * batch_size, b * batch_size + len(batches[b]))]
    loader = DataLoader(
        Subset(data.dataset(rows), positions), batch_size=batch_size, num_workers=workers
    )
    index = data.index
    # the example slices: seeded, spread over the cases (never the first ones of one case)
    if isinstance(examples, int):
        chosen = set(spread_positions(index["case"].to_numpy()[rows], examples).tolist())
    else:
        chosen = {int(p) for p in examples}
    params = sum(p.numel() for p in model.parameters())
    frames: list[tuple[int, list[pd.DataFrame]]] = []  # per batch, one frame per eps
    shown: list[tuple[int, list[dict[str, np.ndarray]]]] = []
    kept: list[tuple[int, list[list[np.ndarray]]]] = []  # per batch, per eps, per loss
    steps: list[tuple[int, list[BatchTrace]]] = []  # per batch, per eps: (slices, loss traces)
    prepare = getattr(data, "prepare", None)
    data_range = getattr(data, "data_range", 1.0)
    for batch_number, batch in zip(mine, loader, strict=True):
        x = batch["image"].to(device, non_blocking=True)
        y = batch["mask"].to(device, non_blocking=True).float()
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if prepare is not None:  # e.g. an nnU-Net model takes the volume's spacing
            prepare(batch["row"].tolist())
        if not frames:
            _check_fit(model, x, y, model_name, classes, activation)
        target = y
        if compat == "notebook":  # the notebook's area-resized masks, never thresholded
            resize = getattr(getattr(data, "preprocess", None), "resize", "stretch")
            target = soft_masks(index, batch["row"].tolist(), classes, y.shape[-1], resize)
            target = target.to(device)
        if erased:
            target = y.clone()
            target[:, erased] = 0  # (B, K, H, W): the chosen organs vanish
        target = model_target(target, activation)  # softmax: one-hot, background first
        if crafted is not None:
            start = batch_number * batch_size
            outs = [score_batch(model, x, crafted(x, target, np.arange(start, start + len(x))))]
        elif shared:
            outs = sweep_batch(model, sweep, x, target)
        else:
            outs = [attack_batch(model, attacks, x, target, start_generators(attacks, batch_number))
                    for attacks in sweep]  # fmt: skip
        if traced:
            steps.append((batch_number, [(len(x), [a.trace for a in atk]) for atk in sweep]))
        if keep_adversarial:
            kept.append(
                (batch_number, [[im.float().cpu().numpy() for im in o.x_adv] for o in outs])
            )
        meta = index.iloc[batch["row"].tolist()]
        spacing = pixel_mm(data, batch["row"].tolist())
        truths = [None] * len(outs)  # a spatial attack's truth moves with the anatomy
        if crafted is None and not shared:
            truths = [[a.adversarial_truth(y) for a in attacks] for attacks in sweep]
        parts, scored = [], None  # the clean scores of the last distinct clean prediction
        for o, n, t in zip(outs, names, truths, strict=True):
            if scored is None or not torch.equal(o.clean_logits, scored[0]):
                scored = (o.clean_logits, clean_scores(o, y, activation, spacing, nsd_mm))
            parts.append(batch_records(o, n, x, y, meta, classes, activation, spacing,
                                       data_range, nsd_mm, truths=t, clean=scored[1]))  # fmt: skip
        frames.append((batch_number, parts))
        start = batch_number * batch_size
        picks = [i for i in range(len(x)) if start + i in chosen]
        if picks:
            shown.append(
                (batch_number, [example_arrays(o, x, y, meta, activation, picks) for o in outs])
            )
        if on_batch is not None:
            on_batch(len(frames), len(mine))

    frames = [item for part in distributed.gather_objects(frames) for item in part]
    shown = [item for part in distributed.gather_objects(shown) for item in part]
    frames.sort(key=_first)
    shown.sort(key=_first)
    steps = [item for part in distributed.gather_objects(steps) for item in part]
    steps.sort(key=_first)
    if keep_adversarial:
        kept = sorted((i for part in distributed.gather_objects(kept) for i in part), key=_first)
    results = []
    for i, eps in enumerate(cells):
        records = pd.concat([parts[i] for _, parts in frames], ignore_index=True)
        order = records["loss"].map({name: j for j, name in enumerate(names[i])})
        records = records.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)
        records.insert(0, "eps", float(eps))
        records["through"] = through or ""
        records.insert(0, "attack_setting", settings[i])
        records.insert(0, "attack", label)
        records.insert(0, "params", params)
        records.insert(0, "arch", arch)
        records.insert(0, "source", source or model_name)
        records.insert(0, "model", model_name)
        examples_i = merge_examples([(b, parts[i]) for b, parts in shown], names[i])
        if through is not None:  # the report draws one axial slice of each example volume
            examples_i = volume_slices(examples_i)
        adversarial = {}
        if keep_adversarial:
            adversarial = {n: _joined([k[i][j] for _, k in kept]) for j, n in enumerate(names[i])}
        cell_steps = None
        if traced:
            batches = [parts[i] for _, parts in steps]
            cell_steps = cell_trace(batches, names[i], model=model_name, attack=label, eps=eps)
        results.append(CellResult(check_records(records), examples_i, adversarial, cell_steps))
    return results


def _joined(batches: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """Kept adversarial batches as one array, or, for volumes of different shapes (one per
    batch), a list with one ``(C, *S)`` array per volume."""
    if len({b.shape[1:] for b in batches}) <= 1:
        return np.concatenate(batches)
    return [image for batch in batches for image in batch]


def check_losses(losses: Sequence[str], activation: str, model_name: str) -> None:
    """Refuse an empty or repeated loss list, or a loss made for the other activation."""
    if not losses:
        raise UserError(f"{model_name}: no attack loss given")
    if len(set(losses)) != len(losses):
        raise UserError(f"losses: each loss once, got {', '.join(losses)}")
    softmax_only = [loss for loss in losses if loss in SOFTMAX_LOSSES]
    if activation == "sigmoid" and softmax_only:
        raise UserError(
            f"loss {softmax_only[0]!r} is for softmax models (one class per pixel); these masks "
            "are multi-label sigmoid outputs: use bce, focal, dice or dicefocal"
        )
    sigmoid_only = [loss for loss in losses if loss_activation(loss) == "sigmoid"]
    if activation == "softmax" and sigmoid_only:
        raise UserError(
            f"loss {sigmoid_only[0]!r} is for sigmoid models; {model_name} has softmax outputs: "
            "use ce, dicece, masked-ce, balanced-ce, js or masked-spherical"
        )


def _first(item: tuple) -> Any:
    return item[0]


def _target_spec(
    attack: str, kwargs: dict[str, Any], erase: Sequence[str], classes: list[str]
) -> tuple[str, list[int]]:
    """The records' attack label and the class channels to erase (targeted evaluation)."""
    if not erase:
        if kwargs.get("targeted"):
            raise UserError(f"{attack}: a targeted evaluation needs the classes to erase (erase)")
        return attack, []
    unknown = [name for name in erase if name not in classes]
    if unknown:
        raise UserError(f"erase: unknown class {unknown[0]!r}; valid: {', '.join(classes)}")
    kwargs["targeted"] = True
    return f"{attack}:erase={'+'.join(erase)}", [classes.index(name) for name in erase]


def _check_fit(
    model: nn.Module, x: Tensor, y: Tensor, model_name: str, classes: list[str], activation: str
):
    """One slice through the model: a model that does not fit the data is a UserError."""
    try:
        with frozen(model), torch.inference_mode():
            logits = model_logits(model, x[:1])
    except RuntimeError as err:
        raise UserError(
            f"model {model_name!r} does not fit the data: images have {x.shape[1]} channels "
            f"({str(err).splitlines()[0]})"
        ) from None
    expected = output_channels(len(classes), activation)
    if logits.shape[1] != expected or logits.shape[2:] != y.shape[2:]:
        raise UserError(
            f"model {model_name!r} predicts {logits.shape[1]} channels at "
            f"{tuple(logits.shape[2:])}; the data has {len(classes)} classes "
            f"({', '.join(classes)}) at {tuple(y.shape[2:])}, {activation} needs {expected}"
        )
