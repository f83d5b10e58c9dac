"""DeLong's test for two correlated AUROCs (same cases), by the fast algorithm of Sun and Xu.

DeLong, DeLong and Clarke-Pearson (Biometrics 1988) estimate the covariance of AUROCs measured on
the same cases from their structural components; Sun and Xu (IEEE Signal Process Lett 2014)
compute those components from midranks in O(n log n) instead of O(m n) comparisons:

- a positive's placement is the fraction of negatives it outscores (ties 1/2): (its midrank among
  all cases - its midrank among positives) / n; AUROC is their mean;
- a negative's placement is the fraction of positives that outscore it:
  1 - (its midrank among all cases - its midrank among negatives) / m;
- var(AUC_A - AUC_B) = s^2(positive placements of A - B) / m + s^2(negative ones) / n (ddof 1).

z = (AUC_A - AUC_B) / sqrt(var); the one-sided p of H1 'A has the higher AUROC' is P(Z >= z),
the same direction as the paired bootstrap's p. With zero variance (identical rankings) p is 1
when AUC_A <= AUC_B, else 0, as the bootstrap's fraction of resamples with A <= B would be.

The label mean: each case's structural components, scaled as above, are summed over the labels
(in each label the case is positive, negative or masked) and the variance of the mean difference
is the sum over cases of the squared totals divided by L^2. For one label that is DeLong's
variance; over several it adds the covariances between labels measured on the same cases.
Only labels passing the small-sample rule (`sample_rule`) are tested and summed: with one case of
a class a label's variance is undefined (NaN), and one such label would make the total NaN.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats

from cxrjax.evaluation.predictions import Predictions
from cxrjax.evaluation.sample_rule import SampleRule


@dataclasses.dataclass
class DelongResult:
    """Per label (L,) arrays and the label mean over `included` labels, of H1 'A > B'."""

    auc_a: np.ndarray
    auc_b: np.ndarray
    var: np.ndarray  # variance of AUC_A - AUC_B
    z: np.ndarray
    p: np.ndarray  # one-sided, H1: A has the higher AUROC
    p_two_sided: np.ndarray
    mean_auc_a: float
    mean_auc_b: float
    mean_var: float
    mean_z: float
    mean_p: float
    mean_p_two_sided: float
    included: np.ndarray


def placements(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive placements (k, m), negative placements (k, n)) of k score rows on one label.

    `scores` is (k, n_cases); each row is one model's scores of the same cases.
    """
    y = np.asarray(labels).astype(bool)
    s = np.atleast_2d(np.asarray(scores, np.float64))
    x, z = s[:, y], s[:, ~y]
    m, n = x.shape[1], z.shape[1]
    t_all = stats.rankdata(np.concatenate([x, z], axis=1), axis=1)
    t_x = stats.rankdata(x, axis=1)
    t_z = stats.rankdata(z, axis=1)
    return (t_all[:, :m] - t_x) / n, 1.0 - (t_all[:, m:] - t_z) / m


def _p_values(diff: float, var: float) -> tuple[float, float, float]:
    """(z, one-sided p of diff > 0, two-sided p); see the module docstring for var == 0."""
    if var <= 0:
        p = 1.0 if diff <= 0 else 0.0
        return (float("nan"), p, 1.0 if diff == 0 else 0.0)
    z = diff / np.sqrt(var)
    return float(z), float(stats.norm.sf(z)), float(2 * stats.norm.sf(abs(z)))


def case_components(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray
) -> tuple[float, float, np.ndarray]:
    """(AUC_A, AUC_B, c (n_cases,)) of one label; sum(c**2) is DeLong's var(AUC_A - AUC_B)."""
    y = np.asarray(labels).astype(bool)
    pos, neg = placements(y, np.stack([scores_a, scores_b]))
    m, n = pos.shape[1], neg.shape[1]
    auc = pos.mean(axis=1)
    d_pos, d_neg = pos[0] - pos[1], neg[0] - neg[1]
    diff = auc[0] - auc[1]
    c = np.empty(y.size)
    # s^2 / m = sum((x - mean)^2) / (m (m - 1)): each case's term, so cases can be summed over
    # labels for the mean. One case of a class has no variance estimate: NaN, as DeLong's.
    with np.errstate(invalid="ignore", divide="ignore"):
        c[y] = (d_pos - diff) / np.sqrt(m * (m - 1.0))
        c[~y] = (d_neg - diff) / np.sqrt(n * (n - 1.0))
    return float(auc[0]), float(auc[1]), c


def delong_test(a: Predictions, b: Predictions, rule: SampleRule | None = None) -> DelongResult:
    """DeLong's paired test of H1 'A has the higher AUROC', per label and for the label mean.

    `a` and `b` must be paired (`bootstrap.check_paired`). A label failing `rule` (default
    `SampleRule()`) gives NaN and is left out of the mean and its variance.
    """
    rule = rule or SampleRule()
    num_cases, num_labels = a.labels.shape
    known = a.known
    out = {k: np.full(num_labels, np.nan) for k in ("auc_a", "auc_b", "var", "z", "p", "p2")}
    total = np.zeros(num_cases)
    included = rule.passes(*rule.class_counts(a.labels, known))
    for j in np.flatnonzero(included):
        k = known[:, j]
        y = a.labels[k, j]
        auc_a, auc_b, c = case_components(y, a.probs[k, j], b.probs[k, j])
        var = float(np.sum(c**2))
        z, p, p2 = _p_values(auc_a - auc_b, var)
        for key, v in zip(out, (auc_a, auc_b, var, z, p, p2), strict=True):
            out[key][j] = v
        total[k] += c
    n_in = int(included.sum())
    if n_in:
        mean_a, mean_b = out["auc_a"][included].mean(), out["auc_b"][included].mean()
        mean_var = float(np.sum(total**2) / n_in**2)
        mean_z, mean_p, mean_p2 = _p_values(mean_a - mean_b, mean_var)
    else:
        mean_a = mean_b = mean_var = mean_z = mean_p = mean_p2 = float("nan")
    return DelongResult(
        auc_a=out["auc_a"],
        auc_b=out["auc_b"],
        var=out["var"],
        z=out["z"],
        p=out["p"],
        p_two_sided=out["p2"],
        mean_auc_a=float(mean_a),
        mean_auc_b=float(mean_b),
        mean_var=mean_var,
        mean_z=mean_z,
        mean_p=mean_p,
        mean_p_two_sided=mean_p2,
        included=included,
    )
