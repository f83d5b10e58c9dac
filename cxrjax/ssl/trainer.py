"""The SSL trainer: unlabeled shards -> multi-crop batches -> jitted, sharded DINOv2 steps.

`pretrain` reads top to bottom in the phases of a run over the same `engine.run` pieces as the
fine-tuning trainer (run directory, restore, step loop): mesh, model, data, state and
step, restore, loop, summary. The run directory is a
fine-tuning starting point as it is: besides `checkpoints/` (student, teacher, heads and
optimizer state, with the data-iterator state) it holds the teacher backbone as `best/`
(orbax, item "params", read by `tools/convert_checkpoint.py`) and as converted weights
(`params.safetensors` + `meta.json`, the teacher heads under `dino_head/`...), read by
`--config.model.init_from=RUN` and `tools/export_checkpoint.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils

from cxrjax import console, sharding
from cxrjax.data import pipeline, shards
from cxrjax.data.images import PreprocessOptions
from cxrjax.data.mixture import parse_sources
from cxrjax.engine import step as steps
from cxrjax.engine.data import open_prepared
from cxrjax.engine.run import Run, open_run
from cxrjax.errors import ConfigError
from cxrjax.models import create_model
from cxrjax.models.weights import save_weights
from cxrjax.run_dir import RunFacts
from cxrjax.ssl import monitor, multicrop
from cxrjax.ssl import schedules as schedules_lib
from cxrjax.ssl.step import build_heads, init_state, make_ssl_step

# What best/ ranks by: the teacher's step, so best/ is the latest exported teacher.
SCORE_NAME = "teacher_step"


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
    infos = open_unlabeled(config)
    with open_run(config, workdir, run_facts(config, infos), score_name=SCORE_NAME) as run:
        return _pretrain(config, run, infos)


def _pretrain(
    config: ml_collections.ConfigDict, run: Run, infos: list[shards.DatasetInfo]
) -> dict[str, Any]:
    # ---------------------------------------------------------------- mesh
    mesh = sharding.make_mesh()
    data_sharding = sharding.data_sharding(mesh)

    # ---------------------------------------------------------------- model
    model, heads = build_model(config)

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
    data_steps = steps_per_epoch
    # DINOv2's OFFICIAL_EPOCH_LENGTH: a fixed number of iterations per schedule "epoch", so the
    # warmups (lr, teacher temperature, frozen prototypes) keep their length on a small set.
    steps_per_epoch = config.ssl.epoch_length or data_steps
    total_steps = config.epochs * steps_per_epoch
    console.say(
        f"ssl: {total_steps} steps = {config.epochs} epochs x {steps_per_epoch} iterations "
        f"({total_steps / data_steps:.1f} passes over the {data_steps * config.batch_size} images)"
    )

    # ---------------------------------------------------------------- state and step
    rng = jax.random.key(config.seed)
    setup = build_step(config, model, heads, crops, mesh, rng, total_steps, steps_per_epoch)
    state, state_shardings, ssl_step = setup.state, setup.shardings, setup.step
    mean, std = setup.mean, setup.std
    if setup.report:
        console.say(setup.report)
    count = sum(x.size for x in jax.tree.leaves(state["student"]))
    console.say(f"student: {count:,} parameters (backbone, heads, mask token); teacher: EMA")

    # ---------------------------------------------------------------- restore
    train_iter = iter(loader)
    state = run.restore(state, state_shardings, train_iter)
    batches = pipeline.prefetch_to_device(train_iter, data_sharding)

    # ---------------------------------------------------------------- monitoring
    knn = monitor.evaluator_for(config, model, infos, mean, std, mesh)
    if knn is not None:
        console.say(
            f"kNN evaluation every {config.ssl.knn_every_steps} steps on {knn.size} "
            f"{config.ssl.knn_split} images ({', '.join(knn.label_names)})"
        )
    elif config.ssl.knn_every_steps:
        console.say(f"no kNN evaluation: no source has a labelled {config.ssl.knn_split} split")

    # ---------------------------------------------------------------- loop
    with run.loop(
        first_step=int(state["step"]),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        desc="ssl",
        # `state` is read when called: the teacher of the step just recorded.
        evaluate=knn and (lambda step: knn(state["teacher"]["backbone"])),
        evaluate_every_steps=config.ssl.knn_every_steps if knn else 0,
    ) as loop:
        while loop.running():
            batch, iterator_state = next(batches)
            state, metrics = ssl_step(state, batch)
            loop.record(metrics)
            if loop.logged:
                _report(loop.step, loop.last_scalars)
            if loop.checkpoint(state, iterator_state):
                _export(run, config, loop.step, state["teacher"])

    # ---------------------------------------------------------------- summary
    results = {
        "objective": "dino",
        "steps": loop.step,
        "final": loop.last_scalars,
        "seconds": {"train": round(loop.seconds, 1)},
        "backbone": str(run.dir.path.absolute()),
    }
    console.say(
        loop.summary("pretrained")
        + f"; teacher backbone in {run.dir.path} (use --config.model.init_from={run.dir.path})"
    )
    if run.primary:
        run.dir.write_results(results)
    return results


def build_model(config: ml_collections.ConfigDict) -> tuple[Any, dict]:
    """The headless ViT the student and teacher share, and the DINO/iBOT heads."""
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
    return model, build_heads(config)


class StepSetup(NamedTuple):
    state: dict
    shardings: dict
    step: Callable[[dict, dict], tuple[dict, dict]]
    mean: jax.Array
    std: jax.Array
    report: str | None


def build_step(
    config: ml_collections.ConfigDict,
    model: Any,
    heads: dict,
    crops: multicrop.CropOptions,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    total_steps: int,
    steps_per_epoch: int,
) -> StepSetup:
    """Schedules, optimizer, the sharded initial state and the jitted step that donates it."""
    schedules = schedules_lib.make_schedules(config.ssl, total_steps, steps_per_epoch)
    state_shapes = jax.eval_shape(lambda: _student_shapes(model, heads, crops.global_size))
    tx = schedules_lib.make_optimizer(config.ssl, schedules, state_shapes, steps_per_epoch)
    state, state_shardings, report = init_state(config, model, heads, tx, mesh, rng)
    stats = steps.input_stats(config.input.normalization, config.model.variant)
    mean, std = (jnp.asarray(v) for v in stats)
    ssl_step = jax.jit(
        make_ssl_step(
            model, heads, tx, schedules, crops, config.ssl, mean, std, jax.random.fold_in(rng, 1)
        ),
        in_shardings=(state_shardings, sharding.data_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return StepSetup(state, state_shardings, ssl_step, mean, std, report)


_REPORTED = (
    ("loss", "loss", ".3f"),
    ("dino_loss", "dino", ".3f"),
    ("ibot_loss", "ibot", ".3f"),
    ("koleo_loss", "koleo", ".3f"),
    ("teacher_entropy", "teacher entropy", ".3f"),
    ("prototype_usage", "prototype usage", ".3f"),
    ("learning_rate", "lr", ".2e"),
    ("teacher_temp", "teacher temp", ".3f"),
)


def _report(step: int, scalars: dict[str, float]) -> None:
    """One console line per logging step, and a warning when the teacher collapses."""
    parts = [f"{label} {scalars[k]:{fmt}}" for k, label, fmt in _REPORTED if k in scalars]
    console.say(f"step {step}: " + ", ".join(parts))
    warning = monitor.collapse_warning(scalars)
    if warning:
        console.say(warning)


def _student_shapes(model: Any, heads: dict, size: int) -> dict:
    """The student tree's structure (the optimizer's per-parameter rates are built on it)."""
    rng = jax.random.key(0)
    dummy = jnp.zeros((1, size, size, 3))
    tree = {"backbone": model.init({"params": rng}, dummy)["params"]}
    tree["mask_token"] = jnp.zeros((model.width,))
    for name, head in heads.items():
        tree[name] = head.init(rng, jnp.zeros((1, model.width)))["params"]
    return tree


def _export(run: Run, config: ml_collections.ConfigDict, step: int, teacher: dict) -> None:
    """The teacher as fine-tuning's starting point: best/ (orbax) and converted weights.

    best/ keeps one step, the one with the highest score: the step itself, so the latest.
    """
    run.ckpt.save_best(step, teacher["backbone"], float(step))
    # Every process takes part in the gather (FSDP shards live on all of them).
    host = multihost_utils.process_allgather(teacher, tiled=True)
    if not run.primary:
        return
    params = {**host["backbone"], **{k: v for k, v in host.items() if k != "backbone"}}
    save_weights(
        run.dir.path,
        params,
        variant=config.model.variant,
        source=str(run.dir.path.absolute()),
        source_sha256="",
        source_format="cxrjax_ssl",
        image_size=config.crops.global_size,
        extra={"step": step, "objective": "dino"},
    )
