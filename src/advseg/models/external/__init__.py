"""Models advseg did not train: nnU-Net v2 results folders, MONAI bundles, TorchScript files and
a user's own module. Each yields an ordinary differentiable function from the image (in the
source's units for nnU-Net and bundles) to logits on the source's grid, so every attack works
on it unchanged.

- :mod:`.nnunet`: an nnU-Net v2 results folder and its exact inference, with gradients;
- :mod:`.nnunet_cases`: the raw data set it is judged on, read as nnU-Net reads it;
- :mod:`.bundle`: a MONAI bundle (``configs/inference.json``) and its inference, with gradients;
- :mod:`.bundle_cases`: the Decathlon-style folder it is judged on, read by its own reader;
- :mod:`.module`: ``torch.jit.load`` files and ``package.module:function`` factories with
  safetensors weights, with the classes and input channels the user declares.

:class:`ExternalConfig` is what ``advseg evaluate --nnunet / --bundle / --torchscript /
--model-factory`` (and an ``evaluate.yaml``) says about such a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from advseg.errors import UserError

KINDS = ("nnunet", "bundle", "torchscript", "factory")


@dataclass
class ExternalConfig:
    """A model advseg did not train.

    Attributes:
        kind: ``nnunet`` (a results folder), ``bundle`` (a MONAI bundle folder),
            ``torchscript`` (a ``torch.jit.save`` file) or
            ``factory`` (``package.module:function`` returning an ``nn.Module``).
        path: the folder, the file, or the factory's ``package.module:function``.
        weights: a safetensors state dict for a factory's module.
        configuration: nnU-Net's configuration (``2d``, ``3d_fullres``, ``3d_lowres``).
        folds: nnU-Net folds to average (empty: every fold found, as nnU-Net does).
        checkpoint: nnU-Net's checkpoint file name in each ``fold_X/``.
        mirroring: nnU-Net's test-time mirroring (its default: on).
        classes: a TorchScript or factory model's classes, in output order (the data's); for a
            bundle, optional: its classes where metadata.json's channel_def names none.
        in_channels: its input channels.
        activation: how its logits are read: ``sigmoid`` (K outputs) or ``softmax`` (K + 1,
            background first).
        size: the side its slices are resized to (advseg's preprocessing, values in [0, 1]).
    """

    kind: str
    path: str
    weights: str | None = None
    configuration: str = "3d_fullres"
    folds: list[str] = field(default_factory=list)
    checkpoint: str = "checkpoint_final.pth"
    mirroring: bool = True
    classes: list[str] = field(default_factory=list)
    in_channels: int = 1
    activation: str = "sigmoid"
    size: int = 224

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"external.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind not in ("nnunet", "bundle"):
            if not self.classes:
                raise UserError(f"--{self.flag} needs --classes (the outputs' classes)")
            if self.in_channels < 1:
                raise UserError(f"--in-channels: {self.in_channels} must be at least 1")
        if self.kind != "factory" and self.weights is not None:
            raise UserError("--weights goes with --model-factory only")

    @property
    def flag(self) -> str:
        """The option that names such a model: ``nnunet``, ``torchscript``, ``model-factory``."""
        return "model-factory" if self.kind == "factory" else self.kind

    @property
    def label(self) -> str:
        """The model's name in records: ``nnunet-3d_fullres-f0f1``, ``ts-model``, ..."""
        if self.kind == "nnunet":  # never "+": it joins defences and ensemble sources
            folds = "".join(f"f{fold}" for fold in self.folds) if self.folds else "fall"
            return f"nnunet-{self.configuration}-{folds}" + ("" if self.mirroring else "-nomirror")
        if self.kind == "torchscript":
            return f"ts-{Path(self.path).stem}"
        if self.kind == "bundle":
            return f"bundle-{Path(self.path).resolve().name}"
        return f"factory-{self.path.split(':')[-1]}"
