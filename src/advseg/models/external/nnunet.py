"""nnU-Net v2 results folders: the trained networks and their exact inference, with gradients.

nnU-Net's own predictor (``nnUNetPredictor``) runs under ``torch.inference_mode()`` with fp16
accumulation, so no gradient reaches the input. :class:`NnUNet` reproduces its inference as a
differentiable function from the raw image (the reader's axis order, the source's units: HU for
CT) to logits on the source grid, so any advseg attack can perturb the raw image:

1. ``transpose_forward`` from the plans;
2. the crop to the non-zero region (nnU-Net's ``crop_to_nonzero``, recomputed on the image given);
3. the normalisation of each channel (``CTNormalization``: clip to the foreground's 0.5 / 99.5
   percentiles from ``plans.json``, z-score with its mean and std; ``ZScoreNormalization``: per
   image, optionally inside the non-zero mask; ``NoNormalization``; ``RescaleTo01Normalization``);
4. the resampling to the configuration's spacing: nnU-Net's own function in the forward pass
   (third-order spline), the adjoint of linear interpolation in the backward pass (named in the
   records as ``resampling_gradient: linear``); none where the spacing already matches;
5. the sliding window (nnU-Net's steps, step 0.5, its Gaussian importance map, zero padding to
   the patch size), mirroring over the checkpoint's ``inference_allowed_mirroring_axes`` (the
   mean of every flip combination), the mean of the folds' logits (what nnU-Net averages), deep
   supervision off;
6. the way back: logits resampled to the cropped source shape (order 1), put back into the
   uncropped grid (background outside the crop), ``transpose_backward``.

Networks are built by nnU-Net's own code from the plans (``nnunetv2`` and
``dynamic_network_architectures``, the ``advseg[nnunet]`` extra); checkpoints are read with
``torch.load(weights_only=True)``: one that needs a full unpickle is refused.
See https://github.com/MIC-DKFZ/nnUNet (Isensee et al., Nature Methods 2021).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advseg.errors import UserError
from advseg.models.external.module import file_sha256

CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
DEFAULT_TRAINER = "nnUNetTrainer"
DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
NORMALISATIONS = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
)
_OUTSIDE_LOGIT = 30.0  # background logit outside nnU-Net's crop (softmax ~1 for background)


def _require_nnunet() -> None:
    try:
        import dynamic_network_architectures  # noqa: F401
        import nnunetv2  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"--nnunet needs nnunetv2 ({error.name} is missing): pip install 'advseg[nnunet]'"
        ) from None


def model_folder(results: str | Path, configuration: str, trainer: str, plans: str) -> Path:
    """The folder holding ``plans.json``, ``dataset.json`` and ``fold_X/``: ``results`` itself,
    or its ``TRAINER__PLANS__CONFIGURATION`` subfolder (``results`` is a dataset's folder)."""
    path = Path(results)
    if not path.is_dir():
        raise UserError(f"--nnunet {path}: no such directory")
    if configuration not in CONFIGURATIONS:
        raise UserError(
            f"--configuration {configuration!r} is not one of {', '.join(CONFIGURATIONS)}"
        )
    if (path / "plans.json").is_file():
        return path
    inner = path / f"{trainer}__{plans}__{configuration}"
    if inner.is_dir():
        return inner
    raise UserError(
        f"--nnunet {path}: neither plans.json nor {inner.name}/ found (a results folder of "
        "nnU-Net v2: DatasetXXX_Name/ or its TRAINER__PLANS__CONFIGURATION/)"
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing (an nnU-Net v2 results folder holds it)")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"{path}: not readable JSON ({type(error).__name__})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def available_folds(folder: Path, checkpoint: str) -> list[str]:
    """The folds with ``checkpoint`` in ``folder``, as nnU-Net detects them."""
    folds = [p.name.removeprefix("fold_") for p in sorted(folder.glob("fold_*")) if p.is_dir()]
    return [f for f in folds if (folder / f"fold_{f}" / checkpoint).is_file()]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint's dict read without arbitrary unpickling.

    ``weights_only=True`` allows tensors, containers, numbers and strings; nnU-Net checkpoints also
    hold numpy scalars in their training log, whose reconstructors are data-only and allowed here.
    Anything else (a class, a function) is refused in one line.
    """
    if not path.is_file():
        raise UserError(f"{path}: missing checkpoint")
    safe = [np.dtype, np.core.multiarray.scalar, *_numpy_dtype_classes()]
    try:
        with torch.serialization.safe_globals(safe):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{path}: not loadable as weights only (advseg never unpickles code): {first[:200]}"
        ) from None
    if not isinstance(loaded, dict) or "network_weights" not in loaded:
        raise UserError(f"{path}: not an nnU-Net v2 checkpoint (no network_weights)")
    return loaded


def _numpy_dtype_classes() -> list[type]:
    dtypes = getattr(np, "dtypes", None)
    if dtypes is None:
        return []
    return [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]


@dataclass
class NnUNetFolder:
    """What an nnU-Net v2 results folder holds, read and checked.

    Attributes:
        folder: the model folder (``TRAINER__PLANS__CONFIGURATION``).
        configuration: ``2d``, ``3d_fullres`` or ``3d_lowres``.
        folds: the folds used (their logits are averaged).
        plans, dataset_json: the two JSON files.
        weights: one state dict per fold.
        trainer_name: the trainer class that built the network.
        mirror_axes: ``inference_allowed_mirroring_axes`` of the first checkpoint (None: none).
        checkpoint_sha256: per fold, the SHA-256 of the checkpoint file (provenance).
    """

    folder: Path
    configuration: str
    folds: tuple[str, ...]
    checkpoint: str
    plans: dict
    dataset_json: dict
    weights: list[dict[str, Tensor]]
    trainer_name: str
    mirror_axes: tuple[int, ...] | None
    checkpoint_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, Any]:
        """``dataset.json``'s labels (name -> value, or -> list of values for a region)."""
        return dict(self.dataset_json["labels"])

    @property
    def has_regions(self) -> bool:
        """Region-based training (sigmoid outputs per region) rather than one label per voxel."""
        return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in self.labels.values())

    @property
    def classes(self) -> list[str]:
        """The foreground classes (or regions) in output order, background left out."""
        return [name for name, value in self.labels.items() if name != "background" and value != 0]

    @property
    def in_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))

    def provenance(self) -> dict[str, Any]:
        """What the records and report say of the model."""
        return {
            "kind": "nnunet",
            "folder": str(self.folder.resolve()),
            "configuration": self.configuration,
            "folds": list(self.folds),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": dict(self.checkpoint_sha256),
            "trainer": self.trainer_name,
            "mirror_axes": list(self.mirror_axes) if self.mirror_axes is not None else None,
        }


def read_folder(
    results: str | Path,
    *,
    configuration: str = "3d_fullres",
    folds: list[str] | tuple[str, ...] | None = None,
    checkpoint: str = DEFAULT_CHECKPOINT,
    trainer: str = DEFAULT_TRAINER,
    plans: str = DEFAULT_PLANS,
) -> NnUNetFolder:
    """Read an nnU-Net v2 results folder (defaults as nnU-Net's: every fold found,
    ``checkpoint_final.pth``). Each missing piece is one :class:`UserError`."""
    folder = model_folder(results, configuration, trainer, plans)
    plans_json = _read_json(folder / "plans.json")
    dataset_json = _read_json(folder / "dataset.json")
    if configuration not in plans_json.get("configurations", {}):
        raise UserError(
            f"{folder / 'plans.json'}: no configuration {configuration!r} "
            f"(it has {', '.join(plans_json.get('configurations', {})) or 'none'})"
        )
    if "labels" not in dataset_json:
        raise UserError(f"{folder / 'dataset.json'}: no 'labels'")
    chosen = [str(f) for f in folds] if folds else available_folds(folder, checkpoint)
    if not chosen:
        raise UserError(f"{folder}: no fold_X/{checkpoint} found")
    weights, hashes = [], {}
    trainer_name, mirror_axes, stored_configuration = trainer, None, None
    for i, fold in enumerate(chosen):
        path = folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise UserError(f"{path}: missing (fold {fold} was asked for)")
        loaded = read_checkpoint(path)
        weights.append(loaded["network_weights"])
        hashes[fold] = file_sha256(path)
        if i == 0:
            trainer_name = str(loaded.get("trainer_name", trainer))
            axes = loaded.get("inference_allowed_mirroring_axes")
            mirror_axes = tuple(int(a) for a in axes) if axes is not None else None
            stored_configuration = (loaded.get("init_args") or {}).get("configuration")
    if stored_configuration not in (None, configuration):
        raise UserError(
            f"{folder}: its checkpoints were trained as {stored_configuration!r}, "
            f"not --configuration {configuration!r}"
        )
    return NnUNetFolder(
        folder=folder,
        configuration=configuration,
        folds=tuple(chosen),
        checkpoint=checkpoint,
        plans=plans_json,
        dataset_json=dataset_json,
        weights=weights,
        trainer_name=trainer_name,
        mirror_axes=mirror_axes,
        checkpoint_sha256=hashes,
    )


def build_network(found: NnUNetFolder, fold: int = 0) -> nn.Module:
    """The network as nnU-Net's predictor builds it (its trainer class, deep supervision off),
    holding the weights of ``found.folds[fold]``, in eval mode."""
    _require_nnunet()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(found.plans)
    config = manager.get_configuration(found.configuration)
    trainer_class = recursive_find_trainer_class_by_name(found.trainer_name)
    if trainer_class is None:
        raise UserError(f"{found.folder}: trainer {found.trainer_name!r} is not in nnunetv2")
    n_in = determine_num_input_channels(manager, config, found.dataset_json)
    n_out = manager.get_label_manager(found.dataset_json).num_segmentation_heads
    network = trainer_class.build_network_architecture(
        manager, config, n_in, n_out, enable_deep_supervision=False
    )
    try:
        network.load_state_dict(found.weights[fold])
    except RuntimeError as error:
        raise UserError(
            f"{found.folder}: fold {found.folds[fold]}'s weights do not fit the network of "
            f"plans.json: {str(error).splitlines()[0][:200]}"
        ) from None
    return network.eval()


class _ResampleExact(torch.autograd.Function):
    """nnU-Net's resampling in the forward pass; the adjoint of linear interpolation backward."""

    @staticmethod
    def forward(ctx, x: Tensor, shape: tuple[int, ...], fn: Any, kwargs: dict) -> Tensor:
        ctx.in_shape = tuple(x.shape[1:])
        ctx.out_shape = tuple(shape)
        out = fn(x.detach().double().cpu().numpy(), np.asarray(shape), **kwargs)
        return torch.as_tensor(np.asarray(out), dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        with torch.enable_grad():
            probe = torch.zeros(
                (grad.shape[0], *ctx.in_shape), dtype=grad.dtype, device=grad.device
            ).requires_grad_(True)
            mode = "trilinear" if len(ctx.in_shape) == 3 else "bilinear"
            out = F.interpolate(probe[None], size=ctx.out_shape, mode=mode, align_corners=False)
            (back,) = torch.autograd.grad(out[0], probe, grad)
        return back, None, None, None


class NnUNet(nn.Module):
    """An nnU-Net v2 model as one differentiable function: raw image -> logits on its grid.

    ``forward(x)`` takes ``(B, C, *spatial)`` raw images in the reader's axis order (as nnU-Net's
    image reader returns them, e.g. SimpleITK's ``(z, y, x)``) and returns ``(B, K, *spatial)``
    logits on the same grid: K = 1 + classes (background first) for label-based models, the
    regions for region-based ones. ``spacing`` is the images' voxel spacing in that axis order.

    Args:
        found: the folder read by :func:`read_folder`.
        spacing: voxel spacing of the images to be given, reader's axis order.
        mirroring: test-time mirroring over the checkpoint's allowed axes (nnU-Net's default).
        step_size: the sliding window's step as a share of the patch (nnU-Net: 0.5).
        window_batch: windows run through the network at once.
        accumulate: dtype of the blended logits and weights: float32 (default: what attacks
            need), or float16 to reproduce nnUNetPredictor's buffers bit for bit (its corners,
            where the Gaussian weight is ~1e-7, come out quantised in float16).
    """

    def __init__(
        self,
        found: NnUNetFolder,
        spacing: tuple[float, ...],
        *,
        mirroring: bool = True,
        step_size: float = 0.5,
        window_batch: int = 4,
        accumulate: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        _require_nnunet()
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.found = found
        self.spacing = tuple(float(s) for s in spacing)
        self.mirroring = mirroring
        self.step_size = step_size
        self.window_batch = window_batch
        self.accumulate = accumulate
        self.plans_manager = PlansManager(found.plans)
        self.config = self.plans_manager.get_configuration(found.configuration)
        self.label_manager = self.plans_manager.get_label_manager(found.dataset_json)
        for scheme in self.config.normalization_schemes:
            if scheme not in NORMALISATIONS:
                raise UserError(
                    f"{found.folder / 'plans.json'}: normalisation {scheme!r} is not one advseg "
                    f"reproduces ({', '.join(NORMALISATIONS)})"
                )
        # one network per fold: an attack differentiates through every fold at once (one network
        # reloaded fold by fold would change the weights the first folds' graphs still hold)
        self.networks = nn.ModuleList(build_network(found, i) for i in range(len(found.weights)))
        self.networks.requires_grad_(False)
        self.network = self.networks[0]

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        if not self.mirroring or self.found.mirror_axes is None:
            return ()
        return self.found.mirror_axes

    @property
    def activation(self) -> str:
        """``softmax`` (background first) or ``sigmoid`` (regions), as advseg.labels reads it."""
        return "sigmoid" if self.label_manager.has_regions else "softmax"

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.predict_case(image) for image in x])

    # -- the pieces, in nnU-Net's order ------------------------------------------------------

    def preprocess(self, image: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """``(C, *spatial)`` raw -> the network's input ``(C, *spatial')`` and what undoes it."""
        from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        forward = list(self.plans_manager.transpose_forward)
        data = image.permute(0, *[a + 1 for a in forward])
        spacing = [self.spacing[a] for a in forward]
        mask = create_nonzero_mask(data.detach().cpu().numpy())
        from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask

        bbox = get_bbox_from_mask(mask)
        crop = tuple(slice(a, b) for a, b in bbox)
        data = data[(slice(None), *crop)]
        inside = torch.as_tensor(mask[crop], device=data.device)
        data = self._normalise(data, inside)
        target = list(self.config.spacing)
        if len(target) < data.dim() - 1:
            target = [spacing[0], *target]
        cropped_shape = tuple(data.shape[1:])
        new_shape = tuple(int(s) for s in compute_new_shape(cropped_shape, spacing, target))
        if new_shape != cropped_shape:
            data = _ResampleExact.apply(
                data,
                new_shape,
                self.config.resampling_fn_data,
                {"current_spacing": spacing, "new_spacing": target},
            )
        undo = {
            "shape": tuple(image.shape[1:]),
            "transposed_shape": tuple(mask.shape),
            "crop": crop,
            "cropped_shape": cropped_shape,
            "spacing": spacing,
            "target": target,
        }
        return data, undo

    def _normalise(self, data: Tensor, inside: Tensor) -> Tensor:
        channels = []
        properties = self.plans_manager.foreground_intensity_properties_per_channel
        for c, scheme in enumerate(self.config.normalization_schemes):
            x = data[c]
            use_mask = bool(self.config.use_mask_for_norm[c])
            if scheme == "CTNormalization":
                p = properties[str(c)]
                x = x.clamp(float(p["percentile_00_5"]), float(p["percentile_99_5"]))
                x = (x - float(p["mean"])) / max(float(p["std"]), 1e-8)
            elif scheme == "ZScoreNormalization":
                if use_mask:
                    values = x[inside]
                    mean, std = values.mean(), values.std(unbiased=False)
                    x = torch.where(inside, (x - mean) / std.clamp_min(1e-8), x)
                else:
                    x = (x - x.mean()) / x.std(unbiased=False).clamp_min(1e-8)
            elif scheme == "RescaleTo01Normalization":
                x = x - x.min()
                x = x / x.max().clamp_min(1e-8)
            channels.append(x)
        return torch.stack(channels)

    def sliding_window(self, data: Tensor, network: nn.Module | None = None) -> Tensor:
        """Logits ``(K, *spatial')`` of the preprocessed ``data`` (in ``accumulate``'s dtype):
        windows, Gaussian blending, mirroring, nnU-Net's padding to the patch size (undone)."""
        from nnunetv2.inference.sliding_window_prediction import (
            compute_gaussian,
            compute_steps_for_sliding_window,
        )

        patch = tuple(int(p) for p in self.config.patch_size)
        per_slice = len(patch) < data.dim() - 1
        spatial = data.shape[2:] if per_slice else data.shape[1:]
        pads, revert = [], []
        for size, p in zip(spatial, patch, strict=True):
            total = max(p - size, 0)
            pads.append((total // 2, total - total // 2))
            revert.append(slice(total // 2, total // 2 + size))
        flat = [v for pair in reversed(pads) for v in pair]
        padded = F.pad(data, flat) if any(flat) else data
        padded_spatial = padded.shape[2:] if per_slice else padded.shape[1:]
        steps = compute_steps_for_sliding_window(tuple(padded_spatial), patch, self.step_size)
        gaussian = compute_gaussian(patch, 1.0 / 8, 10, device=torch.device("cpu"))
        gaussian = gaussian.to(device=data.device).clone()  # nnU-Net caches it: maybe made
        # under inference mode, which autograd cannot save
        corners = list(itertools.product(*steps))
        depths = range(padded.shape[1]) if per_slice else [None]
        heads = self.label_manager.num_segmentation_heads
        logits = padded.new_zeros((heads, *padded.shape[1:]), dtype=self.accumulate)
        weight = padded.new_zeros(padded.shape[1:], dtype=self.accumulate)
        windows = [(d, corner) for d in depths for corner in corners]
        for start in range(0, len(windows), self.window_batch):
            chunk = windows[start : start + self.window_batch]
            slicers = [self._slicer(d, corner, patch) for d, corner in chunk]
            batch = torch.stack([padded[(slice(None), *s)] for s in slicers])
            predicted = self._mirrored(batch, network or self.network) * gaussian
            for s, p in zip(slicers, predicted, strict=True):
                logits[(slice(None), *s)] += p
                weight[s] += gaussian
        logits = logits / weight
        return logits[(slice(None), *([slice(None)] if per_slice else []), *revert)]

    @staticmethod
    def _slicer(depth: int | None, corner: tuple[int, ...], patch: tuple[int, ...]) -> tuple:
        window = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
        return window if depth is None else (depth, *window)

    def _mirrored(self, batch: Tensor, network: nn.Module) -> Tensor:
        prediction = network(batch)
        axes = [a + 2 for a in self.mirror_axes]
        combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for dims in combos:
            prediction = prediction + torch.flip(network(torch.flip(batch, dims)), dims)
        return prediction / (len(combos) + 1)

    def postprocess(self, logits: Tensor, undo: dict[str, Any]) -> Tensor:
        """Logits on the preprocessed grid -> logits on the source grid (background outside
        the crop), in the reader's axis order."""
        if tuple(logits.shape[1:]) != undo["cropped_shape"]:
            logits = _ResampleExact.apply(
                logits,
                undo["cropped_shape"],
                self.config.resampling_fn_probabilities,
                {"current_spacing": undo["target"], "new_spacing": undo["spacing"]},
            )
        full = logits.new_full((logits.shape[0], *undo["transposed_shape"]), -_OUTSIDE_LOGIT)
        if not self.label_manager.has_regions:
            full[0] = _OUTSIDE_LOGIT
        full[(slice(None), *undo["crop"])] = logits
        backward = list(self.plans_manager.transpose_backward)
        return full.permute(0, *[a + 1 for a in backward])

    def predict_case(self, image: Tensor) -> Tensor:
        """One raw image ``(C, *spatial)`` -> logits ``(K, *spatial)``: every fold's logits
        averaged, as nnU-Net's ensemble of folds does."""
        data, undo = self.preprocess(image)
        total = None
        for network in self.networks:
            logits = self.sliding_window(data, network)
            total = logits if total is None else total + logits
        return self.postprocess((total / len(self.found.weights)).float(), undo)
