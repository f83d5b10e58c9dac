"""Position-embedding resampling that reproduces PyTorch's `F.interpolate(mode="bicubic")` exactly.

Pretrained ViTs store position embeddings for one patch grid; running them at another resolution
needs the same resampling their own code applies, or converted models drift from the originals.
Three conventions exist and all are implemented as exact separable weight matrices:

* ``"dinov2"``: the official DINOv2 code: bicubic (A=-0.75), no antialiasing, coordinates mapped
  with ``scale_factor = (new + 0.1) / old`` (the historical ``interpolate_offset`` kludge).
* ``"hf"``: Hugging Face transformers (5.x) ViT/DINOv2: bicubic, no antialiasing, output size.
* ``"timm"``: timm's ``resample_abs_pos_embed``: bicubic with ``antialias=True`` and an explicit
  output size; PyTorch's antialiased bicubic is the PIL-style filter (A=-0.5) whose support widens
  when downsampling.
* ``"siglip2"``: transformers' ``Siglip2VisionModel``: bilinear with ``antialias=True`` (a
  triangle filter, widened the same way when downsampling).

Weights are built in numpy from static shapes, so resampling inside a jitted forward pass is a
pair of small matmuls and is differentiable.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

RESAMPLE_METHODS = ("dinov2", "hf", "timm", "siglip2")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x <= 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


def _bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None) -> np.ndarray:
    """PyTorch's upsample_bicubic2d (align_corners=False, no antialias) along one axis."""
    # PyTorch maps destination to source coordinates with 1/scale_factor when a scale factor is
    # given, otherwise with in/out; cubic sources are not clamped at 0, only the taps are.
    scale = 1.0 / scale_factor if scale_factor is not None else in_size / out_size
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        taps = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
        for k, wk in enumerate(taps):
            w[i, min(max(x0 - 1 + k, 0), in_size - 1)] += wk
    return w


def _antialias_matrix(in_size: int, out_size: int, cubic: bool) -> np.ndarray:
    """PyTorch's antialiased bicubic (PIL filter, A=-0.5) or bilinear along one axis."""
    scale = in_size / out_size
    width = 2.0 if cubic else 1.0
    support = width * scale if scale >= 1.0 else width
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        # int() truncates toward zero, as the C++ static_cast does.
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        j = np.arange(xmin, xmax)
        x = (j - center + 0.5) * invscale
        taps = _cubic(x, -0.5) if cubic else np.maximum(0.0, 1.0 - np.abs(x))
        total = taps.sum()
        w[i, xmin:xmax] = taps / total if total != 0.0 else taps
    return w


@functools.lru_cache(maxsize=64)
def resample_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """Returns the (out_size, in_size) float32 matrix that resamples one grid axis."""
    if method == "dinov2":
        return _bicubic_matrix(in_size, out_size, (out_size + 0.1) / in_size).astype(np.float32)
    if method == "hf":
        return _bicubic_matrix(in_size, out_size, None).astype(np.float32)
    if method in ("timm", "siglip2"):
        return _antialias_matrix(in_size, out_size, cubic=method == "timm").astype(np.float32)
    raise ValueError(
        f"Unknown position-embedding resample method {method!r}; use {RESAMPLE_METHODS}"
    )


def resample_grid(
    grid: jnp.ndarray | np.ndarray, new_hw: tuple[int, int], method: str
) -> jnp.ndarray | np.ndarray:
    """Resamples a (..., H, W, D) grid of embeddings to (..., new_h, new_w, D).

    numpy in, numpy out (used when loading checkpoints); jax in, jax out (inside the model).
    The identity case returns the input unchanged, as the references skip interpolation then.
    """
    h, w = grid.shape[-3], grid.shape[-2]
    if (h, w) == tuple(new_hw):
        return grid
    wh = resample_matrix(h, new_hw[0], method)
    ww = resample_matrix(w, new_hw[1], method)
    if isinstance(grid, np.ndarray):
        out = np.einsum("ih,...hwd->...iwd", wh, grid.astype(np.float32))
        return np.einsum("jw,...iwd->...ijd", ww, out).astype(grid.dtype)
    dtype = grid.dtype
    out = jnp.einsum("ih,...hwd->...iwd", wh, grid.astype(jnp.float32))
    return jnp.einsum("jw,...iwd->...ijd", ww, out).astype(dtype)


def resample_posemb(
    posemb: np.ndarray | jnp.ndarray,
    num_prefix: int,
    new_hw: tuple[int, int],
    method: str,
    old_hw: tuple[int, int] | None = None,
) -> np.ndarray | jnp.ndarray:
    """Resamples a (1, num_prefix + H*W, D) position embedding; prefix tokens are kept as is."""
    prefix, patches = posemb[:, :num_prefix], posemb[:, num_prefix:]
    n = patches.shape[1]
    if old_hw is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(
                f"Position embedding has {n} patch positions, not a square grid; pass old_hw."
            )
        old_hw = (side, side)
    grid = patches.reshape(patches.shape[0], old_hw[0], old_hw[1], patches.shape[-1])
    grid = resample_grid(grid, new_hw, method)
    flat = grid.reshape(grid.shape[0], new_hw[0] * new_hw[1], grid.shape[-1])
    cat = np.concatenate if isinstance(flat, np.ndarray) else jnp.concatenate
    return cat([prefix, flat], axis=1)
