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


def center_teacher(
    logits: jax.Array, center: jax.Array, temperature: float | jax.Array, valid=None
) -> jax.Array:
    """Teacher targets (N, K) by DINOv1's centring: softmax((logits - center) / T) per row.

    DINOv2's `softmax_center_teacher` (its `train.centering: centering`): `center` (K,) is an EMA
    of the teacher's batch-mean scores (`updated_center`), so no prototype wins every sample,
    while the low temperature sharpens; unlike Sinkhorn-Knopp it does not make each batch use
    the prototypes equally. `valid` (N,) zeroes the targets of padding rows.
    """
    q = jax.nn.softmax((logits.astype(jnp.float32) - center) / temperature, axis=-1)
    return q if valid is None else q * valid.astype(jnp.float32)[:, None]


def updated_center(center: jax.Array, logits: jax.Array, momentum: float, valid=None) -> jax.Array:
    """DINOv1's `update_center`: momentum * center + (1 - momentum) * the batch mean of the
    teacher's raw (N, K) scores (the mean over `valid` rows only, when given)."""
    x = logits.astype(jnp.float32)
    if valid is None:
        mean = jnp.mean(x, axis=0)
    else:
        w = valid.astype(jnp.float32)
        mean = jnp.sum(x * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0)
    return momentum * center + (1 - momentum) * mean


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
    weights: jax.Array,
    num_images: int,
    student_temp: float,
) -> jax.Array:
    """iBOT's masked-patch loss over the masked patches gathered from a batch (DINOv2's
    `forward_masked`): per image the mean cross-entropy over its masked patches, then the mean
    over all `num_images` global crops (crops without a mask count as 0, as in DINOv2).

    student_patches (S, K) scores and teacher_targets (S, K) at the S gathered slots; weights
    (S,) is 1 / (masked patches of the slot's image) at real slots and 0 at padding.
    """
    ce = cross_entropy(teacher_targets, student_patches, student_temp)
    return jnp.sum(ce * weights) / num_images


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


def collapse_stats(teacher_scores: jax.Array, temperature: float | jax.Array) -> dict:
    """What shows a collapsing teacher, from its raw (N, K) CLS scores (before Sinkhorn-Knopp,
    which would hide a collapse by balancing the batch).

    `teacher_entropy`: the mean entropy of softmax(scores / T) over the prototypes, divided by
    log K: near 1 every sample gets the same flat distribution (uniform collapse).
    `prototype_usage`: the distinct argmax prototypes over the batch, as a fraction of min(N, K):
    near 0 every sample picks the same few prototypes (dominant-prototype collapse).
    """
    n, k = teacher_scores.shape
    log_p = jax.nn.log_softmax(teacher_scores.astype(jnp.float32) / temperature, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    counts = jnp.zeros(k, jnp.int32).at[jnp.argmax(teacher_scores, axis=-1)].add(1)
    return {
        "teacher_entropy": jnp.mean(entropy) / jnp.log(k),
        "prototype_usage": jnp.sum(counts > 0) / min(n, k),
    }


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
