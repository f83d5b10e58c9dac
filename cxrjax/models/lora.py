"""Dense projections with optional LoRA adapters, and merging the adapters into plain weights.

LoRA (Hu et al. 2021) adds ``scale * (x @ lora_a) @ lora_b`` to a frozen projection, with
``scale = alpha / rank``. ``lora_b`` starts at zero, so a freshly adapted model computes exactly
what the base model computes; the base kernel and bias are wrapped in ``stop_gradient`` so the
backward pass skips their (large) weight gradients. After training, :func:`merge_lora` folds the
adapters into the kernels: the merged tree is an ordinary cxrjax parameter tree that any model
without adapters loads (export, inference, conversion of a run).

:class:`Projection` keeps :class:`flax.linen.DenseGeneral`'s parameter names, shapes,
initialisation and arithmetic, so the trees of models without LoRA are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.models.rope import apply_rope

LORA_TARGETS = ("query", "key", "value", "out", "fc1", "fc2")
_LORA_KEYS = ("lora_a", "lora_b")

Initializer = Callable[..., jnp.ndarray]


class Projection(nn.Module):
    """``DenseGeneral`` over ``axis`` to ``features``, plus LoRA and DINOv3's RoPE when asked.

    ``rope=(cos, sin)`` rotates the output's patch tokens (query and key only); applying it here
    keeps the rotated projection the module's output, which attention rollout captures.
    """

    features: tuple[int, ...]
    axis: tuple[int, ...] = (-1,)
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    lora_rank: int = 0
    lora_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None = None
    ) -> jnp.ndarray:
        axis = tuple(a % x.ndim for a in self.axis)
        in_shape = tuple(x.shape[a] for a in axis)
        n_in = int(np.prod(in_shape))
        n_out = int(np.prod(self.features))

        def flat_init(init: Initializer, flat: tuple[int, ...]) -> Initializer:
            # DenseGeneral initialises the flattened 2-D kernel, then reshapes it.
            return lambda rng, shape, dtype=jnp.float32: jnp.reshape(init(rng, flat, dtype), shape)

        kernel = self.param(
            "kernel", flat_init(self.kernel_init, (n_in, n_out)), in_shape + self.features
        )
        bias = None
        if self.use_bias:
            bias = self.param("bias", flat_init(self.bias_init, (n_out,)), self.features)
        if self.lora_rank:
            kernel = jax.lax.stop_gradient(kernel)
            bias = None if bias is None else jax.lax.stop_gradient(bias)
        contract = (axis, tuple(range(len(axis))))
        xc = x.astype(self.dtype)
        y = jax.lax.dot_general(xc, kernel.astype(self.dtype), (contract, ((), ())))
        if bias is not None:
            y += jnp.reshape(
                bias.astype(self.dtype), (1,) * (y.ndim - len(self.features)) + bias.shape
            )
        if self.lora_rank:
            # PEFT's initialisation: A like a default torch Linear (kaiming-uniform), B zero.
            a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
            lora_a = self.param(
                "lora_a", flat_init(a_init, (n_in, self.lora_rank)), in_shape + (self.lora_rank,)
            )
            lora_b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, *self.features))
            h = jax.lax.dot_general(xc, lora_a.astype(self.dtype), (contract, ((), ())))
            h = jnp.tensordot(h, lora_b.astype(self.dtype), axes=1)
            y = y + jnp.asarray(self.lora_scale, self.dtype) * h
        if rope is not None:
            y = apply_rope(y, *rope)
        return y


def lora_scale(rank: int, alpha: float | None) -> float:
    """``alpha / rank``; ``alpha=None`` means alpha = rank (scale 1)."""
    return 1.0 if alpha is None else float(alpha) / rank


def is_lora_param(path: tuple[str, ...]) -> bool:
    return bool(path) and path[-1] in _LORA_KEYS


def merge_lora(params: Mapping[str, Any], alpha: float | None = None) -> dict[str, Any]:
    """``params`` with every adapter folded into its kernel and the ``lora_*`` leaves removed.

    ``alpha`` must be the value the model was trained with (``None``: alpha = rank). The merge
    runs in float64 on the host and stores float32, so the merged model equals the adapted one
    to float32 rounding.
    """

    def merge(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        if "lora_a" not in node:
            return {k: merge(v) for k, v in node.items()}
        a = np.asarray(node["lora_a"], np.float64)
        b = np.asarray(node["lora_b"], np.float64)
        kernel = np.asarray(node["kernel"])
        scale = lora_scale(a.shape[-1], alpha)
        delta = np.tensordot(a, b, axes=1) * scale
        out = {k: v for k, v in node.items() if k not in _LORA_KEYS}
        out["kernel"] = (kernel.astype(np.float64) + delta).astype(kernel.dtype)
        return out

    return merge(params)
