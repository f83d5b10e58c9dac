"""The optimizer from the config: AdamW (the study's lr 1e-5, no weight decay, constant) by default.

Options: warmup + cosine schedule, gradient clipping, layer-wise learning-rate decay (ViT blocks
named `block_N`, as cxrjax's ViT names them), a frozen backbone (linear probe: only `head` is
trained), and LoRA (`config.model.lora_rank > 0`: only the `lora_a`/`lora_b` adapters and the head
are trained; the model must be built with the same `lora_*` fields so that the adapters exist).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cxrjax.errors import ConfigError
from cxrjax.models.lora import is_lora_param


def learning_rate(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    if config.schedule == "constant":
        return optax.constant_schedule(config.lr)
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.lr, min(config.warmup_steps, max(total_steps - 1, 0)), max(total_steps, 1)
        )
    raise ConfigError(f"config.schedule={config.schedule!r}: use 'constant' or 'warmup_cosine'")


def _layer_id(path: tuple[str, ...], depth: int) -> int:
    """0 for the embeddings, i + 1 for block_i, depth + 1 for the final norm and the head."""
    for name in path:
        match = re.fullmatch(r"block_(\d+)", name)
        if match:
            return int(match.group(1)) + 1
    if path[0] in ("embedding", "cls", "pos_embedding", "registers"):
        return 0
    return depth + 1


def _names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(key, "key", key)) for key in path)


def layer_decay_scales(params: Any, decay: float) -> Any:
    """Per-parameter learning-rate factors: decay ** (distance from the head)."""
    depth = sum(1 for name in params if re.fullmatch(r"block_\d+", name))
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decay ** (depth + 1 - _layer_id(_names(path), depth)), params
    )


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int, params: Any = None
) -> optax.GradientTransformation:
    """AdamW with the configured extras; `params` (or their shapes) is needed for layer decay."""
    parts = []
    if config.grad_clip:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    parts += [optax.scale_by_adam(), optax.add_decayed_weights(config.wd)]
    if config.layer_decay < 1:
        parts.append(_scale_by_tree(layer_decay_scales(params, config.layer_decay)))
    parts.append(optax.scale_by_learning_rate(learning_rate(config, total_steps)))
    tx = optax.chain(*parts)
    trainable = _trainable(config)
    if trainable is not None:
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if trainable(_names(path)) else "frozen", params
        )
        # set_to_zero also keeps weight decay off the frozen weights.
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def _trainable(config: ml_collections.ConfigDict) -> Callable[[tuple[str, ...]], bool] | None:
    """Which parameters train, by path; None when all of them do."""
    model = config.get("model") or {}
    if model.get("lora_rank", 0):
        return lambda names: names[0] == "head" or is_lora_param(names)
    if config.freeze_backbone:
        return lambda names: names[0] == "head"
    return None
