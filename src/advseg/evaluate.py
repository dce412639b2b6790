"""The robustness evaluation engine: one (model, attack, eps) cell over every loss, batched.

:func:`evaluate_cell` is what the experiment runner and ``advseg evaluate`` call once per cell. It
is fast by construction:

- slices are attacked in batches;
- the losses of a cell share one clean forward pass. For a single-step attack (FGSM) that pass is
  made with the input requiring grad, so it gives the clean prediction *and*, through one
  backward per loss on the same graph, every loss's input gradient (one vmapped backward,
  ``is_grads_batched``, measured slower on a CPU: ``benchmarks/bench_attack.py``). For iterative
  attacks the clean prediction is one shared ``inference_mode`` forward;
- the cells of a single-step attack's eps sweep share that gradient too (:func:`evaluate_sweep`,
  :func:`sweep_batch`): one gradient forward and one backward per loss for every eps;
- the model's parameters require no grad during the attack (only the input gradient is made);
- each loss's adversarial images go through the model in an ``inference_mode`` forward of the
  batch size the user chose: one forward of all losses' images at once held three times the
  activations and was measured 1.1-1.3x slower on a CPU at 128 px (caches);
- on a GPU, bf16 autocast and channels_last memory.

Under ``torchrun`` (``torch.distributed`` initialised) the batches are dealt out over the ranks
(batch ``i`` to rank ``i % world``) and the records gathered back in batch order, so every rank
returns exactly the records of a one-process run.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from advseg import distributed
from advseg.attacks import ATTACKS, Attack, create_attack, frozen, model_logits, parse_attack_name
from advseg.attacks.sea import WORST_CASE_LOSS
from advseg.compat import (
    NOTEBOOK_ATTACKS,
    check_compat,
    compat_label,
    create_compat_attack,
    soft_masks,
)
from advseg.data.split import spread_positions
from advseg.errors import UserError
from advseg.labels import class_prediction, model_target, output_channels
from advseg.losses import LOSSES, SOFTMAX_LOSSES, loss_activation
from advseg.metrics import (
    confusion_counts,
    dice_from_counts,
    hd95,
    iou_from_counts,
    luminosity,
    perturbation_norms,
    psnr,
    ssim,
)
from advseg.progress import IntervalLines
from advseg.records import check_records
from advseg.summary import DEFAULT_PROTOCOL
from advseg.traces import BatchTrace, cell_trace

DEFAULT_BATCH_SIZE = 16


class SliceSource(Protocol):
    """What :func:`evaluate_cell` needs of the data (``advseg.data.SliceData`` has it).

    ``index`` has one row per slice with the columns ``id``, ``case``, ``scan``, ``slice``;
    ``dataset(rows)`` yields dicts ``{"image": (C, H, W), "mask": (K, H, W), "row": int}``. A
    ``geometry`` table (``mm_h``, ``mm_w`` per index row, as ``SliceData.geometry``) gives HD95 in
    millimetres; without it the records' ``hd95_mm_*`` are NaN.
    """

    index: pd.DataFrame
    classes: Sequence[str]

    def dataset(self, rows: Sequence[int]) -> Dataset: ...


@dataclass
class CellResult:
    """The outcome of one cell.

    Attributes:
        records: one row per (loss, slice, class) in the :data:`~advseg.records.RECORD_COLUMNS`
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
    trace: pd.DataFrame | None = None
    """With ``trace``: the cell's convergence trace (:data:`advseg.traces.TRACE_COLUMNS`), for
    iterative attacks; None otherwise."""
    """With ``keep_adversarial``: per loss, the adversarial images ``(N, C, H, W)`` of every
    slice of ``rows``, in that order (what a transfer study scores on other models)."""


Crafted = Callable[[Tensor, Tensor, np.ndarray], list[Tensor]]
"""Adversarial images made elsewhere: ``(x (B, C, H, W), y (B, K, H, W), positions (B,) in
``rows``) -> one ``(B, C, H, W)`` tensor per loss``. A transfer cell reads the images crafted on
another model; a universal perturbation adds its fitted pattern (:mod:`advseg.transfer`,
:mod:`advseg.attacks.universal`)."""


@dataclass
class BatchOutput:
    """The tensors of one attacked batch: clean logits, and per loss the images and logits."""

    clean_logits: Tensor  # (B, K, H, W)
    x_adv: list[Tensor]  # L x (B, C, H, W)
    adv_logits: list[Tensor]  # L x (B, K, H, W)
    members: list[list[str] | None] = field(default_factory=list)
    """Per loss, an ensemble attack's winning member per slice (``sea``); None otherwise."""


def attack_batch(
    model: nn.Module,
    attacks: Sequence[Attack],
    x: Tensor,
    y: Tensor,
    generators: Sequence[torch.Generator] | None = None,
) -> BatchOutput:
    """Attack one batch with one attack per loss, sharing the clean forward.

    Args:
        model: the model the attacks were built on.
        attacks: one attack per loss, all on ``model`` (same kind, same eps).
        x: images ``(B, C, H, W)``; y: masks ``(B, K, H, W)``.
        generators: one random generator per attack, for random starts; per batch and loss, so
            that a loss's numbers depend neither on the shard nor on the other losses.
    """
    if all(a.single_step and a.model is model for a in attacks):  # not on adaptive views
        return sweep_batch(model, [attacks], x, y)[0]
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    with frozen(model), amp:
        with torch.inference_mode():
            clean_logits = model_logits(model, x).float()
        draws = generators or [None] * len(attacks)
        x_adv = [a(x, y, generator=g) for a, g in zip(attacks, draws, strict=True)]
        with torch.inference_mode():
            adv_logits = [model_logits(model, images).float() for images in x_adv]
    members = [list(a.winners) if getattr(a, "loss_ensemble", False) else None for a in attacks]
    return BatchOutput(clean_logits, x_adv, adv_logits, members)


def sweep_batch(
    model: nn.Module, sweep: Sequence[Sequence[Attack]], x: Tensor, y: Tensor
) -> list[BatchOutput]:
    """Attack one batch at several eps with single-step attacks, at the cost of one gradient.

    A single-step attack's image is a function of the gradient at the clean image, which no eps
    changes: :func:`sweep_images` makes every (eps, loss)'s images from one forward with input
    gradient and one backward per loss; each (eps, loss) then costs one ``inference_mode``
    forward of its images (they differ, so these forwards cannot be shared).

    Args:
        model: the model the attacks were built on.
        sweep: per eps, one single-step attack per loss (same kind and options; losses are told
            apart by name, and an eps may have its own subset of them).
        x: images ``(B, C, H, W)``; y: masks ``(B, K, H, W)``.

    Returns:
        One :class:`BatchOutput` per eps, each exactly what :func:`attack_batch` gives for it.
    """
    clean_logits, images = sweep_images(model, sweep, x, y)
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    outputs = []
    with frozen(model), amp, torch.inference_mode():
        for x_adv in images:
            adv_logits = [model_logits(model, batch).float() for batch in x_adv]
            outputs.append(BatchOutput(clean_logits, x_adv, adv_logits))
    return outputs


def sweep_images(
    model: nn.Module, sweep: Sequence[Sequence[Attack]], x: Tensor, y: Tensor
) -> tuple[Tensor, list[list[Tensor]]]:
    """The clean logits ``(B, K, H, W)`` and, per eps and loss, the adversarial images.

    One forward with input gradient gives the clean prediction and, through one backward per
    distinct loss (by name) on its graph, every loss's gradient; each (eps, loss)'s images are
    then its attack's ``apply_gradient``. See :func:`sweep_batch` for the arguments.
    """
    if not all(a.single_step for attacks in sweep for a in attacks):
        raise ValueError("sweep_images: every attack must be single-step (apply_gradient)")
    by_loss = {a.loss.name: a for attacks in sweep for a in attacks}  # one gradient per loss
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    with frozen(model), amp, torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = model_logits(model, x_in).float()
        grads = {}
        for i, (name, attack) in enumerate(by_loss.items()):
            objective = attack.objective(logits, y).sum()
            last = i == len(by_loss) - 1
            grads[name] = torch.autograd.grad(objective, x_in, retain_graph=not last)[0]
    images = [[a.apply_gradient(x, grads[a.loss.name]) for a in attacks] for attacks in sweep]
    return logits.detach(), images


def draw_seed(attack: Attack, batch_number: int) -> int:
    """The seed of one (batch, loss)'s random starts: stable across runs, shards and loss sets."""
    return zlib.crc32(f"{attack.seed}/{batch_number}/{attack.loss.name}".encode())


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
    examples: int = 0,
    workers: int = 0,
    erase: Sequence[str] = (),
    on_batch: Callable[[int, int], None] | None = None,
    compat: str = "none",
    crafted: Crafted | None = None,
    source: str | None = None,
    keep_adversarial: bool = False,
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
            the cases (:func:`advseg.data.spread_rows`, seed 0), in the order of ``rows``.
        workers: DataLoader worker processes.
        erase: class names to make vanish: the attack becomes targeted, its target the true
            mask with these classes emptied. The records still score against the true mask,
            and their ``attack`` column reads e.g. ``pgd:erase=stomach``.
        on_batch: called after each batch with (batches done, batches in all) on this rank,
            for progress (see :func:`cell_progress`).
        compat: ``none`` (the attack as named) or ``notebook``: the paper's notebook reproduced
            (:mod:`advseg.compat`: blended FGSM, swapped loss arguments, soft masks as the
            attack's target); the records' ``attack`` column then reads ``fgsm:notebook``.
        crafted: adversarial images made elsewhere (see :data:`Crafted`): the cell scores them
            on ``model`` instead of attacking it; ``attack`` is then only the records' label.
        source: the ``source`` column of the records (default ``model_name``: white-box).
        keep_adversarial: return every slice's adversarial images (``CellResult.adversarial``),
            so that other models can be scored on them without crafting them again.

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
        keep_adversarial=keep_adversarial, compat=compat,
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
    examples: int = 0,
    workers: int = 0,
    erase: Sequence[str] = (),
    on_batch: Callable[[int, int], None] | None = None,
    crafted: Crafted | None = None,
    source: str | None = None,
    keep_adversarial: bool = False,
    trace: bool = False,
    compat: str = "none",
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
            workers, erase, source, keep_adversarial: as for :func:`evaluate_cell`.
        on_batch: called after each batch (attacked at every eps) with (done, total).
        crafted: as for :func:`evaluate_cell`, for a single cell only.
        trace: keep each cell's convergence trace (``CellResult.trace``): per loss and step the
            mean loss and Dice over the slices. Iterative attacks only: a single-step sweep
            (which shares one gradient) and crafted images have no steps to trace.

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
    activation = kwargs.get("activation") or "sigmoid"
    classes = list(data.classes)
    label, erased = _target_spec(attack, kwargs, erase, classes)
    check_compat(compat)
    if compat != "none" and activation != "sigmoid":
        raise UserError(f"compat {compat}: the notebook's models were sigmoid, not {activation}")
    if compat != "none" and erase:
        raise UserError(f"compat {compat}: the notebook's attack was untargeted (no erase)")
    label = compat_label(label, compat)
    for losses in cells.values():
        _check_losses(losses, activation, model_name)
    # crafted images carry a label (universal, random-sign), not necessarily a registry name
    base_attack = None if crafted is not None else ATTACKS.get(parse_attack_name(attack)[0])
    traced = trace and base_attack is not None and not base_attack.single_step
    if traced:
        kwargs["record_trace"] = True
    if crafted is None and getattr(base_attack, "loss_ensemble", False):
        # sea: one attack per cell whose members carry their own losses; one set of records
        sweep = [[create_attack(attack, model, eps=eps, **kwargs)] for eps in cells]
        names = [[WORST_CASE_LOSS] for _ in cells]
    elif crafted is None:
        sweep = [[create_compat_attack(attack, model, loss, eps, compat, **kwargs)
                  for loss in losses] for eps, losses in cells.items()]  # fmt: skip
        names = [[a.loss.name for a in attacks] for attacks in sweep]
    else:
        sweep, names = [], [list(losses) for losses in cells.values()]
    shared = bool(sweep) and all(
        a.single_step and a.model is model for attacks in sweep for a in attacks
    )  # an adaptive attack (+bpda/+eot) differentiates a view of the model, not the model
    device = next(model.parameters()).device
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    mine = list(distributed.shard(range(len(batches))))  # whole batches, strided over ranks
    positions = [p for b in mine for p in range(b * batch_size, b * batch_size + len(batches[b]))]
    loader = DataLoader(
        Subset(data.dataset(rows), positions), batch_size=batch_size, num_workers=workers
    )
    index = data.index
    # the example slices: seeded, spread over the cases (never the first ones of one case)
    chosen = set(spread_positions(index["case"].to_numpy()[rows], examples).tolist())
    params = sum(p.numel() for p in model.parameters())
    frames: list[tuple[int, list[pd.DataFrame]]] = []  # per batch, one frame per eps
    shown: list[tuple[int, list[dict[str, np.ndarray]]]] = []
    kept: list[tuple[int, list[list[np.ndarray]]]] = []  # per batch, per eps, per loss
    steps: list[tuple[int, list[BatchTrace]]] = []  # per batch, per eps: (slices, loss traces)
    for batch_number, batch in zip(mine, loader, strict=True):
        x = batch["image"].to(device, non_blocking=True)
        y = batch["mask"].to(device, non_blocking=True).float()
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
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
            outs = [attack_batch(model, attacks, x, target, _generators(attacks, batch_number))
                    for attacks in sweep]  # fmt: skip
        if traced:
            steps.append((batch_number, [(len(x), [a.trace for a in atk]) for atk in sweep]))
        if keep_adversarial:
            kept.append(
                (batch_number, [[im.float().cpu().numpy() for im in o.x_adv] for o in outs])
            )
        meta = index.iloc[batch["row"].tolist()]
        spacing = pixel_mm(data, batch["row"].tolist())
        parts = [
            _batch_records(o, n, x, y, meta, classes, activation, spacing)
            for o, n in zip(outs, names, strict=True)
        ]
        frames.append((batch_number, parts))
        start = batch_number * batch_size
        picks = [i for i in range(len(x)) if start + i in chosen]
        if picks:
            shown.append(
                (batch_number, [_examples(o, x, y, meta, activation, picks) for o in outs])
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
        records.insert(0, "attack", label)
        records.insert(0, "params", params)
        records.insert(0, "arch", arch)
        records.insert(0, "source", source or model_name)
        records.insert(0, "model", model_name)
        examples_i = _merge_examples([(b, parts[i]) for b, parts in shown], names[i])
        adversarial = {}
        if keep_adversarial:
            adversarial = {
                n: np.concatenate([k[i][j] for _, k in kept]) for j, n in enumerate(names[i])
            }
        cell_steps = None
        if traced:
            batches = [parts[i] for _, parts in steps]
            cell_steps = cell_trace(batches, names[i], model=model_name, attack=label, eps=eps)
        results.append(CellResult(check_records(records), examples_i, adversarial, cell_steps))
    return results


def _check_losses(losses: Sequence[str], activation: str, model_name: str) -> None:
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


def _generators(attacks: Sequence[Attack], batch_number: int) -> list[torch.Generator]:
    """One generator per loss for a batch's random starts (see :func:`_draw_seed`)."""
    device = next(attacks[0].model.parameters()).device
    return [torch.Generator(device=device).manual_seed(draw_seed(a, batch_number)) for a in attacks]


def _first(item: tuple) -> Any:
    return item[0]


def score_batch(model: nn.Module, x: Tensor, x_adv: Sequence[Tensor]) -> BatchOutput:
    """Score given adversarial images on ``model``: the clean and each loss's forward."""
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    with frozen(model), amp, torch.inference_mode():
        clean_logits = model_logits(model, x).float()
        adv_logits = [model_logits(model, images.to(x.device)).float() for images in x_adv]
    return BatchOutput(clean_logits, [images.to(x.device) for images in x_adv], adv_logits)


@contextmanager
def cell_progress(console: Console, description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar of one cell's batches on ``console``, removed when the cell ends.

    Yields the ``on_batch`` callback of :func:`evaluate_cell`. A quiet console shows nothing;
    one that is not a terminal (a log file, a pipe) gets a plain line at intervals, with an ETA
    (:class:`advseg.progress.IntervalLines`).
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    columns += (TimeElapsedColumn(), TimeRemainingColumn())
    hidden = not console.is_terminal
    if hidden:
        lines = IntervalLines(lambda text: console.print(text, highlight=False), description, None)
        yield lambda done, total: lines.update(done, total)
        return
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"{description}, batches", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


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


def pixel_mm(data: SliceSource, rows: Sequence[int]) -> np.ndarray | None:
    """``(B, 2)`` mm per model pixel (down, across) of ``rows``, or None without a geometry."""
    geometry = getattr(data, "geometry", None)
    if geometry is None:
        return None
    return geometry[["mm_h", "mm_w"]].to_numpy(np.float64)[np.asarray(rows, dtype=np.int64)]


def _hd95_mm(pred: Tensor, target: Tensor, spacing: np.ndarray | None) -> np.ndarray:
    if spacing is None:
        return np.full(pred.shape[0] * pred.shape[1], np.nan)
    return hd95(pred, target, spacing).numpy().ravel()


def _batch_records(
    out: BatchOutput,
    losses: Sequence[str],
    x: Tensor,
    y: Tensor,
    meta: pd.DataFrame,
    classes: list[str],
    activation: str,
    spacing: np.ndarray | None = None,
) -> pd.DataFrame:
    """Records of one batch: one row per (loss, slice, class); model/attack columns added later.

    ``spacing``: ``(B, 2)`` mm per model pixel, for HD95 in mm (:func:`pixel_mm`).
    """
    b, k = y.shape[:2]
    target = y > 0.5
    pred_clean = class_prediction(out.clean_logits, activation)
    tp_c, fp_c, fn_c = (t.cpu().numpy().ravel() for t in confusion_counts(pred_clean, target))
    hd_clean = hd95(pred_clean, target).numpy().ravel()
    hd_mm_clean = _hd95_mm(pred_clean, target, spacing)
    lum = np.repeat(luminosity(x).cpu().numpy(), k)  # (B*K,)
    frames = []
    members = out.members or [None] * len(losses)
    for attack_loss, x_adv, adv_logits, winners in zip(
        losses, out.x_adv, out.adv_logits, members, strict=True
    ):
        pred_adv = class_prediction(adv_logits, activation)
        tp_a, fp_a, fn_a = (t.cpu().numpy().ravel() for t in confusion_counts(pred_adv, target))
        linf, l2 = (np.repeat(v.cpu().numpy(), k) for v in perturbation_norms(x, x_adv))
        frame = pd.DataFrame(
            {
                "loss": attack_loss,
                "member": np.repeat(np.asarray(winners, dtype=str), k) if winners else "",
                "slice_id": np.repeat(meta["id"].to_numpy(), k),
                "case": np.repeat(meta["case"].to_numpy(), k),
                "scan": np.repeat(meta["scan"].to_numpy(), k),
                "slice": np.repeat(meta["slice"].to_numpy(), k),
                "class": np.tile(classes, b),
                "gt_pixels": tp_c + fn_c,
                "tp_clean": tp_c,
                "fp_clean": fp_c,
                "fn_clean": fn_c,
                "tp_adv": tp_a,
                "fp_adv": fp_a,
                "fn_adv": fn_a,
                "dice_clean": _empty_is_one(dice_from_counts(tp_c, fp_c, fn_c)),
                "dice_adv": _empty_is_one(dice_from_counts(tp_a, fp_a, fn_a)),
                "iou_clean": _empty_is_one(iou_from_counts(tp_c, fp_c, fn_c)),
                "iou_adv": _empty_is_one(iou_from_counts(tp_a, fp_a, fn_a)),
                "hd95_clean": hd_clean,
                "hd95_adv": hd95(pred_adv, target).numpy().ravel(),
                "hd95_mm_clean": hd_mm_clean,
                "hd95_mm_adv": _hd95_mm(pred_adv, target, spacing),
                "linf": linf,
                "l2": l2,
                "psnr": np.repeat(psnr(x, x_adv).cpu().numpy(), k),
                "ssim": np.repeat(ssim(x, x_adv).cpu().numpy(), k),
                "luminosity": lum,
            }
        )
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _empty_is_one(values: np.ndarray) -> np.ndarray:
    """Dice/IoU of a pair empty in both masks is 1 (see :mod:`advseg.metrics`)."""
    return np.nan_to_num(values, nan=1.0)


def _examples(out, x, y, meta, activation, picks: list[int]) -> dict[str, np.ndarray]:
    """The arrays of the batch positions ``picks`` (see :attr:`CellResult.examples`)."""
    at = torch.as_tensor(picks, device=x.device)
    return {
        "slice_ids": meta["id"].to_numpy()[picks].astype(str),
        "image": x[at].float().cpu().numpy(),
        "mask": (y[at] > 0.5).to(torch.uint8).cpu().numpy(),
        "pred_clean": class_prediction(out.clean_logits[at], activation)
        .to(torch.uint8)
        .cpu()
        .numpy(),
        "x_adv": torch.stack([a[at] for a in out.x_adv]).float().cpu().numpy(),
        "pred_adv": torch.stack([class_prediction(a[at], activation) for a in out.adv_logits])
        .to(torch.uint8)
        .cpu()
        .numpy(),
    }


def _merge_examples(
    shown: list[tuple[int, dict[str, np.ndarray]]], losses: Sequence[str]
) -> dict[str, np.ndarray]:
    if not shown:
        return {}
    parts = [part for _, part in sorted(shown, key=lambda t: t[0])]
    merged = {key: np.concatenate([p[key] for p in parts]) for key in ("slice_ids", "image")}
    for key in ("mask", "pred_clean"):
        merged[key] = np.concatenate([p[key] for p in parts])
    for key in ("x_adv", "pred_adv"):
        merged[key] = np.concatenate([p[key] for p in parts], axis=1)
    merged["losses"] = np.array(list(losses), dtype=str)
    return merged


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
        attacks, losses, eps: the sweep.
        attack_options: options for the attacks (``steps``, ``norm``, ...); each attack gets the
            ones it accepts, and an option no attack of the sweep accepts is an error.
        protocol: the Dice protocol of the summary (``paper``, ``per-class``, ``global``).
        batch_size: slices per batch.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        examples: slices per cell saved as ``examples/<cell>.npz`` for figures.
        erase: classes the attacks try to make vanish (targeted; see :func:`evaluate_cell`).
        compat: ``none`` or ``notebook`` (the paper's notebook reproduced, :mod:`advseg.compat`).
        defences: input defences each checkpoint is evaluated behind (``none``, ``median:3``,
            ...; :mod:`advseg.defences.transforms`); the records name the model
            ``<checkpoint>+<defence>``.
        trace: keep iterative attacks' convergence traces as ``traces/<cell>.csv``.
    """

    checkpoints: list[Path]
    out: Path
    data: Path | None = None
    cache_dir: Path | None = None
    split: str = "test"
    attacks: list[str] = field(default_factory=lambda: ["fgsm"])
    losses: list[str] = field(default_factory=lambda: ["bce", "focal", "dicefocal"])
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
    from advseg.attacks import ATTACKS, parse_attack_name

    values = list(dict.fromkeys(float(e) for e in eps_values))
    base, modes = parse_attack_name(attack)
    return [values] if ATTACKS.get(base).single_step and not modes else [[e] for e in values]


def cell_name(model_name: str, attack: str, eps: float) -> str:
    """The file stem of one cell's records, e.g. ``best__fgsm__eps0.009``."""
    return f"{model_name}__{attack}__eps{eps:g}"


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


def checkpoint_label(checkpoint: str | Path) -> str:
    """The model's name in records: the file stem, or the training run's folder for the
    ``<run>/checkpoints/best`` and ``last`` files that ``advseg train`` writes."""
    path = Path(checkpoint)
    stem = path.name.removesuffix(".safetensors").removesuffix(".json")
    if stem in ("best", "last") and path.parent.name == "checkpoints" and path.parent.parent.name:
        return path.parent.parent.name if stem == "best" else f"{path.parent.parent.name}-last"
    return stem


def trained_data_config(
    metadata: dict[str, Any],
    checkpoint: Path,
    preprocess: Any,
    path: Path | None = None,
    cache_dir: Path | None = None,
) -> Any:
    """The :class:`~advseg.data.DataConfig` a checkpoint was trained on (``path`` replaced).

    Its source, exclusions and label mapping decide which cases exist, and so which cases the
    checkpoint's split holds out: an evaluation must rebuild all of them, not only the path.

    The data: ``path`` (``--data``) when given, else the location the checkpoint stored
    (resolved when it was trained; ``synthetic`` for the phantom, and an empty one, from before
    the phantom had to be named, meant the phantom too). A stored data set that is not there is
    refused in one line: the phantom is never built in place of data that was not found. The
    cache: ``cache_dir`` (``--cache-dir``) when given, else the stored one where it exists, else
    the default (:func:`advseg.data.cache_root`).

    Raises:
        UserError: the stored data set is missing, or the metadata names no data and no ``path``
            is given.
    """
    from advseg.config import from_dict
    from advseg.data import SYNTHETIC, DataConfig
    from advseg.data.location import is_synthetic

    if "config" not in metadata:
        if path is None:
            raise UserError(
                f"{checkpoint}: its metadata does not say which data it was trained on "
                "(no data.config); give the data with --data"
            )
        return DataConfig(path=Path(path), preprocess=preprocess, cache_dir=cache_dir)
    data_config = from_dict(DataConfig, metadata["config"], where=f"{checkpoint} data.config")
    stored_cache = data_config.cache_dir
    if cache_dir is None and stored_cache is not None and Path(stored_cache).is_dir():
        cache_dir = stored_cache
    data_config = replace(data_config, preprocess=preprocess, cache_dir=cache_dir)
    if path is not None:
        return replace(data_config, path=Path(path))
    stored = data_config.path
    if stored is None:  # trained before the phantom had to be named: the phantom
        return replace(data_config, path=Path(SYNTHETIC))
    if not is_synthetic(stored) and not Path(stored).exists():
        raise UserError(
            f"{checkpoint}: the data set it was trained on, {stored}, is not there (moved, or "
            "another machine); pass --data PATH with its location"
        )
    return data_config


def evaluate(config: EvaluateConfig, *, progress: bool = False) -> EvaluateResult:
    """Run a sweep: every cell's records to ``out/records``, Table II to ``out/summary.csv``.

    Under torchrun each cell is sharded over the ranks; rank 0 writes the files. ``progress``
    shows each cell's batches on stderr (rank 0's).

    Raises:
        UserError: no checkpoint, an unknown attack, loss, option or protocol, a bad eps, a
            checkpoint that does not fit the data, or an empty split.
    """
    from advseg.atomic import atomic_path, check_output_dir, write_text_atomic
    from advseg.attacks import attack_options
    from advseg.bootstrap import with_intervals
    from advseg.data import load_data, saved_preprocess, split_cases
    from advseg.data.location import data_note, first_line
    from advseg.defences import create_defence, defend, defended_name
    from advseg.labels import checkpoint_activation
    from advseg.models.checkpoint import (
        check_compatible,
        load_checkpoint,
        newest_complete,
        read_metadata,
    )
    from advseg.provenance import record_session
    from advseg.records import write_records
    from advseg.report.examples import save_examples
    from advseg.report.tables import file_stem
    from advseg.summary import PROTOCOLS, summarize_cells
    from advseg.traces import write_trace
    from advseg.train import resolve_device

    if not config.checkpoints:
        raise UserError("evaluate: no checkpoint given")
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
    for name in config.attacks:
        attack_options(name)  # unknown names fail before any model or data is loaded
    for name in config.losses:
        if name not in LOSSES:
            raise UserError(f"--loss: {LOSSES.unknown_message(name)}")
    for spec in config.defences:
        create_defence(spec)
    if len({defended_name("", spec) for spec in config.defences}) != len(config.defences):
        raise UserError(f"defences: each defence once, got {', '.join(config.defences)}")
    accepted = {name: set(attack_options(name)) for name in config.attacks}
    unused = sorted(set(config.attack_options) - set().union(*accepted.values()))
    if unused:
        takes = "; ".join(f"{name}: {', '.join(sorted(keys))}" for name, keys in accepted.items())
        raise UserError(
            f"attack options {', '.join(unused)}: no attack of the sweep takes them ({takes})"
        )

    if config.examples < 0:
        raise UserError(f"--examples: {config.examples} must be 0 or more")
    if config.batch_size < 1:
        raise UserError(f"--batch-size: {config.batch_size} must be at least 1")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    check_output_dir(out, "--out directory")  # under a file, or not writable: before any work
    _refuse_existing_run(out)
    for checkpoint in config.checkpoints:  # each one's outputs against the losses, before work
        try:
            own = read_metadata(newest_complete(checkpoint)).activation
        except UserError:
            continue  # not readable: load_checkpoint says why, in its own words, below
        given = config.attack_options.get("activation")
        where = str(checkpoint)
        _check_losses(config.losses, checkpoint_activation(own, given, where), where)
    distributed.init()
    console = Console(stderr=True, quiet=not (progress and distributed.is_main()))
    device = resolve_device(config.device)
    loaded: dict[tuple, Any] = {}
    frames, files, slices = [], [], {}
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
        checkpoint_name = checkpoint_label(checkpoint)
        if checkpoint_name in slices:
            raise UserError(
                f"{checkpoint}: another checkpoint is also named {checkpoint_name!r}; the records "
                "of one model would overwrite the other's (rename or copy one of them)"
            )
        preprocess = saved_preprocess(meta.preprocessing, f"{checkpoint} preprocessing")
        data_config = trained_data_config(
            meta.data, checkpoint, preprocess, config.data, config.cache_dir
        )
        key = (repr(data_config),)
        if key not in loaded:  # rank 0 fills the preprocessing cache before the others read it
            console.print(first_line(data_config), highlight=False, soft_wrap=True)
            if not distributed.is_main():
                distributed.barrier()
            loaded[key] = load_data(data_config)
            if distributed.is_main():
                distributed.barrier()
        data = loaded[key]
        check_compatible(
            meta, checkpoint, in_channels=preprocess.channels, classes=list(data.classes)
        )
        rows = np.arange(len(data.index))
        if config.split == "test":
            if "test_fraction" not in meta.data or "split_seed" not in meta.data:
                raise UserError(
                    f"{checkpoint}: its metadata does not say which cases it held out "
                    "(data.test_fraction, data.split_seed); use --split all"
                )
            _, rows = split_cases(data.index, meta.data["test_fraction"], meta.data["split_seed"])
        if len(rows) == 0:
            raise UserError(f"{checkpoint}: the {config.split} split has no slices")
        slices[checkpoint_name] = len(rows)
        for spec, attack in itertools.product(config.defences, config.attacks):
            model, model_name = defend(bare, spec), defended_name(checkpoint_name, spec)
            options = {k: v for k, v in config.attack_options.items() if k in accepted[attack]}
            options["activation"] = activation  # the checkpoint's; --activation may repeat it
            for group in sweep_groups(attack, config.eps):
                what = f"{model_name}, {attack} eps {','.join(f'{e:g}' for e in group)}"
                with cell_progress(console, f"{what} on {len(rows)} slices") as on_batch:
                    results = evaluate_sweep(
                        model, data, rows, attack, dict.fromkeys(group, config.losses),
                        model_name=model_name,
                        arch=meta.model, attack_kwargs=options, batch_size=config.batch_size,
                        examples=config.examples, erase=config.erase, on_batch=on_batch,
                        trace=config.trace, compat=config.compat,
                    )  # fmt: skip
                for eps, result in zip(group, results, strict=True):
                    records = result.records.assign(seed=int(meta.train.get("seed", 0)))
                    frames.append(records)
                    if not distributed.is_main():
                        continue
                    label = f"{attack}-erase-{'+'.join(config.erase)}" if config.erase else attack
                    if config.compat != "none":  # records say fgsm:notebook, files fgsm-notebook
                        label = compat_label(attack, config.compat)
                    name = cell_name(file_stem(model_name), label.replace(":", "-"), eps)
                    files.append(write_records(records, out / "records" / f"{name}.parquet"))
                    if result.examples:
                        npz = out / "examples" / f"{name}.npz"
                        save_examples(result.examples, npz, model=model_name, attack=label, eps=eps)
                    if result.trace is not None:
                        write_trace(result.trace, out / "traces" / f"{name}.csv")
    records = pd.concat(frames, ignore_index=True)
    table = with_intervals(records, config.protocol)  # Table II with case-bootstrap intervals
    summary_path = out / "summary.csv"
    locations = list(dict.fromkeys(data.location for data in loaded.values()))
    if distributed.is_main():
        with atomic_path(summary_path) as tmp:
            table.assign(protocol=config.protocol).to_csv(tmp, index=False)
        write_text_atomic(out / "data.json", json.dumps(data_note(list(loaded.values()))))
        record_session(out, "advseg evaluate", device)
    cells = summarize_cells(records, config.protocol)
    return EvaluateResult(table, cells, files, summary_path, slices, locations)
