"""Vectorised bootstrap and paired tests against a plain per-resample sklearn loop."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation.predictions import Predictions


def _data(seed: int, n: int = 160, num_labels: int = 3, masked: bool = True):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, num_labels)) < 0.3).astype(float)
    s = np.round(rng.random((n, num_labels)) * 0.8 + 0.25 * y, 2)
    mask = rng.random((n, num_labels)) > 0.15 if masked else None
    return y, s, mask


def _preds(y, s, mask=None, patients=None) -> Predictions:
    return Predictions(
        labels=y,
        probs=s,
        label_names=[f"l{j}" for j in range(y.shape[1])],
        ids=[f"id{i}" for i in range(len(y))],
        mask=mask,
        patients=patients,
    )


def test_resample_counts_seeded_and_by_group():
    c = bs.resample_counts(50, 30, seed=4)
    assert c.shape == (30, 50) and np.all(c.sum(axis=1) == 50)
    np.testing.assert_array_equal(c, bs.resample_counts(50, 30, seed=4))
    assert not np.array_equal(c, bs.resample_counts(50, 30, seed=5))
    groups = np.repeat(np.array(["p3", "p1", "p2", "p0", "p4"]), [1, 4, 2, 2, 1])
    g = bs.resample_counts(10, 200, seed=0, groups=groups)
    for key in np.unique(groups):
        cols = g[:, groups == key]
        assert np.all(cols == cols[:, :1])  # a patient's images move together
    # Five patients drawn per resample: the per-patient counts sum to 5.
    first = np.unique(groups, return_index=True)[1]
    assert np.all(g[:, first].sum(axis=1) == 5)


def _reference_row(y, s, idx):
    """What the study's loop computes on one resample: sklearn on the drawn indices."""
    yy, ss = y[idx], s[idx]
    if yy.min() == yy.max():
        return {"auroc": np.nan, "threshold": np.nan, "sensitivity": np.nan}
    fpr, tpr, thr = skm.roc_curve(yy, ss, drop_intermediate=False)
    # sklearn's curve, but J compared in integers: float tpr - fpr can rank two exactly equal
    # J values either way (seen on this data), while the study's rule takes the higher threshold.
    n_pos, n_neg = int(yy.sum()), int((1 - yy).sum())
    j = np.round(tpr * n_pos) * n_neg - np.round(fpr * n_neg) * n_pos
    t = thr[np.argmax(j)]
    pred = ss >= t
    return {
        "auroc": skm.roc_auc_score(yy, ss),
        "threshold": t,
        "sensitivity": skm.recall_score(yy, pred),
        "specificity": skm.recall_score(1 - yy, ~pred),
        "accuracy": skm.accuracy_score(yy, pred),
        "precision": skm.precision_score(yy, pred, zero_division=0),
        "f1": skm.f1_score(yy, pred),
    }


def test_resampled_metrics_equal_per_resample_sklearn_loop():
    y, s, mask = _data(0)
    counts = bs.resample_counts(len(y), 40, seed=1)
    got = bs.resampled_metrics(y, s, counts, mask)
    for r in range(40):
        idx = np.repeat(np.arange(len(y)), counts[r])
        for j in range(y.shape[1]):
            k = idx[mask[idx, j]]
            for name, v in _reference_row(y[:, j], s[:, j], k).items():
                np.testing.assert_allclose(
                    got[name][r, j], v, atol=1e-12, err_msg=f"{name} {r} {j}"
                )


def test_single_class_resample_gives_nan():
    y = np.array([[1.0], [0.0], [0.0], [0.0]])
    s = np.array([[0.9], [0.1], [0.2], [0.3]])
    counts = np.array([[0, 4, 0, 0], [1, 1, 1, 1]])
    got = bs.resampled_metrics(y, s, counts)
    assert np.isnan(got["auroc"][0, 0]) and got["auroc"][1, 0] == 1.0


def test_summarize_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.random((500, 3))
    x[7, 1] = np.nan
    x[9, 2] = np.inf  # a Youden threshold above every score
    got = bs.summarize(x)
    for j in range(3):
        v = x[np.isfinite(x[:, j]), j]
        assert got["mean"][j] == pytest.approx(v.mean(), abs=1e-14)
        assert got["sd"][j] == pytest.approx(v.std(ddof=1), abs=1e-14)
        assert got["ci_low"][j] == pytest.approx(np.percentile(v, 2.5), abs=1e-14)
        assert got["ci_high"][j] == pytest.approx(np.percentile(v, 97.5), abs=1e-14)
        assert got["n_valid"][j] == v.size


def test_bootstrap_result_json_and_label_mean():
    y, s, mask = _data(3)
    res = bs.bootstrap(_preds(y, s, mask), n_resamples=50, seed=0)
    js = res.to_json()
    assert js["bootstrap"]["n_resamples"] == 50
    auc = res.samples["auroc"]
    assert js["mean"]["auroc"]["mean"] == pytest.approx(np.mean(auc.mean(axis=1)), abs=1e-14)
    assert js["per_label"]["l1"]["auroc"]["sd"] == pytest.approx(auc[:, 1].std(ddof=1), abs=1e-14)
    for j in range(3):
        m = mask[:, j]
        assert js["per_label"][f"l{j}"]["auroc"]["point"] == pytest.approx(
            skm.roc_auc_score(y[m, j], s[m, j]), abs=1e-12
        )


@pytest.mark.parametrize("by_image", [False, True])
def test_paired_p_values_equal_reference_loop(by_image):
    y, s_a, mask = _data(4, n=120)
    rng = np.random.default_rng(9)
    s_b = np.round(np.clip(s_a + rng.normal(0, 0.15, s_a.shape), 0, 1), 2)
    patients = [f"p{i // 3}" for i in range(len(y))]
    a, b = _preds(y, s_a, mask, patients), _preds(y, s_b, mask, patients)
    res = bs.paired_bootstrap(a, b, n_resamples=60, seed=7, by_image=by_image)
    counts = bs.resample_counts(len(y), 60, seed=7, groups=None if by_image else a.patients)
    le = np.zeros(3)
    le_mean = 0
    for r in range(60):
        idx = np.repeat(np.arange(len(y)), counts[r])
        auc_a, auc_b = [], []
        for j in range(3):
            k = idx[mask[idx, j]]
            auc_a.append(skm.roc_auc_score(y[k, j], s_a[k, j]))
            auc_b.append(skm.roc_auc_score(y[k, j], s_b[k, j]))
        le += np.array(auc_a) <= np.array(auc_b)
        le_mean += np.mean(auc_a) <= np.mean(auc_b)
    np.testing.assert_array_equal(res.p_label, le / 60)
    assert res.p_mean == le_mean / 60


def test_paired_requires_same_cases_in_same_order():
    y, s, _ = _data(5, masked=False)
    a = _preds(y, s)
    shuffled = _preds(y[::-1], s[::-1])
    shuffled.ids = a.ids[::-1]
    with pytest.raises(ValueError, match="different order"):
        bs.paired_bootstrap(a, shuffled, n_resamples=5)
    other = _preds(y, s)
    other.ids = np.char.add(a.ids, "x")
    with pytest.raises(ValueError, match="different ids"):
        bs.paired_bootstrap(a, other, n_resamples=5)
    flipped = _preds(1 - y, s)
    with pytest.raises(ValueError, match="ground-truth"):
        bs.paired_bootstrap(a, flipped, n_resamples=5)
    with_patients = _preds(y, s, patients=[f"p{i // 2}" for i in range(len(y))])
    with pytest.raises(ValueError, match="disagree on patients"):
        bs.paired_bootstrap(a, with_patients, n_resamples=5)
    # Resampling images needs no patients: the pair is fine then.
    bs.paired_bootstrap(a, with_patients, n_resamples=5, by_image=True)


def test_paired_p_values_nan_only_for_labels_without_both_classes():
    y, s_a, _ = _data(8, n=80, masked=False)
    y[:, 1] = 0.0  # no positive in the split: the label is undefined for both runs
    s_b = np.round(s_a[::-1], 2)
    a, b = _preds(y, s_a), _preds(y, s_b)
    counts = bs.resample_counts(len(y), 40, seed=3)
    res_a, res_b = (bs.bootstrap(p, 40, 3, counts=counts) for p in (a, b))
    p_label, p_mean = bs.paired_p_values(res_a, res_b)
    assert np.isnan(p_label[1]) and np.all(np.isfinite(p_label[[0, 2]]))
    # The label mean covers the defined labels only.
    mean_a = res_a.samples["auroc"][:, [0, 2]].mean(axis=1)
    mean_b = res_b.samples["auroc"][:, [0, 2]].mean(axis=1)
    assert p_mean == np.mean(mean_a <= mean_b)
    paired = bs.paired_bootstrap(a, b, n_resamples=40, seed=3)
    np.testing.assert_array_equal(paired.p_label, p_label)
    assert paired.p_mean == p_mean
    other_seed = bs.bootstrap(b, 40, 4, counts=counts)
    with pytest.raises(ValueError, match="same resamples"):
        bs.paired_p_values(res_a, other_seed)


def test_benjamini_hochberg_hand_computed_and_equals_scipy():
    # Ranks of 0.01, 0.03, 0.04, 0.20 scale to 0.04, 0.06, 0.0533, 0.20; step-up takes the
    # minimum from each rank upwards, so 0.03 and 0.04 share 0.0533. NaN is not counted.
    got = bs.benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.20, np.nan]))
    np.testing.assert_allclose(got[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.20], rtol=0, atol=1e-15)
    assert np.isnan(got[4])
    assert np.all(np.isnan(bs.benjamini_hochberg(np.array([np.nan, np.nan]))))
    assert bs.benjamini_hochberg(np.array([])).shape == (0,)
    rng = np.random.default_rng(6)
    p = rng.random(17) ** 3
    p[[2, 5]] = p[1]  # ties
    np.testing.assert_allclose(
        bs.benjamini_hochberg(p), stats.false_discovery_control(p), rtol=0, atol=1e-15
    )
    with_nan = np.r_[p[:4], np.nan, p[4:9]]
    got = bs.benjamini_hochberg(with_nan)
    assert np.isnan(got[4])
    np.testing.assert_allclose(
        np.delete(got, 4), stats.false_discovery_control(p[:9]), rtol=0, atol=1e-15
    )
