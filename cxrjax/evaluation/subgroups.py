"""AUROC by subgroup (sex, age band, view) with bootstrap intervals, and the largest gap.

The attributes come from the prepared dataset's `attributes.json` (`cxrjax.data.table`), keyed
by the same salted image hashes as the predictions' `ids`. Every subgroup is scored on the same
bootstrap resamples as the whole split (its cases keep their counts), so a subgroup's interval
and the gap's interval come from one set of resamples. The gap of a label is the largest minus
the smallest subgroup AUROC of one attribute, over the subgroups where that label passes the
small-sample rule (`sample_rule`: a 10-image group with one positive has no AUROC, so it cannot
become "the largest gap"); its interval is that of the same difference recomputed on every
resample. A group's label mean covers the labels of the split's own mean, the same in every
group; a group where one of them fails the rule has no mean and stays out of the mean's gap.
Images whose attribute is unknown belong to no subgroup of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxrjax.data.table import ATTRIBUTE_VALUES
from cxrjax.errors import ConfigError
from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation.predictions import Predictions
from cxrjax.evaluation.sample_rule import SampleRule


def attribute_columns(
    preds: Predictions, attributes: dict[str, dict[str, str]]
) -> dict[str, np.ndarray]:
    """Per attribute present, an (N,) str array of each case's value ("" unknown)."""
    missing = [i for i in preds.ids if i not in attributes]
    if len(missing) == len(preds.ids):
        raise ConfigError(
            "none of the predictions' ids is in the dataset's attributes.json",
            "Pass --data DIR of the prepared dataset these predictions were made on.",
        )
    present = [a for a in ATTRIBUTE_VALUES if any(a in v for v in attributes.values())]
    return {
        a: np.array([attributes.get(i, {}).get(a, "") for i in preds.ids], dtype=str)
        for a in present
    }


def _gap(values: np.ndarray) -> np.ndarray:
    """max - min over the subgroup axis (last), ignoring NaN; NaN with under two defined."""
    defined = ~np.isnan(values)
    with np.errstate(invalid="ignore"):
        hi = np.where(defined, values, -np.inf).max(axis=-1)
        lo = np.where(defined, values, np.inf).min(axis=-1)
    return np.where(defined.sum(axis=-1) >= 2, hi - lo, np.nan)


def subgroup_report(
    preds: Predictions,
    columns: dict[str, np.ndarray],
    counts: np.ndarray,
    rule: SampleRule | None = None,
    mean_labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """The JSON section: per attribute, per subgroup AUROC (point and bootstrap) and the gaps.

    `counts` (R, N) are the split's bootstrap resamples (`bootstrap.draw_counts`). `mean_labels`
    (L,) bool: the labels of the split's label mean (default: those passing `rule` on the whole
    split).
    """
    rule = rule or SampleRule()
    out: dict[str, Any] = {}
    names = preds.label_names
    if mean_labels is None:
        mean_labels = rule.passes(*rule.class_counts(preds.labels, preds.known))
    # Row 0 draws every case once (the point estimate); the rest are the split's resamples.
    weights = np.vstack([np.ones((1, counts.shape[1]), counts.dtype), counts])
    for attribute, values in columns.items():
        groups = [v for v in ATTRIBUTE_VALUES[attribute] if np.any(values == v)]
        auroc = np.full((weights.shape[0], len(groups), len(names)), np.nan)
        mean = np.full((weights.shape[0], len(groups)), np.nan)
        report: dict[str, Any] = {
            "labels_in_mean": [n for n, i in zip(names, mean_labels, strict=True) if i],
            "groups": {},
        }
        for g, value in enumerate(groups):
            in_group = values == value
            mask = preds.known & in_group[:, None]
            positives, negatives = rule.class_counts(preds.labels, mask)
            passes = rule.passes(positives, negatives)
            auroc[:, g] = bs.resampled_metrics(preds.labels, preds.probs, weights, mask)["auroc"]
            auroc[:, g, ~passes] = np.nan
            failing = [names[j] for j in np.flatnonzero(mean_labels & ~passes)]
            if mean_labels.any() and not failing:
                mean[:, g] = bs.label_mean(auroc[:, g], mean_labels)
            report["groups"][value] = {
                "n_cases": int(in_group.sum()),
                "per_label": {
                    name: {
                        "n_known": int(mask[:, j].sum()),
                        "n_positive": int(positives[j]),
                        "n_negative": int(negatives[j]),
                        "auroc": bs.summary_json(auroc[0, g, j], auroc[1:, g, j]),
                        "excluded": None if passes[j] else rule.reason(positives[j], negatives[j]),
                    }
                    for j, name in enumerate(names)
                },
                "mean": {"auroc": bs.summary_json(mean[0, g], mean[1:, g])},
                # The mean's labels that fail here: this group has no mean (null above).
                "mean_excluded_by": failing,
            }
        report["gap"] = {}
        # (L, 1 + R, groups): one (1 + R, groups) block per label, then the label mean's.
        per_label = np.moveaxis(auroc, 2, 0)
        for key, values_by_group in [*zip(names, per_label, strict=True), ("mean", mean)]:
            gap = _gap(values_by_group)
            entry = bs.summary_json(gap[0], gap[1:])
            row = values_by_group[0]
            if np.sum(~np.isnan(row)) >= 2:
                entry["highest"] = groups[int(np.nanargmax(row))]
                entry["lowest"] = groups[int(np.nanargmin(row))]
            report["gap"][key] = entry
        out[attribute] = report
    return out
