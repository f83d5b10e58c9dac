"""The SSL state and the function that runs on the device: multi-crop forward, loss, update, EMA.

State (a plain dict pytree, sharded like fine-tuning's): `step`; `student` = {"backbone",
"dino_head", ["ibot_head"], "mask_token"}; `teacher` = the same without the mask token, never
differentiated, updated inside the step as m * teacher + (1 - m) * student with the scheduled
momentum m; `opt_state` (the student's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cxrjax import sharding
from cxrjax.engine.step import interleaved_micro_batches, normalize, update_if_finite
from cxrjax.errors import ConfigError
from cxrjax.models.pretrained import load_pretrained
from cxrjax.models.weights import flatten, read_weights, unflatten
from cxrjax.ssl import objective
from cxrjax.ssl.heads import DINOHead
from cxrjax.ssl.multicrop import CropOptions
from cxrjax.ssl.schedules import Schedules

HEADS = ("dino_head", "ibot_head")
# The loss's aux key for the updated centres (centering="centering"), which the step stores as
# state["center"] and keeps out of the metrics.
NEW_CENTERS = "new_centers"
# The converters' key for the trained mask token, shape (width,).
MASK_TOKEN = "mask_token"


def build_heads(config: ml_collections.ConfigDict) -> dict[str, DINOHead]:
    """The DINO head, and iBOT's own head when `ssl.ibot_separate_head` (else it shares)."""
    s = config.ssl
    head = DINOHead(
        num_prototypes=s.prototypes,
        hidden_dim=s.head_hidden_dim,
        bottleneck_dim=s.head_bottleneck_dim,
        nlayers=s.head_layers,
        dtype=jnp.dtype(config.model.dtype),
    )
    heads = {"dino_head": head}
    if s.ibot_separate_head:
        heads["ibot_head"] = head.clone(num_prototypes=s.ibot_prototypes or s.prototypes)
    return heads


CENTERINGS = ("sinkhorn_knopp", "centering")


def initial_centers(ssl: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """DINOv1's centres, zeros at the start: one for the CLS scores ("dino") and one for the
    masked patches' ("ibot", when iBOT is on), as DINOv2 keeps one per loss."""
    centers = {"dino": jnp.zeros((ssl.prototypes,), jnp.float32)}
    if ssl.ibot_weight:
        k = (ssl.ibot_prototypes or ssl.prototypes) if ssl.ibot_separate_head else ssl.prototypes
        centers["ibot"] = jnp.zeros((k,), jnp.float32)
    return centers


def init_state(
    config: ml_collections.ConfigDict,
    model: Any,
    heads: dict[str, DINOHead],
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
) -> tuple[dict, dict, str | None]:
    """(sharded state, its shardings, the pretrained-weights report or None)."""
    size = config.crops.global_size

    def student_init(r):
        r_backbone, r_heads = jax.random.split(r)
        backbone = model.init({"params": r_backbone}, jnp.zeros((1, size, size, 3)))["params"]
        student = {"backbone": backbone, "mask_token": jnp.zeros((model.width,), jnp.float32)}
        for i, (name, head) in enumerate(heads.items()):
            features = jnp.zeros((1, model.width))
            student[name] = head.init(jax.random.fold_in(r_heads, i), features)["params"]
        return student

    def state_from(student):
        teacher = {k: v for k, v in student.items() if k != "mask_token"}
        state = {
            "step": jnp.zeros((), jnp.int32),
            "student": student,
            "teacher": teacher,
            "opt_state": tx.init(student),
        }
        if config.ssl.get("centering") == "centering":
            state["center"] = initial_centers(config.ssl)
        return state

    init = lambda r: state_from(student_init(r))  # noqa: E731
    shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh, fsdp=config.fsdp)
    student = jax.jit(student_init)(rng)
    report = None
    if config.model.init_from:
        student, report = _load(config, jax.device_get(student), size)
    state = jax.jit(state_from, out_shardings=shardings)(student)
    return state, shardings, report


def _load(config: ml_collections.ConfigDict, student: dict, size: int) -> tuple[dict, str]:
    """The backbone from converted weights (or an SSL run directory); heads too when the
    weights hold them under `dino_head/` and `ibot_head/` with matching shapes."""
    path = config.model.init_from
    backbone, report = load_pretrained(
        path, student["backbone"], variant=config.model.variant, image_size=size
    )
    student = {**student, "backbone": backbone}
    flat, _ = read_weights(path)
    lines = [f"pretrained weights from {path}:", str(report)]
    # The trained iBOT mask token of DINOv2 / RAD-DINO / DINOv3 (the converters keep it): a
    # zero token would make every masked patch look like a fresh task to the student.
    token = flat.get(MASK_TOKEN)
    if token is not None and token.shape == student[MASK_TOKEN].shape:
        student[MASK_TOKEN] = np.asarray(token, np.float32)
        lines.append(f"  {MASK_TOKEN}: loaded from the weights")
    else:
        lines.append(f"  {MASK_TOKEN}: zeros (not in the weights, or another width)")
    for name in HEADS:
        if name not in student:
            continue
        target = flatten(student[name])
        found = {k: flat.get(f"{name}/{k}") for k in target}
        if all(v is not None and v.shape == target[k].shape for k, v in found.items()):
            student[name] = unflatten({k: np.asarray(v, np.float32) for k, v in found.items()})
            lines.append(f"  {name}: loaded from the weights")
        else:
            lines.append(f"  {name}: initialised at random (not in the weights, or other shapes)")
    return student, "\n".join(lines)


def make_ssl_step(
    model: Any,
    heads: dict[str, DINOHead],
    tx: optax.GradientTransformation,
    schedules: Schedules,
    crops: CropOptions,
    ssl: ml_collections.ConfigDict,
    mean: jax.Array,
    std: jax.Array,
    base_rng: jax.Array,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """(state, batch) -> (state, metrics). A non-finite loss or gradient skips the update."""
    grad_fn = accumulated_value_and_grad(
        make_loss(model, heads, crops, ssl, mean, std), ssl.get("accum_steps", 1)
    )

    def ssl_step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(base_rng, step)
        temp = schedules.teacher_temp(step)
        (loss, parts), grads = grad_fn(
            state["student"], state["teacher"], batch, rng, temp, state.get("center")
        )
        new_centers = parts.pop(NEW_CENTERS, None)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        m = schedules.momentum(step)

        def update(state):
            updates, opt_state = tx.update(grads, state["opt_state"], state["student"])
            student = optax.apply_updates(state["student"], updates)
            teacher = jax.tree.map(
                lambda t, s: m * t + (1 - m) * s,
                state["teacher"],
                {k: student[k] for k in state["teacher"]},
            )
            new = {**state, "student": student, "teacher": teacher, "opt_state": opt_state}
            if new_centers is not None:
                new["center"] = new_centers
            return new

        new = update_if_finite(finite, update, state)
        new["step"] = step + 1
        metrics = {
            "loss": loss,
            **parts,
            "grad_norm": grad_norm,
            "learning_rate": schedules.lr(step),
            "weight_decay": schedules.wd(step),
            "teacher_momentum": m,
            "teacher_temp": temp,
            "finite": finite,
        }
        return new, metrics

    return ssl_step


def accumulated_value_and_grad(loss_fn: Callable, accum_steps: int) -> Callable:
    """`jax.value_and_grad(loss_fn, has_aux=True)` over `accum_steps` micro-batches of a batch:
    micro-batch j takes rows j, j + k, ... (every device keeps an equal share of each) with rng
    `fold_in(rng, j)`; loss, parts and gradients are the micro-batches' means, summed in the scan
    carry so memory holds one gradient, not k. Sinkhorn-Knopp and KoLeo then see a micro-batch
    (DINOv2's KoLeo is per GPU anyway); DINOv1 centres are updated once per micro-batch."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        return grad_fn

    def run(student, teacher, batch, rng, temp, centers=None):
        rows = {k: v.shape[0] for k, v in batch.items()}
        if any(n % accum_steps for n in rows.values()):
            raise ConfigError(
                f"ssl.accum_steps={accum_steps} does not divide the batch ({rows})",
                "Pick a batch_size (per process) that ssl.accum_steps divides.",
            )
        micro = interleaved_micro_batches(batch, accum_steps)

        def one(centers, j, chunk):
            (loss, parts), grads = grad_fn(
                student, teacher, chunk, jax.random.fold_in(rng, j), temp, centers
            )
            parts = dict(parts)
            return parts.pop(NEW_CENTERS, centers), (loss, parts, grads)

        first = jax.tree.map(lambda x: x[0], micro)
        _, shapes = jax.eval_shape(one, centers, 0, first)
        zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), shapes)

        def body(carry, inputs):
            centers, sums = carry
            centers, values = one(centers, *inputs)
            return (centers, jax.tree.map(jnp.add, sums, values)), None

        (centers, sums), _ = jax.lax.scan(body, (centers, zeros), (jnp.arange(accum_steps), micro))
        loss, parts, grads = jax.tree.map(lambda x: x / accum_steps, sums)
        if centers is not None:
            parts[NEW_CENTERS] = centers
        return (loss, parts), grads

    return run


def make_loss(
    model: Any,
    heads: dict[str, DINOHead],
    crops: CropOptions,
    ssl: ml_collections.ConfigDict,
    mean: jax.Array,
    std: jax.Array,
) -> Callable[..., tuple[jax.Array, dict]]:
    """(student, teacher, batch, rng, teacher_temp[, centers]) -> (loss, its parts); the teacher's
    outputs are constants (stop_gradient), so the gradient is the student's alone.

    The teacher's targets: Sinkhorn-Knopp (DINOv2's recipe, `ssl.centering="sinkhorn_knopp"`), or
    DINOv1's centring (`"centering"`) against `centers` = state["center"]; then the parts also
    hold the centres updated with this batch (after the targets, as DINOv1) under NEW_CENTERS."""
    if ssl.get("centering", "sinkhorn_knopp") not in CENTERINGS:
        raise ConfigError(f"ssl.centering={ssl.centering!r}: use one of {CENTERINGS}")
    centering = ssl.get("centering") == "centering"
    prefix = model.num_prefix_tokens
    ibot_name = "ibot_head" if "ibot_head" in heads else "dino_head"
    dino_head, ibot_head = heads["dino_head"], heads[ibot_name]

    def gather(tokens, index):
        # (crops, T, D) -> the (S, D) patch tokens at flat patch indices `index`.
        patches = tokens[:, prefix:]
        return patches.reshape(-1, patches.shape[-1])[index]

    def targets_of(scores, temp, center, valid=None):
        """(targets, the centre updated with this batch's scores or None)."""
        if not centering:
            return objective.sinkhorn_knopp(scores, temp, ssl.sinkhorn_iterations, valid), None
        updated = objective.updated_center(center, scores, ssl.center_momentum, valid)
        return objective.center_teacher(scores, center, temp, valid), updated

    def loss_fn(student, teacher, batch, rng, temp, centers=None):
        if centering and centers is None:
            centers = initial_centers(ssl)
        new_centers = {}
        b = batch["global"].shape[0]
        g = crops.global_size
        images = normalize(batch["global"].reshape(b * 2, g, g), mean, std)
        masks = batch["mask"].reshape(b * 2, -1)
        # DINOv2's bounded gather: slots 0..count-1 hold the batch's masked patches (flat
        # indices over all crops), the rest is padding; past the bound a patch is dropped.
        slots = crops.masked_slots(b * 2)
        per_crop = jnp.sum(masks, axis=1)
        index = jnp.nonzero(masks.reshape(-1), size=slots, fill_value=0)[0]
        valid = jnp.arange(slots) < jnp.sum(per_crop)
        weights = jnp.where(valid, 1.0 / jnp.maximum(per_crop[index // masks.shape[1]], 1), 0.0)
        r_global, r_local = jax.random.split(rng)

        t_tokens = objective.encode(model, teacher["backbone"], images, train=False)
        t_scores = dino_head.apply({"params": teacher["dino_head"]}, t_tokens[:, 0])
        center = centers["dino"] if centering else None
        t_cls, new_centers["dino"] = targets_of(t_scores, temp, center)
        targets = jax.lax.stop_gradient(t_cls.reshape(b, 2, -1))

        s_tokens = objective.encode(
            model,
            student["backbone"],
            images,
            train=True,
            rng=r_global,
            masks=masks,
            mask_token=student["mask_token"],
        )
        s_global = dino_head.apply({"params": student["dino_head"]}, s_tokens[:, 0])
        s_local = None
        if crops.num_local:
            size = crops.local_size
            local = normalize(batch["local"].reshape(b * crops.num_local, size, size), mean, std)
            l_tokens = objective.encode(model, student["backbone"], local, train=True, rng=r_local)
            s_local = dino_head.apply({"params": student["dino_head"]}, l_tokens[:, 0])
            s_local = s_local.reshape(b, crops.num_local, -1)
        dino = objective.dino_loss(s_global.reshape(b, 2, -1), s_local, targets, ssl.student_temp)
        loss, parts = ssl.dino_weight * dino, {"dino_loss": dino}
        parts.update(objective.collapse_stats(jax.lax.stop_gradient(t_scores), temp))

        if ssl.ibot_weight:
            t_patch = ibot_head.apply({"params": teacher[ibot_name]}, gather(t_tokens, index))
            center = centers["ibot"] if centering else None
            t_patch, new_centers["ibot"] = targets_of(t_patch, temp, center, valid)
            t_patch = jax.lax.stop_gradient(t_patch)
            s_patch = ibot_head.apply({"params": student[ibot_name]}, gather(s_tokens, index))
            ibot = objective.ibot_loss(s_patch, t_patch, weights, b * 2, ssl.student_temp)
            loss, parts["ibot_loss"] = loss + ssl.ibot_weight * ibot, ibot
            total = jnp.sum(per_crop)
            parts["ibot_overflow"] = jnp.maximum(total - slots, 0) / jnp.maximum(total, 1)
        if ssl.koleo_weight:
            cls = s_tokens[:, 0].reshape(b, 2, -1)
            koleo = objective.koleo_loss(cls[:, 0]) + objective.koleo_loss(cls[:, 1])
            loss, parts["koleo_loss"] = loss + ssl.koleo_weight * koleo, koleo
        if centering:
            parts[NEW_CENTERS] = jax.lax.stop_gradient(new_centers)
        return loss, parts

    return loss_fn
