"""Lists or runs the study's grid: initialisation x dataset x training fraction x seed.

  python tools/run_study.py --datasets vindr chexpert --fractions 1.0 0.1 --seeds 0 1        # list
  python tools/run_study.py --datasets vindr --run --compare-out results/vindr             # run all
  python tools/run_study.py ... --config.batch_size=64    (any --config.x=y goes to every run)
  python tools/run_study.py --datasets chexpert chestxray14 vindr --cross-dataset --run \
      --compare-out results/external    # also every run on every other dataset's test split
  python tools/run_study.py --grid pooled --datasets chexpert mimic chestxray14 --run
  python tools/run_study.py --grid lodo --datasets chexpert mimic chestxray14 --run
  python tools/run_study.py ... --run --launcher slurm --partition gpu --gpus 8 --hours 48 \
      --array-parallelism 16

Grids: `single` (default) trains one run per dataset; `pooled` trains one multi-source run on all
`--datasets` (configs/multi.py), tested on each source's test split inside the run; `lodo`
(leave one dataset out) trains on all but one and tests on the one left out, on the labels it
shares (`python -m cxrjax.evaluate --workdir W --data D`).

Finished cells (a `results.json`, or the external evaluation's predictions file) are skipped;
interrupted ones resume from their checkpoint. `sup_med` needs its MIMIC-CXR pretraining stage
first: the grid then contains that run and the conversion of its best checkpoint into the
weights the fine-tuning configs load, and every cell waits for what it depends on.

Launchers: `local` runs the pending cells one after another here. `slurm` submits each pending
cell as a job through submitit (GPUs, time, partition, array parallelism; dependencies as SLURM
`afterok`; a preempted or timed-out job is requeued and resumes from its checkpoint).
`submitit-local` uses submitit's local executor: the same submission code on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

from cxrjax.config_base import DATASETS, data_root
from cxrjax.errors import run_main
from cxrjax.run_dir import RunDir

STUDY_INITS = ("ssl_nonmed", "sup_nonmed", "sup_med", "scratch")
# The 2025-26 arms (configs/<name>.py, the same dataset/fraction/seed arguments).
NEW_INITS = ("ssl_nonmed_dinov3", "ssl_med_raddino", "siglip")
INITS = STUDY_INITS + NEW_INITS
GRIDS = ("single", "pooled", "lodo")
LAUNCHERS = ("local", "slurm", "submitit-local")
MIMIC_WEIGHTS = "vit_b16_mimic"


@dataclasses.dataclass
class Job:
    name: str
    command: list[str]
    workdir: Path | None  # None: a job without a run directory (conversion, evaluation)
    done_marker: Path
    after: list[str] = dataclasses.field(default_factory=list)  # names of jobs to wait for

    @property
    def done(self) -> bool:
        return self.done_marker.exists()

    @property
    def status(self) -> str:
        if self.done:
            return "done"
        if self.workdir and RunDir(self.workdir).checkpoints.is_dir():
            return "partial"
        return "pending"


def _train(config_arg: str, workdir: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "cxrjax.main", f"--config={config_arg}", f"--workdir={workdir}",
        *overrides,
    ]  # fmt: skip


def _evaluate(workdir: Path, dataset: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "cxrjax.evaluate", f"--workdir={workdir}",
        f"--data={data_root()}/{dataset}", "--split=test", f"--out={out}",
    ]  # fmt: skip


def _training_job(name: str, config_arg: str, workdir: Path, args, after: list[str]) -> Job:
    command = _train(config_arg, workdir, args.overrides)
    return Job(name, command, workdir, RunDir(workdir).results, after)


def plan(args: argparse.Namespace) -> list[Job]:
    runs = Path(args.runs_dir)
    jobs: list[Job] = []
    needs_mimic: list[str] = []
    if "sup_med" in args.inits:
        pretrain = runs / "mimic" / "sup_med_pretrain"
        jobs.append(
            _training_job(
                "sup_med pretrain (MIMIC-CXR)",
                "configs/sup_med.py:stage=pretrain",
                pretrain,
                args,
                [],
            )
        )
        weights = Path(os.environ.get("CXRJAX_WEIGHTS", "weights")) / MIMIC_WEIGHTS
        convert = [
            sys.executable, "tools/convert_checkpoint.py", str(pretrain), "--format", "cxrjax_run",
            "--variant", "vit_b16_in21k", "--out", str(weights),
        ]  # fmt: skip
        jobs.append(Job("sup_med convert", convert, None, weights, [jobs[-1].name]))
        needs_mimic = [jobs[-1].name]
    grid = getattr(args, "grid", "single")
    for init, seed in itertools.product(args.inits, args.seeds):
        after = needs_mimic if init == "sup_med" else []
        if grid == "single":
            noises = getattr(args, "label_noise", None) or [0.0]
            for dataset, fraction, noise in itertools.product(
                args.datasets, args.fractions, noises
            ):
                workdir = runs / dataset / init / f"fraction{fraction:g}" / f"seed{seed}"
                arg = f"dataset={dataset},fraction={fraction:g},seed={seed}"
                if init == "sup_med":
                    arg = f"stage=finetune,{arg}"
                name = f"{init} {dataset} fraction={fraction:g} seed={seed}"
                cell_args = args
                if noise:
                    workdir = workdir.with_name(f"{workdir.name}-noise{noise:g}")
                    name += f" label_noise={noise:g}"
                    cell_args = argparse.Namespace(
                        **{**vars(args), "overrides": [*args.overrides,
                                                       f"--config.data.label_noise={noise}"]}
                    )  # fmt: skip
                job = _training_job(name, f"configs/{init}.py:{arg}", workdir, cell_args, after)
                jobs.append(job)
            continue
        held_out = args.datasets if grid == "lodo" else [None]
        for left_out in held_out:
            sources = [d for d in args.datasets if d != left_out]
            label = "+".join(sources)
            workdir = runs / f"pooled-{label}" / init / f"seed{seed}"
            arg = f"init={init},sources={label},seed={seed}"
            name = f"{init} pooled {label} seed={seed}"
            train = _training_job(name, f"configs/multi.py:{arg}", workdir, args, after)
            if not any(j.name == name for j in jobs):
                jobs.append(train)
            if left_out is not None:
                out = workdir / "external" / left_out
                done = RunDir(workdir).predictions("test", out=out)
                jobs.append(
                    Job(
                        f"{name} -> tested on {left_out}",
                        _evaluate(workdir, left_out, out),
                        None,
                        done,
                        [name],
                    )  # fmt: skip
                )
    if args.cross_dataset and grid == "single":
        jobs += external_jobs([j for j in jobs if j.workdir and "pretrain" not in j.name], args)
    return jobs


def external_jobs(train_jobs: list[Job], args: argparse.Namespace) -> list[Job]:
    """External validation: each trained run on the test split of every other dataset."""
    jobs = []
    for job in train_jobs:
        trained_on = job.workdir.relative_to(Path(args.runs_dir)).parts[0]
        for dataset in args.datasets:
            if dataset == trained_on:
                continue
            out = job.workdir / "external" / dataset
            done = RunDir(job.workdir).predictions("test", out=out)
            command = _evaluate(job.workdir, dataset, out)
            jobs.append(Job(f"{job.name} -> tested on {dataset}", command, None, done, [job.name]))
    return jobs


class Cell:
    """One grid cell as a submitit job: runs its command; on preemption or timeout submitit
    calls `checkpoint`, which requeues the same command (training resumes from its checkpoint,
    a finished cell exits at once)."""

    def __init__(self, command: list[str], cwd: str):
        self.command = command
        self.cwd = cwd

    def __call__(self) -> int:
        result = subprocess.run(self.command, cwd=self.cwd)
        if result.returncode:
            raise RuntimeError(f"exit status {result.returncode}: {' '.join(self.command)}")
        return 0

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(Cell(self.command, self.cwd))


def make_executor(args: argparse.Namespace):
    """The submitit executor for `args.launcher` with the cluster options."""
    import submitit

    folder = Path(args.runs_dir) / "submitit" / "%j"
    if args.launcher == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=int(args.hours * 60))
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        timeout_min=int(args.hours * 60),
        gpus_per_node=args.gpus,
        tasks_per_node=1,
        cpus_per_task=args.cpus,
        nodes=1,
        slurm_partition=args.partition,
        slurm_array_parallelism=args.array_parallelism,
        name="cxrjax",
    )
    return executor


def submit(jobs: list[Job], executor, slurm: bool, cwd: str) -> dict[str, object]:
    """Submits every pending job; a job waits for the jobs named in its `after`.

    On SLURM the wait is the scheduler's (`--dependency=afterok:...`), so this returns at once.
    Elsewhere (submitit's local executor) a job is submitted after what it needs has finished.
    """
    import cloudpickle  # submitit's pickler

    # tools/ is not a package the job's interpreter can import: ship `Cell` by value.
    cloudpickle.register_pickle_by_value(sys.modules[Cell.__module__])
    submitted: dict[str, object] = {}
    for job in jobs:
        if job.done:
            continue
        waits = [submitted[name] for name in job.after if name in submitted]
        if slurm:
            dependency = ":".join(str(w.job_id) for w in waits)
            executor.update_parameters(
                slurm_additional_parameters={"dependency": f"afterok:{dependency}"} if waits else {}
            )
        else:
            for waited in waits:
                waited.result()  # raises when a prerequisite failed: dependents never run
        submitted[job.name] = executor.submit(Cell(job.command, cwd))
        print(f"submitted {submitted[job.name].job_id}: {job.name}", flush=True)
    return submitted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["vindr"], choices=DATASETS)
    parser.add_argument(
        "--inits", nargs="+", default=list(STUDY_INITS), choices=INITS,
        help=f"default: the study's {', '.join(STUDY_INITS)}; also {', '.join(NEW_INITS)}",
    )  # fmt: skip
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--grid", choices=GRIDS, default="single")
    parser.add_argument(
        "--label-noise", nargs="+", type=float, default=[0.0],
        help="training label-noise fractions to sweep (0: clean labels)",
    )  # fmt: skip
    parser.add_argument("--runs-dir", default="runs/study")
    parser.add_argument("--run", action="store_true", help="run what is not finished")
    parser.add_argument("--compare-out", help="then compare the finished runs into this folder")
    parser.add_argument(
        "--cross-dataset",
        action="store_true",
        help="also evaluate every run on every other dataset's test split (external validation)",
    )
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per job")
    parser.add_argument("--cpus", type=int, default=8, help="CPUs per job")
    parser.add_argument("--hours", type=float, default=24.0, help="time limit per job")
    parser.add_argument("--array-parallelism", type=int, default=64, help="jobs running at once")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unknown arguments {bad}; extra run flags must look like --config.x=y")
    args.overrides = overrides

    jobs = plan(args)
    for job in jobs:
        print(f"{job.status:8s} {job.name}\n         {' '.join(job.command)}")
    if args.run and args.launcher != "local":
        submitted = submit(jobs, make_executor(args), args.launcher == "slurm", os.getcwd())
        if args.launcher == "slurm":
            print(f"{len(submitted)} jobs submitted; rerun this command to see their status")
            return 0
        for name, job in submitted.items():
            try:
                job.result()
            except Exception as e:  # submitit re-raises the cell's error with its traceback
                print(f"failed: {name}: {e}", file=sys.stderr)
                return 1
    elif args.run:
        for job in jobs:
            if job.done:
                continue
            print(f"==> {job.name}", flush=True)
            result = subprocess.run(job.command)
            if result.returncode:
                print(f"failed ({result.returncode}): {job.name}; stopping", file=sys.stderr)
                return result.returncode
    finished = []
    for job in jobs:
        if not job.done or "pretrain" in job.name:
            continue
        if " -> tested on " in job.name:
            finished.append(str(job.done_marker))
        elif " pooled " in job.name:
            # A multi-source run compares per source: its sources/<name>/ views.
            finished += [str(view.path) for view in RunDir(job.workdir).source_views()]
        elif job.workdir:
            finished.append(str(job.workdir))
    if args.compare_out and finished:
        command = [sys.executable, "tools/compare.py", *finished, "--out", args.compare_out]
        print(" ".join(command), flush=True)
        return subprocess.run(command).returncode
    return 0


if __name__ == "__main__":
    run_main(main)
