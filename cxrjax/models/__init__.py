"""Flax ViT family, variant registry and pretrained-weight loading."""

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

__all__ = [
    "ModelSpec",
    "VisionTransformer",
    "count_params",
    "create_model",
    "flops_per_image",
    "get_spec",
    "list_models",
    "model_kwargs",
]
