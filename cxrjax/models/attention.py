"""Scaled dot-product attention: cuDNN's flash kernel on request, otherwise XLA operations.

The XLA form normalises after the product with the values: ``(exp(s - max) @ v) / rowsum``
equals ``softmax(s) @ v`` exactly in real arithmetic (the subtracted row maximum is a constant
that cancels, so it carries no gradient), as flash-attention kernels do. Its backward pass is
cheaper than that of a softmax followed by the product: on the 2-core CPU machine one ViT-S/16
attention (batch 16, 197 tokens, 6 heads) takes 55 ms forward + backward against 84 ms through
``jax.nn.dot_product_attention``'s XLA path (timm's fused CPU kernel: 36 ms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cxrjax.errors import ConfigError

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def dot_product_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, implementation: str = "xla"
) -> jax.Array:
    """Attention over (B, T, heads, head_dim) arrays, as ``jax.nn.dot_product_attention``.

    ``implementation="cudnn"`` calls cuDNN's fused kernel (GPU, bf16/fp16); "xla" computes it
    with ordinary operations, the scores and their sums in float32.
    """
    if implementation not in ("xla", "cudnn"):
        raise ConfigError(
            f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}",
            "Set config.model.attention_impl to auto, xla or cudnn.",
        )
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")
    scores = _scores(query, key)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    v = jnp.swapaxes(value, 1, 2)
    out = jnp.einsum(
        "bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    out = out / weights.sum(-1, keepdims=True)
    return jnp.swapaxes(out, 1, 2).astype(query.dtype)


def attention_probs(query: jax.Array, key: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) of (B, T, heads, head_dim) -> (B, heads, T, T) float32:
    the weights the XLA form multiplies the values by (before it normalises)."""
    return jax.nn.softmax(_scores(query, key), axis=-1)


def _scores(query: jax.Array, key: jax.Array) -> jax.Array:
    q, k = (jnp.swapaxes(t, 1, 2) for t in (query, key))  # (B, heads, T, head_dim)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # scaling T x head_dim, not T x T
    return jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
