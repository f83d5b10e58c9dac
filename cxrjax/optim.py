"""The optimizer from the config: AdamW (the study's lr 1e-5, no weight decay, constant) by default."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    if config.schedule == "constant":
        return optax.constant_schedule(config.lr)
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.lr, min(config.warmup_steps, max(total_steps - 1, 0)), max(total_steps, 1)
        )
    raise ValueError(f"config.schedule={config.schedule!r}: use 'constant' or 'warmup_cosine'")


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    parts = []
    if config.grad_clip:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    parts.append(optax.adamw(learning_rate(config, total_steps), weight_decay=config.wd))
    return optax.chain(*parts)
