"""Evaluate one run: AUROC and the Youden-point metrics with bootstrap statistics.

  python -m cxrjax.evaluate --predictions P.npz [--out DIR] [--bootstrap 1000] [--seed 0]
      [--by-patient]
  python -m cxrjax.evaluate --workdir W [--split test] [--checkpoint best|latest] [...]

The first form evaluates any predictions file (see cxrjax.evaluation.predictions) and writes
the metrics JSON to --out, else beside the file. The second predicts the run's checkpoint on a
split, writes `predictions_<split>.npz` (`predictions_<split>_latest.npz` for the latest
checkpoint) and the metrics JSON into --out, else into the workdir.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from absl import flags

from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation.predictions import Predictions, load_predictions, save_predictions


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
        raise ValueError(f"--bootstrap must be >= 0, got {n_resamples}")
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


def run(fv: flags.FlagValues) -> Path:
    """Evaluate as the parsed flags say; returns the metrics JSON path."""
    if (fv.predictions is None) == (fv.workdir is None):
        raise ValueError("give exactly one of --predictions P.npz or --workdir W")
    out_dir = Path(fv.out) if fv.out else None
    if fv.predictions:
        pred_path = Path(fv.predictions)
        if not pred_path.is_file():
            raise FileNotFoundError(f"{pred_path}: no such predictions file")
        preds = load_predictions(pred_path)
        meta: dict[str, Any] = {"source": str(pred_path)}
    else:
        from cxrjax.train import predict_split  # lazy: pulls in jax, flax and the data stack

        workdir = Path(fv.workdir)
        preds = predict_split(str(workdir), fv.split, fv.checkpoint)
        suffix = "" if fv.checkpoint == "best" else f"_{fv.checkpoint}"
        pred_path = (out_dir or workdir) / f"predictions_{fv.split}{suffix}.npz"
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        save_predictions(pred_path, preds)
        meta = {
            "source": str(pred_path),
            "workdir": str(workdir),
            "split": fv.split,
            "checkpoint": fv.checkpoint,
        }
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
    try:
        fv([argv[0], *map(_underscore_flag, argv[1:])])
        run(fv)
    except (flags.Error, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
