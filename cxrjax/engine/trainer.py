"""The trainer: shards -> jitted, sharded train steps -> validation -> checkpoints -> test results.

`train_and_evaluate` reads top to bottom in the phases of a run: run directory, mesh, data, model
and state, step, evaluators, restore, loop, final evaluation. State is a plain dict pytree that
`jax.jit` receives with explicit shardings and donates back each step; the step functions live
in `engine.step` (no I/O), evaluation goes through the same `Predictor` that `cxrjax.predict`
and `cxrjax.evaluate` use.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import parameter_overview
from jax.experimental import multihost_utils

from cxrjax import checkpoint, console, optim, sharding
from cxrjax.data import pipeline
from cxrjax.data.images import PreprocessOptions
from cxrjax.engine import step as steps
from cxrjax.engine.data import SELECTION_RULE, TrainingData, open_training_data
from cxrjax.engine.inference import Predictor
from cxrjax.engine.state import build_model, init_state, model_options
from cxrjax.errors import MissingInputError, NonFiniteError, Preempted
from cxrjax.evaluation.evaluators import ClassificationEvaluator, format_line, summarize
from cxrjax.evaluation.predictions import Predictions, concatenate, save_predictions
from cxrjax.metric_writer import MetricWriter
from cxrjax.models.pretrained import conversion_command
from cxrjax.run_dir import RunDir, RunFacts


def check_pretrained(config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any compilation, when the configured initial weights are absent."""
    path = config.model.init_from
    if path and not Path(path).exists():
        create = config.model.init_hint or conversion_command(path, config.model.variant)
        raise MissingInputError(
            f"no converted weights at {path}",
            f"Create them with:\n  {create}\n"
            "(or point --config.model.init_from at them, or set it to '' to train from scratch)",
        )


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
    # ---------------------------------------------------------------- run directory
    run = RunDir(workdir)
    data = open_training_data(config)
    check_pretrained(config)
    facts = run_facts(config, data)
    primary = jax.process_index() == 0
    if primary:
        run.create()
        run.check_resumable(facts)
    with run.lock(primary):
        return _train(config, run, data, facts)


def _train(
    config: ml_collections.ConfigDict, run: RunDir, data: TrainingData, facts: RunFacts
) -> dict[str, Any]:
    primary = jax.process_index() == 0
    if primary:
        run.write_config(config)

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
    _describe_parameters(run, state["params"], primary)
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
        source=str(run.path),
    )
    validation = data.evaluators("val", config.eval_batch_size)
    eval_params = lambda state: state["ema"] if config.ema_decay else state["params"]  # noqa: E731

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
    timer, steps_timed, finite_flags = time.time(), 0, []
    bar = console.progress(total=total_steps, initial=step, desc="train", unit="step")
    try:
        while step < total_steps:
            batch, iterator_state = next(batches)
            state, metrics = train_step(state, batch)
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
                        "learning_rate": float(schedule(step - 1)),
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
            # Validation and an epoch-end checkpoint every `eval_every_epochs`, and at the end.
            epoch_end = step % steps_per_epoch == 0 and (
                (step // steps_per_epoch) % config.eval_every_epochs == 0 or step == total_steps
            )
            if epoch_end and validation:
                score = _validate(
                    validation,
                    predictor.with_params(eval_params(state)),
                    step,
                    steps_per_epoch,
                    writer,
                )
                ckpt.save_best(step, eval_params(state), score)
            stop = preemption.should_stop(step)
            if epoch_end or step % config.checkpoint_every_steps == 0 or stop:
                ckpt.save(step, state, iterator_state)
            if stop:
                ckpt.wait()
                raise Preempted(step, str(run.path))
    finally:
        bar.close()
        preemption.restore()
        ckpt.wait()
    train_seconds = time.time() - started

    # ---------------------------------------------------------------- final evaluation
    started = time.time()
    results: dict[str, Any] = {"label_names": list(facts.label_names), "steps": step}
    abstract_params = checkpoint.abstract(state["params"], state_shardings["params"])
    best = predictor.with_params(ckpt.restore_params("best", abstract_params))
    for split in ("val", "test"):
        evaluators = data.evaluators(split, config.eval_batch_size)
        if not evaluators:
            continue
        per_source = {name: ev.predictions(best) for name, ev in evaluators.items()}
        if data.sources is None:
            preds = per_source[split]
            results[split] = summarize(preds)
            if primary:
                save_predictions(run.predictions(split), preds)
        else:
            results[split] = summarize(concatenate(list(per_source.values())))
            for name, preds in per_source.items():
                summary = summarize(preds)
                results.setdefault("sources", {}).setdefault(name, {})[split] = summary
                console.say(f"best checkpoint, {name}: " + format_line(split, summary))
                if primary:
                    _write_source_view(run, config, data, name, split, preds)
            results["selection"] = SELECTION_RULE
        writer.scalars(step, {f"final_{split}/mean_auroc": results[split]["mean_auroc"]})
        console.say("best checkpoint: " + format_line(split, results[split]))
    results["seconds"] = {
        "train": round(train_seconds, 1),
        "final_evaluation": round(time.time() - started, 1),
    }
    trained = step - first_step
    console.say(
        f"trained {trained} steps in {train_seconds:.0f} s"
        + (f" ({trained * config.batch_size / train_seconds:.0f} img/s)" if trained else "")
        + f"; final evaluation {results['seconds']['final_evaluation']:.0f} s"
    )
    if primary:
        run.write_results(results)
    writer.close()
    ckpt.close()
    return results


def _validate(
    evaluators: dict[str, ClassificationEvaluator],
    predictor: Predictor,
    step: int,
    steps_per_epoch: int,
    writer: MetricWriter,
) -> float:
    """Runs the validation evaluators; returns the model-selection score.

    One source: its mean AUROC. Several: the mean over sources of each source's mean AUROC
    (SELECTION_RULE); each source and the pooled predictions are logged.
    """
    epoch = step // steps_per_epoch
    if len(evaluators) == 1 and "val" in evaluators:
        values = dict(evaluators["val"].run(predictor))
        writer.scalars(step, {f"val/{k}": v for k, v in values.items()})
        console.say(f"[epoch {epoch}] " + _line("val", values))
        return values["mean_auroc"]
    scores, pooled = [], []
    for name, evaluator in evaluators.items():
        values = dict(evaluator.run(predictor))
        pooled.append(evaluator.last_predictions)
        writer.scalars(step, {f"val/{name}/{k}": v for k, v in values.items()})
        console.say(f"[epoch {epoch}] {name}: " + _line("val", values))
        scores.append(values["mean_auroc"])
    summary = summarize(concatenate(pooled))
    score = float(np.nanmean(scores))
    writer.scalars(step, {"val/pooled/mean_auroc": summary["mean_auroc"], "val/selection": score})
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
    source_config.data.dir = str(data.infos[data.source_names().index(name)].directory)
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


class Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks: the step in flight finishes, then saves."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
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


def check_finite(flags: list, step: int, policy: str, ckpt: checkpoint.Checkpointer) -> None:
    """Non-finite steps were skipped in the step itself; `stop` ends the run naming the step."""
    bad = np.flatnonzero(~np.asarray(jax.device_get(flags), bool))
    if not len(bad):
        return
    first = step - len(flags) + int(bad[0]) + 1
    if policy == "skip":
        console.say(f"warning: skipped {len(bad)} steps with non-finite loss (first: {first})")
        return
    ckpt.wait()
    raise NonFiniteError(
        f"non-finite loss or gradient at step {first}; the update was not applied and the last "
        f"good checkpoint (step {ckpt.latest_step()}) is kept.",
        "Lower config.lr, set config.grad_clip, or set config.nonfinite='skip' to skip such steps.",
    )
