"""Brier score, ECE (equal width and equal mass) and temperature scaling."""

import numpy as np
import pytest
from scipy import optimize
from sklearn import metrics as skm

from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation import calibration


def _data(seed: int, n: int = 400, num_labels: int = 3):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, num_labels)) < 0.3).astype(float)
    # Two decimals: many ties, some exactly on bin edges (k / 15 is never a 2-decimal number,
    # but 0.0, 1.0 and repeated values are), overconfident on purpose.
    s = np.round(np.clip(rng.random((n, num_labels)) ** 2 + 0.4 * y, 0, 1), 2)
    s[:5] = 1.0
    s[5:10] = 0.0
    return y, s, rng.random((n, num_labels)) > 0.15


def _direct_ece(y: np.ndarray, p: np.ndarray, mass: bool, bins: int = 15) -> float:
    """ECE by a plain loop over bins, straight from the README's definitions."""
    n = len(y)
    if mass:
        order = sorted(range(n), key=lambda i: (p[i], i))
        bin_of = {}
        for i in order:
            # Ties join the bin of the first case with the same probability.
            first = next(kk for kk, ii in enumerate(order) if p[ii] == p[i])
            bin_of[i] = first * bins // n
    else:
        bin_of = {i: min(int(p[i] * bins), bins - 1) for i in range(n)}
    total = 0.0
    for b in range(bins):
        members = [i for i in range(n) if bin_of[i] == b]
        if members:
            acc = np.mean([y[i] for i in members])
            conf = np.mean([p[i] for i in members])
            total += len(members) / n * abs(acc - conf)
    return total


@pytest.mark.parametrize("seed", [0, 1])
def test_brier_and_ece_equal_sklearn_and_a_direct_loop_with_masks(seed):
    y, s, mask = _data(seed)
    counts = bs.resample_counts(len(y), 6, seed=seed)
    got = bs.resampled_metrics(y, s, np.vstack([np.ones(len(y), np.int32), counts]), mask)
    for j in range(y.shape[1]):
        k = mask[:, j]
        yk, sk = y[k, j], s[k, j]
        assert abs(got["brier"][0, j] - skm.brier_score_loss(yk, sk)) <= 1e-9
        assert abs(got["ece"][0, j] - _direct_ece(yk, sk, mass=False)) <= 1e-9
        assert abs(got["ece_mass"][0, j] - _direct_ece(yk, sk, mass=True)) <= 1e-9
        assert abs(got["auprc"][0, j] - skm.average_precision_score(yk, sk)) <= 1e-9
        # A resample is the same cases repeated; the bins stay those of the evaluated cases.
        edges_mass = calibration.equal_mass_bins(sk)
        for r in range(6):
            idx = np.repeat(np.flatnonzero(k), counts[r, k])
            assert abs(got["brier"][r + 1, j] - skm.brier_score_loss(y[idx, j], s[idx, j])) <= 1e-9
            rep = np.repeat(np.arange(k.sum()), counts[r, k])
            by_bin = np.zeros(15)
            np.add.at(by_bin, edges_mass[rep], yk[rep] - sk[rep])
            assert abs(got["ece_mass"][r + 1, j] - np.abs(by_bin).sum() / rep.size) <= 1e-9


def test_equal_mass_bins_hold_equal_counts_and_keep_ties_together():
    s = np.arange(150) / 150.0
    np.testing.assert_array_equal(np.bincount(calibration.equal_mass_bins(s)), np.full(15, 10))
    tied = np.r_[np.zeros(25), np.linspace(0.1, 1, 125)]
    bins = calibration.equal_mass_bins(tied)
    assert len(set(bins[:25])) == 1 and bins[0] == 0 and bins[25] > 0


def test_scores_outside_unit_interval_give_nan_calibration():
    got = calibration.weighted_calibration_stats(
        np.array([0, 1]), np.array([-1.0, 2.0]), np.ones((2, 1))
    )
    assert all(np.isnan(v[0]) for v in got.values())


def test_temperature_fit_minimises_nll_and_lowers_ece():
    rng = np.random.default_rng(4)
    n = 3000
    z_true = rng.normal(0, 2, (n, 2))
    y = (rng.random((n, 2)) < 1 / (1 + np.exp(-z_true))).astype(float)
    # An overconfident model: logits twice too large (T = 2 undoes it).
    probs = 1 / (1 + np.exp(-2 * z_true))
    t = calibration.fit_temperature(y, probs)
    z = calibration.logit(probs)
    for j in range(2):
        ref = optimize.minimize_scalar(
            lambda tt, j=j: skm.log_loss(y[:, j], 1 / (1 + np.exp(-z[:, j] / tt))),
            bounds=(0.1, 10),
            method="bounded",
            options={"xatol": 1e-9},
        )
        assert t[j] == pytest.approx(ref.x, rel=1e-5)
        assert 1.7 < t[j] < 2.3
    scaled = calibration.apply_temperature(probs, t)
    ones = np.ones((n, 1))
    for j in range(2):
        before = calibration.weighted_calibration_stats(y[:, j], probs[:, j], ones)["ece"][0]
        after = calibration.weighted_calibration_stats(y[:, j], scaled[:, j], ones)["ece"][0]
        assert after < before / 2
    np.testing.assert_allclose(calibration.apply_temperature(probs, np.ones(2)), probs, atol=1e-9)
    # A single-class label cannot be fitted and keeps T = 1.
    assert calibration.fit_temperature(np.zeros((5, 1)), np.full((5, 1), 0.2))[0] == 1.0
