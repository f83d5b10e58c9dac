"""The DINOv2 objective's pieces, as pure functions of arrays (no parameters, no I/O).

Shapes are global: under `jax.jit` over the mesh a sum over the batch is a sum over every
device's rows, so Sinkhorn-Knopp and KoLeo see the whole global batch (DINOv2 all-reduces the
Sinkhorn-Knopp sums the same way; its KoLeo is per GPU, here per global crop of the global
batch).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def sinkhorn_knopp(
    logits: jax.Array, temperature: float | jax.Array, iterations: int = 3, valid=None
) -> jax.Array:
    """Teacher targets (N, K): exp(logits / T), alternately normalised over prototypes and samples.

    DINOv2's `sinkhorn_knopp_teacher`: Q = exp(s / T) as (K, N), divided by its total, then
    `iterations` times rows (prototypes) to 1/K each and columns (samples) to 1/N each, finally
    columns scaled back to sum to 1: every sample's target is a distribution, and prototypes are
    used about equally over the batch. `valid` (N,) excludes rows (padding) from every sum; their
    targets are zero.
    """
    x = logits.astype(jnp.float32) / temperature
    w = jnp.ones(x.shape[0], jnp.float32) if valid is None else valid.astype(jnp.float32)
    # A constant shift cancels in the first normalisation; it keeps exp finite.
    x = x - jnp.max(jnp.where(w[:, None] > 0, x, -jnp.inf))
    q = jnp.exp(x).T * w  # (K, N)
    n = jnp.maximum(jnp.sum(w), 1.0)
    k = q.shape[0]
    q = q / jnp.sum(q)
    for _ in range(iterations):
        q = q / jnp.sum(q, axis=1, keepdims=True) / k
        q = q / jnp.maximum(jnp.sum(q, axis=0, keepdims=True), 1e-30) / n
    return (q * n).T * w[:, None]


def cross_entropy(targets: jax.Array, student_logits: jax.Array, student_temp: float) -> jax.Array:
    """Per row -sum(t * log_softmax(s / T_s)): (..., K) -> (...)."""
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    return -jnp.sum(targets * log_p, axis=-1)


def dino_loss(
    student_global: jax.Array,
    student_local: jax.Array | None,
    teacher_targets: jax.Array,
    student_temp: float,
) -> jax.Array:
    """DINO's CLS loss: the mean over (student crop, teacher global crop) pairs of different
    views of the batch-mean cross-entropy.

    student_global (B, 2, K), student_local (B, N, K) or None, teacher_targets (B, 2, K). Each
    student global crop meets the teacher's other global crop (DINOv2 swaps them); each local
    crop meets both.
    """
    swapped = teacher_targets[:, ::-1]
    total = jnp.sum(jnp.mean(cross_entropy(swapped, student_global, student_temp), axis=0))
    pairs = student_global.shape[1]
    if student_local is not None:
        # (B, N, 1, K) against (B, 1, 2, K): every local crop with every teacher global crop.
        ce = cross_entropy(teacher_targets[:, None], student_local[:, :, None], student_temp)
        total = total + jnp.sum(jnp.mean(ce, axis=0))
        pairs += ce.shape[1] * ce.shape[2]
    return total / pairs


def ibot_loss(
    student_patches: jax.Array,
    teacher_targets: jax.Array,
    valid: jax.Array,
    student_temp: float,
) -> jax.Array:
    """iBOT's masked-patch loss: per image the mean cross-entropy over its masked patches, then
    the mean over images (images without a mask count as 0, as in DINOv2).

    student_patches (I, M, K) and teacher_targets (I, M, K) at the M gathered patch slots of each
    of I images; valid (I, M) marks the slots that are masked patches (the rest is padding).
    """
    ce = cross_entropy(teacher_targets, student_patches, student_temp)
    per_image = jnp.sum(ce * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)
    return jnp.mean(per_image)


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Kozachenko-Leonenko entropy estimate: -mean log(distance to the nearest other sample)
    of the L2-normalised rows of (N, D) `x` (DINOv2's `KoLeoLoss`)."""
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    similarity = x @ x.T
    similarity = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, similarity)
    nearest = jnp.argmax(similarity, axis=1)
    # torch's PairwiseDistance adds eps to the difference before the norm.
    distance = jnp.linalg.norm(x - x[nearest] + eps, axis=-1)
    return -jnp.mean(jnp.log(distance + eps))


def encode(
    model: nn.Module,
    params: Any,
    images: jax.Array,
    *,
    train: bool,
    rng: jax.Array | None = None,
    masks: jax.Array | None = None,
    mask_token: jax.Array | None = None,
) -> jax.Array:
    """All final-normed tokens (B, T, D) of the backbone, masked patches replaced when asked.

    The backbone is the fine-tuning `VisionTransformer` unchanged: its patch embedding's output
    is intercepted to put `mask_token` (D,) where `masks` (B, patches) is set (before the
    position embedding is added, as in DINOv2), and the tokens are read from `encoder_norm`.
    """

    def put_mask_token(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if masks is not None and module.name == "embedding" and isinstance(module, nn.Conv):
            m = masks.reshape(out.shape[:-1])[..., None]
            out = jnp.where(m, mask_token.astype(out.dtype), out)
        return out

    rngs = {"dropout": rng} if rng is not None else {}
    with nn.intercept_methods(put_mask_token):
        _, state = model.apply(
            {"params": params},
            images,
            train=train,
            rngs=rngs,
            capture_intermediates=lambda module, method: module.name == "encoder_norm",
            mutable=["intermediates"],
        )
    return state["intermediates"]["encoder_norm"]["__call__"][0]
