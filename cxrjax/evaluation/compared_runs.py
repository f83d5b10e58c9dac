"""The runs a comparison reads: predictions with their config's names, paired on shared labels.

`load_run` reads a run directory or a predictions file (external validation included) into a
`ComparedRun`; `shared_labels` cuts a group of runs to the labels they share when one of them is
external validation; `assign_columns` names each run's table column. `tools/compare.py` tests
and reports them.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from cxrjax import console
from cxrjax.errors import ConfigError
from cxrjax.evaluation import pipeline
from cxrjax.evaluation.predictions import Predictions, load_predictions
from cxrjax.run_dir import RunDir


@dataclasses.dataclass
class ComparedRun:
    source: str
    experiment: str
    dataset: str
    init: str
    train_fraction: float
    preds: Predictions
    column: str = ""


def _config_field(config: dict[str, Any], key: str) -> Any:
    if key in config:
        return config[key]
    return config.get("data", {}).get(key)


def load_run(path: str | Path, split: str = "test") -> ComparedRun:
    """A run from a workdir or a predictions file, with its config's names.

    A predictions file written by external validation (`cxrjax.evaluate --workdir A --data B`)
    is named after the run that made it and compared on the dataset it was tested on, so its
    column reads "<init> (trained on <A>)" in B's rows.
    """
    path = Path(path)
    external: dict[str, Any] = {}
    if path.is_dir():
        pred_path, config_path = RunDir(path).predictions(split), path / RunDir.CONFIG
        if not pred_path.is_file():
            raise FileNotFoundError(
                f"{path}: no {pred_path.name}; write it with "
                f"`python -m cxrjax.evaluate --workdir {path} --split {split}`"
            )
    elif path.is_file():
        pred_path, config_path = path, path.parent / RunDir.CONFIG
        metrics_path = RunDir.metrics_for(pred_path)
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
            if "trained_on" in metrics:
                external = metrics
                config_path = Path(metrics["workdir"]) / RunDir.CONFIG
    else:
        raise FileNotFoundError(f"{path}: neither a run directory nor a predictions file")
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    experiment = config.get("experiment") or pred_path.stem
    fraction = _config_field(config, "train_fraction")
    init = str(config.get("init") or experiment)
    dataset = str(_config_field(config, "dataset") or "-")
    if external:
        init = f"{init} (trained on {external['trained_on']})"
        dataset = str(external["tested_on"])
    preds = load_predictions(pred_path)
    pipeline.check_evaluable(preds, str(pred_path))
    for line in pipeline.probability_warnings(preds, str(pred_path)):
        console.say(line)
    return ComparedRun(
        source=str(path),
        experiment=str(experiment),
        dataset=dataset,
        init=init,
        train_fraction=1.0 if fraction is None else float(fraction),
        preds=preds,
    )


def shared_labels(members: list[ComparedRun]) -> None:
    """Cut the runs of one group to the labels they share when one is external validation.

    External-validation predictions hold only the labels the run and the dataset share, under
    the dataset's names (`model_label_names` set); the dataset's own runs hold all of its labels.
    Otherwise differing labels are a mistake that `bootstrap.check_paired` reports.
    """
    names = [r.preds.label_names for r in members]
    if all(n == names[0] for n in names) or all(r.preds.model_label_names is None for r in members):
        return
    shared = [n for n in names[0] if all(n in other for other in names[1:])]
    if not shared:
        raise ConfigError(
            f"{members[0].source} and the runs it is paired with share no label: {names}",
            "Compare external-validation predictions with runs trained on the dataset they were "
            "tested on.",
        )
    dropped = sorted({n for ns in names for n in ns} - set(shared))
    if dropped:
        console.say(f"{members[0].dataset}: comparing on the shared labels; left out {dropped}")
    for r in members:
        cols = [r.preds.label_names.index(n) for n in shared]
        model = r.preds.model_label_names
        r.preds = dataclasses.replace(
            r.preds,
            labels=r.preds.labels[:, cols],
            probs=r.preds.probs[:, cols],
            mask=r.preds.known[:, cols],
            label_names=shared,
            model_label_names=None if model is None else [model[c] for c in cols],
        )


def _run_dir_name(source: str) -> str:
    path = Path(source)
    return path.parent.name if path.suffix == ".npz" else path.name


def assign_columns(runs: list[ComparedRun]) -> None:
    """Column = init; runs sharing an init on one dataset and fraction (seeds) add their
    experiment name, else their directory name, else a number."""
    groups: dict[tuple, list[ComparedRun]] = defaultdict(list)
    for r in runs:
        groups[(r.dataset, r.train_fraction, r.init)].append(r)
    for members in groups.values():
        names = [r.init if len(members) == 1 else f"{r.init} ({r.experiment})" for r in members]
        if len(set(names)) < len(names):
            names = [f"{r.init} ({_run_dir_name(r.source)})" for r in members]
        if len(set(names)) < len(names):
            names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
        for r, n in zip(members, names, strict=True):
            r.column = n
