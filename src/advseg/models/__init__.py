"""Segmentation models by name, and their checkpoints (safetensors + JSON, never pickle)."""

from advseg.models.checkpoint import (
    CheckpointMeta,
    check_compatible,
    load_checkpoint,
    metadata_for,
    read_checkpoint,
    save_checkpoint,
)
from advseg.models.zoo import (
    MODELS,
    ModelInfo,
    ModelSpec,
    count_parameters,
    create_model,
    list_models,
    model_info,
    model_names,
    model_spec,
)

__all__ = [
    "MODELS",
    "CheckpointMeta",
    "ModelInfo",
    "ModelSpec",
    "check_compatible",
    "count_parameters",
    "create_model",
    "list_models",
    "load_checkpoint",
    "metadata_for",
    "model_info",
    "model_names",
    "model_spec",
    "read_checkpoint",
    "save_checkpoint",
]
