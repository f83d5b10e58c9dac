"""Per-label classification metrics: AUROC, AUPRC and the study's metrics at the Youden-J threshold.

Everything here reduces to one kernel, `weighted_curve_stats`, which sorts a label's scores once
and evaluates AUROC, AUPRC and the Youden operating point for any number of case-weight vectors
at once.
A point estimate is the kernel with all weights 1; a bootstrap resample is the kernel with the
resample's multinomial counts as weights, so both share one code path and one set of tests.

Conventions (those of `sklearn.metrics.roc_curve` / `roc_auc_score`):
- AUROC counts a positive-negative tie as 1/2 (midranks).
- AUPRC is average precision, `sklearn.metrics.average_precision_score`: the sum over distinct
  thresholds of (recall step) x precision, tied scores forming one threshold.
- A case is predicted positive when its score is >= the threshold.
- The Youden threshold is the distinct score maximising sensitivity + specificity - 1; among
  equal maxima the highest threshold wins (sklearn's `argmax` over decreasing thresholds). J is
  compared in exact integer arithmetic, so float rounding never picks the operating point.
- Precision is 0 when nothing is predicted positive (sklearn's `zero_division` default).
- A label whose evaluated cases hold a single class gives NaN for every metric.
"""

from __future__ import annotations

import warnings

import numpy as np

# Metrics reported at the Youden-J operating point, in report order.
YOUDEN_METRICS = ("threshold", "accuracy", "sensitivity", "specificity", "precision", "f1")
ALL_METRICS = ("auroc", "auprc", *YOUDEN_METRICS)


def _as_binary(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    values = np.unique(labels)
    if not np.all(np.isin(values, (0, 1))):
        raise ValueError(
            f"labels must be 0/1, found values {values[:5].tolist()}; binarise them (and mask "
            "unknown entries) before computing metrics"
        )
    return labels.astype(bool)


def _cumsum_rows(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """np.cumsum(a, axis=0, out=out) for a C-ordered (n, R) array, ~10x faster.

    numpy's cumsum along axis 0 walks the array with stride R; adding whole rows keeps every
    inner loop contiguous and vectorised over the R resamples.
    """
    if a.shape[0]:
        out[0] = a[0]
    for i in range(1, a.shape[0]):
        np.add(out[i - 1], a[i], out=out[i])
    return out


def weighted_curve_stats(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """AUROC, AUPRC and Youden-point metrics of one label under R case-weight vectors.

    Args:
      labels: (n,) 0/1 labels, no missing entries.
      scores: (n,) finite scores.
      weights: (n, R) non-negative integer case weights, case-major (bootstrap counts; ones for
        the plain estimate). Integers keep every count and J comparison exact.

    Returns:
      dict mapping each name in ALL_METRICS to an (R,) float64 array; NaN where a weight vector
      leaves one class empty.
    """
    y = _as_binary(labels)
    s = np.asarray(scores, dtype=np.float64)
    w = np.asarray(weights)
    if y.ndim != 1 or s.shape != y.shape or w.ndim != 2 or w.shape[0] != y.shape[0]:
        raise ValueError(
            f"shapes disagree: labels {y.shape}, scores {s.shape}, weights {w.shape}; "
            "expected (n,), (n,), (n, R)"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf; mask those cases or fix the predictions")
    if w.dtype.kind not in "iub":
        raise ValueError(f"weights must be integer counts, got dtype {w.dtype}")
    r = w.shape[1]
    s_pos, s_neg = s[y], s[~y]
    if s_pos.size == 0 or s_neg.size == 0:
        return {k: np.full(r, np.nan) for k in ALL_METRICS}

    # Cumulative negative weight over negatives sorted ascending, with a leading zero row:
    # neg_cum[k] is the weight of the k lowest-scoring negatives.
    neg_idx = np.flatnonzero(~y)
    neg_idx = neg_idx[np.argsort(s[neg_idx], kind="stable")]
    s_neg = s[neg_idx]
    # int32 sums run faster; a column total of at most n * max weight decides if they fit.
    acc = np.int32 if y.size * int(w.max(initial=0)) < 2**31 else np.int64
    neg_cum = np.empty((neg_idx.size + 1, r), dtype=acc)
    neg_cum[0] = 0
    _cumsum_rows(w[neg_idx], out=neg_cum[1:])
    n_neg = neg_cum[-1]

    # Positives sorted descending; thresholds worth trying are their distinct scores, since
    # raising a threshold to the next positive score keeps TP and cannot add false positives.
    pos_idx = np.flatnonzero(y)
    pos_idx = pos_idx[np.argsort(-s[pos_idx], kind="stable")]
    s_pos = s[pos_idx]
    w_pos = w[pos_idx]
    lo = np.searchsorted(s_neg, s_pos, side="left")
    hi = np.searchsorted(s_neg, s_pos, side="right")
    below = neg_cum[lo]  # weight of negatives scoring lower than each positive
    # Each positive beats the negatives scoring lower and ties (half a win) with equal ones.
    wins2 = 2 * (w_pos * below).sum(axis=0, dtype=np.int64)
    if not np.array_equal(lo, hi):
        wins2 += (w_pos * (neg_cum[hi] - below)).sum(axis=0, dtype=np.int64)
    tp = _cumsum_rows(w_pos, out=np.empty(w_pos.shape, acc))
    n_pos = tp[-1]

    # One candidate per distinct positive score: the last row of its tie group.
    ends = np.r_[np.flatnonzero(s_pos[1:] != s_pos[:-1]), s_pos.size - 1]
    if ends.size < s_pos.size:
        tp, below = tp[ends], below[ends]
    # Average precision: recall only moves at positive scores, so summing (TP step) x precision
    # over these candidates is sklearn's sum over every distinct threshold.
    tp_f = tp.astype(np.float64)
    precision = tp_f / np.maximum(tp_f + (n_neg - below), 1)
    tp_f[1:] -= tp[:-1]
    ap_sum = (tp_f * precision).sum(axis=0)
    # J * n_pos * n_neg = tp * n_neg - (n_neg - below) * n_pos; drop the constant
    # -n_neg * n_pos. Integers below 2**53 keep float64 exact; the first maximum is the
    # highest threshold, as sklearn's argmax over decreasing thresholds.
    n_pos_f, n_neg_f = n_pos.astype(np.float64), n_neg.astype(np.float64)
    j = tp * n_neg_f + below * n_pos_f
    best = np.argmax(j, axis=0)
    cols = np.arange(r)
    # J <= 0 everywhere: sklearn's first threshold (+inf, nothing positive, J = 0) wins.
    at_inf = j[best, cols] <= n_pos_f * n_neg_f
    tp0 = np.where(at_inf, 0.0, tp[best, cols])
    fp0 = np.where(at_inf, 0.0, n_neg - below[best, cols])
    threshold = np.where(at_inf, np.inf, s_pos[ends][best])
    n_pos, n_neg = n_pos_f, n_neg_f
    tn0, fn0 = n_neg - fp0, n_pos - tp0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "auroc": wins2 / (2 * n_pos * n_neg),
            "auprc": ap_sum / n_pos,
            "threshold": threshold,
            "accuracy": (tp0 + tn0) / (n_pos + n_neg),
            "sensitivity": tp0 / n_pos,
            "specificity": tn0 / n_neg,
            "precision": np.where(tp0 + fp0 > 0, tp0 / np.maximum(tp0 + fp0, 1), 0.0),
            "f1": 2 * tp0 / (2 * tp0 + fp0 + fn0),
        }
    degenerate = (n_pos == 0) | (n_neg == 0)
    for v in out.values():
        v[degenerate] = np.nan
    return out


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of 1-D 0/1 labels; NaN (no warning) when one class is absent."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"auroc takes 1-D labels, got shape {labels.shape}; see auroc_per_label")
    return float(
        weighted_curve_stats(labels, scores, np.ones((labels.size, 1), np.int32))["auroc"][0]
    )


def check_2d(
    labels: np.ndarray, scores: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, L) float64 labels and scores and a bool mask (all True when None), or ValueError."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(
            f"labels {labels.shape} and scores {scores.shape} must both be (N, L) and equal"
        )
    if mask is None:
        mask = np.ones(labels.shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {mask.shape} differs from labels shape {labels.shape}")
    if np.any(np.isnan(labels[mask])):
        raise ValueError("labels are NaN where mask says known; set mask False for those entries")
    return labels, scores, mask


def warn_single_class(labels: np.ndarray, mask: np.ndarray, names: list[str] | None) -> None:
    """A RuntimeWarning per label whose evaluated cases hold a single class (its metrics NaN)."""
    for j in range(labels.shape[1]):
        known = labels[mask[:, j], j]
        if known.size == 0 or known.min() == known.max():
            name = names[j] if names is not None else f"label {j}"
            warnings.warn(
                f"{name}: {known.size} evaluated cases hold a single class; its metrics are NaN",
                RuntimeWarning,
                stacklevel=3,
            )


def auroc_per_label(
    labels: np.ndarray,
    scores: np.ndarray,
    mask: np.ndarray | None = None,
    label_names: list[str] | None = None,
) -> np.ndarray:
    """(L,) AUROC of (N, L) labels and scores; entries with mask False are left out per label.

    A label with a single class among its evaluated cases gives NaN and a RuntimeWarning.
    """
    labels, scores, mask = check_2d(labels, scores, mask)
    warn_single_class(labels, mask, label_names)
    return np.array(
        [
            auroc(labels[mask[:, j], j], scores[mask[:, j], j]) if mask[:, j].any() else np.nan
            for j in range(labels.shape[1])
        ]
    )


def metrics_per_label(
    labels: np.ndarray,
    scores: np.ndarray,
    mask: np.ndarray | None = None,
    label_names: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Every metric in ALL_METRICS as an (L,) array, Youden threshold chosen per label."""
    labels, scores, mask = check_2d(labels, scores, mask)
    warn_single_class(labels, mask, label_names)
    out = {k: np.full(labels.shape[1], np.nan) for k in ALL_METRICS}
    for j in range(labels.shape[1]):
        known = mask[:, j]
        ones = np.ones((int(known.sum()), 1), np.int32)
        stats = weighted_curve_stats(labels[known, j], scores[known, j], ones)
        for k in ALL_METRICS:
            out[k][j] = stats[k][0]
    return out
