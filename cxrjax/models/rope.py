"""DINOv3's 2-D rotary position embedding (RoPE) on the patch tokens.

Each head's dimensions split in four quarters of frequencies: the first half of the rotated pairs
carries the patch row, the second the column, and the rotation is applied "rotate-half" style
(``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``), as in the official
DINOv3 code, timm's ``rope_type='dinov3'`` and transformers' ``DINOv3ViTModel``:

* patch centres are normalised per axis ("separate"): ``2 * (i + 0.5) / n - 1`` in [-1, 1], so
  any grid (any input size a multiple of the patch) is covered without resampling anything;
* periods are ``base ** (4 k / head_dim)`` for ``k < head_dim / 4`` (base 100), the angle of a
  coordinate ``c`` is ``2 pi c / period``.

Prefix tokens (CLS and the storage/register tokens) are not rotated. Training-time coordinate
augmentation (shift, jitter, rescale) is not reproduced: it only served DINOv3's pretraining.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def periods(head_dim: int, base: float) -> np.ndarray:
    """The (head_dim // 4,) float32 periods of DINOv3's RoPE (its ``rope_embed.periods``)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    exponent = np.arange(0, 1, 4 / head_dim, dtype=np.float32)
    return (np.float32(base) ** exponent).astype(np.float32)


@functools.lru_cache(maxsize=32)
def rope_tables(grid_h: int, grid_w: int, head_dim: int, base: float) -> tuple[np.ndarray, ...]:
    """(cos, sin), each (grid_h * grid_w, head_dim) float32, patches in row-major order.

    Computed in float32 in the same order of operations as the references, from static shapes,
    so inside a jitted forward pass they are constants.
    """
    coords_h = np.arange(0.5, grid_h, dtype=np.float32) / np.float32(grid_h)
    coords_w = np.arange(0.5, grid_w, dtype=np.float32) / np.float32(grid_w)
    coords = np.stack(np.meshgrid(coords_h, coords_w, indexing="ij"), axis=-1).reshape(-1, 2)
    coords = np.float32(2.0) * coords - np.float32(1.0)
    inv = (np.float32(1.0) / periods(head_dim, base)).astype(np.float32)
    angles = np.float32(2 * np.pi) * coords[:, :, None] * inv[None, None, :]
    angles = np.tile(angles.reshape(angles.shape[0], -1), (1, 2)).astype(np.float32)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates the last ``len(cos)`` tokens of (B, T, heads, head_dim) ``x``; the rest stay."""
    num_patches = cos.shape[0]
    prefix, patches = x[:, : x.shape[1] - num_patches], x[:, x.shape[1] - num_patches :]
    cos = cos[None, :, None, :].astype(x.dtype)
    sin = sin[None, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(patches, 2, axis=-1)
    rotated = patches * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return jnp.concatenate([prefix, rotated], axis=1)
