"""The model zoo: the paper's five U-Nets (and any segmentation_models_pytorch model) by name.

Names are the interface (``advseg models`` lists them):

- ``unet``: the paper's plain U-Net, kernels 16 -> 256 (MONAI ``BasicUNet``, features
  ``(16, 32, 64, 128, 256, 16)``, 1.95M parameters with 3 channels in and 3 classes).
- ``unet-vgg13``: the paper's "VGG16" row. Its 18.44M parameters are those of a VGG13 U-Net, not a
  VGG16 one (23.75M); see FACTS.md §2. ``unet-vgg16`` is the VGG16 U-Net, offered for completeness.
- ``unet-resnext101`` (resnext101_32x8d, 95.76M), ``unet-effb7`` (67.10M), ``unetpp-effb7``
  (U-Net++, 68.16M): segmentation_models_pytorch, as in the paper.
- ``unet-tiny``: not from the paper; a 0.12M-parameter ``BasicUNet`` for tests and fast demos.
- ``smp:<Arch>:<encoder>``: any segmentation_models_pytorch model, e.g. ``smp:FPN:resnet34``.

Every model maps ``(B, C, H, W)`` images to ``(B, K, H, W)`` per-class logits. H and W must be
multiples of 32 for the encoder models and of 16 for the ``BasicUNet`` ones.

3D networks (:mod:`advseg.models.volumetric`, MONAI's): ``unet3d`` (nnU-Net's U-Net as
``DynUNet``), ``segresnet``, ``unetr``, ``swinunetr`` and ``unet3d-tiny`` map ``(B, C, D, H, W)``
to ``(B, K, D, H, W)``; ``ZooEntry.roi`` is the window a whole volume is predicted with
(:class:`advseg.inference.SlidingWindow`).

Pretrained encoders: ``encoder_weights="imagenet"`` lets segmentation_models_pytorch download them
(needs internet once; then from the local Hugging Face cache, with no request, and offline with no
cache: one line at once, :mod:`advseg.models.pretrained`); a path to a local safetensors file
holding the encoder's ``state_dict`` (keys as in ``model.encoder``, optionally prefixed
``encoder.``) loads them with no network at all. The ``model.safetensors`` files that
segmentation_models_pytorch itself downloads (Hugging Face repositories ``smp-
hub/<encoder>.imagenet``) have exactly that form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from advseg.catalogue import SMP_NAMES
from advseg.errors import UserError
from advseg.models.volumetric import build_volumetric
from advseg.registry import Registry


@dataclass(frozen=True)
class ZooEntry:
    """How to build one named model.

    Attributes:
        arch: ``BasicUNet`` (MONAI) or a segmentation_models_pytorch architecture (``Unet``, ...).
        encoder: the segmentation_models_pytorch encoder name; None for ``BasicUNet``.
        features: ``BasicUNet`` feature widths (six values); unused for encoder models; for the
            3D networks, see :func:`advseg.models.volumetric.build_volumetric`.
        description: one line for ``advseg models``, including the paper row it stands for.
        spatial_dims: 2 (slices ``(B, C, H, W)``) or 3 (volumes ``(B, C, D, H, W)``).
        roi: a 3D network's window for sliding-window inference (``advseg.inference``).
    """

    arch: str
    encoder: str | None = None
    features: tuple[int, ...] = ()
    description: str = ""
    spatial_dims: int = 2
    roi: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint needs to rebuild a model: its zoo name and its input/output sizes."""

    name: str
    in_channels: int
    classes: int


MODELS: Registry[ZooEntry] = Registry("model")

_PAPER_ENTRIES = {
    "unet": ZooEntry(
        "BasicUNet",
        features=(16, 32, 64, 128, 256, 16),
        description="paper's plain U-Net, kernels 16 -> 256 (MONAI BasicUNet)",
    ),
    "unet-vgg13": ZooEntry(
        "Unet",
        "vgg13",
        description="paper's 'VGG16 U-Net' row (18.44M): by its parameter count a VGG13 U-Net",
    ),
    "unet-vgg16": ZooEntry(
        "Unet", "vgg16", description="U-Net + VGG16 encoder (not the paper's row, see unet-vgg13)"
    ),
    "unet-resnext101": ZooEntry(
        "Unet", "resnext101_32x8d", description="paper's ResNeXt U-Net (resnext101_32x8d)"
    ),
    "unet-effb7": ZooEntry("Unet", "efficientnet-b7", description="paper's EfficientNet-B7 U-Net"),
    "unetpp-effb7": ZooEntry(
        "UnetPlusPlus", "efficientnet-b7", description="paper's EfficientNet-B7 U-Net++"
    ),
    "unet-tiny": ZooEntry(
        "BasicUNet",
        features=(4, 8, 16, 32, 64, 4),
        description="not from the paper: tiny BasicUNet (kernels 4 -> 64) for tests and demos",
    ),
}
_VOLUME_ENTRIES = {  # advseg.models.volumetric: MONAI's 3D networks
    "unet3d": ZooEntry(
        "DynUNet",
        features=(32, 64, 128, 256, 320, 320),
        description="3D, window 128^3: nnU-Net's 3d_fullres U-Net (MONAI DynUNet)",
        spatial_dims=3,
        roi=(128, 128, 128),
    ),
    "segresnet": ZooEntry(
        "SegResNet",
        features=(16,),
        description="3D, window 96^3: MONAI SegResNet (16 filters, blocks 1-2-2-4)",
        spatial_dims=3,
        roi=(96, 96, 96),
    ),
    "unetr": ZooEntry(
        "UNETR",
        features=(16,),
        description="3D, window 96^3 only: MONAI UNETR (ViT-B encoder, feature size 16)",
        spatial_dims=3,
        roi=(96, 96, 96),
    ),
    "swinunetr": ZooEntry(
        "SwinUNETR",
        features=(48,),
        description="3D, window 96^3: MONAI SwinUNETR (feature size 48)",
        spatial_dims=3,
        roi=(96, 96, 96),
    ),
    "unet3d-tiny": ZooEntry(
        "DynUNet",
        features=(4, 8, 16, 32),
        description="3D, window 32^3: tiny DynUNet (4 -> 32 features) for tests and demos",
        spatial_dims=3,
        roi=(32, 32, 32),
    ),
}
for _name, _entry in (_PAPER_ENTRIES | _VOLUME_ENTRIES).items():
    MODELS.register(_name, help=_entry.description)(_entry)

SMP_PREFIX = "smp:"

# Classifier heads that pretrained files carry and segmentation encoders drop
# (segmentation_models_pytorch removes the same ones when it loads ImageNet weights).
_HEAD_PREFIXES = ("fc.", "_fc.", "classifier.", "last_linear.", "head.")


def model_names() -> list[str]:
    """Every registered name (``smp:<Arch>:<encoder>`` names are open-ended and not listed)."""
    return MODELS.names()


def resolve(name: str) -> ZooEntry:
    """The zoo entry for ``name``: a registered name or ``smp:<Arch>:<encoder>``."""
    if not name.startswith(SMP_PREFIX):
        if name not in MODELS:
            raise UserError(f"{MODELS.unknown_message(name)}, or {SMP_NAMES}")
        return MODELS.get(name)
    parts = name.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise UserError(f"model {name!r}: expected smp:<Arch>:<encoder>, e.g. smp:Unet:resnet34")
    _, arch, encoder = parts
    import segmentation_models_pytorch as smp  # here, as MONAI below: imported when needed

    archs = {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}
    if arch not in archs:
        raise UserError(
            f"model {name!r}: unknown smp architecture {arch!r}; valid: {', '.join(archs)}"
        )
    encoders = smp.encoders.get_encoder_names()
    if encoder.startswith("tu-"):  # any timm model, through smp's timm-universal encoder
        import timm

        if not timm.is_model(encoder[3:]):
            raise UserError(
                f"model {name!r}: timm has no model {encoder[3:]!r} (see timm.list_models)"
            )
    elif encoder not in encoders:
        raise UserError(
            f"model {name!r}: unknown smp encoder {encoder!r}; valid: {', '.join(sorted(encoders))}"
        )
    return ZooEntry(arch, encoder, description=f"segmentation_models_pytorch {arch} + {encoder}")


def create_model(
    name: str,
    in_channels: int = 3,
    classes: int = 3,
    encoder_weights: str | Path | None = None,
) -> nn.Module:
    """Build a model by zoo name, randomly initialised or with a pretrained encoder.

    Args:
        name: a zoo name (``advseg models``) or ``smp:<Arch>:<encoder>``.
        in_channels: image channels C (3: grey copied to RGB, as the paper).
        classes: output channels K, one logit map per class.
        encoder_weights: None (random), ``"imagenet"`` (downloaded by
            segmentation_models_pytorch), or a local safetensors file of encoder weights.

    Returns:
        A module mapping ``(B, C, H, W)`` to logits ``(B, K, H, W)``; :func:`model_spec` gives
        back the name and sizes it was built with.

    Example:
        >>> model = create_model("unet-tiny", in_channels=3, classes=3)
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 3, 32, 32])
    """
    entry = resolve(name)
    if in_channels < 1 or classes < 1:
        raise UserError(f"model {name!r}: in_channels and classes must be >= 1")
    if entry.spatial_dims == 3:
        if encoder_weights is not None:
            raise UserError(f"model {name!r} has no pretrained encoder; drop encoder_weights")
        model = build_volumetric(entry.arch, entry.features, entry.roi, in_channels, classes)
    elif entry.arch == "BasicUNet":
        if encoder_weights is not None:
            raise UserError(f"model {name!r} has no pretrained encoder; drop encoder_weights")
        from monai.networks.nets import BasicUNet  # here: MONAI's package import is heavy

        model = BasicUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=classes, features=entry.features
        )
    elif encoder_weights is None or encoder_weights == "imagenet":
        model = _create_smp(name, entry, in_channels, classes, encoder_weights)
    else:
        # Build for 3 channels, load the RGB weights, then adapt the first convolution the way
        # segmentation_models_pytorch does for its own pretrained weights.
        model = _create_smp(name, entry, 3, classes, None)
        load_encoder_weights(model, encoder_weights)
        if in_channels != 3:
            if not hasattr(model.encoder, "set_in_channels"):
                raise UserError(f"model {name!r}: local encoder weights need in_channels 3")
            model.encoder.set_in_channels(in_channels, pretrained=True)
    model.advseg_spec = ModelSpec(name, in_channels, classes)
    return model


def _create_smp(
    name: str, entry: ZooEntry, in_channels: int, classes: int, weights: str | None
) -> nn.Module:
    import segmentation_models_pytorch as smp

    from advseg.models.pretrained import ensure_imagenet, quiet_hub

    cached = weights == "imagenet" and ensure_imagenet(name, str(entry.encoder))
    try:
        with quiet_hub(offline=cached):
            return smp.create_model(
                entry.arch,
                encoder_name=entry.encoder,
                encoder_weights=weights,
                in_channels=in_channels,
                classes=classes,
            )
    except (OSError, ConnectionError) as err:  # no network, or the download failed
        raise UserError(
            f"model {name!r}: cannot fetch {weights} weights ({err}); "
            "pass a local encoder weights file instead"
        ) from None
    except KeyError as err:  # smp has no such weights for this encoder
        raise UserError(f"model {name!r}: {err.args[0] if err.args else err}") from None


def load_encoder_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local safetensors file into ``model.encoder``; never touches the network.

    The file holds the encoder's ``state_dict`` (keys as in ``model.encoder``, or the whole
    model's keys with the ``encoder.`` prefix). Classifier-head keys (``fc.``, ``classifier.``, ...)
    are ignored, as segmentation_models_pytorch does; any other missing or extra key is an error.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _weights_file(path)
    try:
        state = _encoder_keys(load_file(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a safetensors file of encoder weights ({err})") from None
    expected = model.encoder.state_dict()
    _check_encoder_state(
        path,
        {k: tuple(v.shape) for k, v in state.items()},
        {k: tuple(v.shape) for k, v in expected.items()},
        type(model.encoder).__name__,
    )
    model.encoder.load_state_dict(state)


def check_encoder_weights(name: str, weights: str | Path | None) -> None:
    """Refuse what ``create_model(name, encoder_weights=weights)`` would refuse, reading no tensor.

    A model without an encoder given weights, a missing file, a file that is no safetensors file
    or that does not fit the encoder (keys and shapes, from the file's header; the model is built
    on the meta device) are each one :class:`UserError`; so is ``imagenet`` neither in the local
    cache nor reachable (:mod:`advseg.models.pretrained`); None passes. What a
    preflight check calls before any training starts.
    """
    if weights is None:
        return
    entry = resolve(name)
    if entry.arch == "BasicUNet" or entry.spatial_dims == 3:
        raise UserError(f"model {name!r} has no pretrained encoder; drop encoder_weights")
    if str(weights) == "imagenet":
        from advseg.models.pretrained import ensure_imagenet

        ensure_imagenet(name, str(entry.encoder))  # in the cache, or the hub reachable
        return
    from safetensors import SafetensorError, safe_open

    path = _weights_file(weights)
    try:
        with safe_open(path, framework="pt") as file:
            shapes = {k: tuple(file.get_slice(k).get_shape()) for k in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a safetensors file of encoder weights ({err})") from None
    with torch.device("meta"):
        model = _create_smp(name, entry, 3, 1, None)
    expected = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
    _check_encoder_state(path, _encoder_keys(shapes), expected, type(model.encoder).__name__)


def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: encoder weights file not found")
    return path


def _encoder_keys(state: dict) -> dict:
    """The encoder's entries of a state dict: ``encoder.`` prefixes cut, classifier heads left."""
    if any(key.startswith("encoder.") for key in state):
        state = {
            k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")
        }
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}


def _check_encoder_state(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    encoder: str,
) -> None:
    """Refuse a file whose keys or shapes differ from the encoder's, naming a few of them."""
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise UserError(
            f"{path}: does not match the {encoder} encoder "
            f"({len(missing)} missing keys, e.g. {missing[:2]}; {len(extra)} unexpected, "
            f"e.g. {extra[:2]})"
        )
    for key, shape in shapes.items():
        if shape != expected[key]:
            raise UserError(f"{path}: {key} has shape {shape}, the encoder expects {expected[key]}")


def model_spec(model: nn.Module) -> ModelSpec:
    """The zoo name and sizes a model was built with (by :func:`create_model`)."""
    model = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    spec = getattr(model, "advseg_spec", None)
    if spec is None:
        raise ValueError("model was not built by advseg.models.create_model; its name is unknown")
    return spec


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not), as the paper's "params" column."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``advseg models``."""

    name: str
    arch: str
    encoder: str | None
    params: int
    description: str


def model_info(name: str, in_channels: int = 3, classes: int = 3) -> ModelInfo:
    """Architecture and parameter count of a zoo model, built on the meta device (no memory).

    A network that cannot be built there (SwinUNETR reads a tensor's value while it is built) is
    built on the CPU, without gradients, and dropped.
    """
    entry = resolve(name)
    try:
        with torch.device("meta"):
            model = create_model(name, in_channels=in_channels, classes=classes)
    except (RuntimeError, NotImplementedError):
        with torch.no_grad():
            model = create_model(name, in_channels=in_channels, classes=classes)
    return ModelInfo(name, entry.arch, entry.encoder, count_parameters(model), entry.description)


def list_models(in_channels: int = 3, classes: int = 3) -> list[ModelInfo]:
    """Every registered model with its parameter count for the given sizes."""
    return [model_info(name, in_channels, classes) for name in model_names()]
