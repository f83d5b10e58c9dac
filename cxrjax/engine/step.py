"""The functions that run on the device: input normalisation, loss, train and predict steps.

No I/O here. Each factory closes over the model and constants and returns a pure function the
caller hands to `jax.jit` with its shardings (the trainer, the predictor, the benchmark).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrjax.data.device_augment import Augment, device_augment
from cxrjax.errors import ConfigError
from cxrjax.models import get_spec

NORMALIZATIONS = ("unit", "zscore", "pretrained")


def input_stats(normalization: str, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) applied to [0, 1] images: the one definition of each option.

    "unit": the study's [0, 1] inputs; "zscore": zero mean, unit variance (from scratch they
    train much faster); "pretrained": the statistics the variant's pretrained weights expect.
    """
    if normalization == "unit":
        return np.zeros(3, np.float32), np.ones(3, np.float32)
    if normalization == "zscore":
        # A histogram-equalised image is uniform on [0, 1]: mean 1/2, std 1/sqrt(12).
        return np.full(3, 0.5, np.float32), np.full(3, 12**-0.5, np.float32)
    if normalization == "pretrained":
        spec = get_spec(variant)
        return np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    raise ConfigError(
        f"config.input.normalization={normalization!r} is not an option",
        f"Use one of {NORMALIZATIONS}.",
    )


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """uint8 (B, H, W) grayscale -> float32 (B, H, W, 3): runs on the device, inside the step."""
    x = images.astype(jnp.float32)[..., None] / 255.0
    return (jnp.broadcast_to(x, (*x.shape[:-1], 3)) - mean) / std


def bce_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, pos_weight: jax.Array):
    """Binary cross-entropy with per-label `pos_weight`, averaged over known labels only."""
    logits = logits.astype(jnp.float32)
    per_entry = pos_weight * labels * jax.nn.softplus(-logits) + (1 - labels) * jax.nn.softplus(
        logits
    )
    return jnp.sum(per_entry * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def update_if_finite(finite: jax.Array, update: Callable[[dict], dict], state: dict) -> dict:
    """`update(state)` when `finite`, else `state` unchanged.

    A `lax.cond`, not a `jnp.where` over the two states: the select read the parameters and both
    Adam moments twice more and wrote them again every step (measured: about 1% of a ViT-S step
    on CPU), while the cond runs one branch and the untaken one costs nothing.
    """
    return jax.lax.cond(finite, update, lambda state: state, state)


def interleaved_micro_batches(batch: Any, accum_steps: int) -> Any:
    """`batch` with a leading micro-batch axis of `accum_steps`: micro-batch j takes rows j,
    j + k, ..., so every device keeps an equal share of each (a contiguous split would hand
    whole micro-batches to some devices)."""
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
        batch,
    )


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    mean: jax.Array,
    std: jax.Array,
    pos_weight: jax.Array,
    base_rng: jax.Array,
    *,
    accum_steps: int = 1,
    ema_decay: float = 0.0,
    augment: Augment | None = None,
    compute_sharding: Any = None,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """(state, batch) -> (state, metrics): grads over `accum_steps` micro-batches, update, EMA.

    `augment` moves the augmentation into the step (on the device, whole batch at once).
    `compute_sharding` (FSDP: replicated): the sharding the forward and backward passes see the
    parameters in. Under FSDP without it XLA's propagation meets weights split on the data axis
    and the batch split on the same axis, and gathers activations (measured on 4 CPU devices,
    ViT-S/16: 384 all-gathers and 100 all-to-alls, 2.8x the minimum bytes); with it the sharded
    parameters are gathered once per step, the batch stays split and the gradients return to
    the parameters' shards.

    A non-finite loss or gradient leaves the state untouched (the step is skipped) and is
    reported in the metrics; the loop decides whether to stop or go on.
    """

    def grads_of(params, batch, rng):
        if compute_sharding is not None:
            params = jax.lax.with_sharding_constraint(params, compute_sharding)

        def loss_fn(params):
            images = normalize(batch["image"], mean, std)
            logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
            return bce_loss(logits, batch["labels"], batch["mask"], pos_weight)

        return jax.value_and_grad(loss_fn)(params)

    def accumulated(params, batch, rng):
        micro = interleaved_micro_batches(batch, accum_steps)

        def body(carry, inputs):
            loss_sum, grad_sum = carry
            j, chunk = inputs
            loss, grads = grads_of(params, chunk, jax.random.fold_in(rng, j))
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss, grads), _ = jax.lax.scan(
            body, (jnp.zeros(()), zeros), (jnp.arange(accum_steps), micro)
        )
        return loss / accum_steps, jax.tree.map(lambda g: g / accum_steps, grads)

    def train_step(state, batch):
        rng, augment_rng = jax.random.split(jax.random.fold_in(base_rng, state["step"]))
        batch = {k: batch[k] for k in ("image", "labels", "mask")}
        if augment is not None:
            batch["image"] = device_augment(batch["image"], augment_rng, augment)
        if accum_steps > 1:
            loss, grads = accumulated(state["params"], batch, rng)
        else:
            loss, grads = grads_of(state["params"], batch, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state):
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            new_state = {**state, "params": params, "opt_state": opt_state}
            if ema_decay:
                new_state["ema"] = jax.tree.map(
                    lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], params
                )
            return new_state

        new_state = update_if_finite(finite, update, state)
        new_state["step"] = state["step"] + 1
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return train_step


def forward(model, params: Any, inputs: jax.Array) -> dict[str, jax.Array]:
    """The evaluation forward pass of normalised float (B, H, W, 3) inputs.

    Returns float32 "probs" (sigmoid), "logits" and "features" (the normed CLS token). It serves
    prediction, evaluation and embedding alike, so features and probabilities always come from
    the same computation.
    """
    logits, features = model.apply({"params": params}, inputs, train=False, return_features=True)
    return {
        "probs": jax.nn.sigmoid(logits.astype(jnp.float32)),
        "logits": logits.astype(jnp.float32),
        "features": features.astype(jnp.float32),
    }


def make_predict_step(model, mean: jax.Array, std: jax.Array) -> Callable[[Any, jax.Array], dict]:
    """(params, uint8 images (B, H, W)) -> `forward`'s outputs, normalised on the device."""

    def predict_step(params, images):
        return forward(model, params, normalize(images, mean, std))

    return predict_step


def make_heatmap_step(model, mean: jax.Array, std: jax.Array) -> Callable[[Any, jax.Array], dict]:
    """Like `make_predict_step`, plus the attention rollout of the CLS token over the patches.

    The probabilities come from the same forward pass that captures the attention.
    """
    from cxrjax.evaluation import rollout

    if not model.class_token:
        raise ConfigError(
            "attention rollout follows the CLS token, and this model has none (SigLIP pools "
            "with an attention head)",
            "Predict without --heatmap.",
        )
    num_prefix = model.num_prefix_tokens

    def heatmap_step(params, images):
        logits, attentions = rollout.layer_attentions(model, params, normalize(images, mean, std))
        grid = (images.shape[1] // model.patch_size, images.shape[2] // model.patch_size)
        maps = rollout.cls_patch_map(rollout.rollout(attentions), num_prefix, grid)
        return {"probs": jax.nn.sigmoid(logits.astype(jnp.float32)), "heatmap": maps}

    return heatmap_step
