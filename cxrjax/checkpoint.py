"""orbax checkpoints of a run: the latest K (state + data-iterator state) and the best one.

`checkpoints/<step>/` holds the full train state and ONE shared data-iterator file (the next
global step and what it is valid for); `best/<step>/` holds the parameters with the highest
score (`score_name`: validation mean AUROC when fine-tuning; an SSL run names its own, one name
per run, so a reader ranks by whichever the run wrote). The data state does not depend on the
number of processes (every process derives its rows of a global batch from the step), so it is
written once by process 0 and read by all, as maxtext does: a checkpoint written by 2 processes
resumes on 1 and vice versa, and parameters restore onto whatever shardings the new topology
asks for. grain's own handler keeps one file per process (`process_{i}-of-{n}.json`) and would
tie a checkpoint to its process count; checkpoints written that way are still read.

Saves are asynchronous; orbax commits a step only after every file is written (a tmp directory
renamed at the end), so a `kill -9` during a save leaves the previous step restorable.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp

from cxrjax.errors import MissingInputError
from cxrjax.run_dir import RunDir

_DATA_FILE = "iterator_state.json"


class Checkpointer:
    def __init__(
        self,
        run: RunDir,
        *,
        keep: int = 3,
        async_save: bool = True,
        score_name: str = "val_mean_auroc",
    ):
        self.score_name = score_name
        self.latest = ocp.CheckpointManager(
            run.checkpoints,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
                multiprocessing_options=_barriers_named("latest"),
            ),
            item_handlers={
                # PyTree (not Standard) handler: it can restore the params alone (evaluation).
                "state": ocp.PyTreeCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(_DATA_FILE),
            },
        )
        self.best = ocp.CheckpointManager(
            run.best,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                # A run's best/ holds one score name, whichever objective wrote it.
                best_fn=lambda metrics: next(iter(metrics.values())),
                best_mode="max",
                keep_checkpoints_without_metrics=False,
                enable_async_checkpointing=async_save,
                create=True,
                multiprocessing_options=_barriers_named("best"),
            ),
            item_handlers={"params": ocp.StandardCheckpointHandler()},
        )

    def save(self, step: int, state: Any, iterator_state: bytes) -> None:
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=ocp.args.JsonSave(json.loads(iterator_state)),
            ),
            force=True,
        )

    def save_best(self, step: int, params: Any, score: float) -> None:
        if step in self.best.all_steps():
            # A run killed after this save but before the step's train state was committed
            # repeats the step on resume; the parameters (and so the score) are the same.
            return
        self.best.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
            metrics={self.score_name: float(score)},
            force=True,
        )

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, bytes]:
        """The newest train state (onto `abstract_state`'s shardings) and the iterator state."""
        step = self.latest.latest_step()
        restored = self.latest.restore(
            step, args=ocp.args.Composite(state=_pytree_restore(abstract_state))
        )
        return restored["state"], self._iterator_state(step)

    def _iterator_state(self, step: int) -> bytes:
        data = self.latest.directory / str(step) / "data"
        shared = data / _DATA_FILE
        if shared.exists():
            return shared.read_bytes()
        # Written by grain's handler (one file per process, all equal): read any one of them.
        legacy = sorted(data.glob("process_*-of-*.json"))
        if not legacy:
            raise MissingInputError(
                f"{data}: the checkpoint holds no data-iterator state",
                f"Delete {self.latest.directory / str(step)} to resume from the step before.",
            )
        return legacy[0].read_bytes()

    def restore_params(self, which: str, abstract_params: Any) -> Any:
        """Parameters of the best (by validation) or the latest checkpoint."""
        if which == "best" and self.best.best_step() is not None:
            return self.best.restore(
                self.best.best_step(),
                args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)),
            )["params"]
        step = self.latest.latest_step()
        if step is None:
            raise MissingInputError(
                f"no checkpoint in {self.latest.directory}",
                "Train the run first (or wait for its first checkpoint).",
            )
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=_pytree_restore({"params": abstract_params}, partial=True)
            ),
        )
        return restored["state"]["params"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _barriers_named(manager: str) -> ocp.options.MultiprocessingOptions:
    """Cross-process barrier names of one manager.

    orbax names an async save's commit barrier after the step directory, so `checkpoints/4`
    and `best/4`, committed at the same time, would meet at one barrier: process 0 could then
    finalize one save while process 1 is still writing it (a failed validation or a hang).
    """
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=manager)


def _pytree_restore(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restores onto `target`'s shardings, whatever topology saved the checkpoint."""
    return ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial,
    )


def abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
