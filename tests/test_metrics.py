"""Metrics against sklearn and a direct count; the predictions file round trip."""

from fractions import Fraction

import numpy as np
import pytest
from sklearn import metrics as skm

from cxrjax.evaluation import metrics
from cxrjax.evaluation.predictions import Predictions, load_predictions, save_predictions


def _random_case(rng: np.random.Generator, n: int, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    # Few decimals force many ties, including positive-negative ties.
    s = np.round(rng.random(n) * 0.6 + 0.4 * y, decimals)
    return y, s


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_auroc_equals_sklearn_with_ties(decimals):
    rng = np.random.default_rng(decimals)
    for _ in range(50):
        y, s = _random_case(rng, int(rng.integers(2, 400)), decimals)
        assert abs(metrics.auroc(y, s) - skm.roc_auc_score(y, s)) <= 1e-12


def test_auroc_single_class_is_nan_and_bad_input_raises():
    assert np.isnan(metrics.auroc(np.zeros(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="0/1"):
        metrics.auroc(np.array([0, 2, 1]), np.arange(3.0))
    with pytest.raises(ValueError, match="1-D"):
        metrics.auroc(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.auroc(np.array([0, 1]), np.array([0.1, np.nan]))


def test_auroc_per_label_mask_and_single_class_warning():
    rng = np.random.default_rng(0)
    n, num_labels = 300, 4
    y = rng.integers(0, 2, (n, num_labels)).astype(float)
    s = np.round(rng.random((n, num_labels)), 2)
    mask = rng.random((n, num_labels)) > 0.3
    y[~mask] = 7.0  # garbage where masked: must never be read
    y[mask[:, 3], 3] = 1.0  # label 3 has one class among its known cases
    with pytest.warns(RuntimeWarning, match="lab3"):
        got = metrics.auroc_per_label(y, s, mask, label_names=["a", "b", "c", "lab3"])
    for j in range(3):
        m = mask[:, j]
        assert abs(got[j] - skm.roc_auc_score(y[m, j], s[m, j])) <= 1e-12
    assert np.isnan(got[3])


def _direct_youden(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """Try every distinct score as threshold (plus +inf), exact J with fractions, first max wins."""
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    best_j, best_t = Fraction(0), np.inf
    for t in np.unique(s)[::-1]:
        pred = s >= t
        j = Fraction(int((pred & (y == 1)).sum()), n_pos) - Fraction(
            int((pred & (y == 0)).sum()), n_neg
        )
        if j > best_j:
            best_j, best_t = j, t
    pred = (s >= best_t).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    return {
        "threshold": best_t,
        "accuracy": (tp + tn) / len(y),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn),
    }


def test_youden_metrics_equal_direct_count_and_sklearn():
    rng = np.random.default_rng(1)
    n, num_labels = 250, 5
    y = rng.integers(0, 2, (n, num_labels))
    s = np.round(rng.random((n, num_labels)) * 0.7 + 0.3 * y, 2)
    got = metrics.metrics_per_label(y, s)
    for j in range(num_labels):
        ref = _direct_youden(y[:, j], s[:, j])
        for k, v in ref.items():
            assert got[k][j] == pytest.approx(v, abs=1e-12), (k, j)
        pred = s[:, j] >= got["threshold"][j]
        assert got["accuracy"][j] == pytest.approx(skm.accuracy_score(y[:, j], pred), abs=1e-12)
        assert got["sensitivity"][j] == pytest.approx(skm.recall_score(y[:, j], pred), abs=1e-12)
        assert got["precision"][j] == pytest.approx(skm.precision_score(y[:, j], pred), abs=1e-12)
        assert got["f1"][j] == pytest.approx(skm.f1_score(y[:, j], pred), abs=1e-12)
        fpr, tpr, thr = skm.roc_curve(y[:, j], s[:, j], drop_intermediate=False)
        assert got["threshold"][j] == thr[np.argmax(tpr - fpr)]


def test_weighted_stats_equal_stats_of_repeated_cases():
    rng = np.random.default_rng(2)
    y, s = _random_case(rng, 120, 2)
    counts = rng.multinomial(120, np.full(120, 1 / 120), size=6)
    got = metrics.weighted_curve_stats(y, s, counts.T)
    for r in range(6):
        idx = np.repeat(np.arange(120), counts[r])
        ref = _direct_youden(y[idx], s[idx])
        assert abs(got["auroc"][r] - skm.roc_auc_score(y[idx], s[idx])) <= 1e-12
        for k, v in ref.items():
            assert got[k][r] == pytest.approx(v, abs=1e-12), (k, r)
    # A weight vector that drops every positive makes every metric NaN.
    only_neg = np.where(y == 0, 1, 0)[:, None]
    assert all(np.isnan(v[0]) for v in metrics.weighted_curve_stats(y, s, only_neg).values())


def _preds(n: int = 20, with_mask: bool = True) -> Predictions:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, (n, 3)).astype(float)
    mask = rng.random((n, 3)) > 0.2 if with_mask else None
    return Predictions(
        labels=labels,
        probs=rng.random((n, 3)),
        label_names=["cardiomegaly", "effusion", "pneumonia"],
        ids=[f"h{i:04x}" for i in range(n)],
        mask=mask,
        patients=[f"p{i // 2}" for i in range(n)],
    )


def test_predictions_round_trip(tmp_path):
    p = _preds()
    path = tmp_path / "preds_test.npz"
    save_predictions(path, p)
    q = load_predictions(path)
    np.testing.assert_array_equal(q.labels, p.labels)
    np.testing.assert_array_equal(q.probs, p.probs)
    np.testing.assert_array_equal(q.mask, p.mask)
    np.testing.assert_array_equal(q.ids, p.ids)
    np.testing.assert_array_equal(q.patients, p.patients)
    assert q.label_names == p.label_names


def test_predictions_nan_labels_become_mask():
    p = _preds(with_mask=False)
    labels = p.labels.copy()
    labels[0, 1] = np.nan
    q = Predictions(labels, p.probs, p.label_names, p.ids)
    assert q.mask is not None and not q.mask[0, 1] and q.mask.sum() == q.mask.size - 1


def test_predictions_bad_files_name_the_file(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, labels=np.zeros((2, 1)), probs=np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"bad\.npz.*missing keys \['label_names', 'ids'\]"):
        load_predictions(path)
    np.savez(
        path,
        labels=np.zeros((2, 1)),
        probs=np.zeros((2, 1)),
        label_names=np.array(["a"], dtype=object),
        ids=np.array(["x", "y"]),
    )
    with pytest.raises(ValueError, match=r"bad\.npz.*object arrays"):
        load_predictions(path)
    np.savez(
        path,
        labels=np.array([[0.0], [2.0]]),
        probs=np.zeros((2, 1)),
        label_names=np.array(["a"]),
        ids=np.array(["x", "y"]),
    )
    with pytest.raises(ValueError, match=r"bad\.npz.*0 or 1"):
        load_predictions(path)
    with pytest.raises(ValueError, match="not unique"):
        Predictions(np.zeros((2, 1)), np.zeros((2, 1)), ["a"], ["x", "x"])


def _tied_masked(seed: int, n: int = 300, num_labels: int = 4):
    """Labels, scores rounded to 2 decimals (many ties) and a mask hiding ~15% of entries."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, num_labels)) < np.linspace(0.05, 0.5, num_labels)).astype(float)
    s = np.round(np.clip(rng.random((n, num_labels)) * 0.8 + 0.25 * y, 0, 1), 2)
    return y, s, rng.random((n, num_labels)) > 0.15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auprc_equals_sklearn_average_precision_with_ties_masks_and_weights(seed):
    y, s, mask = _tied_masked(seed)
    rng = np.random.default_rng(seed + 10)
    for j in range(y.shape[1]):
        yk, sk = y[mask[:, j], j], s[mask[:, j], j]
        counts = rng.multinomial(yk.size, np.full(yk.size, 1 / yk.size), size=8)
        got = metrics.weighted_curve_stats(yk, sk, np.c_[np.ones(yk.size, int), counts.T])
        assert abs(got["auprc"][0] - skm.average_precision_score(yk, sk)) <= 1e-9
        for r in range(8):
            idx = np.repeat(np.arange(yk.size), counts[r])
            ref = skm.average_precision_score(yk[idx], sk[idx])
            assert abs(got["auprc"][r + 1] - ref) <= 1e-9, (j, r)
    # A constant score: every case is one threshold, AP = prevalence.
    const = metrics.weighted_curve_stats(y[:, 3], np.full(len(y), 0.5), np.ones((len(y), 1), int))
    assert const["auprc"][0] == pytest.approx(y[:, 3].mean(), abs=1e-12)
