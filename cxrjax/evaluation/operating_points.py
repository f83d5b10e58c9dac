"""Operating points chosen on validation predictions and held fixed on test.

The study re-picks the Youden threshold on every test resample (`metrics.YOUDEN_METRICS`: an
optimistic estimate no deployment can reach). Here a threshold is chosen once per label on the
validation split by one of three rules, then every test resample is scored at that threshold:

- `youden`: the threshold maximising sensitivity + specificity - 1 on validation (the same
  kernel and tie rule as the study's, `metrics.weighted_curve_stats`).
- `sensitivity=S`: the highest threshold whose validation sensitivity is >= S (the best
  specificity that keeps the sensitivity).
- `specificity=S`: the lowest threshold whose validation specificity is >= S (the best
  sensitivity that keeps the specificity).

Thresholds are observed validation scores of positives (or +inf: nothing called positive); a case
is positive when its score is >= the threshold. PPV and NPV are 0 when nothing is predicted
positive, respectively negative (sklearn's `zero_division` default, as for the study's precision).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cxrjax.errors import ConfigError
from cxrjax.evaluation import metrics

FIXED_METRICS = (
    "fixed_threshold",
    "fixed_sensitivity",
    "fixed_specificity",
    "fixed_ppv",
    "fixed_npv",
    "fixed_f1",
)
RULES = ("youden", "sensitivity", "specificity")


@dataclasses.dataclass(frozen=True)
class OperatingRule:
    """A threshold rule: `kind` in RULES, `target` in (0, 1] for sensitivity/specificity."""

    kind: str
    target: float | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target:g}"


def parse_rule(text: str) -> OperatingRule:
    """'youden' | 'sensitivity=0.95' | 'specificity=0.9' -> OperatingRule, else ConfigError."""
    kind, sep, value = text.strip().partition("=")
    fix = "Write youden, sensitivity=0.95 or specificity=0.9."
    if kind not in RULES or (kind == "youden") == bool(sep):
        raise ConfigError(
            f"operating point {text!r} is not one of youden|sensitivity=S|specificity=S", fix
        )
    if kind == "youden":
        return OperatingRule("youden")
    try:
        target = float(value)
    except ValueError:
        raise ConfigError(f"operating point {text!r}: {value!r} is not a number", fix) from None
    if not 0 < target <= 1:
        raise ConfigError(f"operating point {text!r}: the target must lie in (0, 1]", fix)
    return OperatingRule(kind, target)


def _needed(target: float, n: int) -> int:
    """The fewest of n cases that make a fraction >= target (rounded so 0.95 * 20 is 19)."""
    return math.ceil(round(target * n, 9))


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: OperatingRule) -> float:
    """The threshold of `rule` on one label's known cases; NaN when a class is absent."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, np.float64)
    if y.all() or not y.any():
        return float("nan")
    if rule.kind == "youden":
        ones = np.ones((y.size, 1), np.int32)
        return float(metrics.weighted_curve_stats(y, s, ones)["threshold"][0])
    s_pos = np.sort(s[y])[::-1]
    if rule.kind == "sensitivity":
        # The k-th highest positive score calls at least k positives positive.
        return float(s_pos[_needed(rule.target, s_pos.size) - 1])
    s_neg = np.sort(s[~y])
    # At least k negatives must score below the threshold: the lowest positive score above the
    # k-th lowest negative keeps them below and calls the most positives positive.
    highest_kept = s_neg[_needed(rule.target, s_neg.size) - 1]
    above = s_pos[s_pos > highest_kept]
    return float(above[-1]) if above.size else float("inf")


def choose_thresholds(
    labels: np.ndarray, scores: np.ndarray, mask: np.ndarray | None, rule: OperatingRule
) -> np.ndarray:
    """(L,) thresholds of `rule`, per label on its known cases (validation predictions)."""
    labels, scores, mask = metrics.check_2d(labels, scores, mask)
    return np.array(
        [
            choose_threshold(labels[mask[:, j], j], scores[mask[:, j], j], rule)
            for j in range(labels.shape[1])
        ]
    )


def weighted_fixed_stats(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    """Every name in FIXED_METRICS as an (R,) array at one fixed threshold, per weight vector.

    A metric is NaN only where the class it is conditioned on is empty in a weight vector:
    sensitivity, PPV and F1 need positives, specificity and NPV negatives (a test split without
    positives still has a specificity). All are NaN when the threshold is NaN.
    """
    y = np.asarray(labels).astype(bool)
    w = np.asarray(weights)
    r = w.shape[1]
    if np.isnan(threshold):
        return {k: np.full(r, np.nan) for k in FIXED_METRICS}
    called = np.asarray(scores, np.float64) >= threshold
    # The four cells of the confusion matrix, summed for all weight vectors in one product.
    # float64 (BLAS) is exact: the counts stay far below 2**53.
    cells = np.stack([y & called, ~y & called, ~y & ~called, y & ~called]).astype(np.float64)
    tp, fp, tn, fn = cells @ w
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "fixed_threshold": np.full(r, threshold),
            "fixed_sensitivity": tp / (tp + fn),
            "fixed_specificity": tn / (tn + fp),
            "fixed_ppv": np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0),
            "fixed_npv": np.where(tn + fn > 0, tn / np.maximum(tn + fn, 1), 0.0),
            "fixed_f1": 2 * tp / (2 * tp + fp + fn),
        }
    no_pos, no_neg = tp + fn == 0, tn + fp == 0
    for k in ("fixed_sensitivity", "fixed_ppv", "fixed_f1"):
        out[k][no_pos] = np.nan
    for k in ("fixed_specificity", "fixed_npv"):
        out[k][no_neg] = np.nan
    return out
