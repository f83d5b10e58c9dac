"""What every training objective shares around its step: an open run and its step loop.

`open_run` is the run-directory phase (weights check, create, resume check, lock, config);
`Run.restore` resumes the latest checkpoint with its data-iterator state; `Run.loop` is the
step bookkeeping (progress with ETA, timing and images/s, the non-finite check, TensorBoard
scalars at `log_every_steps`, checkpoint cadence, preemption). The fine-tuning trainer
(`engine.trainer`) and the SSL trainer (`ssl.trainer`) are each a loop over these pieces, so
neither imports the other.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from cxrjax import checkpoint, console
from cxrjax.errors import MissingInputError, NonFiniteError, Preempted
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


@contextlib.contextmanager
def open_run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    facts: RunFacts,
    *,
    score_name: str,
) -> Iterator[Run]:
    """The run directory, checked and locked for this process's lifetime.

    `score_name` is what `best/` ranks by (validation mean AUROC, or an SSL run's own score).
    """
    check_pretrained(config)
    directory = RunDir(workdir)
    primary = jax.process_index() == 0
    if primary:
        directory.create()
        directory.check_resumable(facts)
    with directory.lock(primary):
        if primary:
            directory.write_config(config)
        run = Run(directory, config, score_name)
        try:
            yield run
        finally:
            run.close()


class Run:
    """An open run directory with its checkpointer and metric writer."""

    def __init__(self, directory: RunDir, config: ml_collections.ConfigDict, score_name: str):
        self.dir = directory
        self.config = config
        self.primary = jax.process_index() == 0
        self.ckpt = checkpoint.Checkpointer(
            directory, keep=config.keep_checkpoints, score_name=score_name
        )
        self.writer = MetricWriter(directory.tensorboard)

    def restore(self, state: Any, shardings: Any, train_iter: Any) -> Any:
        """The latest checkpoint's state (onto `shardings`), `train_iter` set to follow it."""
        if self.ckpt.latest_step() is None:
            return state
        state, iterator_state = self.ckpt.restore_latest(checkpoint.abstract(state, shardings))
        train_iter.set_state(iterator_state)
        console.say(f"resumed from step {int(state['step'])} in {self.dir.path}")
        return state

    def loop(
        self,
        *,
        first_step: int,
        total_steps: int,
        steps_per_epoch: int,
        desc: str,
        extra_scalars: Callable[[int], dict[str, float]] | None = None,
        evaluate: Callable[[int], dict[str, float]] | None = None,
        evaluate_every_steps: int = 0,
    ) -> StepLoop:
        return StepLoop(
            self,
            first_step=first_step,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            desc=desc,
            extra_scalars=extra_scalars,
            evaluate=evaluate,
            evaluate_every_steps=evaluate_every_steps,
        )

    def close(self) -> None:
        self.ckpt.wait()
        self.writer.close()
        self.ckpt.close()


class StepLoop:
    """The bookkeeping of one training loop, used as a context manager around it.

    `running()` is the loop condition (it raises `Preempted` once a signalled step is saved),
    `record(metrics)` follows each step (count, bar, non-finite flags, scalars) and
    `checkpoint(state, iterator_state)` ends it (cadence, preemption). `logged` says whether
    the last `record` logged. An optional `evaluate(step)` runs every `evaluate_every_steps`
    (and at the end) inside `record`; its scalars go to TensorBoard and one console line.
    """

    def __init__(
        self,
        run: Run,
        *,
        first_step: int,
        total_steps: int,
        steps_per_epoch: int,
        desc: str,
        extra_scalars: Callable[[int], dict[str, float]] | None,
        evaluate: Callable[[int], dict[str, float]] | None = None,
        evaluate_every_steps: int = 0,
    ):
        self.run = run
        self.config = run.config
        self.step = self.first_step = first_step
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.desc = desc
        self.last_scalars: dict[str, float] = {}
        self.seconds = 0.0
        self._extra = extra_scalars or (lambda step: {})
        self._evaluate = evaluate if evaluate_every_steps else None
        self._evaluate_every = evaluate_every_steps
        self.logged = False
        self.last_evaluation: dict[str, float] = {}
        self._finite: list[Any] = []
        self._stop = False

    def __enter__(self) -> StepLoop:
        self._preemption = Preemption()
        self._bar = console.progress(
            total=self.total_steps, initial=self.step, desc=self.desc, unit="step"
        )
        self._started = self._timer = time.time()
        self._steps_timed = 0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.time() - self._started
        self._bar.close()
        self._preemption.restore()
        self.run.ckpt.wait()

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def running(self) -> bool:
        """True while steps remain; after a signal, raises `Preempted` (the step was saved)."""
        if self._stop:
            self.run.ckpt.wait()
            raise Preempted(self.step, str(self.run.dir.path))
        return self.step < self.total_steps

    def is_epoch_end(self, every_epochs: int = 1) -> bool:
        """The step closes an epoch that is a multiple of `every_epochs`, or the last one."""
        if self.step % self.steps_per_epoch:
            return False
        return (self.step // self.steps_per_epoch) % every_epochs == 0 or self.done

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def record(self, metrics: dict[str, Any]) -> None:
        """Counts the step; every `log_every_steps` (and at the end) checks and logs metrics.

        Metrics stay on the device between logging steps: reading them is the loop's only
        host sync.
        """
        self.step += 1
        self._steps_timed += 1
        self._bar.update(1)
        self._finite.append(metrics.pop("finite"))
        self.logged = not (self.step % self.config.log_every_steps and not self.done)
        if self.logged:
            self._log(metrics)
        if self._evaluate and (self.step % self._evaluate_every == 0 or self.done):
            started = time.time()
            self.last_evaluation = self._evaluate(self.step)
            self.run.writer.scalars(self.step, self.last_evaluation)
            console.say(
                f"step {self.step}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in self.last_evaluation.items())
            )
            # Evaluation time is not training time: the next images/s leaves it out.
            self._timer += time.time() - started

    def _log(self, metrics: dict[str, Any]) -> None:
        check_finite(self._finite, self.step, self.config.nonfinite, self.run.ckpt)
        self._finite = []
        elapsed = time.time() - self._timer
        self.last_scalars = {k: float(v) for k, v in metrics.items()}
        self.run.writer.scalars(
            self.step,
            {
                **self.last_scalars,
                **self._extra(self.step),
                "images_per_s": self._steps_timed * self.config.batch_size / elapsed,
                "step_ms": 1000 * elapsed / self._steps_timed,
                "epoch": self.epoch,
            },
        )
        # No redraw of its own: in logs the bar then adds a line only every few seconds.
        self._bar.set_postfix(
            epoch=f"{self.epoch:.1f}", loss=f"{self.last_scalars['loss']:.4f}", refresh=False
        )
        self._timer, self._steps_timed = time.time(), 0

    def checkpoint(self, state: Any, iterator_state: bytes, *, force: bool = False) -> bool:
        """Saves at `checkpoint_every_steps`, at the end, when `force`d or after a signal."""
        self._stop = self._preemption.should_stop(self.step)
        if not (
            force or self._stop or self.done or self.step % self.config.checkpoint_every_steps == 0
        ):
            return False
        self.run.ckpt.save(self.step, state, iterator_state)
        return True

    def summary(self, verb: str) -> str:
        """The closing line: how many steps this process ran, in how long, how fast."""
        trained = self.step - self.first_step
        rate = trained * self.config.batch_size / self.seconds if trained and self.seconds else 0
        return f"{verb} {trained} steps in {self.seconds:.0f} s" + (
            f" ({rate:.0f} img/s)" if trained else ""
        )


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
