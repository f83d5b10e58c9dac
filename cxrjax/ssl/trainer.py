"""The SSL trainer: unlabeled shards -> multi-crop batches -> jitted, sharded DINOv2 steps.

`pretrain` reads top to bottom in the phases of a run, as `cxrjax.engine.trainer` does: run
directory, mesh, data, model and state, step, restore, loop, export. The run directory is a
fine-tuning starting point as it is: besides `checkpoints/` (student, teacher, heads and
optimizer state, with the data-iterator state) it holds the teacher backbone as `best/`
(orbax, item "params", read by `tools/convert_checkpoint.py`) and as converted weights
(`params.safetensors` + `meta.json`, the teacher heads under `dino_head/`...), read by
`--config.model.init_from=RUN` and `tools/export_checkpoint.py`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils

from cxrjax import checkpoint, console, sharding
from cxrjax.data import pipeline, shards
from cxrjax.data.images import PreprocessOptions
from cxrjax.data.mixture import parse_sources
from cxrjax.engine import step as steps
from cxrjax.engine.data import open_prepared
from cxrjax.engine.trainer import Preemption, check_finite, check_pretrained
from cxrjax.errors import ConfigError, Preempted
from cxrjax.metric_writer import MetricWriter
from cxrjax.models import create_model
from cxrjax.models.weights import save_weights
from cxrjax.run_dir import RunDir, RunFacts
from cxrjax.ssl import multicrop
from cxrjax.ssl import schedules as schedules_lib
from cxrjax.ssl.step import build_heads, init_state, make_ssl_step


def crop_options(config: ml_collections.ConfigDict, patch_size: int) -> multicrop.CropOptions:
    c = config.crops
    return multicrop.CropOptions(
        global_size=c.global_size,
        local_size=c.local_size,
        num_local=c.num_local,
        global_scale=tuple(c.global_scale),
        local_scale=tuple(c.local_scale),
        flip_prob=c.flip_prob,
        max_rotation=c.max_rotation,
        jitter_prob=c.jitter_prob,
        brightness=c.brightness,
        contrast=c.contrast,
        blur_prob=tuple(c.blur_prob),
        blur_sigma=tuple(c.blur_sigma),
        patch_size=patch_size,
        mask_prob=config.ssl.mask_prob,
        mask_ratio=tuple(config.ssl.mask_ratio),
    )


def open_unlabeled(config: ml_collections.ConfigDict) -> list[shards.DatasetInfo]:
    """The prepared datasets to pool: `config.data.sources` when set, else `config.data.dir`."""
    specs = tuple(config.data.get("sources") or ())
    if not specs:
        return [open_prepared(config.data.dir, config.data.dataset)]
    infos = [open_prepared(directory) for directory, _ in parse_sources(specs)]
    sizes = {info.image_size for info in infos}
    if len(sizes) != 1:
        raise ConfigError(
            f"the sources hold images of different sizes: {sorted(sizes)}",
            "Prepare every source with the same tools/prepare_data.py --size.",
        )
    return infos


def run_facts(config: ml_collections.ConfigDict, infos: list[shards.DatasetInfo]) -> RunFacts:
    """run.json of an SSL run: a backbone without labels, at the global-crop resolution."""
    mean, std = steps.input_stats(config.input.normalization, config.model.variant)
    return RunFacts(
        variant=config.model.variant,
        label_names=(),
        image_size=config.crops.global_size,
        preprocessing=dataclasses.asdict(PreprocessOptions(**infos[0].preprocessing)),
        normalization=config.input.normalization,
        mean=tuple(map(float, mean)),
        std=tuple(map(float, std)),
        dtype=config.model.dtype,
        dataset="+".join(info.name for info in infos),
        batch_size=config.batch_size,
        ema=False,
    )


def pretrain(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Pretrains (or resumes) the SSL run in `workdir`; returns its summary."""
    # ---------------------------------------------------------------- run directory
    run = RunDir(workdir)
    infos = open_unlabeled(config)
    check_pretrained(config)
    facts = run_facts(config, infos)
    primary = jax.process_index() == 0
    if primary:
        run.create()
        run.check_resumable(facts)
    with run.lock(primary):
        return _pretrain(config, run, infos)


def _pretrain(
    config: ml_collections.ConfigDict, run: RunDir, infos: list[shards.DatasetInfo]
) -> dict[str, Any]:
    primary = jax.process_index() == 0
    if primary:
        run.write_config(config)

    # ---------------------------------------------------------------- mesh
    mesh = sharding.make_mesh()
    data_sharding = sharding.data_sharding(mesh)

    # ---------------------------------------------------------------- model
    m = config.model
    model = create_model(
        m.variant,
        0,
        image_size=config.crops.global_size,
        dtype=m.dtype,
        drop_path=m.drop_path,
        remat=m.remat,
    )
    if not model.class_token:
        raise ConfigError(
            f"{m.variant} has no CLS token; the DINO loss needs one",
            "Use a ViT with a CLS token (DINOv2, DINOv3, AugReg, vit_tiny_demo).",
        )
    heads = build_heads(config)

    # ---------------------------------------------------------------- data
    crops = crop_options(config, model.patch_size)
    for size in (crops.global_size, crops.local_size):
        if size % model.patch_size:
            raise ConfigError(
                f"crop size {size} is not a multiple of the patch size {model.patch_size}",
                "Set config.crops.global_size and local_size to multiples of it (DINOv2 at "
                "patch 14: 224 and 98).",
            )
    loader, steps_per_epoch = multicrop.multicrop_loader(
        infos,
        batch_size=config.batch_size,
        seed=config.seed,
        options=crops,
        splits=tuple(config.data.splits),
        worker_count=config.data.worker_count,
    )
    total_steps = config.epochs * steps_per_epoch

    # ---------------------------------------------------------------- state
    rng = jax.random.key(config.seed)
    schedules = schedules_lib.make_schedules(config.ssl, total_steps, steps_per_epoch)
    state_shapes = jax.eval_shape(lambda: _student_shapes(model, heads, crops.global_size))
    tx = schedules_lib.make_optimizer(config.ssl, schedules, state_shapes, steps_per_epoch)
    state, state_shardings, report = init_state(config, model, heads, tx, mesh, rng)
    if report:
        console.say(report)
    count = sum(x.size for x in jax.tree.leaves(state["student"]))
    console.say(f"student: {count:,} parameters (backbone, heads, mask token); teacher: EMA")

    # ---------------------------------------------------------------- step
    mean, std = (jnp.asarray(v) for v in steps.input_stats(config.input.normalization, m.variant))
    ssl_step = jax.jit(
        make_ssl_step(
            model, heads, tx, schedules, crops, config.ssl, mean, std, jax.random.fold_in(rng, 1)
        ),
        in_shardings=(state_shardings, data_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    # ---------------------------------------------------------------- restore
    train_iter = iter(loader)
    ckpt = checkpoint.Checkpointer(run, keep=config.keep_checkpoints)
    if ckpt.latest_step() is not None:
        state, iterator_state = ckpt.restore_latest(checkpoint.abstract(state, state_shardings))
        train_iter.set_state(iterator_state)
        console.say(f"resumed from step {int(state['step'])} in {run.path}")
    writer = MetricWriter(run.tensorboard)
    preemption = Preemption()
    batches = pipeline.prefetch_to_device(train_iter, data_sharding)

    # ---------------------------------------------------------------- loop
    step = int(state["step"])
    started, first_step = time.time(), step
    timer, steps_timed, finite_flags, scalars = time.time(), 0, [], {}
    bar = console.progress(total=total_steps, initial=step, desc="ssl", unit="step")
    try:
        while step < total_steps:
            batch, iterator_state = next(batches)
            state, metrics = ssl_step(state, batch)
            step += 1
            steps_timed += 1
            bar.update(1)
            finite_flags.append(metrics.pop("finite"))
            if step % config.log_every_steps == 0 or step == total_steps:
                check_finite(finite_flags, step, config.nonfinite, ckpt)
                finite_flags = []
                elapsed = time.time() - timer
                scalars = {k: float(v) for k, v in metrics.items()}
                writer.scalars(
                    step,
                    {
                        **scalars,
                        "images_per_s": steps_timed * config.batch_size / elapsed,
                        "step_ms": 1000 * elapsed / steps_timed,
                        "epoch": step / steps_per_epoch,
                    },
                )
                # No redraw of its own: in logs the bar then adds a line only every few seconds.
                bar.set_postfix(
                    epoch=f"{step / steps_per_epoch:.1f}",
                    loss=f"{scalars['loss']:.4f}",
                    refresh=False,
                )
                timer, steps_timed = time.time(), 0
            stop = preemption.should_stop(step)
            if step % config.checkpoint_every_steps == 0 or step == total_steps or stop:
                ckpt.save(step, state, iterator_state)
                _export(run, ckpt, config, step, state["teacher"], primary)
            if stop:
                ckpt.wait()
                raise Preempted(step, str(run.path))
    finally:
        bar.close()
        preemption.restore()
        ckpt.wait()
    seconds = time.time() - started

    # ---------------------------------------------------------------- summary
    trained = step - first_step
    results = {
        "objective": "dino",
        "steps": step,
        "final": scalars,
        "seconds": {"train": round(seconds, 1)},
        "backbone": str(run.path.absolute()),
    }
    console.say(
        f"pretrained {trained} steps in {seconds:.0f} s"
        + (f" ({trained * config.batch_size / seconds:.0f} img/s)" if trained else "")
        + f"; teacher backbone in {run.path} (use --config.model.init_from={run.path})"
    )
    if primary:
        run.write_results(results)
    writer.close()
    ckpt.close()
    return results


def _student_shapes(model: Any, heads: dict, size: int) -> dict:
    """The student tree's structure (the optimizer's per-parameter rates are built on it)."""
    rng = jax.random.key(0)
    dummy = jnp.zeros((1, size, size, 3))
    tree = {"backbone": model.init({"params": rng}, dummy)["params"]}
    tree["mask_token"] = jnp.zeros((model.width,))
    for name, head in heads.items():
        tree[name] = head.init(rng, jnp.zeros((1, model.width)))["params"]
    return tree


def _export(
    run: RunDir,
    ckpt: checkpoint.Checkpointer,
    config: ml_collections.ConfigDict,
    step: int,
    teacher: dict,
    primary: bool,
) -> None:
    """The teacher as fine-tuning's starting point: best/ (orbax) and converted weights.

    best/ keeps one step, the one with the highest "score": the step itself, so the latest.
    """
    ckpt.save_best(step, teacher["backbone"], float(step))
    # Every process takes part in the gather (FSDP shards live on all of them).
    host = multihost_utils.process_allgather(teacher, tiled=True)
    if not primary:
        return
    params = {**host["backbone"], **{k: v for k, v in host.items() if k != "backbone"}}
    save_weights(
        run.path,
        params,
        variant=config.model.variant,
        source=str(run.path.absolute()),
        source_sha256="",
        source_format="cxrjax_ssl",
        image_size=config.crops.global_size,
        extra={"step": step, "objective": "dino"},
    )
