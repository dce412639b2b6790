"""A MONAI bundle (``configs/inference.json`` + ``models/model.pt``) as a differentiable function
from the raw image to logits on the image's own grid.

The bundle is read by ``monai.bundle.ConfigParser``, exactly as ``monai.bundle.run`` reads it:
``network_def`` (with ``models/model.pt`` loaded by ``torch.load(weights_only=True)``, strictly)
or ``models/model.ts`` (TorchScript), ``preprocessing``, ``inferer`` and ``postprocessing``.
:class:`BundleModel` runs, with gradients from the raw image:

1. the bundle's preprocessing after its reading transforms (``LoadImaged``,
   ``EnsureChannelFirstd``), MONAI's own transform objects on a ``MetaTensor`` carrying the
   case's affine (orientation, spacing, intensity scaling: all torch, all differentiable);
2. the bundle's inferer: a ``SlidingWindowInferer`` becomes :class:`~advseg.inference.SlidingWindow`
   with its roi, overlap, blend and sigma (equal to MONAI's, and its memory does not grow with the
   volume), a ``SimpleInferer`` calls the network, any other inferer runs as MONAI's own;
3. the way back to the source grid as the bundle's ``Invertd`` does it
   (``preprocessing.inverse``, differentiable), on probabilities when the bundle's postprocessing
   activates before it inverts (then the logits returned are ``log p`` for softmax, ``logit(p)``
   for sigmoid, so the engine's activation gives back the bundle's probabilities).

The perturbation is therefore added to the raw image in the source's units (HU for CT), before
the bundle's intensity scaling, as for nnU-Net. How the outputs are read (softmax or sigmoid) comes
from the postprocessing's ``Activationsd`` / ``AsDiscreted``; the classes from ``metadata.json``'s
``channel_def`` (or ``--classes``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advseg.errors import UserError

READING = ("LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst")


@dataclass
class Bundle:
    """A MONAI bundle, read.

    Attributes:
        root: the bundle's folder.
        network: the network in eval mode (``network_def`` with the weights, or the TorchScript).
        reading: the leading transforms that read a file (run once per case, no gradient).
        preprocessing: the remaining transforms (MONAI's ``Compose``), run with gradients.
        inferer: the inferer as the bundle configures it (MONAI's object).
        activation: ``softmax`` or ``sigmoid``.
        invert_probabilities: the postprocessing activates before it inverts.
        classes: the classes in output order (softmax: without channel 0, the background).
        weights: the weights file loaded.
        key: the image's key in the transforms (``image``).
    """

    root: Path
    network: nn.Module
    reading: Any
    preprocessing: Any
    inferer: Any
    activation: str
    invert_probabilities: bool
    classes: list[str]
    weights: Path
    key: str = "image"
    notes: list[str] = field(default_factory=list)

    def provenance(self) -> dict[str, Any]:
        """What the report says of the bundle: folder, weights and their hash, inferer."""
        from advseg.models.external.module import file_sha256

        return {
            "kind": "bundle",
            "bundle": str(self.root.resolve()),
            "config": "configs/inference.json",
            "weights": self.weights.name,
            "sha256": {self.weights.name: file_sha256(self.weights)},
            "classes": list(self.classes),
            "activation": self.activation,
            "inferer": type(self.inferer).__name__,
            "preprocessing": [type(t).__name__ for t in self.preprocessing.transforms],
        }


def read_bundle(
    root: str | Path, classes: list[str] | None = None, device: str | torch.device = "cpu"
) -> Bundle:
    """The bundle in ``root``: its network with weights, transforms, inferer and classes.

    Raises:
        UserError: no ``configs/inference.json``, no ``network_def`` (with ``model.pt``), no
            weights, weights that do not fit, no ``preprocessing``/``inferer``, a preprocessing
            that does not start by reading the image, or classes that cannot be told: one line.
    """
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    root = Path(root)
    config = root / "configs" / "inference.json"
    if not root.is_dir():
        raise UserError(f"--bundle {root}: no such directory")
    if not config.is_file():
        raise UserError(f"--bundle {root}: no configs/inference.json")
    parser = ConfigParser()
    meta = root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    try:
        parser.read_config(str(config))
    except Exception as error:
        raise UserError(f"{config}: not a readable bundle config ({_first(error)})") from None
    parser["bundle_root"] = str(root)
    where = f"--bundle {root}"
    network, weights = _network(parser, root, where, device)
    parts = {}
    for key in ("preprocessing", "inferer"):
        if key not in parser:
            raise UserError(f"{config}: no {key!r}")
        try:
            parts[key] = parser.get_parsed_content(key)
        except Exception as error:
            raise UserError(f"{config}: {key} cannot be built ({_first(error)})") from None
    transforms = list(getattr(parts["preprocessing"], "transforms", []))
    reading = [t for t in transforms[:2] if type(t).__name__ in READING]
    if not reading or type(reading[0]).__name__ not in ("LoadImaged", "LoadImage"):
        raise UserError(f"{config}: preprocessing does not start with LoadImaged (the image read)")
    keys = list(getattr(reading[0], "keys", ["image"]))
    post = parser.get_parsed_content("postprocessing") if "postprocessing" in parser else None
    activation, invert_probabilities = _activation(post, config)
    names = classes or _channel_names(parser, activation, config)
    network.to(device).eval()
    return Bundle(
        root=root,
        network=network,
        reading=Compose(reading),
        preprocessing=Compose(transforms[len(reading) :]),
        inferer=parts["inferer"],
        activation=activation,
        invert_probabilities=invert_probabilities,
        classes=list(names),
        weights=weights,
        key=str(keys[0]),
    )


def _first(error: BaseException) -> str:
    return ((str(error).strip().splitlines() or [type(error).__name__])[0])[:160]


def _network(parser, root: Path, where: str, device) -> tuple[nn.Module, Path]:
    """``network_def`` with ``models/model.pt`` (weights only, strict), else ``models/model.ts``."""
    pt, ts = root / "models" / "model.pt", root / "models" / "model.ts"
    if "network_def" not in parser:
        if ts.is_file():
            from advseg.models.external.module import load_torchscript

            return load_torchscript(ts, device), ts
        raise UserError(
            f"{where}: configs/inference.json has no network_def (and no models/model.ts)"
        )
    if not pt.is_file():
        if ts.is_file():
            from advseg.models.external.module import load_torchscript

            return load_torchscript(ts, device), ts
        raise UserError(f"{where}: no models/model.pt (or models/model.ts) with the weights")
    try:
        network = parser.get_parsed_content("network_def")
    except Exception as error:
        raise UserError(f"{where}: network_def cannot be built ({_first(error)})") from None
    if not isinstance(network, nn.Module):
        raise UserError(f"{where}: network_def is a {type(network).__name__}, not a module")
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{pt}: not readable with weights_only=True ({_first(error)})") from None
    for key in ("model", "state_dict", "network"):  # a CheckpointSaver's {"model": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{pt}: holds no state dict of tensors")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{pt}: tensor {name} holds NaN or infinite values")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:240]
        raise UserError(f"{pt}: does not fit network_def: {detail}") from None
    return network, pt


def _activation(post, config: Path) -> tuple[str, bool]:
    """``softmax``/``sigmoid`` from the postprocessing, and whether it activates before
    ``Invertd``."""
    transforms = list(getattr(post, "transforms", [])) if post is not None else []
    names = [type(t).__name__ for t in transforms]
    activation = None
    for t in transforms:
        if type(t).__name__ in ("Activationsd", "Activations"):
            activation = (
                "softmax" if _flag(t, "softmax") else "sigmoid" if _flag(t, "sigmoid") else None
            )
            break
    if activation is None:
        for t in transforms:
            if type(t).__name__ in ("AsDiscreted", "AsDiscrete"):
                activation = "softmax" if _flag(t, "argmax") else "sigmoid"
                break
    if activation is None:
        raise UserError(
            f"{config}: postprocessing has no Activationsd or AsDiscreted: cannot tell whether "
            "its outputs are read by softmax or sigmoid"
        )
    activated = next((i for i, n in enumerate(names) if n.startswith("Activations")), None)
    inverted = next((i for i, n in enumerate(names) if n == "Invertd"), None)
    return activation, activated is not None and inverted is not None and activated < inverted


def _flag(transform: Any, name: str) -> bool:
    """A MONAI transform's boolean option, a bool or (dictionary transforms) one per key."""
    value = getattr(transform, name, False)
    return any(value) if isinstance(value, (list, tuple)) else bool(value)


def _channel_names(parser, activation: str, config: Path) -> list[str]:
    """The classes from ``metadata.json``'s ``network_data_format.outputs.pred.channel_def``."""
    try:
        outputs = parser.get("_meta_", {}).get("network_data_format", {}).get("outputs", {})
        channels = next(iter(outputs.values())).get("channel_def", {})
    except (AttributeError, StopIteration):
        channels = {}
    if not channels:
        raise UserError(
            f"{config}: metadata.json names no output channels (channel_def): give --classes"
        )
    names = [str(channels[k]) for k in sorted(channels, key=int)]
    return names[1:] if activation == "softmax" else names


class BundleModel(nn.Module):
    """The bundle from the raw image ``(1, C, *S)`` (the reading transforms' output, in the
    source's units) to logits ``(1, K', *S)`` on the same grid (``K' = K + 1`` for softmax).

    ``meta`` is the case's ``MetaTensor`` metadata (affine, ...), set before each case by
    :class:`~advseg.models.external.bundle_cases.BundleCases`.
    """

    def __init__(self, bundle: Bundle) -> None:
        super().__init__()
        from monai.inferers import SimpleInferer, SlidingWindowInferer

        self.bundle = bundle
        self.network = bundle.network
        self.meta: dict[str, Any] = {}
        self.activation = bundle.activation
        inferer = bundle.inferer
        if isinstance(inferer, SlidingWindowInferer):
            self.infer = _sliding(inferer, self.network, bundle.root)
        elif isinstance(inferer, SimpleInferer):
            self.infer = self.network
        else:
            self.infer = _MonaiInferer(inferer, self.network)

    def forward(self, x: Tensor) -> Tensor:
        from monai.data import MetaTensor

        if x.shape[0] != 1:
            raise ValueError(f"a bundle's volumes go one at a time, got a batch of {x.shape[0]}")
        image = MetaTensor(x[0], meta=copy.deepcopy(self.meta))
        pre = self.bundle.preprocessing({self.bundle.key: image})[self.bundle.key]
        logits = self.infer(pre.as_tensor()[None] if isinstance(pre, MetaTensor) else pre[None])
        out = logits[0]
        if self.bundle.invert_probabilities:
            out = out.softmax(0) if self.activation == "softmax" else out.sigmoid()
        back = MetaTensor(
            out,
            meta=copy.deepcopy(pre.meta),
            applied_operations=copy.deepcopy(pre.applied_operations),
        )
        back = self.bundle.preprocessing.inverse({self.bundle.key: back})[self.bundle.key]
        back = back.as_tensor() if isinstance(back, MetaTensor) else back
        if self.bundle.invert_probabilities:
            tiny = torch.finfo(back.dtype).tiny
            if self.activation == "softmax":
                back = back.clamp_min(tiny).log()
            else:
                back = back.clamp(tiny, 1 - torch.finfo(back.dtype).eps).logit()
        return back[None]


def check_differentiable(bundle: Bundle, image: Tensor, meta: dict[str, Any]) -> None:
    """Refuse, in one line naming it, a preprocessing transform the gradient cannot pass (one
    that goes through numpy, or draws at random): run each on ``image`` (``(C, *S)``, the
    reading transforms' output) with the input requiring grad."""
    from monai.data import MetaTensor

    item = {bundle.key: MetaTensor(image.detach().clone().requires_grad_(True), meta=dict(meta))}
    for transform in bundle.preprocessing.transforms:
        item = transform(item)
        value = item[bundle.key]
        if not (isinstance(value, Tensor) and value.requires_grad):
            raise UserError(
                f"--bundle {bundle.root}: preprocessing transform {type(transform).__name__} "
                "stops the gradient (numpy or random): advseg cannot attack through it"
            )


def _sliding(inferer, network: nn.Module, root: Path) -> nn.Module:
    """advseg's :class:`~advseg.inference.SlidingWindow` configured as MONAI's inferer (refused
    in one line where it has an option advseg's does not reproduce)."""
    from advseg.inference import SlidingWindow

    where = f"--bundle {root}: inferer SlidingWindowInferer"
    overlap = inferer.overlap
    if isinstance(overlap, (list, tuple)):
        if len(set(overlap)) != 1:
            raise UserError(f"{where}: a different overlap per axis is not supported")
        overlap = overlap[0]
    mode = str(getattr(inferer.mode, "value", inferer.mode))
    padding = str(getattr(inferer.padding_mode, "value", inferer.padding_mode))
    if mode not in ("gaussian", "constant"):
        raise UserError(f"{where}: mode {mode!r} is not supported (gaussian or constant)")
    if padding != "constant" or float(inferer.cval) != 0.0:
        raise UserError(f"{where}: padding {padding!r} (cval {inferer.cval}) is not supported")
    sigma = inferer.sigma_scale
    if isinstance(sigma, (list, tuple)):
        if len(set(sigma)) != 1:
            raise UserError(f"{where}: a different sigma_scale per axis is not supported")
        sigma = sigma[0]
    roi = [int(r) for r in inferer.roi_size]
    if min(roi) < 1:
        raise UserError(f"{where}: roi_size {roi} with non-positive sizes is not supported")
    return SlidingWindow(
        network,
        roi,
        overlap=float(overlap),
        blend=mode,  # type: ignore[arg-type]
        sigma_scale=float(sigma),
        batch_size=int(inferer.sw_batch_size),
    )


class _MonaiInferer(nn.Module):
    """Any other MONAI inferer, as the bundle runs it (differentiable; its graph is MONAI's)."""

    def __init__(self, inferer, network: nn.Module) -> None:
        super().__init__()
        self.inferer, self.network = inferer, network

    def forward(self, x: Tensor) -> Tensor:
        return self.inferer(x, self.network)
