"""The DINO projection head: an MLP to a bottleneck, then gained cosine scores against K prototypes.

As DINOv2's `DINOHead`: `nlayers` Dense layers with GELU (in -> hidden -> ... -> bottleneck),
the bottleneck L2-normalised, then DINOv2's last layer: a Linear without bias under
`weight_norm`, row k = g_k v_k / |v_k|. The prototypes v are the columns of `prototypes`
(bottleneck, K) and g is `gain` (K,): filled with 1 at init as DINOv2 does, and trainable as in
DINOv2 and RAD-DINO (whose released head `cxrjax.models.convert` turns into these two arrays),
so a score is g_k times a cosine. The teacher's softmax at temperature 0.04 stays finite through
Sinkhorn-Knopp's max shift.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


class DINOHead(nn.Module):
    """(..., D) features -> (..., num_prototypes) float32 scores (gain x cosine)."""

    num_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(self.dtype)
        widths = [self.hidden_dim] * (self.nlayers - 1) + [self.bottleneck_dim]
        for i, width in enumerate(widths):
            x = nn.Dense(width, dtype=self.dtype, kernel_init=_trunc_normal, name=f"mlp_{i}")(x)
            if i < len(widths) - 1:
                x = nn.gelu(x, approximate=False)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        v = self.param(
            "prototypes", _trunc_normal, (self.bottleneck_dim, self.num_prototypes), jnp.float32
        )
        gain = self.param("gain", nn.initializers.ones, (self.num_prototypes,), jnp.float32)
        v = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        cosine = jnp.dot(x.astype(self.dtype), v.astype(self.dtype)).astype(jnp.float32)
        return cosine * gain
