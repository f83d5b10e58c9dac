"""Evaluate a run: AUROC, AUPRC, calibration and operating points with bootstrap statistics.

  python -m cxrjax.evaluate --predictions P.npz [--out DIR] [--bootstrap 1000] [--seed 0]
      [--by-image] [--min-per-class 10]
  python -m cxrjax.evaluate --workdir W [--split test] [--checkpoint best|latest] [...]
  python -m cxrjax.evaluate --workdir W --data PREPARED_DIR [--split test]
      [--label-map their_name=our_name ...] --out DIR
  python -m cxrjax.evaluate --predictions A.npz --compare B.npz --out DIR

The bootstrap resamples patients whenever the predictions carry patient ids (several images of
one patient are not independent); --by-image resamples images, the study's protocol. A label
with fewer than --min-per-class positives or negatives (default 10) gets no AUROC and stays out
of the label mean and DeLong's total; the console names it and the JSON records the rule.

Options of every form: --calibrate-on VAL (temperature scaling fitted on VAL, applied before
scoring), --thresholds-from VAL --operating-point youden|sensitivity=S|specificity=S (thresholds
chosen on VAL, held fixed on the evaluated split: the `fixed_*` metrics), --subgroups (AUROC by
sex, age band and view from the prepared dataset's attributes.json: --data DIR, else the run's
dataset), --no-plots (no reliability diagrams). VAL is a predictions file, or with --workdir a
split name (`val`: the run's predictions_val.npz).

The first form evaluates any predictions file (see cxrjax.evaluation.predictions) and writes
the metrics JSON to --out, else beside the file. The second predicts the run's checkpoint on a
split of its own dataset, writes `predictions_<split>.npz` (`predictions_<split>_latest.npz` for
the latest checkpoint) and the metrics JSON into --out, else into the workdir; when that dataset
is gone (a copied run directory) it evaluates the predictions the run saved. The third is
external validation: run W on another prepared dataset, on the labels both share (matched by
the label vocabulary, or paired by --label-map), with a line naming the labels it could not
match; the predictions carry that dataset's label names and the metrics JSON records
"trained_on", "tested_on" and the matched pairs. The fourth also writes
`paired_<A>_vs_<B>.json`: per label and for the label mean, the paired bootstrap and DeLong
p-values of H1 'A has the higher AUROC', Benjamini-Hochberg adjusted across the labels.
Every input is read and checked before anything is written. The library behind this command
is cxrjax.evaluation (pipeline, external, bootstrap, ...).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from cxrjax import console
from cxrjax.data.table import ATTRIBUTES_FILE, read_attributes
from cxrjax.errors import ConfigError, MissingInputError
from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation import calibration, operating_points, pipeline
from cxrjax.evaluation.external import parse_label_map, predict_run
from cxrjax.evaluation.predictions import Predictions, load_predictions, save_predictions
from cxrjax.evaluation.sample_rule import DEFAULT_MIN_PER_CLASS, SampleRule
from cxrjax.run_dir import RunDir


def _flag_values() -> flags.FlagValues:
    # A private FlagValues: the trainer's entry point defines --workdir too, and both modules
    # may be imported in one process (tests, notebooks).
    fv = flags.FlagValues()
    flags.DEFINE_string("predictions", None, "Predictions .npz file to evaluate.", flag_values=fv)
    flags.DEFINE_string("workdir", None, "Run directory to predict and evaluate.", flag_values=fv)
    flags.DEFINE_string("split", "test", "Split to predict (with --workdir).", flag_values=fv)
    flags.DEFINE_enum(
        "checkpoint", "best", ["best", "latest"], "Checkpoint (with --workdir).", flag_values=fv
    )
    flags.DEFINE_string(
        "out", None, "Output directory (default: beside the input).", flag_values=fv
    )
    flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples (0: none).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Bootstrap seed.", flag_values=fv)
    flags.DEFINE_bool(
        "by_image",
        False,
        "Resample images, not patients (the study's protocol; default: patients when known).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "min_per_class",
        DEFAULT_MIN_PER_CLASS,
        "Small-sample rule: fewest positives and negatives a label needs for an AUROC.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "data", None, "Prepared dataset to test the run on (external validation).", flag_values=fv
    )
    flags.DEFINE_multi_string(
        "label_map",
        [],
        "their_name=our_name: pair a dataset label with a run label (with --workdir).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "batch_size", 0, "Images per forward pass (0: the run's eval_batch_size).", flag_values=fv
    )
    flags.DEFINE_string(
        "calibrate_on",
        None,
        "Validation predictions (file, or split name with --workdir) to fit temperature scaling.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "thresholds_from",
        None,
        "Validation predictions (file, or split name with --workdir) to choose thresholds on.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "operating_point",
        "youden",
        "Threshold rule on --thresholds-from: youden, sensitivity=S or specificity=S.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "subgroups", False, "AUROC by sex, age band and view (needs attributes).", flag_values=fv
    )
    flags.DEFINE_string(
        "compare", None, "Predictions B to test A (--predictions) against.", flag_values=fv
    )
    flags.DEFINE_bool("plots", True, "Write reliability diagrams per label.", flag_values=fv)
    return fv


def _check_options(fv: flags.FlagValues) -> None:
    """Refuse combinations that cannot work or whose options would be silently ignored."""
    if (fv.predictions is None) == (fv.workdir is None):
        raise ConfigError(
            "give exactly one of --predictions P.npz or --workdir W", "See --help for the forms."
        )
    if fv.data and not fv.workdir and not fv.subgroups:
        raise ConfigError(
            "--data needs --workdir (or --subgroups, to read its attributes)",
            "Pass the run to test: --workdir W.",
        )
    if fv.compare and not fv.predictions:
        raise ConfigError("--compare needs --predictions A.npz", "Pass both predictions files.")
    if fv.label_map and not fv.workdir:
        raise ConfigError(
            "--label-map pairs a dataset's labels with a run's outputs: it needs --workdir "
            "(the predictions of --predictions are already paired)",
            "Drop --label-map, or evaluate the run: --workdir W --data DIR --label-map ...",
        )
    if fv["operating_point"].present and not fv.thresholds_from:
        raise ConfigError(
            "--operating-point chooses thresholds on validation predictions: it needs "
            "--thresholds-from",
            "Add --thresholds-from VAL (a file, or with --workdir a split name such as val).",
        )
    if fv.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {fv.bootstrap}", "Pass 0 or more.")
    if fv.compare and fv.bootstrap < 1:
        raise ConfigError(
            "--compare needs bootstrap resamples for its paired test",
            "Pass --bootstrap 1000 (or any number >= 1).",
        )


def _read(path: Path, what: str) -> Predictions:
    if not path.is_file():
        raise MissingInputError(
            f"{what}{path}: no such predictions file",
            "Pass a predictions .npz file (with --workdir, VAL may be a split name such as val).",
        )
    preds = load_predictions(path)
    pipeline.check_evaluable(preds, f"{what}{path}")
    return preds


def _validation_file(value: str, run_dir: RunDir | None, checkpoint: str, flag: str) -> Path:
    """The predictions file `--<flag>` names: a file, or with --workdir a split of the run."""
    path = Path(value)
    if not path.suffix and run_dir is not None:
        path = run_dir.predictions(value, checkpoint)
    return path


def _check_validation(
    path: Path, preds: Predictions, evaluated: Path, like: Predictions, flag: str
) -> None:
    if path.resolve() == evaluated.resolve():
        raise ConfigError(
            f"--{flag.replace('_', '-')}: {path} is the evaluated file itself: fitting on the "
            "cases it then scores makes the result optimistic",
            "Pass the validation predictions (e.g. predictions_val.npz, or --workdir W ... val).",
        )
    if preds.label_names != like.label_names:
        raise ConfigError(
            f"--{flag.replace('_', '-')}: {path} has labels {preds.label_names}, the evaluated "
            f"predictions {like.label_names}",
            "Use validation predictions of the same model and labels.",
        )


def _attributes(fv: flags.FlagValues, run_dir: RunDir | None) -> dict[str, dict[str, str]]:
    if fv.data:
        folder = Path(fv.data)
    elif run_dir is None:
        raise ConfigError(
            "--subgroups with --predictions needs --data DIR", "Name the prepared dataset."
        )
    else:
        folder = Path(run_dir.read_config().data.dir)
    attributes = read_attributes(folder)
    if attributes is None:
        raise MissingInputError(
            f"--subgroups: {folder} has no {ATTRIBUTES_FILE}",
            "Prepare the dataset with a reader that keeps sex, age and view (ChestX-ray14, "
            "CheXpert, PadChest, or a CSV dataset with --attributes), or drop --subgroups.",
        )
    return attributes


def _threshold_messages(
    names: list[str], val: Predictions, thresholds: np.ndarray, rule: SampleRule
) -> list[str]:
    """Why a label got no threshold, or one chosen on too few validation cases."""
    positives, negatives = rule.class_counts(val.labels, val.known)
    passes = rule.passes(positives, negatives)
    lines = []
    for j, name in enumerate(names):
        if np.isnan(thresholds[j]):
            lines.append(
                f"--thresholds-from: {name}: no threshold (validation has {positives[j]} "
                f"positives, {negatives[j]} negatives); its fixed_* metrics are null"
            )
        elif not passes[j]:
            lines.append(
                f"warning: --thresholds-from: {name}: threshold chosen on "
                f"{rule.reason(int(positives[j]), int(negatives[j]))}"
            )
    return lines


def run(fv: flags.FlagValues) -> Path:
    """Evaluate as the parsed flags say; returns the metrics JSON path."""
    _check_options(fv)
    rule = SampleRule.per_class(fv.min_per_class)
    op_rule = operating_points.parse_rule(fv.operating_point)
    out_dir = Path(fv.out) if fv.out else None
    label_map = parse_label_map(fv.label_map)
    messages: list[str] = []

    # ---- Inputs: everything is read and checked before the first file is written.
    run_dir = RunDir(fv.workdir).require() if fv.workdir else None
    vals = {}
    for flag in ("calibrate_on", "thresholds_from"):
        if fv[flag].value:
            path = _validation_file(fv[flag].value, run_dir, fv.checkpoint, flag)
            vals[flag] = (path, _read(path, f"--{flag.replace('_', '-')}: "))
    b_path = Path(fv.compare) if fv.compare else None
    b = _read(b_path, "--compare: ") if b_path else None
    attributes = _attributes(fv, run_dir) if fv.subgroups else None
    to_save = None
    if run_dir is None:
        pred_path = Path(fv.predictions)
        preds = _read(pred_path, "")
        meta: dict[str, Any] = {"source": str(pred_path)}
    else:
        config = run_dir.read_config()
        data = Path(fv.data) if fv.data else Path(config.data.dir)
        # The run's own batch size by default: its saved predictions were made with it, so a
        # fresh prediction of the same split gives bitwise the same probabilities.
        batch_size = fv.batch_size or config.eval_batch_size
        meta = {"workdir": str(run_dir.path), "split": fv.split, "checkpoint": fv.checkpoint}
        saved = run_dir.predictions(fv.split, fv.checkpoint)
        if not fv.data and not data.is_dir() and saved.is_file():
            messages.append(f"{data} is gone: evaluating the predictions the run saved, {saved}")
            pred_path, preds = saved, _read(saved, "")
        else:
            preds, external = predict_run(
                run_dir.path, data, fv.split, fv.checkpoint, label_map, batch_size,
                external=bool(fv.data),
            )  # fmt: skip
            meta.update(external)
            pred_path = to_save = run_dir.predictions(fv.split, fv.checkpoint, out_dir)
            pipeline.check_evaluable(preds, f"{fv.split} split of {data}")
        meta["source"] = str(pred_path)
    for flag, (path, val) in vals.items():
        _check_validation(path, val, pred_path, preds, flag)
    if b is not None:
        bs.check_paired(preds, b, (str(pred_path), str(b_path)), fv.by_image)
    messages += pipeline.probability_warnings(preds, str(pred_path))
    if preds.patients is None and not fv.by_image:
        messages.append(
            f"{pred_path} carries no patient ids: resampling images (intervals are too narrow "
            "when a patient has several images)"
        )

    uncalibrated = preds
    temperature = None
    if "calibrate_on" in vals:
        val_path, val = vals["calibrate_on"]
        temperature = calibration.fit_temperature(val.labels, val.probs, val.mask)
        bound = calibration.at_bound(temperature)
        for j in np.flatnonzero(bound):
            messages.append(
                f"warning: --calibrate-on: the temperature of {preds.label_names[j]} is at its "
                f"bound ({temperature[j]:.3g}): "
                "the validation split separates it, or its scores carry no information; the "
                "calibrated probabilities of that label mean little"
            )
        preds = dataclasses.replace(
            preds, probs=calibration.apply_temperature(preds.probs, temperature)
        )
        meta["calibration"] = {
            "method": "temperature scaling, one temperature per label (NLL)",
            "fitted_on": str(val_path),
            "temperature": dict(zip(preds.label_names, temperature.tolist(), strict=True)),
            "at_bound": [preds.label_names[j] for j in np.flatnonzero(bound)],
        }
    thresholds = None
    if "thresholds_from" in vals:
        val_path, val = vals["thresholds_from"]
        probs = (
            val.probs
            if temperature is None
            else calibration.apply_temperature(val.probs, temperature)
        )
        thresholds = operating_points.choose_thresholds(val.labels, probs, val.mask, op_rule)
        messages += _threshold_messages(preds.label_names, val, thresholds, rule)
        meta["operating_point"] = {
            "rule": str(op_rule),
            "chosen_on": str(val_path),
            "thresholds": {
                n: bs.json_number(t) for n, t in zip(preds.label_names, thresholds, strict=True)
            },
        }
    evaluated = pipeline.evaluate_predictions(
        preds, fv.bootstrap, fv.seed, by_image=fv.by_image, thresholds=thresholds,
        attributes=attributes, rule=rule,
    )  # fmt: skip
    metrics = {**meta, **evaluated}
    # The tests compare rankings: A's own probabilities, as B's, without temperature.
    paired = None
    if b is not None:
        paired = pipeline.paired_report(
            uncalibrated, b, fv.bootstrap, fv.seed, by_image=fv.by_image, rule=rule,
            names=(str(pred_path), str(b_path)),
        )  # fmt: skip
        paired = {"a": str(pred_path), "b": str(b_path), **paired}

    # ---- Outputs.
    for line in [*messages, *pipeline.exclusion_lines(metrics)]:
        console.say(line)
    if to_save is not None:
        to_save.parent.mkdir(parents=True, exist_ok=True)
        save_predictions(to_save, uncalibrated)
    path = RunDir.metrics_for(pred_path, out_dir)
    pipeline.write_json(path, metrics)
    print(pipeline.format_summary(metrics))
    print(f"metrics written to {path} (bootstrap over {evaluated['bootstrap']['resampling']}s)")
    if fv.plots:
        from cxrjax.evaluation import report  # lazy: matplotlib is slow to import

        curves = {"model": uncalibrated}
        if temperature is not None:
            curves = {"uncalibrated": uncalibrated, "temperature-scaled": preds}
        folder = pipeline.reliability_dir(path)
        written = report.plot_reliability(curves, folder)
        print(f"reliability diagrams: {len(written)} in {folder}")
    if paired is not None:
        paired_path = pipeline.paired_path(path, pred_path, b_path)
        pipeline.write_json(paired_path, paired)
        print(pipeline.format_paired(paired))
        print(f"paired tests written to {paired_path}")
    return path


def _underscore_flag(arg: str) -> str:
    """Accept --by-image for absl's --by_image, and --no-plots for its --noplots."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    name = "--no" + name[5:] if name.startswith("--no-") else name
    return "--" + name[2:].replace("-", "_") + eq + value


def main(argv: list[str] | None = None) -> int:
    def body(fv: flags.FlagValues, positional: list[str]) -> int:
        run(fv)
        return 0

    return console.run_cli(__doc__, _flag_values(), argv, body, rewrite=_underscore_flag)


if __name__ == "__main__":
    sys.exit(main())
