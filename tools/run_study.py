"""Lists or runs the study's grid: initialisation x dataset x training fraction x seed.

  python tools/run_study.py --datasets vindr chexpert --fractions 1.0 0.1 --seeds 0 1        # list
  python tools/run_study.py --datasets vindr --run --compare-out results/vindr             # run all
  python tools/run_study.py ... --config.batch_size=64    (any --config.x=y goes to every run)
  python tools/run_study.py --datasets chexpert chestxray14 vindr --cross-dataset --run \
      --compare-out results/external    # also every run on every other dataset's test split

Finished runs (a `results.json` in the workdir) are skipped; interrupted ones resume from their
checkpoint. `sup_med` needs its MIMIC-CXR pretraining stage first: the grid then contains that run
and the conversion of its best checkpoint into the weights the fine-tuning configs load.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

from cxrjax.config_base import data_root
from cxrjax.run_dir import RunDir

INITS = ("ssl_nonmed", "sup_nonmed", "sup_med", "scratch")
MIMIC_WEIGHTS = "vit_b16_mimic"


@dataclasses.dataclass
class Job:
    name: str
    command: list[str]
    workdir: Path | None  # None: a job without a run directory (conversion)
    done_marker: Path

    @property
    def done(self) -> bool:
        return self.done_marker.exists()

    @property
    def status(self) -> str:
        if self.done:
            return "done"
        if self.workdir and (self.workdir / "checkpoints").is_dir():
            return "partial"
        return "pending"


def _train(config_arg: str, workdir: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "cxrjax.main", f"--config={config_arg}", f"--workdir={workdir}",
        *overrides,
    ]  # fmt: skip


def plan(args: argparse.Namespace) -> list[Job]:
    runs = Path(args.runs_dir)
    jobs = []
    if "sup_med" in args.inits:
        pretrain = runs / "mimic" / "sup_med_pretrain"
        jobs.append(
            Job(
                "sup_med pretrain (MIMIC-CXR)",
                _train("configs/sup_med.py:stage=pretrain", pretrain, args.overrides),
                pretrain,
                pretrain / "results.json",
            )
        )
        weights = Path(os.environ.get("CXRJAX_WEIGHTS", "weights")) / MIMIC_WEIGHTS
        convert = [
            sys.executable, "tools/convert_checkpoint.py", str(pretrain), "--format", "cxrjax_run",
            "--variant", "vit_b16_in21k", "--out", str(weights),
        ]  # fmt: skip
        jobs.append(Job("sup_med convert", convert, None, weights))
    for init, dataset, fraction, seed in itertools.product(
        args.inits, args.datasets, args.fractions, args.seeds
    ):
        workdir = runs / dataset / init / f"fraction{fraction:g}" / f"seed{seed}"
        arg = f"dataset={dataset},fraction={fraction:g},seed={seed}"
        if init == "sup_med":
            arg = f"stage=finetune,{arg}"
        jobs.append(
            Job(
                f"{init} {dataset} fraction={fraction:g} seed={seed}",
                _train(f"configs/{init}.py:{arg}", workdir, args.overrides),
                workdir,
                workdir / "results.json",
            )
        )
    if args.cross_dataset:
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
            command = [
                sys.executable, "-m", "cxrjax.evaluate", f"--workdir={job.workdir}",
                f"--data={data_root()}/{dataset}", "--split=test", f"--out={out}",
            ]  # fmt: skip
            done = RunDir(job.workdir).predictions("test", out=out)
            jobs.append(Job(f"{job.name} -> tested on {dataset}", command, None, done))
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["vindr"])
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--runs-dir", default="runs/study")
    parser.add_argument("--run", action="store_true", help="run what is not finished")
    parser.add_argument("--compare-out", help="then compare the finished runs into this folder")
    parser.add_argument(
        "--cross-dataset",
        action="store_true",
        help="also evaluate every run on every other dataset's test split (external validation)",
    )
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unknown arguments {bad}; extra run flags must look like --config.x=y")
    args.overrides = overrides

    jobs = plan(args)
    for job in jobs:
        print(f"{job.status:8s} {job.name}\n         {' '.join(job.command)}")
    if args.run:
        for job in jobs:
            if job.done:
                continue
            print(f"==> {job.name}", flush=True)
            result = subprocess.run(job.command)
            if result.returncode:
                print(f"failed ({result.returncode}): {job.name}; stopping", file=sys.stderr)
                return result.returncode
    finished = [str(j.workdir) for j in jobs if j.workdir and j.done and "pretrain" not in j.name]
    finished += [str(j.done_marker) for j in jobs if " -> tested on " in j.name and j.done]
    if args.compare_out and finished:
        command = [sys.executable, "tools/compare.py", *finished, "--out", args.compare_out]
        print(" ".join(command), flush=True)
        return subprocess.run(command).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
