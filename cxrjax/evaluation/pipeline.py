"""One predictions set to its metrics JSON and text tables: what evaluate, compare and probe share.

`evaluate_predictions` gives the metrics JSON (class counts, point estimates, bootstrap
statistics, the small-sample rule and the labels it excluded, optional subgroups);
`paired_report` the paired test of two models (bootstrap and DeLong, Benjamini-Hochberg across
labels); `check_evaluable` and `probability_warnings` the checks made before anything is
written; `write_json` the one strict-JSON writer (null, never NaN).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from cxrjax.errors import ConfigError
from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation import delong, subgroups
from cxrjax.evaluation.predictions import Predictions, PredictionsError
from cxrjax.evaluation.sample_rule import SampleRule


def check_evaluable(preds: Predictions, source: str) -> None:
    """PredictionsError unless `preds` has cases and at least one known label entry."""
    if len(preds.ids) == 0:
        raise PredictionsError(
            f"{source}: holds no cases (an empty split)",
            "Evaluate a split with images; check the split name and the prepared dataset.",
        )
    if not preds.known.any():
        raise PredictionsError(
            f"{source}: every label of every case is masked (unknown): nothing to evaluate",
            "Evaluate a split whose labels are known, or check how the mask was written.",
        )


def probability_warnings(preds: Predictions, source: str) -> list[str]:
    """Lines to print when `preds` do not look like probabilities (e.g. logits)."""
    probs = preds.probs[preds.known]
    outside = int(np.sum((probs < 0) | (probs > 1)))
    if not outside:
        return []
    return [
        f"warning: {source}: {outside} of {probs.size} known probabilities lie outside [0, 1] "
        f"(range {probs.min():.3g} to {probs.max():.3g}); these look like logits. AUROC is "
        "unaffected, Brier and ECE are null. Apply a sigmoid before saving the predictions."
    ]


def evaluate_predictions(
    preds: Predictions,
    n_resamples: int = 1000,
    seed: int = 0,
    *,
    by_image: bool = False,
    thresholds: np.ndarray | None = None,
    attributes: dict[str, dict[str, str]] | None = None,
    rule: SampleRule | None = None,
) -> dict[str, Any]:
    """The metrics JSON of one predictions set: class counts, point estimates, bootstrap stats.

    Resamples patients when `preds` has `patients`, images with `by_image` (the study's
    protocol) or without patient ids. `thresholds` (L,): fixed operating points, giving the
    `fixed_*` metrics. `attributes` (image hash -> sex / age_band / view,
    `cxrjax.data.table.read_attributes`): adds the "subgroups" section, on the same resamples.
    `rule`: the small-sample rule (default `SampleRule()`).
    """
    if n_resamples < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {n_resamples}", "Pass 0 or more.")
    rule = rule or SampleRule()
    counts = bs.draw_counts(preds, n_resamples, seed, by_image)
    result = bs.bootstrap(
        preds, n_resamples, seed, by_image=by_image, counts=counts, thresholds=thresholds,
        rule=rule,
    )  # fmt: skip
    label_counts = {
        name: {
            "known": int(result.n_positive[j] + result.n_negative[j]),
            "positive": int(result.n_positive[j]),
            "negative": int(result.n_negative[j]),
        }
        for j, name in enumerate(preds.label_names)
    }
    out = {"n_cases": len(preds.ids), "label_counts": label_counts, **result.to_json()}
    if attributes is not None:
        columns = subgroups.attribute_columns(preds, attributes)
        out["subgroups"] = subgroups.subgroup_report(preds, columns, counts, rule, result.included)
    return out


def exclusion_lines(metrics: dict[str, Any]) -> list[str]:
    """Console lines naming every label (and subgroup x label) the small-sample rule left out."""
    lines = [
        f"small-sample rule: {name}: {e['reason']}; no AUROC, not in the label mean"
        for name, e in metrics.get("excluded_labels", {}).items()
    ]
    for attribute, report in metrics.get("subgroups", {}).items():
        for group, entry in report["groups"].items():
            failing = [n for n, m in entry["per_label"].items() if m["excluded"]]
            if failing:
                lines.append(
                    f"small-sample rule: {attribute}={group}: no AUROC for {', '.join(failing)}"
                    + ("; no label mean" if entry["mean_excluded_by"] else "")
                )
    return lines


def format_summary(metrics: dict[str, Any]) -> str:
    """A short per-label text table of a metrics JSON (point estimates; AUROC with its spread).

    sens/spec are the study's (Youden re-picked on every resample); with fixed thresholds the
    fixed-threshold sensitivity and specificity follow as `fx sens` / `fx spec`. A label the
    small-sample rule excluded shows its class counts instead of an AUROC.
    """
    fixed = "fixed_sensitivity" in metrics["mean"]
    head = (
        f"{'label':<24} {'AUROC':>7} {'boot mean ± SD':>16} {'95% CI':>13} {'AUPRC':>6} "
        f"{'Brier':>6} {'ECE':>6} {'sens':>6} {'spec':>6}"
    )
    rows = [head + (f" {'fx sens':>7} {'fx spec':>7}" if fixed else "")]
    entries = [*metrics["per_label"].items(), ("mean", metrics["mean"])]
    excluded = metrics.get("excluded_labels", {})

    def f(x: float | None, w: int = 6) -> str:
        return f"{'n/a':>{w}}" if x is None else f"{x:>{w}.4f}"

    for name, m in entries:
        a = m["auroc"]
        ms = "n/a" if a["mean"] is None else f"{a['mean']:.4f} ± {a['sd'] or 0:.4f}"
        ci = "n/a" if a["ci_low"] is None else f"{a['ci_low']:.3f}-{a['ci_high']:.3f}"
        if name in excluded:
            e = excluded[name]
            ms, ci = "too few cases", f"{e['positive']} pos/{e['negative']} neg"
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


def paired_report(
    a: Predictions,
    b: Predictions,
    n_resamples: int,
    seed: int,
    *,
    by_image: bool = False,
    rule: SampleRule | None = None,
    names: tuple[str, str] = ("A", "B"),
) -> dict[str, Any]:
    """Per label and label mean: both AUROCs, paired bootstrap and DeLong p-values (H1 A > B).

    The label p-values are also Benjamini-Hochberg adjusted across the labels (`*_bh`), as
    tools/compare.py does; the label mean is a single test and is not adjusted.
    """
    rule = rule or SampleRule()
    paired = bs.paired_bootstrap(a, b, n_resamples, seed, by_image=by_image, names=names, rule=rule)
    p_auprc, p_auprc_mean = bs.paired_p_values(paired.a, paired.b, "auprc")
    test = delong.delong_test(a, b, rule)
    bh_boot = bs.benjamini_hochberg(paired.p_label)
    bh_delong = bs.benjamini_hochberg(test.p)
    num = bs.json_number
    rows = {
        name: {
            "n_positive": int(paired.a.n_positive[j]),
            "n_negative": int(paired.a.n_negative[j]),
            "auroc_a": num(test.auc_a[j]),
            "auroc_b": num(test.auc_b[j]),
            "p_bootstrap": num(paired.p_label[j]),
            "p_bootstrap_bh": num(bh_boot[j]),
            "p_bootstrap_auprc": num(p_auprc[j]),
            "p_delong": num(test.p[j]),
            "p_delong_bh": num(bh_delong[j]),
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
        "hypothesis": "A has the higher AUROC (one-sided; DeLong also two-sided)",
        "multiple_testing": "Benjamini-Hochberg across the labels (p_*_bh); the mean unadjusted",
        "bootstrap": bs.bootstrap_json(n_resamples, seed, paired.a.unit),
        "sample_rule": rule.to_json(),
        "excluded_labels": rule.excluded_json(
            a.label_names, paired.a.n_positive, paired.a.n_negative
        ),
        "labels_in_mean": [n for n, i in zip(a.label_names, test.included, strict=True) if i],
        "per_label": rows,
    }


def format_paired(report: dict[str, Any]) -> str:
    """The paired test as a text table (p-values one-sided, BH-adjusted in brackets)."""

    def f(x: float | None, w: int = 9) -> str:
        return f"{'n/a':>{w}}" if x is None else f"{x:>{w}.4f}"

    rows = [
        f"{'label':<24} {'AUROC A':>9} {'AUROC B':>9} {'p boot (BH)':>20} {'p DeLong (BH)':>20}"
    ]
    for name, r in report["per_label"].items():
        boot = f"{f(r['p_bootstrap'])} ({f(r.get('p_bootstrap_bh'), 7)})"
        dl = f"{f(r['p_delong'])} ({f(r.get('p_delong_bh'), 7)})"
        if name == "mean":
            boot, dl = f"{f(r['p_bootstrap']):>20}", f"{f(r['p_delong']):>20}"
        rows.append(f"{name:<24} {f(r['auroc_a'])} {f(r['auroc_b'])} {boot:>20} {dl:>20}")
    return "\n".join(rows)


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float as None and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Strict JSON (null, never NaN or Infinity: strict parsers reject those), parents made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict(obj), indent=2, allow_nan=False) + "\n")


def paired_path(metrics_path: Path, a: Path, b: Path) -> Path:
    """paired_<A>_vs_<B>.json beside the metrics JSON of A."""
    return metrics_path.parent / f"paired_{a.stem}_vs_{b.stem}.json"


def reliability_dir(metrics_path: Path) -> Path:
    """reliability_<metrics stem>/ beside the metrics JSON: one diagram per label."""
    return metrics_path.parent / f"reliability_{metrics_path.stem}"
