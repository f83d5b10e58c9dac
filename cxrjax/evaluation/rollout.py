"""Attention rollout (Abnar & Zuidema 2020) for the ViT, and its overlay on the input image.

The model attends through `cxrjax.models.attention`, whose kernels never materialise the
normalised probabilities (cuDNN's fused kernel on GPU; the XLA form normalises after the product
with the values), so they cannot simply be captured. Instead the `query` and `key` projections of
every block are captured (Flax `capture_intermediates`) and `attention_probs` recomputes the
softmax from the same scores the model computes.

Rollout: per layer, average the attention over heads, add the identity (the residual stream),
renormalise the rows, and multiply the layers through (last layer on the left). The CLS row of
the product, restricted to the patch tokens, says how much each patch fed the classification.
Token order is the model's: CLS, then any register tokens, then the patches row-major.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from PIL import Image

from cxrjax.models.attention import attention_probs
from cxrjax.models.vit import Attention


def _is_query_or_key(module: nn.Module, method_name: str) -> bool:
    return (
        method_name == "__call__"
        and module.name in ("query", "key")
        and isinstance(module.parent, Attention)
    )


def layer_attentions(model: nn.Module, params: Any, images: jax.Array) -> tuple[jax.Array, Any]:
    """Logits and the head-averaged attention of every block, (L, B, T, T), first block first.

    `images` are the normalised float (B, H, W, 3) inputs the model takes. Averaging over heads
    inside the same traced function keeps only (B, T, T) per layer alive, not (B, H, T, T).
    """
    logits, state = model.apply(
        {"params": params},
        images,
        train=False,
        capture_intermediates=_is_query_or_key,
        mutable=["intermediates"],
    )
    captured = state["intermediates"]
    blocks = sorted((n for n in captured if n.startswith("block_")), key=lambda n: int(n[6:]))
    if not blocks:
        raise ValueError("captured no attention blocks: is this a cxrjax VisionTransformer?")
    per_layer = []
    for name in blocks:
        attn = captured[name]["attn"]
        probs = attention_probs(attn["query"]["__call__"][0], attn["key"]["__call__"][0])
        per_layer.append(probs.mean(axis=1))
    return logits, jnp.stack(per_layer)


def rollout(attentions: jax.Array) -> jax.Array:
    """(L, B, T, T) head-averaged, row-stochastic attention -> (B, T, T) joint attention.

    Each layer becomes (A + I) with rows renormalised, i.e. 0.5 A + 0.5 I for row-stochastic A,
    and joint = A_L ... A_1, so every row of the result sums to 1.
    """
    tokens = attentions.shape[-1]
    eye = jnp.eye(tokens, dtype=jnp.float32)
    mixed = attentions.astype(jnp.float32) + eye
    mixed = mixed / mixed.sum(axis=-1, keepdims=True)

    def step(joint: jax.Array, layer: jax.Array) -> tuple[jax.Array, None]:
        # HIGHEST: accelerators otherwise multiply float32 in reduced precision, and the
        # errors compound over the depth of the model.
        return jnp.einsum("bij,bjk->bik", layer, joint, precision="highest"), None

    start = jnp.broadcast_to(eye, attentions.shape[1:])
    joint, _ = jax.lax.scan(step, start, mixed)
    return joint


def cls_patch_map(joint: jax.Array, num_prefix: int, grid: tuple[int, int]) -> jax.Array:
    """The CLS row of the joint attention over the patch tokens, as a (B, gh, gw) grid.

    num_prefix: tokens before the patches (1 for CLS plus the number of register tokens).
    """
    patches = joint[:, 0, num_prefix:]
    if patches.shape[-1] != grid[0] * grid[1]:
        raise ValueError(
            f"{patches.shape[-1]} patch tokens after {num_prefix} prefix tokens do not form a "
            f"{grid[0]}x{grid[1]} grid"
        )
    return patches.reshape(patches.shape[0], *grid)


def overlay(gray: np.ndarray, patch_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blends a colour-mapped, bilinearly upsampled patch map onto a uint8 (H, W) image.

    The map is min-max scaled per image (rollout magnitudes are only comparable within one
    image); a constant map shows as the colormap's lowest colour. Returns (H, W, 3) uint8.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"overlay needs a uint8 (H, W) image, got {gray.dtype} {gray.shape}")
    height, width = gray.shape
    heat = np.asarray(
        Image.fromarray(np.asarray(patch_map, np.float32)).resize(
            (width, height), Image.Resampling.BILINEAR
        )
    )
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    colours = matplotlib.colormaps["jet"](heat)[..., :3]
    base = gray.astype(np.float32)[..., None] / 255.0
    blended = (1.0 - alpha) * base + alpha * colours
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
