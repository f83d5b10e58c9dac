"""Evaluate a run: AUROC and the Youden-point metrics with bootstrap statistics.

  python -m cxrjax.evaluate --predictions P.npz [--out DIR] [--bootstrap 1000] [--seed 0]
      [--by-patient]
  python -m cxrjax.evaluate --workdir W [--split test] [--checkpoint best|latest] [...]
  python -m cxrjax.evaluate --workdir W --data PREPARED_DIR [--split test]
      [--label-map their_name=our_name ...] --out DIR

The first form evaluates any predictions file (see cxrjax.evaluation.predictions) and writes
the metrics JSON to --out, else beside the file. The second predicts the run's checkpoint on a
split of its own dataset, writes `predictions_<split>.npz` (`predictions_<split>_latest.npz` for
the latest checkpoint) and the metrics JSON into --out, else into the workdir; when that dataset
is gone (a copied run directory) it evaluates the predictions the run saved. The third is
external validation: run W on another prepared dataset, on the labels both share (matched by
the label vocabulary, or paired by --label-map), with a line naming the labels it could not
match; the metrics JSON records "trained_on" and "tested_on".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from absl import flags

from cxrjax import console
from cxrjax.errors import ConfigError, CxrjaxError, MissingInputError, report_and_exit
from cxrjax.evaluation import bootstrap as bs
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
    preds: Predictions, n_resamples: int = 1000, seed: int = 0, by_patient: bool = False
) -> dict[str, Any]:
    """The metrics JSON of one predictions set: class counts, point estimates, bootstrap stats."""
    if n_resamples < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {n_resamples}", "Pass 0 or more.")
    result = bs.bootstrap(preds, n_resamples, seed, by_patient)
    known = preds.known
    counts = {
        name: {
            "known": int(known[:, j].sum()),
            "positive": int(preds.labels[known[:, j], j].sum()),
        }
        for j, name in enumerate(preds.label_names)
    }
    return {"n_cases": len(preds.ids), "label_counts": counts, **result.to_json()}


def format_summary(metrics: dict[str, Any]) -> str:
    """A short per-label text table of a metrics JSON."""
    rows = [
        f"{'label':<24} {'AUROC':>7} {'boot mean ± SD':>16} {'95% CI':>15} {'sens':>6} {'spec':>6}"
    ]
    entries = [*metrics["per_label"].items(), ("mean", metrics["mean"])]
    for name, m in entries:
        a = m["auroc"]

        def f(x: float | None, w: int = 7) -> str:
            return f"{'n/a':>{w}}" if x is None else f"{x:>{w}.4f}"

        ms = "n/a" if a["mean"] is None else f"{a['mean']:.4f} ± {a['sd'] or 0:.4f}"
        ci = "n/a" if a["ci_low"] is None else f"{a['ci_low']:.3f}-{a['ci_high']:.3f}"
        rows.append(
            f"{name:<24} {f(a['point'])} {ms:>16} {ci:>15} "
            f"{f(m['sensitivity']['point'], 6)} {f(m['specificity']['point'], 6)}"
        )
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


def run(fv: flags.FlagValues) -> Path:
    """Evaluate as the parsed flags say; returns the metrics JSON path."""
    if (fv.predictions is None) == (fv.workdir is None):
        raise ConfigError(
            "give exactly one of --predictions P.npz or --workdir W", "See --help for the forms."
        )
    if fv.data and not fv.workdir:
        raise ConfigError("--data needs --workdir", "Pass the run to test: --workdir W.")
    out_dir = Path(fv.out) if fv.out else None
    label_map = parse_label_map(fv.label_map)
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
    metrics = {**meta, **evaluate_predictions(preds, fv.bootstrap, fv.seed, fv.by_patient)}
    path = metrics_path_for(pred_path, out_dir)
    _write_json(path, metrics)
    print(format_summary(metrics))
    print(f"metrics written to {path}")
    return path


def _underscore_flag(arg: str) -> str:
    """Accept --by-patient for absl's --by_patient."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    fv = _flag_values()
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(fv.get_help())
        return 0
    console.configure(verbose=False)
    try:
        fv([argv[0], *map(_underscore_flag, argv[1:])])
        run(fv)
    except flags.Error as e:
        return report_and_exit(ConfigError(str(e), "See --help."))
    except CxrjaxError as e:
        return report_and_exit(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
