"""The DINO projection head: an MLP to a bottleneck, then cosine scores against K prototypes.

As DINOv2's `DINOHead`: `nlayers` Dense layers with GELU (in -> hidden -> ... -> bottleneck),
the bottleneck L2-normalised, then a weight-normalised linear layer without bias whose columns
are the prototypes. The weight-norm gain is fixed at 1 (DINOv2 fills it with 1), so every
prototype is a unit vector and a score is a cosine in [-1, 1]: the teacher's softmax at
temperature 0.04 stays finite without a max-shift.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


class DINOHead(nn.Module):
    """(..., D) features -> (..., num_prototypes) float32 cosine scores."""

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
        v = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        return jnp.dot(x.astype(self.dtype), v.astype(self.dtype)).astype(jnp.float32)
