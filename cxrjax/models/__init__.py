"""Flax ViT family, variant registry and pretrained-weight loading."""

from cxrjax.models.pretrained import LoadReport, load_pretrained
from cxrjax.models.registry import (
    ModelSpec,
    count_params,
    create_model,
    flops_per_image,
    get_spec,
    list_models,
    model_kwargs,
)
from cxrjax.models.vit import VisionTransformer
from cxrjax.models.weights import CheckpointError, MissingCheckpointError

__all__ = [
    "CheckpointError",
    "LoadReport",
    "MissingCheckpointError",
    "ModelSpec",
    "VisionTransformer",
    "count_params",
    "create_model",
    "flops_per_image",
    "get_spec",
    "list_models",
    "load_pretrained",
    "model_kwargs",
]
