"""The trainer: shards -> jitted, sharded train steps -> validation -> checkpoints -> test results.

`train_and_evaluate` reads top to bottom as the run goes: data, model, state, restore, loop,
final evaluation. State is a plain dict pytree (`step`, `params`, `opt_state`) that `jax.jit`
receives with explicit shardings and donates back each step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils

from cxrjax import checkpoint, optim, sharding
from cxrjax.data import pipeline, shards
from cxrjax.data.device_augment import device_augment
from cxrjax.evaluation.metrics import auroc_per_label
from cxrjax.evaluation.predictions import Predictions, save_predictions
from cxrjax.metric_writer import MetricWriter
from cxrjax.models import create_model, get_spec
from cxrjax.models.pretrained import conversion_command, load_pretrained

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"


class MissingInputError(RuntimeError):
    """A dataset or checkpoint the config names does not exist; the message says how to make it."""


def open_dataset(config: ml_collections.ConfigDict) -> shards.DatasetInfo:
    directory = Path(config.data.dir)
    try:
        return shards.load_info(directory)
    except FileNotFoundError:
        raise MissingInputError(
            f"no prepared dataset at {directory} (missing {directory / shards.INFO_FILE}).\n"
            f"Create it with:\n  python tools/prepare_data.py --dataset {config.data.dataset} "
            f"--raw /path/to/raw/{config.data.dataset} --out {directory}\n"
            "or point the config at prepared shards with --config.data.dir=DIR"
        ) from None


def check_pretrained(config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any compilation, when the configured initial weights are absent."""
    path = config.model.init_from
    if path and not Path(path).exists():
        create = config.model.init_hint or conversion_command(path, config.model.variant)
        raise MissingInputError(
            f"no converted weights at {path}.\nCreate them with:\n  {create}\n"
            "(or point --config.model.init_from at them, or set it to '' to train from scratch)"
        )


def build_model(config: ml_collections.ConfigDict, num_labels: int, image_size: int):
    m = config.model
    return create_model(
        m.variant,
        num_labels,
        image_size=image_size,
        dtype=m.dtype,
        dropout=m.dropout,
        drop_path=m.drop_path,
        remat=m.remat,
        head_zero_init=m.head_zero_init,
    )


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """uint8 (B, H, W) grayscale -> float32 (B, H, W, 3): runs on the device, inside the step."""
    x = images.astype(jnp.float32)[..., None] / 255.0
    return (jnp.broadcast_to(x, (*x.shape[:-1], 3)) - mean) / std


def input_stats(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """[0, 1] inputs (the study), zero-mean unit-variance ones (from scratch they train much
    faster), or the normalisation the pretrained weights expect."""
    if config.input.normalization == "unit":
        return np.zeros(3, np.float32), np.ones(3, np.float32)
    if config.input.normalization == "zscore":
        # A histogram-equalised image is uniform on [0, 1]: mean 1/2, std 1/sqrt(12).
        return np.full(3, 0.5, np.float32), np.full(3, 12**-0.5, np.float32)
    if config.input.normalization == "pretrained":
        spec = get_spec(config.model.variant)
        return np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    raise ValueError(
        f"config.input.normalization={config.input.normalization!r}: use 'unit', 'zscore' or "
        "'pretrained'"
    )


def bce_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, pos_weight: jax.Array):
    """Binary cross-entropy with per-label `pos_weight`, averaged over known labels only."""
    logits = logits.astype(jnp.float32)
    per_entry = pos_weight * labels * jax.nn.softplus(-logits) + (1 - labels) * jax.nn.softplus(
        logits
    )
    return jnp.sum(per_entry * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(
    model, tx, mean, std, pos_weight, base_rng, *, accum_steps=1, ema_decay=0.0, augment=None
):
    """The jitted step: grads (over `accum_steps` micro-batches), update, optional EMA.

    `augment` moves the augmentation into the step (on the device, whole batch at once).

    A non-finite loss or gradient leaves the state untouched (the step is skipped) and is
    reported in the metrics; the loop decides whether to stop or go on.
    """

    def grads_of(params, batch, rng):
        def loss_fn(params):
            images = normalize(batch["image"], mean, std)
            logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
            return bce_loss(logits, batch["labels"], batch["mask"], pos_weight)

        return jax.value_and_grad(loss_fn)(params)

    def accumulated(params, batch, rng):
        # Micro-batch j takes rows j, j + k, ...: every device keeps an equal share of each.
        micro = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(
                0, 1
            ),
            batch,
        )

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
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if ema_decay:
            new_state["ema"] = jax.tree.map(
                lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], params
            )
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        new_state["step"] = state["step"] + 1
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return train_step


def make_predict_step(model, mean, std):
    def predict_step(params, batch):
        logits = model.apply({"params": params}, normalize(batch["image"], mean, std), train=False)
        return jax.nn.sigmoid(logits.astype(jnp.float32))

    return predict_step


def _gather(x: np.ndarray | jax.Array) -> np.ndarray:
    """A process-local (or globally sharded) array, concatenated over processes."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict(
    predict_step, params, info: shards.DatasetInfo, split: str, config, label_indices, mesh
) -> Predictions:
    """Probabilities for every example of `split`, each exactly once (padding dropped)."""
    rows = {k: [] for k in ("probs", "labels", "mask", "valid", "id", "patient")}
    batches = pipeline.eval_batches(
        info, split, batch_size=config.eval_batch_size, label_indices=label_indices
    )
    for batch in batches:
        probs = predict_step(params, pipeline.to_device(batch, sharding.data_sharding(mesh)))
        rows["probs"].append(_gather(probs))
        for key in ("labels", "mask", "valid"):
            rows[key].append(_gather(batch[key]))
        for key in ("id", "patient"):
            # Fixed-width bytes gather across processes; salted hashes are 16 ASCII characters.
            codes = np.frombuffer(batch[key].astype("S16").tobytes(), np.uint8).reshape(-1, 16)
            rows[key].append(_gather(codes).view("S16")[:, 0].astype(str))
    out = {k: np.concatenate(v) for k, v in rows.items()}
    valid = out["valid"]
    names = [info.label_names[i] for i in label_indices]
    return Predictions(
        labels=out["labels"][valid],
        probs=out["probs"][valid],
        label_names=names,
        ids=out["id"][valid],
        mask=out["mask"][valid],
        patients=out["patient"][valid],
    )


def summarize(preds: Predictions) -> dict[str, Any]:
    aurocs = auroc_per_label(preds.labels, preds.probs, preds.mask)
    return {
        "mean_auroc": float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else float("nan"),
        "auroc": dict(zip(preds.label_names, map(float, aurocs), strict=True)),
        "num_examples": len(preds.ids),
    }


class _Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks: the step in flight finishes, then saves."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        logging.warning("signal %d: saving a checkpoint, then exiting", signum)
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """True on every process once any was signalled (agreed every 10 steps across hosts)."""
        if jax.process_count() == 1:
            return self.requested
        if step % 10:
            return False
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def init_state(config, model, image_size, mesh, rng, total_steps, label_names=None):
    """The optimizer and the sharded train state, with pretrained weights when configured."""
    dummy = jnp.zeros((1, image_size, image_size, 3))
    abstract_params = jax.eval_shape(lambda r: model.init({"params": r}, dummy)["params"], rng)
    tx = optim.make_optimizer(config, total_steps, abstract_params)

    def state_from(params):
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        if config.ema_decay:
            state["ema"] = params
        return state

    init = lambda r: state_from(model.init({"params": r}, dummy)["params"])  # noqa: E731
    shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh, fsdp=config.fsdp)
    state = jax.jit(init, out_shardings=shardings)(rng)
    if config.model.init_from:
        params, report = load_pretrained(
            config.model.init_from,
            jax.device_get(state["params"]),
            variant=config.model.variant,
            image_size=image_size,
            label_names=label_names,
        )
        print(f"pretrained weights from {config.model.init_from}:\n{report}", flush=True)
        params = jax.device_put(params, shardings["params"])
        state = jax.jit(state_from, out_shardings=shardings)(params)
    return tx, state, shardings


class WorkdirLock:
    """Refuses a second run on the same workdir while the first is alive."""

    def __init__(self, workdir: Path):
        self.path = workdir / "RUNNING"
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    def __enter__(self) -> WorkdirLock:
        if jax.process_index() != 0:
            return self
        if self.path.exists():
            host, _, pid = self.path.read_text().partition(":")
            alive = host != socket.gethostname() or _pid_alive(int(pid or 0))
            if alive:
                raise RuntimeError(
                    f"{self.path.parent} is in use by process {pid} on {host}. Wait for it, use "
                    f"another --workdir, or delete {self.path} if that run is gone."
                )
        self.path.write_text(self.owner)
        return self

    def __exit__(self, *exc) -> None:
        if jax.process_index() == 0 and self.path.exists():
            self.path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def check_resumable(workdir: Path, fields: dict[str, Any]) -> None:
    """A checkpoint made under another variant/labels/resolution must not be silently resumed."""
    path = workdir / RUN_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        differing = {k: (saved.get(k), v) for k, v in fields.items() if saved.get(k) != v}
        if differing:
            lines = "\n".join(
                f"  {k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in differing.items()
            )
            raise MissingInputError(
                f"the checkpoints in {workdir} do not match this config:\n{lines}\n"
                "Use another --workdir, or restore the config the run was started with."
            )
    elif jax.process_index() == 0:
        path.write_text(json.dumps(fields, indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    workdir = Path(workdir)
    info = open_dataset(config)
    check_pretrained(config)
    workdir.mkdir(parents=True, exist_ok=True)
    label_indices = info.label_indices(config.data.labels)
    label_names = [info.label_names[i] for i in label_indices]
    check_resumable(
        workdir,
        {
            "variant": config.model.variant,
            "label_names": label_names,
            "image_size": info.image_size,
            "batch_size": config.batch_size,
            "ema": bool(config.ema_decay),
            "fsdp": config.fsdp,
        },
    )
    with WorkdirLock(workdir):
        return _train(config, workdir, info, label_indices)


def _train(config, workdir: Path, info: shards.DatasetInfo, label_indices: list[int]) -> dict:
    num_train = pipeline.num_train_examples(info, config.data.train_fraction)
    steps_per_epoch = num_train // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    if jax.process_index() == 0:
        (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))

    mesh = sharding.make_mesh()
    model = build_model(config, len(label_indices), info.image_size)
    rng = jax.random.key(config.seed)
    tx, state, state_shardings = init_state(
        config,
        model,
        info.image_size,
        mesh,
        rng,
        total_steps,
        [info.label_names[i] for i in label_indices],
    )
    parameter_overview.log_parameter_overview(state["params"])
    schedule = optim.learning_rate(config, total_steps)

    mean, std = (jnp.asarray(v) for v in input_stats(config))
    pos_weight = jnp.asarray(np.asarray(info.pos_weight, np.float32)[label_indices])
    if not config.loss.pos_weight:
        pos_weight = jnp.ones_like(pos_weight)
    data = sharding.data_sharding(mesh)
    augment = pipeline.Augment(config.input.flip_prob, config.input.max_rotation)
    train_step = jax.jit(
        make_train_step(
            model,
            tx,
            mean,
            std,
            pos_weight,
            jax.random.fold_in(rng, 1),
            accum_steps=config.grad_accum_steps,
            ema_decay=config.ema_decay,
            augment=augment if config.input.augment_on_device else None,
        ),
        in_shardings=(state_shardings, data),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    predict_step = jax.jit(
        make_predict_step(model, mean, std),
        in_shardings=(state_shardings["params"], data),
        out_shardings=data,
    )
    evaluate = functools.partial(
        predict, predict_step, info=info, config=config, label_indices=label_indices, mesh=mesh
    )
    eval_params = lambda state: state["ema"] if config.ema_decay else state["params"]  # noqa: E731

    loader = pipeline.train_loader(
        info,
        batch_size=config.batch_size,
        label_indices=label_indices,
        seed=config.seed,
        fraction=config.data.train_fraction,
        augment=pipeline.Augment(0.0, 0.0) if config.input.augment_on_device else augment,
        worker_count=config.data.worker_count,
    )
    train_iter = iter(loader)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    if ckpt.latest_step() is not None:
        state = ckpt.restore_latest(checkpoint.abstract(state, state_shardings), train_iter)
        print(f"resumed from step {int(state['step'])} in {workdir}", flush=True)
    writer = MetricWriter(workdir)
    preemption = _Preemption()
    batches = pipeline.prefetch_to_device(train_iter, data)

    step = int(state["step"])
    timer, steps_timed, finite_flags = time.time(), 0, []
    while step < total_steps:
        batch, iterator_state = next(batches)
        state, metrics = train_step(state, batch)
        step += 1
        steps_timed += 1
        finite_flags.append(metrics.pop("finite"))
        if step % config.log_every_steps == 0 or step == total_steps:
            _check_finite(finite_flags, step, config.nonfinite, ckpt)
            finite_flags = []
            elapsed = time.time() - timer
            writer.scalars(
                step,
                {
                    **{k: float(v) for k, v in metrics.items()},
                    "learning_rate": float(schedule(step - 1)),
                    "images_per_s": steps_timed * config.batch_size / elapsed,
                    "step_ms": 1000 * elapsed / steps_timed,
                    "epoch": step / steps_per_epoch,
                    "eta_min": (total_steps - step) * elapsed / steps_timed / 60,
                },
            )
            timer, steps_timed = time.time(), 0
        # Validation and an epoch-end checkpoint every `eval_every_epochs`, and at the last step.
        epoch_end = step % steps_per_epoch == 0 and (
            (step // steps_per_epoch) % config.eval_every_epochs == 0 or step == total_steps
        )
        if epoch_end:
            val = summarize(evaluate(eval_params(state), split="val"))
            writer.scalars(step, _flat("val", val))
            ckpt.save_best(step, eval_params(state), val["mean_auroc"])
        stop = preemption.should_stop(step)
        if epoch_end or step % config.checkpoint_every_steps == 0 or stop:
            ckpt.save(step, state, iterator_state)
        if stop:
            ckpt.wait()
            ckpt.close()
            preemption.restore()
            print(f"stopped at step {step}; rerun with the same workdir to resume", flush=True)
            raise SystemExit(0)
    preemption.restore()
    ckpt.wait()

    label_names = [info.label_names[i] for i in label_indices]
    results = {"label_names": label_names, "steps": step}
    abstract_params = checkpoint.abstract(state["params"], state_shardings["params"])
    best = ckpt.restore_params("best", abstract_params)
    for split in ("val", "test"):
        if not info.splits.get(split, {}).get("num_examples"):
            continue
        preds = evaluate(best, split=split)
        results[split] = summarize(preds)
        writer.scalars(step, _flat(f"final_{split}", results[split]))
        if jax.process_index() == 0:
            save_predictions(workdir / f"predictions_{split}.npz", preds)
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    writer.close()
    ckpt.close()
    return results


def _check_finite(flags: list, step: int, policy: str, ckpt: checkpoint.Checkpointer) -> None:
    """Non-finite steps were skipped in the step itself; `stop` ends the run naming the step."""
    bad = np.flatnonzero(~np.asarray(jax.device_get(flags), bool))
    if not len(bad):
        return
    first = step - len(flags) + int(bad[0]) + 1
    if policy == "skip":
        print(
            f"warning: skipped {len(bad)} steps with non-finite loss (first: {first})", flush=True
        )
        return
    ckpt.wait()
    raise FloatingPointError(
        f"non-finite loss or gradient at step {first}; the update was not applied and the last "
        f"good checkpoint (step {ckpt.latest_step()}) is kept. Lower config.lr, set "
        "config.grad_clip, or set config.nonfinite='skip' to skip such steps."
    )


def _flat(prefix: str, summary: dict) -> dict[str, float]:
    out = {f"{prefix}/mean_auroc": summary["mean_auroc"]}
    out.update({f"{prefix}/auroc/{k}": v for k, v in summary["auroc"].items()})
    return out


@dataclasses.dataclass
class Run:
    """A trained run loaded for inference: what `predict_split` and `cxrjax.predict` need."""

    config: ml_collections.ConfigDict
    info: shards.DatasetInfo
    label_indices: list[int]
    model: Any
    params: Any
    mesh: jax.sharding.Mesh

    @property
    def label_names(self) -> list[str]:
        return [self.info.label_names[i] for i in self.label_indices]


def load_run(workdir: str | Path, checkpoint_name: str = "best") -> Run:
    """The config, dataset description, model and checkpointed parameters of a run directory."""
    workdir = Path(workdir)
    config_path = workdir / CONFIG_FILE
    if not config_path.is_file():
        raise MissingInputError(f"{workdir} is not a cxrjax run directory (no {CONFIG_FILE})")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    info = open_dataset(config)
    label_indices = info.label_indices(config.data.labels)
    mesh = sharding.make_mesh()
    model = build_model(config, len(label_indices), info.image_size)
    dummy = jnp.zeros((1, info.image_size, info.image_size, 3))
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, dummy)["params"])
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        params = ckpt.restore_params(
            checkpoint_name,
            checkpoint.abstract(
                shapes, sharding.state_shardings(shapes, mesh, fsdp=config.get("fsdp", False))
            ),
        )
    finally:
        ckpt.close()
    return Run(config, info, label_indices, model, params, mesh)


def predict_split(workdir: str, split: str, checkpoint_name: str = "best") -> Predictions:
    """Predictions of a finished (or running) run's checkpoint on one split of its dataset."""
    run = load_run(workdir, checkpoint_name)
    mean, std = (jnp.asarray(v) for v in input_stats(run.config))
    predict_step = jax.jit(make_predict_step(run.model, mean, std))
    return predict(
        predict_step, run.params, run.info, split, run.config, run.label_indices, run.mesh
    )
