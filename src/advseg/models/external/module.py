"""A user's own network: a TorchScript file, or any ``nn.Module`` from a factory function.

Both are ordinary differentiable modules (TorchScript keeps autograd), so every attack works on
them unchanged. advseg knows nothing of how they were trained: the user declares the input
channels, the classes and the activation, and :func:`check_outputs` refuses a declaration that
the module's outputs contradict, with one line, before any work.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path

import torch
from torch import nn

from advseg.errors import UserError

FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_torchscript(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The TorchScript module saved in ``path`` (``torch.jit.save``), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--torchscript {path}: no such file")
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"--torchscript {path}: not a TorchScript module ({first[:160]})") from None
    if not isinstance(module, torch.jit.ScriptModule):
        raise UserError(f"--torchscript {path}: holds no TorchScript module")
    return module.eval()


def load_factory(
    spec: str, weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """``package.module:function()``'s module, with ``weights`` (a safetensors state dict) loaded
    strictly; every weight must be finite."""
    if not FACTORY_SPEC.match(spec):
        raise UserError(f"--model-factory {spec!r}: expected package.module:function")
    module_name, function_name = spec.split(":")
    try:
        found = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"--model-factory {spec}: cannot import {module_name} ({error})") from None
    factory = getattr(found, function_name, None)
    if not callable(factory):
        raise UserError(f"--model-factory {spec}: {module_name} has no function {function_name}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UserError(f"--model-factory {spec}: returned {type(model).__name__}, not a module")
    if weights is not None:
        load_weights(model, weights)
    return model.to(device).eval()


def load_weights(model: nn.Module, weights: str | Path) -> None:
    """Load a safetensors state dict into ``model``: names and shapes must match exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights)
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"--weights {path}: not a safetensors file ({error})") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"--weights {path}: tensor {name} holds NaN or infinite values")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:240]
        raise UserError(f"--weights {path}: does not fit the module: {detail}") from None


def check_outputs(
    model: nn.Module, in_channels: int, classes: list[str], activation: str, where: str,
    size: int = 64,
) -> None:  # fmt: skip
    """Refuse a declaration the module contradicts: one probe forward of zeros
    ``(1, in_channels, size, size)`` must give ``K`` (sigmoid) or ``K + 1`` (softmax) outputs."""
    expected = len(classes) + (1 if activation == "softmax" else 0)
    probe = torch.zeros(1, in_channels, size, size, device=_device(model))
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"{where}: does not take {in_channels} input channel(s) at {size}x{size} "
            f"(--in-channels): {first[:160]}"
        ) from None
    if isinstance(out, dict):
        out = out.get("out", next(iter(out.values())))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() != 4 or out.shape[1] != expected:
        raise UserError(
            f"{where}: gives {out.shape[1] if out.dim() > 1 else '?'} output channels, but "
            f"{len(classes)} classes with {activation} need {expected} (--classes, --activation)"
        )


def _device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (a model's provenance)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
