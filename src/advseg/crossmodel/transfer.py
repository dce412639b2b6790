"""Transfer attacks: adversarial images crafted on a source model, scored on a target model.

An attacker who cannot see the deployed model crafts on a surrogate. A *transfer cell* is the
ordinary evaluation (:func:`advseg.evaluate.evaluate_cell`, one records format) with the images
crafted on another model: its records carry ``source`` (the crafting model) beside ``model``
(the scored one). White-box cells are the diagonal, ``source == model``.

The images are crafted **once** per (source, attack, loss, eps) and reused for every target:

- a single source model's images are the ones its own white-box cell made (kept with
  ``keep_adversarial``), so a transfer study adds no attack call at all to the white-box grid;
- an *ensemble source* ``a+b`` is one attack on the mean loss of its members (see
  :class:`LossEnsemble`), crafted once by :func:`craft`;
- either way the images are stored in the run directory (:func:`save_crafted`, one ``.npy`` per
  loss, memory-mapped when read back), so a resumed grid scores the remaining targets without
  crafting again.

Sources and targets must take the same images and predict the same classes:
:func:`check_same_io` refuses a pair that does not, naming both models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from advseg import distributed
from advseg.atomic import atomic_path
from advseg.attacks import create_attack, model_logits
from advseg.errors import UserError
from advseg.evaluate.cells import Crafted, SliceSource
from advseg.evaluate.engine import attack_batch, start_generators
from advseg.labels import model_target
from advseg.metrics import attack_success
from advseg.stats.summary import protocol_dice

ENSEMBLE_JOIN = "+"
"""Joins the members of an ensemble source (``a+b``); model names never hold it."""


def source_members(source: str) -> list[str]:
    """The model names of a source: ``a`` -> ``[a]``, ``a+b`` -> ``[a, b]``."""
    return [name for name in source.split(ENSEMBLE_JOIN) if name]


def source_stem(source: str) -> str:
    """A source as a file-name-safe stem: each member's stem, joined by ``+``."""
    from advseg.runs.names import file_stem

    return ENSEMBLE_JOIN.join(file_stem(name) for name in source_members(source))


def transfer_pairs(
    models: Sequence[str], sources: Sequence[str], every_pair: bool
) -> list[tuple[str, str]]:
    """The (source, target) pairs of one attack of a grid, white-box pairs left out.

    Args:
        models: the grid's model names (every one is a target).
        sources: the attack's ``sources`` (single models or ensembles ``a+b``).
        every_pair: ``transfer: true``: every grid model is also a source.

    Returns:
        Pairs in order: source by source, then target in grid order. A source equal to its
        target is the white-box cell itself and is not repeated.
    """
    chosen = list(models) if every_pair else []
    chosen += [s for s in sources if s not in chosen]
    return [(s, t) for s in chosen for t in models if s != t]


@dataclass(frozen=True)
class ModelIO:
    """What a model takes and gives: the contract a source and a target must share."""

    name: str
    in_channels: int
    classes: tuple[str, ...]
    size: int | None = None
    activation: str = "sigmoid"


def check_same_io(first: ModelIO, second: ModelIO, role: str = "source and target") -> None:
    """Refuse two models that do not take the same images or predict the same classes.

    Raises:
        UserError: one line naming both models and what differs.
    """
    differences = []
    if first.in_channels != second.in_channels:
        differences.append(f"input channels {first.in_channels} vs {second.in_channels}")
    if first.size is not None and second.size is not None and first.size != second.size:
        differences.append(f"input size {first.size} vs {second.size}")
    if first.classes != second.classes:
        differences.append(f"classes {list(first.classes)} vs {list(second.classes)}")
    if first.activation != second.activation:  # one loss list must fit both
        differences.append(f"outputs {first.activation} vs {second.activation}")
    if differences:
        raise UserError(
            f"{role} {first.name!r} and {second.name!r} do not fit together: "
            f"{'; '.join(differences)}"
        )


class LossEnsemble(nn.Module):
    """Several source models as one attack target: their logits side by side on the channels.

    ``forward(x)`` gives ``(B, M*K, H, W)``; scored against the mask tiled ``M`` times
    (:meth:`tile`), every per-sample loss of :mod:`advseg.losses` (a mean over channels and
    pixels, or for Dice a mean of per-channel terms) is exactly the mean of the members' losses,
    so any attack maximises the ensemble's mean loss and its gradient runs through every member
    (Liu et al., "Delving into Transferable Adversarial Examples and Black-box Attacks",
    ICLR 2017, https://arxiv.org/abs/1611.02770, ensemble of losses).

    Args:
        members: models mapping ``(B, C, H, W)`` to logits ``(B, K, H, W)`` (sigmoid outputs).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise UserError("an ensemble source needs at least one model")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([model_logits(m, x) for m in self.members], dim=1)  # (B, M*K, H, W)

    def tile(self, y: Tensor) -> Tensor:
        """The mask ``(B, K, H, W)`` repeated once per member: ``(B, M*K, H, W)``."""
        return y.repeat(1, len(self.members), 1, 1)


def craft(
    source: nn.Module,
    data: SliceSource,
    rows: Sequence[int],
    attack: str,
    losses: Sequence[str],
    eps: float,
    *,
    attack_kwargs: dict[str, Any] | None = None,
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """Craft adversarial images on ``source`` for the slices ``rows``, one array per loss.

    Batches and random starts follow :func:`advseg.evaluate.evaluate_cell` exactly (same
    batches, same per-(batch, loss) seeds), so a single model crafted here gives the images of
    its own white-box cell. Under torchrun the batches are sharded over the ranks as the
    engine's are (batch ``i`` on rank ``i % world``) and gathered back in batch order: each
    image is crafted once, and every rank returns the same arrays as one process would.

    Args:
        source: a model, or a :class:`LossEnsemble` (its mask is tiled to match).
        attack, losses, eps, attack_kwargs: as in :func:`~advseg.evaluate.evaluate_cell`.

    Returns:
        ``{loss: (N, C, H, W) float32}`` in the order of ``rows``.
    """
    kwargs = dict(attack_kwargs or {})
    activation = kwargs.get("activation") or "sigmoid"
    if activation != "sigmoid" and isinstance(source, LossEnsemble):
        raise UserError(f"{attack}: an ensemble source needs sigmoid outputs (activation)")
    attacks = [create_attack(attack, source, loss, eps, **kwargs) for loss in losses]
    if attacks and attacks[0].moves_anatomy:  # only images are kept: the moved truth is lost
        raise UserError(
            f"{attack}: moves the anatomy, and transferred images are kept without the "
            "deformation their truth needs; it cannot be a transfer attack"
        )
    device = next(source.parameters()).device
    rows = [int(r) for r in rows]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    mine = list(distributed.shard(range(len(batches))))  # whole batches, strided over ranks
    positions = [p for b in mine for p in range(b * batch_size, b * batch_size + len(batches[b]))]
    loader = DataLoader(Subset(data.dataset(rows), positions), batch_size=batch_size)
    done: list[tuple[int, list[np.ndarray]]] = []  # per batch, one array per loss
    for batch_number, batch in zip(mine, loader, strict=True):
        x = batch["image"].to(device)
        y = batch["mask"].to(device).float()
        # an ensemble's mask tiled to its members; softmax: one-hot, background first
        y = source.tile(y) if isinstance(source, LossEnsemble) else model_target(y, activation)
        out = attack_batch(source, attacks, x, y, start_generators(attacks, batch_number))
        done.append((batch_number, [images.float().cpu().numpy() for images in out.x_adv]))
    done = sorted((item for part in distributed.gather_objects(done) for item in part), key=_first)
    return {
        loss: np.concatenate([arrays[j] for _, arrays in done]) for j, loss in enumerate(losses)
    }


def _first(item: tuple[int, Any]) -> int:
    return item[0]


def crafted_dir(run_dir: str | Path, source: str, attack: str, eps: float) -> Path:
    """Where a source's images live: ``run_dir/adversarial/<source>__<attack>__eps<eps>/``."""
    return Path(run_dir) / "adversarial" / f"{source_stem(source)}__{attack}__eps{eps:g}"


def save_crafted(
    folder: str | Path,
    slice_ids: Sequence[str],
    images: dict[str, np.ndarray | list[np.ndarray]],
):
    """Save crafted images: ``<loss>.npy`` each (volumes of different shapes, a list of
    ``(C, *S)`` arrays: ``<loss>.npz``, one array per volume named by its position), then
    ``slice_ids.npy`` (written last: the folder is complete exactly when it exists)."""
    folder = Path(folder)
    for loss, array in images.items():
        if isinstance(array, list):
            arrays = {
                f"v{i}": np.ascontiguousarray(a, dtype=np.float32) for i, a in enumerate(array)
            }
            with atomic_path(folder / f"{loss}.npz") as tmp, open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
            continue
        with atomic_path(folder / f"{loss}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array, dtype=np.float32))
    with atomic_path(folder / "slice_ids.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.asarray(list(slice_ids), dtype=str))


def load_crafted(
    folder: str | Path, losses: Sequence[str], slice_ids: Sequence[str]
) -> dict[str, np.ndarray] | None:
    """The saved images of ``losses`` for exactly ``slice_ids`` (memory-mapped; volumes of
    different shapes: a list of arrays), or None when the folder is incomplete or was crafted
    for other slices."""
    folder = Path(folder)
    ids_file = folder / "slice_ids.npy"
    if not ids_file.exists() or not all(_crafted_file(folder, loss) for loss in losses):
        return None
    if np.load(ids_file).tolist() != list(slice_ids):
        return None
    images = {}
    for loss in losses:
        path = _crafted_file(folder, loss)
        if path.suffix == ".npz":
            with np.load(path) as saved:
                images[loss] = [saved[f"v{i}"] for i in range(len(saved.files))]
        else:
            images[loss] = np.load(path, mmap_mode="r")
    return images


def _crafted_file(folder: Path, loss: str) -> Path | None:
    """A loss's saved images: ``<loss>.npy`` (one array), ``<loss>.npz`` (volumes), or None."""
    found = [folder / f"{loss}{suffix}" for suffix in (".npy", ".npz")]
    return next((path for path in found if path.exists()), None)


def reader(images: dict[str, np.ndarray], losses: Sequence[str]) -> Crafted:
    """The ``crafted`` callable of :func:`~advseg.evaluate.evaluate_cell` over saved images."""

    def read(x: Tensor, y: Tensor, positions: np.ndarray) -> list[Tensor]:
        return [torch.from_numpy(_take(images[loss], positions)).to(x.device) for loss in losses]

    return read


def _take(images: np.ndarray | list[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """The images at ``positions``, ``(B, C, *S)``; from a list of volumes (of one shape
    within a batch: volumes are evaluated one per batch), stacked."""
    if isinstance(images, list):
        return np.stack([images[int(p)] for p in positions])
    return np.array(images[positions])


def transfer_matrix(records: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """One row per (source, target, attack, loss, eps): clean and adversarial DSC, Attack Success.

    Computed with :func:`advseg.stats.summary.protocol_dice` (the one Dice implementation), so the
    diagonal rows (``source == target``) are exactly the white-box cells of Table II.

    Returns:
        Columns ``source, target, attack, loss, eps, dsc_clean, dsc_adv, attack_success``.
    """
    rows = []
    keys = ["source", "model", "attack", "loss", "eps"]
    for key, group in records.groupby(keys, sort=False):
        clean, _, _ = protocol_dice(group, protocol, "clean")
        adv, _, _ = protocol_dice(group, protocol, "adv")
        rows.append([*key, clean, adv, float(attack_success(clean, adv))])
    columns = ["source", "target", "attack", "loss", "eps", "dsc_clean", "dsc_adv"]
    return pd.DataFrame(rows, columns=[*columns, "attack_success"])
