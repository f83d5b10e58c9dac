"""The trainer: shards -> jitted, sharded train steps -> validation -> checkpoints -> test results.

`train_and_evaluate` reads top to bottom in the phases of a run: run directory, mesh, data, model
and state, step, evaluators, restore, loop, final evaluation. State is a plain dict pytree that
`jax.jit` receives with explicit shardings and donates back each step; the step functions live
in `engine.step` (no I/O), evaluation goes through the same `Predictor` that `cxrjax.predict`
and `cxrjax.evaluate` use.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import parameter_overview

from cxrjax import checkpoint, console, optim, sharding
from cxrjax.data import pipeline
from cxrjax.data.images import PreprocessOptions
from cxrjax.engine import step as steps
from cxrjax.engine.data import TrainingData, open_training_data
from cxrjax.engine.inference import Predictor
from cxrjax.engine.run import Run, open_run
from cxrjax.engine.state import build_model, init_state, model_options
from cxrjax.evaluation.evaluators import ClassificationEvaluator, format_line, summarize
from cxrjax.evaluation.predictions import Predictions, concatenate, save_predictions
from cxrjax.run_dir import RunDir, RunFacts

# What best/ ranks by (the selection rule of `TrainingData.selection_rule`).
SCORE_NAME = "val_mean_auroc"


def run_facts(config: ml_collections.ConfigDict, data: TrainingData) -> RunFacts:
    """What the run directory records so that inference never needs the training data."""
    mean, std = steps.input_stats(config.input.normalization, config.model.variant)
    return RunFacts(
        variant=config.model.variant,
        label_names=tuple(data.label_names),
        image_size=data.image_size,
        preprocessing=dataclasses.asdict(PreprocessOptions(**data.preprocessing)),
        normalization=config.input.normalization,
        mean=tuple(map(float, mean)),
        std=tuple(map(float, std)),
        dtype=config.model.dtype,
        dataset=data.name,
        batch_size=config.batch_size,
        ema=bool(config.ema_decay),
        model_options=model_options(config),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`, then evaluates its best checkpoint."""
    data = open_training_data(config)
    with open_run(config, workdir, run_facts(config, data), score_name=SCORE_NAME) as run:
        return _train(config, run, data)


def _train(config: ml_collections.ConfigDict, run: Run, data: TrainingData) -> dict[str, Any]:
    facts = run_facts(config, data)

    # ---------------------------------------------------------------- mesh
    mesh = sharding.make_mesh()
    data_sharding = sharding.data_sharding(mesh)

    # ---------------------------------------------------------------- data
    steps_per_epoch = data.steps_per_epoch(config)
    total_steps = config.epochs * steps_per_epoch
    augment = pipeline.Augment(config.input.flip_prob, config.input.max_rotation)
    host_augment = pipeline.Augment(0.0, 0.0) if config.input.augment_on_device else augment
    loader = data.loader(config, host_augment)

    # ---------------------------------------------------------------- model and state
    model = build_model(config, len(data.label_names), data.image_size)
    rng = jax.random.key(config.seed)
    tx, state, state_shardings, report = init_state(
        config, model, data.image_size, mesh, rng, total_steps, data.label_names
    )
    if report:
        console.say(report)
    _describe_parameters(run.dir, state["params"], run.primary)
    schedule = optim.learning_rate(config, total_steps)

    # ---------------------------------------------------------------- step
    mean, std = (jnp.asarray(v) for v in (facts.mean, facts.std))
    pos_weight = jnp.asarray(data.pos_weight())
    if not config.loss.pos_weight:
        pos_weight = jnp.ones_like(pos_weight)
    train_step = jax.jit(
        steps.make_train_step(
            model,
            tx,
            mean,
            std,
            pos_weight,
            jax.random.fold_in(rng, 1),
            accum_steps=config.grad_accum_steps,
            ema_decay=config.ema_decay,
            augment=augment if config.input.augment_on_device else None,
            # FSDP: gather the parameter shards once per step (see make_train_step).
            compute_sharding=sharding.replicated(mesh) if config.fsdp else None,
        ),
        in_shardings=(state_shardings, data_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    # ---------------------------------------------------------------- evaluators
    predictor = Predictor.build(
        model,
        None,
        label_names=facts.label_names,
        preprocessing=PreprocessOptions(**facts.preprocessing),
        normalization=(np.asarray(facts.mean), np.asarray(facts.std)),
        mesh=mesh,
        source=str(run.dir.path),
    )
    validation = data.evaluators("val", config.eval_batch_size)
    eval_params = lambda state: state["ema"] if config.ema_decay else state["params"]  # noqa: E731

    # ---------------------------------------------------------------- restore
    train_iter = iter(loader)
    state = run.restore(state, state_shardings, train_iter)
    batches = pipeline.prefetch_to_device(train_iter, data_sharding)

    # ---------------------------------------------------------------- loop
    with run.loop(
        first_step=int(state["step"]),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        desc="train",
        extra_scalars=lambda step: {"learning_rate": float(schedule(step - 1))},
    ) as loop:
        while loop.running():
            batch, iterator_state = next(batches)
            state, metrics = train_step(state, batch)
            loop.record(metrics)
            # Validation and an epoch-end checkpoint every `eval_every_epochs`, and at the end.
            epoch_end = loop.is_epoch_end(config.eval_every_epochs)
            if epoch_end and validation:
                predictions = predictor.with_params(eval_params(state))
                score = _validate(validation, predictions, loop.step, steps_per_epoch, run)
                run.ckpt.save_best(loop.step, eval_params(state), score)
            loop.checkpoint(state, iterator_state, force=epoch_end)

    # ---------------------------------------------------------------- final evaluation
    started = time.time()
    results: dict[str, Any] = {"label_names": list(facts.label_names), "steps": loop.step}
    abstract_params = checkpoint.abstract(state["params"], state_shardings["params"])
    best = predictor.with_params(run.ckpt.restore_params("best", abstract_params))
    for split in ("val", "test"):
        per_source = {
            name: evaluator.predictions(best)
            for name, evaluator in data.evaluators(split, config.eval_batch_size).items()
        }
        if not per_source:
            continue
        pooled = concatenate(list(per_source.values()))
        results[split] = summarize(pooled)
        if run.primary:
            save_predictions(run.dir.predictions(split), pooled)
        if len(per_source) > 1:
            for name, preds in per_source.items():
                summary = summarize(preds)
                results.setdefault("sources", {}).setdefault(name, {})[split] = summary
                console.say(f"best checkpoint, {name}: " + format_line(split, summary))
                if run.primary:
                    _write_source_view(run.dir, config, data, name, split, preds)
        run.writer.scalars(loop.step, {f"final_{split}/mean_auroc": results[split]["mean_auroc"]})
        console.say("best checkpoint: " + format_line(split, results[split]))
    results["selection"] = data.selection_rule
    results["seconds"] = {
        "train": round(loop.seconds, 1),
        "final_evaluation": round(time.time() - started, 1),
    }
    console.say(
        loop.summary("trained")
        + f"; final evaluation {results['seconds']['final_evaluation']:.0f} s"
    )
    if run.primary:
        run.dir.write_results(results)
    return results


def _validate(
    evaluators: dict[str, ClassificationEvaluator],
    predictor: Predictor,
    step: int,
    steps_per_epoch: int,
    run: Run,
) -> float:
    """Runs the validation evaluators; returns the model-selection score.

    The score is the mean over sources of each source's mean AUROC (one source: its mean
    AUROC); with several, each source is logged as well, and the pooled predictions.
    """
    epoch = step // steps_per_epoch
    several = len(evaluators) > 1
    scores, pooled = [], []
    for name, evaluator in evaluators.items():
        values = dict(evaluator.run(predictor))
        pooled.append(evaluator.last_predictions)
        scores.append(values["mean_auroc"])
        prefix = f"val/{name}/" if several else "val/"
        run.writer.scalars(step, {prefix + k: v for k, v in values.items()})
        console.say(f"[epoch {epoch}] " + (f"{name}: " if several else "") + _line("val", values))
    score = float(np.nanmean(scores))
    if several:
        summary = summarize(concatenate(pooled))
        run.writer.scalars(
            step, {"val/pooled/mean_auroc": summary["mean_auroc"], "val/selection": score}
        )
        console.say(
            f"[epoch {epoch}] pooled: " + format_line("val", summary) + f"; selection {score:.4f}"
        )
    return score


def _line(split: str, values: dict[str, float]) -> str:
    labels = {k[len("auroc/") :]: v for k, v in values.items() if k.startswith("auroc/")}
    return format_line(split, {"mean_auroc": values["mean_auroc"], "auroc": labels})


def _write_source_view(
    run: RunDir,
    config: ml_collections.ConfigDict,
    data: TrainingData,
    name: str,
    split: str,
    preds: Predictions,
) -> None:
    """sources/<name>/: this source's predictions with a config naming it as the dataset, so
    `tools/compare.py` and `cxrjax.evaluate` read it like a run trained on that source."""
    view = run.source(name)
    view.create()
    save_predictions(view.predictions(split), preds)
    source_config = ml_collections.ConfigDict(config.to_dict())
    source_config.experiment = f"{config.experiment} (trained on {data.name})"
    source_config.data.dataset = name
    (info,) = [info for info in data.infos if info.directory.name == name]
    source_config.data.dir = str(info.directory)
    view.write_config(source_config)


def _describe_parameters(run: RunDir, params: Any, primary: bool) -> None:
    """The full parameter table goes to the run directory; the console gets one line."""
    if not primary:
        return
    run.write_parameters(parameter_overview.get_parameter_overview(params) + "\n")
    leaves = jax.tree.leaves(params)
    count = sum(x.size for x in leaves)
    size = sum(x.size * x.dtype.itemsize for x in leaves)
    console.say(f"model: {count:,} parameters ({size / 2**20:.1f} MiB), table in {run.parameters}")
