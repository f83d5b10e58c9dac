"""Evaluate a run: AUROC, AUPRC, calibration and operating points with bootstrap statistics.

(Over ~400 lines on purpose: it is the one command-line front of the evaluation package; the
metrics themselves live in cxrjax/evaluation/.)

  python -m cxrjax.evaluate --predictions P.npz [--out DIR] [--bootstrap 1000] [--seed 0]
      [--by-patient]
  python -m cxrjax.evaluate --workdir W [--split test] [--checkpoint best|latest] [...]
  python -m cxrjax.evaluate --workdir W --data PREPARED_DIR [--split test]
      [--label-map their_name=our_name ...] --out DIR
  python -m cxrjax.evaluate --predictions A.npz --compare B.npz --out DIR

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
match; the metrics JSON records "trained_on" and "tested_on". The fourth also writes
`paired_<A>_vs_<B>.json`: per label and for the label mean, the paired bootstrap and DeLong
p-values of H1 'A has the higher AUROC'.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from cxrjax import console
from cxrjax.data.table import ATTRIBUTES_FILE, read_attributes
from cxrjax.errors import ConfigError, MissingInputError
from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation import calibration, delong, operating_points, subgroups
from cxrjax.evaluation.predictions import Predictions, load_predictions, save_predictions
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
    flags.DEFINE_bool("by_patient", False, "Resample patients, not images.", flag_values=fv)
    flags.DEFINE_string(
        "data", None, "Prepared dataset to test the run on (external validation).", flag_values=fv
    )
    flags.DEFINE_multi_string(
        "label_map",
        [],
        "their_name=our_name: pair a dataset label with a run label.",
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


def metrics_path_for(predictions_path: Path, out_dir: Path | None = None) -> Path:
    """predictions_test.npz -> metrics_test.json; other.npz -> other_metrics.json."""
    stem = predictions_path.stem
    name = (
        "metrics" + stem[len("predictions") :]
        if stem.startswith("predictions")
        else f"{stem}_metrics"
    )
    return (out_dir or predictions_path.parent) / f"{name}.json"


def evaluate_predictions(
    preds: Predictions,
    n_resamples: int = 1000,
    seed: int = 0,
    by_patient: bool = False,
    thresholds: np.ndarray | None = None,
    attributes: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The metrics JSON of one predictions set: class counts, point estimates, bootstrap stats.

    `thresholds` (L,): fixed operating points, giving the `fixed_*` metrics. `attributes`
    (image hash -> sex / age_band / view, `cxrjax.data.table.read_attributes`): adds the
    "subgroups" section, on the same resamples.
    """
    if n_resamples < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {n_resamples}", "Pass 0 or more.")
    counts = bs.draw_counts(preds, n_resamples, seed, by_patient)
    result = bs.bootstrap(preds, n_resamples, seed, by_patient, counts, thresholds)
    known = preds.known
    label_counts = {
        name: {
            "known": int(known[:, j].sum()),
            "positive": int(preds.labels[known[:, j], j].sum()),
        }
        for j, name in enumerate(preds.label_names)
    }
    out = {"n_cases": len(preds.ids), "label_counts": label_counts, **result.to_json()}
    if attributes is not None:
        columns = subgroups.attribute_columns(preds, attributes)
        out["subgroups"] = subgroups.subgroup_report(preds, columns, counts)
    return out


def format_summary(metrics: dict[str, Any]) -> str:
    """A short per-label text table of a metrics JSON (point estimates; AUROC with its spread).

    sens/spec are the study's (Youden re-picked on every resample); with fixed thresholds the
    fixed-threshold sensitivity and specificity follow as `fx sens` / `fx spec`.
    """
    fixed = "fixed_sensitivity" in metrics["mean"]
    head = (
        f"{'label':<24} {'AUROC':>7} {'boot mean ± SD':>16} {'95% CI':>13} {'AUPRC':>6} "
        f"{'Brier':>6} {'ECE':>6} {'sens':>6} {'spec':>6}"
    )
    rows = [head + (f" {'fx sens':>7} {'fx spec':>7}" if fixed else "")]
    entries = [*metrics["per_label"].items(), ("mean", metrics["mean"])]

    def f(x: float | None, w: int = 6) -> str:
        return f"{'n/a':>{w}}" if x is None else f"{x:>{w}.4f}"

    for name, m in entries:
        a = m["auroc"]
        ms = "n/a" if a["mean"] is None else f"{a['mean']:.4f} ± {a['sd'] or 0:.4f}"
        ci = "n/a" if a["ci_low"] is None else f"{a['ci_low']:.3f}-{a['ci_high']:.3f}"
        row = (
            f"{name:<24} {f(a['point'], 7)} {ms:>16} {ci:>13} {f(m['auprc']['point'])} "
            f"{f(m['brier']['point'])} {f(m['ece']['point'])} "
            f"{f(m['sensitivity']['point'])} {f(m['specificity']['point'])}"
        )
        if fixed:
            fx_sens, fx_spec = m["fixed_sensitivity"]["point"], m["fixed_specificity"]["point"]
            row += f" {f(fx_sens, 7)} {f(fx_spec, 7)}"
        rows.append(row)
    return "\n".join(rows)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def parse_label_map(items: list[str]) -> dict[str, str]:
    """["their=our", ...] -> {"their": "our"}."""
    out = {}
    for item in items:
        theirs, sep, ours = item.partition("=")
        if not sep or not theirs or not ours:
            raise ConfigError(
                f"--label-map {item!r} is not their_name=our_name",
                "Write e.g. --label-map Effusion=pleural_effusion.",
            )
        out[theirs] = ours
    return out


def predict_run(
    workdir: Path,
    data: Path,
    split: str,
    checkpoint: str,
    label_map: dict[str, str],
    batch_size: int,
) -> tuple[Predictions, dict[str, Any]]:
    """Run `workdir` on `split` of the prepared dataset `data`, on the labels both share."""
    # Lazy: these pull in jax, flax and the data stack, which --predictions does not need.
    from cxrjax.data import shards
    from cxrjax.data.datasets.labels import relabel
    from cxrjax.engine.inference import Predictor

    try:
        info = shards.load_info(data)
    except FileNotFoundError:
        raise MissingInputError(
            f"no prepared dataset at {data} (missing {data / shards.INFO_FILE})",
            "Prepare it with tools/prepare_data.py, or pass --data DIR of one.",
        ) from None
    predictor = Predictor.from_run(workdir, checkpoint)
    matching = relabel(info.label_names, predictor.label_names, label_map)
    if not matching.matched:
        raise ConfigError(
            f"{data} shares no label with {workdir}: it has {info.label_names}, the run "
            f"predicts {predictor.label_names}",
            "Pair labels with --label-map their_name=our_name.",
        )
    outputs = [j for j, i in enumerate(matching.indices) if i is not None]
    columns = [matching.indices[j] for j in outputs]
    if matching.unmatched_target or matching.unmatched_source:
        console.say(
            f"labels not matched: run {list(matching.unmatched_target)}, dataset "
            f"{list(matching.unmatched_source)} (pair them with --label-map their=our)"
        )
    preds = predictor.predict_split(
        info, split, batch_size=batch_size, label_indices=columns, output_indices=outputs
    )
    facts = RunDir(workdir).read_facts()
    meta = {
        "trained_on": facts.dataset,
        "tested_on": info.name,
        "data": str(data),
        "matched_labels": [list(pair) for pair in matching.matched],
        "unmatched_run_labels": list(matching.unmatched_target),
        "unmatched_dataset_labels": list(matching.unmatched_source),
    }
    return preds, meta


def _validation_predictions(
    value: str, run_dir: RunDir | None, checkpoint: str, like: Predictions, flag: str
) -> tuple[Path, Predictions]:
    """The predictions `--<flag>` names: a file, or with --workdir a split of the run."""
    path = Path(value)
    if not path.suffix and run_dir is not None:
        path = run_dir.predictions(value, checkpoint)
    if not path.is_file():
        raise MissingInputError(
            f"--{flag}: {path}: no such predictions file",
            "Pass the validation predictions (.npz), or with --workdir a split name such as val.",
        )
    preds = load_predictions(path)
    if preds.label_names != like.label_names:
        raise ConfigError(
            f"--{flag}: {path} has labels {preds.label_names}, the evaluated predictions "
            f"{like.label_names}",
            "Use validation predictions of the same model and labels.",
        )
    return path, preds


def _attributes_dir(fv: flags.FlagValues, run_dir: RunDir | None) -> Path:
    if fv.data:
        return Path(fv.data)
    if run_dir is None:
        raise ConfigError(
            "--subgroups with --predictions needs --data DIR", "Name the prepared dataset."
        )
    return Path(run_dir.read_config().data.dir)


def _paired_report(a: Predictions, b: Predictions, fv: flags.FlagValues) -> dict[str, Any]:
    """Per label and label mean: both AUROCs, paired bootstrap and DeLong p-values (H1 A > B)."""
    paired = bs.paired_bootstrap(a, b, fv.bootstrap, fv.seed, fv.by_patient, ("A", "B"))
    p_auprc, p_auprc_mean = bs.paired_p_values(paired.a, paired.b, "auprc")
    test = delong.delong_test(a, b)
    num = bs.json_number
    rows = {
        name: {
            "auroc_a": num(test.auc_a[j]),
            "auroc_b": num(test.auc_b[j]),
            "p_bootstrap": num(paired.p_label[j]),
            "p_bootstrap_auprc": num(p_auprc[j]),
            "p_delong": num(test.p[j]),
            "p_delong_two_sided": num(test.p_two_sided[j]),
            "delong_z": num(test.z[j]),
            "delong_var": num(test.var[j]),
        }
        for j, name in enumerate(a.label_names)
    }
    rows["mean"] = {
        "auroc_a": num(test.mean_auc_a),
        "auroc_b": num(test.mean_auc_b),
        "p_bootstrap": num(paired.p_mean),
        "p_bootstrap_auprc": num(p_auprc_mean),
        "p_delong": num(test.mean_p),
        "p_delong_two_sided": num(test.mean_p_two_sided),
        "delong_z": num(test.mean_z),
        "delong_var": num(test.mean_var),
    }
    return {
        "a": fv.predictions,
        "b": fv.compare,
        "hypothesis": "A has the higher AUROC (one-sided; DeLong also two-sided)",
        "bootstrap": {"n_resamples": fv.bootstrap, "seed": fv.seed, "by_patient": fv.by_patient},
        "per_label": rows,
    }


def format_paired(report: dict[str, Any]) -> str:
    """The paired test as a text table."""

    def f(x: float | None) -> str:
        return f"{'n/a':>9}" if x is None else f"{x:>9.4f}"

    rows = [f"{'label':<24} {'AUROC A':>9} {'AUROC B':>9} {'p boot':>9} {'p DeLong':>9}"]
    for name, r in report["per_label"].items():
        rows.append(
            f"{name:<24} {f(r['auroc_a'])} {f(r['auroc_b'])} {f(r['p_bootstrap'])} "
            f"{f(r['p_delong'])}"
        )
    return "\n".join(rows)


def run(fv: flags.FlagValues) -> Path:
    """Evaluate as the parsed flags say; returns the metrics JSON path."""
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
    rule = operating_points.parse_rule(fv.operating_point)
    out_dir = Path(fv.out) if fv.out else None
    label_map = parse_label_map(fv.label_map)
    run_dir = None
    if fv.predictions:
        pred_path = Path(fv.predictions)
        if not pred_path.is_file():
            raise MissingInputError(
                f"{pred_path}: no such predictions file", "Pass a predictions .npz file."
            )
        preds = load_predictions(pred_path)
        meta: dict[str, Any] = {"source": str(pred_path)}
    else:
        run_dir = RunDir(fv.workdir).require()
        config = run_dir.read_config()
        data = Path(fv.data) if fv.data else Path(config.data.dir)
        # The run's own batch size by default: its saved predictions were made with it, so a
        # fresh prediction of the same split gives bitwise the same probabilities.
        batch_size = fv.batch_size or config.eval_batch_size
        meta = {"workdir": str(run_dir.path), "split": fv.split, "checkpoint": fv.checkpoint}
        saved = run_dir.predictions(fv.split, fv.checkpoint)
        if not fv.data and not data.is_dir() and saved.is_file():
            console.say(f"{data} is gone: evaluating the predictions the run saved, {saved}")
            pred_path, preds = saved, load_predictions(saved)
        else:
            preds, external = predict_run(
                run_dir.path, data, fv.split, fv.checkpoint, label_map, batch_size
            )
            meta.update(external)
            pred_path = run_dir.predictions(fv.split, fv.checkpoint, out_dir)
            pred_path.parent.mkdir(parents=True, exist_ok=True)
            save_predictions(pred_path, preds)
        meta["source"] = str(pred_path)

    uncalibrated = preds
    temperature = None
    if fv.calibrate_on:
        val_path, val = _validation_predictions(
            fv.calibrate_on, run_dir, fv.checkpoint, preds, "calibrate_on"
        )
        temperature = calibration.fit_temperature(val.labels, val.probs, val.mask)
        preds = dataclasses.replace(
            preds, probs=calibration.apply_temperature(preds.probs, temperature)
        )
        meta["calibration"] = {
            "method": "temperature scaling, one temperature per label (NLL)",
            "fitted_on": str(val_path),
            "temperature": dict(zip(preds.label_names, temperature.tolist(), strict=True)),
        }
    thresholds = None
    if fv.thresholds_from:
        val_path, val = _validation_predictions(
            fv.thresholds_from, run_dir, fv.checkpoint, preds, "thresholds_from"
        )
        probs = (
            val.probs
            if temperature is None
            else calibration.apply_temperature(val.probs, temperature)
        )
        thresholds = operating_points.choose_thresholds(val.labels, probs, val.mask, rule)
        meta["operating_point"] = {
            "rule": str(rule),
            "chosen_on": str(val_path),
            "thresholds": {
                n: bs.json_number(t) for n, t in zip(preds.label_names, thresholds, strict=True)
            },
        }
    attributes = None
    if fv.subgroups:
        folder = _attributes_dir(fv, run_dir)
        attributes = read_attributes(folder)
        if attributes is None:
            raise MissingInputError(
                f"--subgroups: {folder} has no {ATTRIBUTES_FILE}",
                "Prepare the dataset with a reader that keeps sex, age and view (ChestX-ray14, "
                "CheXpert, PadChest), or drop --subgroups.",
            )
    evaluated = evaluate_predictions(
        preds, fv.bootstrap, fv.seed, fv.by_patient, thresholds, attributes
    )
    metrics = {**meta, **evaluated}
    path = metrics_path_for(pred_path, out_dir)
    _write_json(path, metrics)
    print(format_summary(metrics))
    print(f"metrics written to {path}")
    if fv.plots:
        from cxrjax.evaluation import report  # lazy: matplotlib is slow to import

        curves = {"model": uncalibrated}
        if temperature is not None:
            curves = {"uncalibrated": uncalibrated, "temperature-scaled": preds}
        folder = path.parent / f"reliability_{path.stem}"
        written = report.plot_reliability(curves, folder)
        print(f"reliability diagrams: {len(written)} in {folder}")
    if fv.compare:
        b_path = Path(fv.compare)
        if not b_path.is_file():
            raise MissingInputError(f"--compare: {b_path}: no such predictions file")
        # The tests compare rankings: A's own probabilities, as B's, without temperature.
        paired = _paired_report(uncalibrated, load_predictions(b_path), fv)
        paired_path = path.parent / f"paired_{pred_path.stem}_vs_{b_path.stem}.json"
        _write_json(paired_path, paired)
        print(format_paired(paired))
        print(f"paired tests written to {paired_path}")
    return path


def _underscore_flag(arg: str) -> str:
    """Accept --by-patient for absl's --by_patient, and --no-plots for its --noplots."""
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
