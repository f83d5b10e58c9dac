"""Entry point: `python -m cxrjax.main --config configs/ssl_nonmed.py:dataset=vindr --workdir W`.

Multi-host: `jax.distributed` is initialised from --coordinator_address, --num_processes and
--process_id, or automatically on SLURM (more than one task) and Cloud TPU VM slices.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cxrjax import console
from cxrjax.errors import CxrjaxError, Preempted, report_and_exit
from cxrjax.run_dir import RunDir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<experiment>).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show library INFO logging (orbax, absl, jax).")


def _initialize_distributed() -> None:
    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get(
        "TPU_WORKER_HOSTNAMES", ""
    ):
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.configure(_VERBOSE.value)
    try:
        sys.exit(_run(_CONFIG.value))
    except CxrjaxError as e:
        sys.exit(report_and_exit(e))
    except Preempted as e:
        console.say(str(e))
        sys.exit(0)


def _run(config) -> int:
    _initialize_distributed()
    # Imported here so that `--help` and config errors answer without loading the model code.
    from cxrjax.engine import trainer

    workdir = _WORKDIR.value or f"runs/{config.experiment}"
    logging.info(
        "workdir %s, %d processes, %d devices", workdir, jax.process_count(), jax.device_count()
    )
    if config.data.get("demo_patients") and not config.data.get("sources"):
        from cxrjax.data.demo import ensure_demo_dataset

        with config.unlocked():
            config.data.dir = config.data.dir or os.path.join(workdir, "data")
        if jax.process_index() == 0:
            ensure_demo_dataset(
                config.data.dir,
                patients=config.data.demo_patients,
                image_size=config.data.demo_image_size,
            )
    if config.get("objective") == "dino":
        # Self-supervised pretraining (configs/ssl_pretrain*.py): no labels, no evaluation.
        from cxrjax.ssl import trainer as ssl_trainer

        ssl_trainer.pretrain(config, workdir)
        console.say(f"results: {RunDir(workdir).results}")
        return 0
    results = trainer.train_and_evaluate(config, workdir)
    for split in ("val", "test"):
        if split in results:
            console.say(f"{split} mean AUROC: {results[split]['mean_auroc']:.4f}")
    console.say(f"results: {RunDir(workdir).results}")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
