"""Time the vectorised bootstrap against the per-resample sklearn loop the study used.

  python tools/bench_eval.py [--resamples 1000] [--cases 3000] [--labels 11] [--seed 0]
      [--loop-resamples N]

Both compute, on the same resamples, per-label AUROC, AUPRC (average precision), Brier score,
ECE (15 equal-width and 15 equal-mass bins) and the Youden-J threshold with accuracy,
sensitivity, specificity, precision and F1 at it. An AUROC-only sklearn loop is timed too,
as the fastest loop anyone could write. The full loop is timed on all resamples unless
--loop-resamples is given or a 20-resample probe predicts it would take over two minutes; then
it is timed on a subset and extrapolated, and the output says so. The last line reads
`bootstrap: X s; sklearn loop: Y s; speed-up: Z`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn import metrics as skm

from cxrjax.errors import run_main
from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation import calibration
from cxrjax.evaluation.predictions import Predictions

_LOOP_BUDGET_S = 120.0


def synthetic_predictions(n_cases: int, n_labels: int, seed: int) -> Predictions:
    """Multi-label test set with VinDr-like prevalences (2-30%) and float32 sigmoid scores."""
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.02, 0.3, n_labels)
    labels = (rng.random((n_cases, n_labels)) < prevalence).astype(np.float64)
    logits = rng.normal(size=labels.shape) + 1.5 * labels
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)
    return Predictions(
        labels=labels,
        probs=probs,
        label_names=[f"label_{j}" for j in range(n_labels)],
        ids=[f"case{i}" for i in range(n_cases)],
    )


# The metrics both paths compute, in the column order of `sklearn_resample`.
NAMES = (
    "auroc",
    "auprc",
    "brier",
    "ece",
    "ece_mass",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
)


def _ece(y: np.ndarray, s: np.ndarray, bins: np.ndarray) -> float:
    """ECE over the given bin of each case, as a per-resample loop would compute it."""
    n_bins = calibration.ECE_BINS
    count = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, y, n_bins) - np.bincount(bins, s, n_bins)
    return float(np.abs(gap[count > 0]).sum() / len(y))


def sklearn_resample(preds: Predictions, idx: np.ndarray, mass_bins: np.ndarray) -> np.ndarray:
    """One resample the way the study's loop did it, with AUPRC and calibration added:
    (L, 10) in NAMES order. `mass_bins` (N, L): each case's equal-mass bin on the full set."""
    out = np.full((preds.labels.shape[1], len(NAMES)), np.nan)
    for j in range(preds.labels.shape[1]):
        y, s = preds.labels[idx, j], preds.probs[idx, j]
        if y.min() == y.max():
            continue
        fpr, tpr, thr = skm.roc_curve(y, s)
        # argmax of J in integers: float tpr - fpr ranks exactly tied J values by rounding
        # noise, which moved the study's threshold between equally good operating points.
        n_pos, n_neg = y.sum(), len(y) - y.sum()
        j_num = np.round(tpr * n_pos) * n_neg - np.round(fpr * n_neg) * n_pos
        pred = s >= thr[np.argmax(j_num)]
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
        out[j] = [
            skm.roc_auc_score(y, s),
            skm.average_precision_score(y, s),
            skm.brier_score_loss(y, s),
            _ece(y, s, calibration.equal_width_bins(s)),
            _ece(y, s, mass_bins[idx, j]),
            (tp + tn) / len(y),
            tp / (tp + fn),
            tn / (tn + fp),
            skm.precision_score(y, pred, zero_division=0),
            skm.f1_score(y, pred),
        ]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--labels", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop-resamples", type=int, default=None)
    args = parser.parse_args(argv)
    preds = synthetic_predictions(args.cases, args.labels, args.seed)
    print(f"{args.resamples} resamples x {args.cases} cases x {args.labels} labels")

    bs.bootstrap(preds, 5, args.seed)  # warm-up: imports and first-call allocations
    t0 = time.perf_counter()
    result = bs.bootstrap(preds, args.resamples, args.seed)
    t_vec = time.perf_counter() - t0

    counts = bs.resample_counts(args.cases, args.resamples, args.seed)
    cases = np.arange(args.cases)
    mass_bins = np.stack(
        [calibration.equal_mass_bins(preds.probs[:, j]) for j in range(args.labels)], axis=1
    )
    n_loop = args.loop_resamples
    if n_loop is None:
        t0 = time.perf_counter()
        for r in range(min(20, args.resamples)):
            sklearn_resample(preds, np.repeat(cases, counts[r]), mass_bins)
        probe = (time.perf_counter() - t0) / min(20, args.resamples)
        n_loop = args.resamples if probe * args.resamples < _LOOP_BUDGET_S else 100
    n_loop = min(n_loop, args.resamples)
    loop = np.empty((n_loop, args.labels, len(NAMES)))
    t0 = time.perf_counter()
    for r in range(n_loop):
        loop[r] = sklearn_resample(preds, np.repeat(cases, counts[r]), mass_bins)
    t_loop = (time.perf_counter() - t0) * args.resamples / n_loop

    # The leanest possible loop, AUROC alone, timed in full: a lower bound for any loop.
    t0 = time.perf_counter()
    for r in range(args.resamples):
        idx = np.repeat(cases, counts[r])
        for j in range(args.labels):
            y = preds.labels[idx, j]
            if y.min() != y.max():
                skm.roc_auc_score(y, preds.probs[idx, j])
    t_auc = time.perf_counter() - t0
    print(f"sklearn loop, AUROC only: {t_auc:.2f} s ({t_auc / t_vec:.1f}x the full bootstrap)")

    diff = max(
        float(np.nanmax(np.abs(result.samples[m][:n_loop] - loop[..., k])))
        for k, m in enumerate(NAMES)
    )
    print(f"max |vectorised - sklearn| over {n_loop} resamples, all metrics: {diff:.2e}")
    if n_loop < args.resamples:
        print(f"sklearn loop timed on {n_loop} resamples, extrapolated to {args.resamples}")
    print(f"bootstrap: {t_vec:.3f} s; sklearn loop: {t_loop:.2f} s; speed-up: {t_loop / t_vec:.1f}")


if __name__ == "__main__":
    run_main(main)
