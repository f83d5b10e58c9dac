"""orbax checkpoints of a run: the latest K (state + data-iterator state) and the best one.

`workdir/checkpoints/<step>/` holds the full train state and every process's grain iterator
state; `workdir/best/<step>/` holds the parameters with the highest validation mean AUROC. Saves
are asynchronous; orbax commits a step only after every file is written, so a `kill -9` during a
save leaves the previous step restorable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class _IteratorState:
    """What grain's checkpoint handler saves: a state taken when its batch was consumed."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        workdir = Path(workdir).absolute()
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
            item_handlers={
                # PyTree (not Standard) handler: it can restore the params alone (evaluation).
                "state": ocp.PyTreeCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )
        self.best = ocp.CheckpointManager(
            workdir / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda metrics: metrics["val_mean_auroc"],
                best_mode="max",
                keep_checkpoints_without_metrics=False,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_handlers={"params": ocp.StandardCheckpointHandler()},
        )

    def save(self, step: int, state: Any, iterator_state: bytes) -> None:
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=grain.checkpoint.CheckpointSave(_IteratorState(iterator_state)),
            ),
            force=True,
        )

    def save_best(self, step: int, params: Any, val_mean_auroc: float) -> None:
        self.best.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
            metrics={"val_mean_auroc": float(val_mean_auroc)},
            force=True,
        )

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, abstract_state: Any, iterator: grain.DataLoaderIterator) -> Any:
        """Restores the newest train state (shaped like `abstract_state`) and `iterator`."""
        restored = self.latest.restore(
            self.latest.latest_step(),
            args=ocp.args.Composite(
                state=_pytree_restore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(iterator),
            ),
        )
        return restored["state"]

    def restore_params(self, which: str, abstract_params: Any) -> Any:
        """Parameters of the best (by validation) or the latest checkpoint."""
        if which == "best" and self.best.best_step() is not None:
            return self.best.restore(
                self.best.best_step(),
                args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)),
            )["params"]
        if which not in ("best", "latest"):
            raise ValueError(f"checkpoint must be 'best' or 'latest', not {which!r}")
        step = self.latest.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.latest.directory}")
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
