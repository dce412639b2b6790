"""Checkpoints as safetensors weights + JSON metadata; loading never unpickles anything.

A checkpoint ``PATH`` is two files written by :func:`save_checkpoint`:

- ``PATH.safetensors``: the model's ``state_dict`` and, for a resumable checkpoint, the tensors of
  the training state (optimiser moments, ...) under keys starting with ``__state__.``.
- ``PATH.json``: :class:`CheckpointMeta` (model name and sizes, class names, preprocessing, data
  source and split, training config, metrics, package versions) and the non-tensor part of the
  training state, with ``{"__tensor__": key}`` where a tensor was.

The pair is saved atomically as a pair. Both files carry the same random ``save_id``; the new pair
is written completely under temporary names, the previous complete pair is kept (hard-linked) as
``PATH.prev.safetensors`` + ``PATH.prev.json`` while the two new files are renamed into place, and
only then removed. A process killed at any instant therefore leaves a complete pair under ``PATH``
or under ``PATH.prev``, and :func:`read_checkpoint` reads the newest complete pair: a kill loses at
most the work since the last complete save. A pair torn apart some other way is detected (their
save ids differ) instead of loaded.

A pickle file (``.pt``, ``.pth``, ``.ckpt``) handed in as a checkpoint is refused with a one-line
error and never opened by an unpickler: a pickle can run arbitrary code when loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from advseg.atomic import atomic_path, fault_point
from advseg.config import from_dict, read_json, to_dict
from advseg.errors import AdvsegWarning, UserError
from advseg.labels import check_activation, output_channels
from advseg.limits import check_seed
from advseg.models.zoo import count_parameters, create_model, model_spec

FORMAT = "advseg-checkpoint/1"
_STATE_PREFIX = "__state__."
_PACKAGES = ("advseg", "torch", "segmentation-models-pytorch", "monai", "safetensors", "numpy")


@dataclass
class CheckpointMeta:
    """Everything needed to rebuild, trust and re-run a trained model.

    Attributes:
        model: zoo name (``advseg.models.create_model``).
        in_channels: image channels C the model takes.
        classes: class names, in output-channel order (K = ``len(classes)``).
        activation: ``sigmoid`` (K output channels) or ``softmax`` (K + 1: background first;
            :mod:`advseg.labels`). A checkpoint saved before the field was sigmoid.
        params: parameter count (filled in by :func:`save_checkpoint`).
        preprocessing: the data layer's preprocessing config (image size, channels, ...).
        data: data source and split (e.g. ``{"source": ..., "split_seed": 0}``).
        train: the training config (``advseg.train.TrainConfig`` as a dict).
        metrics: ``{"best": {...}, "last": {...}}`` validation metrics.
        epoch: epochs completed when the checkpoint was written.
        versions: package versions (filled in by :func:`save_checkpoint`).
    """

    model: str
    in_channels: int
    classes: list[str]
    activation: str = "sigmoid"
    params: int = 0
    preprocessing: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    versions: dict[str, str] = field(default_factory=dict)


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """``(PATH.safetensors, PATH.json)`` for a checkpoint given as PATH or either file."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def previous_files(path: str | Path) -> tuple[Path, Path]:
    """``(PATH.prev.safetensors, PATH.prev.json)``: the pair kept while a new one is renamed in."""
    weights_file, _ = checkpoint_files(path)
    return checkpoint_files(weights_file.with_name(weights_file.stem + ".prev"))


def checkpoint_exists(path: str | Path) -> bool:
    """True when ``PATH`` names a saved checkpoint (its JSON, or the previous pair's, exists)."""
    return checkpoint_files(path)[1].exists() or previous_files(path)[1].exists()


def package_versions() -> dict[str, str]:
    """Versions of python and the packages a checkpoint's numbers depend on."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    metadata: CheckpointMeta,
    training_state: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``PATH.safetensors`` and ``PATH.json`` atomically (weights first, JSON last).

    Args:
        path: the checkpoint path without suffix, e.g. ``run/checkpoints/best``.
        model: the model (a DistributedDataParallel wrapper is unwrapped).
        metadata: what to store beside the weights; ``params`` and ``versions`` are filled in.
        training_state: optional nested dicts/lists of tensors and plain values (optimiser,
            scheduler and scaler ``state_dict()``s, epoch, ...), stored without pickle.

    Returns:
        The two files written.
    """
    model = getattr(model, "module", model)
    weights_file, meta_file = checkpoint_files(path)
    metadata = dataclasses.replace(
        metadata, params=count_parameters(model), versions=package_versions()
    )
    tensors, aliases = shared_weights(model.state_dict())
    state_json = None
    if training_state is not None:
        state_tensors: dict[str, Tensor] = {}
        state_json = _encode(training_state, state_tensors)
        tensors.update(state_tensors)
    save_id = uuid.uuid4().hex
    document = {
        "format": FORMAT,
        "save_id": save_id,
        "meta": to_dict(metadata),
        "training_state": state_json,
        **({"aliases": aliases} if aliases else {}),
    }
    prev_weights, prev_meta = previous_files(path)
    with atomic_path(meta_file, fsync=True) as tmp_meta:
        tmp_meta.write_text(json.dumps(document, indent=1) + "\n")
        with atomic_path(weights_file, fsync=True) as tmp_weights:
            save_file(tensors, str(tmp_weights), metadata={"format": FORMAT, "save_id": save_id})
            # Both new files are complete. Keep the current pair as PATH.prev until the new pair
            # is in place: at every instant one complete pair exists under PATH or PATH.prev.
            if _pair_id(weights_file, meta_file) is not None:
                _keep(weights_file, prev_weights)
                _keep(meta_file, prev_meta)
        # the weights are renamed into place (above), the JSON last (below)
        fault_point("checkpoint-between", meta_file.name)
    for stale in (prev_weights, prev_meta):
        stale.unlink(missing_ok=True)
    return weights_file, meta_file


def shared_weights(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A state dict's tensors, each stored once, and the names that share one (``alias ->
    stored name``): MONAI's DynUNet (``unet3d``) holds its blocks under two names
    (``skip_layers`` and ``downsamples`` ...), which safetensors refuses to write twice."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, ...], str] = {}
    for key, value in state.items():
        if value.numel():
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), *value.shape,
                     *value.stride())  # fmt: skip
            if ident in seen:
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
        tensors[key] = value.detach().cpu().contiguous()
    return tensors, aliases


def _keep(current: Path, previous: Path) -> None:
    """Make ``previous`` a second name of ``current`` (a hard link; a copy where links fail)."""
    with atomic_path(previous) as tmp:
        tmp.unlink()
        try:
            os.link(current, tmp)
        except OSError:
            shutil.copyfile(current, tmp)


def _pair_id(weights_file: Path, meta_file: Path) -> str | None:
    """The ``save_id`` both files share, or None when either is missing, unreadable or torn."""
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            header = handle.metadata() or {}
        document = read_json(meta_file)
    except (SafetensorError, OSError, ValueError):  # UserError too
        return None
    save_id = header.get("save_id")
    if isinstance(document, dict) and save_id and document.get("save_id") == save_id:
        return save_id
    return None


def checkpoint_id(path: str | Path) -> str | None:
    """The ``save_id`` of the newest complete pair at ``path`` (:func:`newest_complete`): what
    a records file names its model by; None when no complete pair is there."""
    return _pair_id(*checkpoint_files(newest_complete(path)))


def newest_complete(path: str | Path) -> Path:
    """The checkpoint path (``PATH`` or ``PATH.prev``) holding the newest complete pair.

    ``PATH`` when its pair is complete (it is then the newest), else ``PATH.prev`` when that pair
    is (a save was interrupted after the previous pair was kept), else ``PATH`` (whose reading
    then says what is wrong with it).
    """
    weights_file, meta_file = checkpoint_files(path)
    base = weights_file.with_suffix("")
    if _pair_id(weights_file, meta_file) is not None:
        return base
    prev = previous_files(path)
    if _pair_id(*prev) is not None:
        return prev[0].with_suffix("")
    return base


def read_checkpoint(
    path: str | Path,
) -> tuple[dict[str, Tensor], CheckpointMeta, dict[str, Any] | None]:
    """Read a checkpoint's weights, metadata and training state, with no unpickling.

    Returns:
        ``(state_dict, metadata, training_state)``; ``training_state`` is None when the
        checkpoint was saved without one.
    """
    weights_file, meta_file = checkpoint_files(path)
    given = Path(path)
    if given.is_file() and given not in (weights_file, meta_file):
        raise UserError(
            f"{given}: not an advseg checkpoint (expected {weights_file.name} + {meta_file.name}); "
            "pickle files (.pt/.pth/.ckpt) are refused: advseg never unpickles"
        )
    chosen = newest_complete(path)
    if chosen != weights_file.with_suffix(""):
        warnings.warn(
            f"{meta_file}: the last save was interrupted; reading the previous complete "
            f"checkpoint {chosen.name}",
            AdvsegWarning,
            stacklevel=2,
        )
        weights_file, meta_file = checkpoint_files(chosen)
    for file in (weights_file, meta_file):
        if not file.is_file():
            raise UserError(f"{file}: checkpoint file not found")
    document = _read_json(meta_file)
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{weights_file}: not a safetensors file ({err})") from None
    if header.get("save_id") != document["save_id"]:
        raise UserError(
            f"{weights_file}: weights and {meta_file.name} come from different saves "
            "(a write was interrupted); use another checkpoint"
        )
    meta = from_dict(CheckpointMeta, document["meta"], where=f"{meta_file}: meta")
    check_activation(meta.activation, f"{meta_file}: meta.activation")
    _check_split(meta.data, meta_file)
    if meta.epoch < 0:
        raise UserError(f"{meta_file}: meta.epoch: {meta.epoch} must be 0 or more")
    if "seed" in meta.train:
        check_seed(meta.train["seed"], f"{meta_file}: meta.train.seed")
    weights = {k: v for k, v in tensors.items() if not k.startswith(_STATE_PREFIX)}
    aliases = document.get("aliases") or {}
    if not isinstance(aliases, dict) or any(v not in weights for v in aliases.values()):
        raise UserError(f"{meta_file}: aliases name weights the file does not hold")
    weights.update({alias: weights[name] for alias, name in aliases.items()})
    state = document.get("training_state")
    training_state = None if state is None else _decode(state, tensors, meta_file)
    return weights, meta, training_state


def _check_split(data: dict[str, Any], meta_file: Path) -> None:
    """The split fields an evaluation relies on must be what they say (a hand edit, a bad tool)."""
    seed = data.get("split_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{meta_file}: meta.data.split_seed: expected an integer, got {seed!r}")
    if "split" in data:
        from advseg.data.heldout import check_split_note

        check_split_note(data["split"], f"{meta_file}: meta.data.split")
    folds = data.get("folds")
    if folds is not None and not (
        isinstance(folds, dict)
        and all(isinstance(folds.get(k), int) for k in ("fold", "folds"))
        and 0 <= folds["fold"] < folds["folds"]
    ):
        raise UserError(f"{meta_file}: meta.data.folds: expected {{fold, folds}}, got {folds!r}")
    for key in ("test_fraction", "val_fraction"):
        value = data.get(key, 0.5)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise UserError(
                f"{meta_file}: meta.data.{key}: expected a number in (0, 1), got {value!r}"
            )


def read_metadata(path: str | Path) -> CheckpointMeta:
    """A checkpoint's metadata alone, from its JSON file: no weights are read (for reports)."""
    _, meta_file = checkpoint_files(path)
    if not meta_file.is_file():
        raise UserError(f"{meta_file}: checkpoint file not found")
    document = _read_json(meta_file)
    return from_dict(CheckpointMeta, document["meta"], where=f"{meta_file}: meta")


def _read_json(meta_file: Path) -> dict[str, Any]:
    try:
        document = read_json(meta_file)
    except UserError as err:
        raise UserError(f"not an advseg checkpoint's JSON: {err}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise UserError(f"{meta_file}: format is {found!r}, expected {FORMAT!r}")
    for key in ("save_id", "meta"):
        if key not in document:
            raise UserError(f"{meta_file}: missing key {key!r}")
    return document


def check_compatible(
    meta: CheckpointMeta,
    where: str | Path,
    model: str | None = None,
    in_channels: int | None = None,
    classes: int | list[str] | None = None,
) -> None:
    """Refuse a checkpoint whose model, channel count or classes differ from what is expected.

    Raises:
        UserError: naming every field that differs, e.g. ``classes: checkpoint 3, expected 2``.
    """
    differences = []
    if model is not None and model != meta.model:
        differences.append(f"model: checkpoint {meta.model!r}, expected {model!r}")
    if in_channels is not None and in_channels != meta.in_channels:
        differences.append(f"in_channels: checkpoint {meta.in_channels}, expected {in_channels}")
    if isinstance(classes, int) and classes != len(meta.classes):
        differences.append(f"classes: checkpoint {len(meta.classes)}, expected {classes}")
    if isinstance(classes, list) and classes != meta.classes:
        differences.append(f"classes: checkpoint {meta.classes}, expected {classes}")
    if differences:
        raise UserError(f"{where}: checkpoint does not fit: {'; '.join(differences)}")


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    model: str | None = None,
    in_channels: int | None = None,
    classes: int | list[str] | None = None,
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild a model from a checkpoint, in eval mode, never unpickling anything.

    Args:
        path: ``PATH``, ``PATH.safetensors`` or ``PATH.json``.
        device: where to put the model.
        model, in_channels, classes: when given, the checkpoint must match them
            (see :func:`check_compatible`).

    Returns:
        ``(model, metadata)``: ``metadata.classes`` names the classes (the output channels,
        after a background channel for ``metadata.activation`` softmax),
        ``metadata.in_channels`` the input channels, ``metadata.preprocessing`` how to prepare
        images for it.

    Example:
        >>> net, meta = load_checkpoint("runs/demo/checkpoints/best")  # doctest: +SKIP
        >>> net(images)  # (B, C, H, W) -> (B, len(meta.classes), H, W) logits  # doctest: +SKIP
    """
    weights, meta, _ = read_checkpoint(path)
    check_compatible(meta, path, model, in_channels, classes)
    outputs = output_channels(len(meta.classes), meta.activation)
    net = create_model(meta.model, in_channels=meta.in_channels, classes=outputs)
    load_weights(net, weights, path)
    return net.to(device).eval(), meta


def load_weights(model: nn.Module, weights: dict[str, Tensor], where: str | Path) -> None:
    """Copy a checkpoint's weights into ``model``; any missing, extra or reshaped key, or a
    weight that is not a finite number, is refused."""
    model = getattr(model, "module", model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    reshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or extra or reshaped:
        spec = getattr(model, "advseg_spec", None)
        name = spec.name if spec else type(model).__name__
        raise UserError(
            f"{where}: weights do not fit model {name!r} ({len(missing)} missing, "
            f"e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}; "
            f"{len(reshaped)} of another shape, e.g. {reshaped[:2]})"
        )
    broken = {
        key: int((~torch.isfinite(value)).sum())
        for key, value in weights.items()
        if value.is_floating_point() or value.is_complex()
    }
    broken = {key: count for key, count in broken.items() if count}
    if broken:
        key = next(iter(broken))
        raise UserError(
            f"{where}: {sum(broken.values())} weights are not finite numbers (NaN or inf) in "
            f"{len(broken)} tensor(s), e.g. {key!r}; the checkpoint is damaged"
        )
    model.load_state_dict(weights)


def metadata_for(
    model: nn.Module, classes: list[str], activation: str = "sigmoid", **fields: Any
) -> CheckpointMeta:
    """A :class:`CheckpointMeta` for a zoo model, with its name and channel count filled in."""
    spec = model_spec(model)
    if output_channels(len(classes), activation) != spec.classes:
        raise UserError(
            f"classes: {len(classes)} names for a model with {spec.classes} outputs ({activation})"
        )
    return CheckpointMeta(
        model=spec.name, in_channels=spec.in_channels, classes=classes, activation=activation,
        **fields,
    )  # fmt: skip


# Nested training state <-> (JSON, tensors). JSON objects need string keys and have no tuples,
# while optimiser state dicts use integer keys and tuples (betas), so those are tagged.


def _encode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        key = f"{_STATE_PREFIX}{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint's training state")


def _decode(value: Any, tensors: dict[str, Tensor], where: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        key = value["__tensor__"]
        if key not in tensors:
            raise UserError(f"{where}: training state names a missing tensor {key!r}")
        return tensors[key]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, where) for v in value["__tuple__"])
    if "__items__" in value:
        return {
            _decode(k, tensors, where): _decode(v, tensors, where) for k, v in value["__items__"]
        }
    return {k: _decode(v, tensors, where) for k, v in value.items()}
