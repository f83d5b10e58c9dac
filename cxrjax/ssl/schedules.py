"""DINOv2's schedules, as functions of the step, and the optimizer they drive.

Teacher momentum: cosine from `momentum` to 1. Teacher temperature: linear warmup from
`warmup_temp` to `temp`, then constant. Weight decay: cosine from `wd` to `wd_end`. Learning
rate: linear warmup to `lr`, then cosine to `min_lr`. The optimizer is AdamW with gradient
clipping per module (backbone, each head), layer-wise lr decay
(`cxrjax.optim.layer_decay_scales` over the backbone, heads at
the top rate), a smaller lr for the patch embedding, no weight decay on biases, norms and
LayerScale, and the prototypes frozen for the first `freeze_prototypes_steps` (DINOv2 freezes
its last layer for the first epoch).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cxrjax.optim import layer_decay_scales


def cosine(start: float, end: float, total_steps: int) -> optax.Schedule:
    """`start` at step 0 towards `end` at `total_steps` (DINOv2's CosineScheduler: the last
    step's value is just short of `end`, so the teacher still moves on it)."""
    span = max(total_steps, 1)

    def schedule(step):
        t = jnp.clip(jnp.asarray(step, jnp.float32) / span, 0.0, 1.0)
        return end + 0.5 * (start - end) * (1 + jnp.cos(jnp.pi * t))

    return schedule


def warmup_cosine(peak: float, end: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear from 0 to `peak` over `warmup_steps`, then cosine to `end`."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay = cosine(peak, end, total_steps - warmup_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = peak * step / max(warmup_steps, 1)
        return jnp.where(step < warmup_steps, ramp, decay(step - warmup_steps))

    return schedule


def linear_warmup(start: float, end: float, warmup_steps: int) -> optax.Schedule:
    """Linear from `start` to `end` over `warmup_steps`, then `end`."""

    def schedule(step):
        t = jnp.clip(jnp.asarray(step, jnp.float32) / max(warmup_steps, 1), 0.0, 1.0)
        return start + (end - start) * t

    return schedule


class Schedules(NamedTuple):
    lr: optax.Schedule
    wd: optax.Schedule
    momentum: optax.Schedule
    teacher_temp: optax.Schedule


def make_schedules(
    ssl: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int
) -> Schedules:
    """The schedules of `config.ssl`, whose warmups are given in epochs (as DINOv2's)."""
    return Schedules(
        lr=warmup_cosine(
            ssl.lr, ssl.min_lr, round(ssl.warmup_epochs * steps_per_epoch), total_steps
        ),
        wd=cosine(ssl.wd, ssl.wd_end, total_steps),
        momentum=cosine(ssl.momentum, 1.0, total_steps),
        teacher_temp=linear_warmup(
            ssl.warmup_teacher_temp,
            ssl.teacher_temp,
            round(ssl.teacher_temp_warmup_epochs * steps_per_epoch),
        ),
    )


# The DINO head's last layer, frozen for `freeze_prototypes_epochs` (DINOv2's freeze_last_layer).
LAST_LAYER = ("prototypes", "gain")
# The student's parts a heads-only warmup (`heads_only_epochs`) holds still.
BACKBONE = ("backbone", "mask_token")


def _names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(key, "key", key)) for key in path)


def _no_decay(names: tuple[str, ...]) -> bool:
    leaf, parent = names[-1], names[-2] if len(names) > 1 else ""
    # DINOv2's no-decay rule (".bias", "norm", "gamma" = LayerScale); its mask token, CLS and
    # position embeddings are decayed like any weight.
    return leaf == "bias" or "norm" in parent or parent.startswith("ls")


def lr_scales(student: Any, layer_decay: float, patch_embed_mult: float) -> Any:
    """Per-parameter lr factors of the student tree {"backbone", heads..., "mask_token"}."""
    backbone = layer_decay_scales(student["backbone"], layer_decay)
    backbone = jax.tree_util.tree_map_with_path(
        lambda path, s: s * (patch_embed_mult if _names(path)[0] == "embedding" else 1.0),
        backbone,
    )
    scales = jax.tree.map(lambda _: 1.0, student)
    scales["backbone"] = backbone
    # The mask token is a backbone input in DINOv2 (layer 0, like the CLS token and the
    # position embeddings): the lowest layer-decay rate, not the heads' rate.
    depth = sum(1 for name in student["backbone"] if name.startswith("block_"))
    scales["mask_token"] = layer_decay ** (depth + 1)
    return scales


def clip_groups(student: Any) -> Any:
    """The clipping group of each student parameter: DINOv2 clips the backbone (its mask token
    included) and each head by its own norm, so a head's large gradients do not shrink the
    backbone's step."""
    groups = {}
    for name, subtree in student.items():
        group = "backbone" if name == "mask_token" else name
        groups[name] = jax.tree.map(lambda _, g=group: g, subtree)
    return groups


def clip_per_module(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` applied to each group of `clip_groups` separately."""

    def update(updates, state, params=None):
        del params
        groups = clip_groups(updates)
        leaves, treedef = jax.tree.flatten(updates)
        names = treedef.flatten_up_to(groups)
        out = list(leaves)
        for name in sorted(set(names)):
            members = [i for i, n in enumerate(names) if n == name]
            norm = optax.tree.norm([leaves[i] for i in members])
            factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
            for i in members:
                out[i] = (leaves[i] * factor).astype(leaves[i].dtype)
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class _State(NamedTuple):
    count: jax.Array


def scheduled_adamw_tail(
    schedules: Schedules,
    scales: Any,
    freeze_prototypes_steps: int,
    freeze_gain: bool = False,
    heads_only_steps: int = 0,
) -> optax.GradientTransformation:
    """After Adam: adds the scheduled decoupled weight decay, then scales by -lr per parameter.
    `freeze_gain` keeps every head's `gain` where it is (DINOv1's norm_last_layer);
    `heads_only_steps` keeps the backbone and its mask token where they are for that many steps
    (the heads train; Adam's moments of the frozen part still accumulate, as for the frozen
    prototypes)."""

    def init(params):
        del params
        return _State(jnp.zeros((), jnp.int32))

    def update(updates, state, params):
        lr, wd = schedules.lr(state.count), schedules.wd(state.count)
        thaw = (state.count >= freeze_prototypes_steps).astype(jnp.float32)
        thaw_backbone = (state.count >= heads_only_steps).astype(jnp.float32)

        def one(path, u, p, s):
            names = _names(path)
            decay = 0.0 if _no_decay(names) else wd
            # DINOv2 freezes its whole last layer: weight_v (prototypes) and weight_g (gain).
            factor = -lr * s * (thaw if names[-1] in LAST_LAYER else 1.0)
            if freeze_gain and names[-1] == "gain":
                factor = 0.0
            if names[0] in BACKBONE:
                factor = factor * thaw_backbone
            return (factor * (u + decay * p)).astype(u.dtype)

        out = jax.tree_util.tree_map_with_path(one, updates, params, scales)
        return out, _State(state.count + 1)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    ssl: ml_collections.ConfigDict, schedules: Schedules, student_shapes: Any, steps_per_epoch: int
) -> optax.GradientTransformation:
    """AdamW over the student tree (or its shapes) with the schedules and per-parameter rates."""
    scales = lr_scales(student_shapes, ssl.layer_decay, ssl.patch_embed_lr_mult)
    scales = jax.tree.map(lambda s: np.float32(s), scales)
    parts = []
    if ssl.grad_clip:
        parts.append(clip_per_module(ssl.grad_clip))
    parts += [
        optax.scale_by_adam(b1=0.9, b2=0.999),
        scheduled_adamw_tail(
            schedules,
            scales,
            round(ssl.freeze_prototypes_epochs * steps_per_epoch),
            ssl.get("freeze_gain", False),
            round(ssl.get("heads_only_epochs", 0.0) * steps_per_epoch),
        ),
    ]
    return optax.chain(*parts)
