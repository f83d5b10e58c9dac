"""DeLong's test (Sun and Xu's fast algorithm) against a plain O(n^2) implementation."""

import json

import numpy as np
import pytest
from scipy import stats

from cxrjax import evaluate
from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation import delong
from cxrjax.evaluation.predictions import Predictions, save_predictions


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _reference_components(y, s_a, s_b):
    """DeLong 1988 by pairwise comparison: AUCs and the scaled structural components per case."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    out = []
    for s in (s_a, s_b):
        psi = np.array([[_psi(s[i], s[k]) for k in neg] for i in pos])
        out.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (auc_a, v10_a, v01_a), (auc_b, v10_b, v01_b) = out
    d10, d01 = v10_a - v10_b, v01_a - v01_b
    s10 = np.sum((d10 - d10.mean()) ** 2) / (m - 1)
    s01 = np.sum((d01 - d01.mean()) ** 2) / (n - 1)
    var = s10 / m + s01 / n
    c = np.zeros(len(y))
    c[pos] = (d10 - (auc_a - auc_b)) / np.sqrt(m * (m - 1))
    c[neg] = (d01 - (auc_a - auc_b)) / np.sqrt(n * (n - 1))
    return auc_a, auc_b, var, c


def _pair(seed: int, n: int = 150):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < 0.35).astype(float)
    s_a = np.round(1 / (1 + np.exp(-(rng.normal(size=y.shape) + 1.4 * y))), 2)
    s_b = np.round(np.clip(s_a + rng.normal(0, 0.2, y.shape), 0, 1), 1)  # coarser: more ties
    mask = rng.random(y.shape) > 0.1
    make = lambda s: Predictions(y, s, ["a", "b", "c"], [f"h{i}" for i in range(n)], mask)  # noqa: E731
    return make(s_a), make(s_b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variance_and_p_equal_the_pairwise_reference(seed):
    a, b = _pair(seed)
    got = delong.delong_test(a, b)
    total = np.zeros(len(a.ids))
    for j in range(3):
        k = a.mask[:, j]
        auc_a, auc_b, var, c = _reference_components(a.labels[k, j], a.probs[k, j], b.probs[k, j])
        z = (auc_a - auc_b) / np.sqrt(var)
        assert abs(got.auc_a[j] - auc_a) <= 1e-9 and abs(got.auc_b[j] - auc_b) <= 1e-9
        assert abs(got.var[j] - var) <= 1e-9
        assert abs(got.z[j] - z) <= 1e-9
        assert abs(got.p[j] - stats.norm.sf(z)) <= 1e-9
        assert abs(got.p_two_sided[j] - 2 * stats.norm.sf(abs(z))) <= 1e-9
        total[k] += c
    mean_diff = got.auc_a.mean() - got.auc_b.mean()
    mean_var = np.sum(total**2) / 9
    assert abs(got.mean_var - mean_var) <= 1e-9
    assert abs(got.mean_p - stats.norm.sf(mean_diff / np.sqrt(mean_var))) <= 1e-9


def test_single_label_mean_is_that_label_and_identical_models_give_p_one():
    a, b = _pair(3)
    one = lambda p: Predictions(p.labels[:, :1], p.probs[:, :1], ["a"], p.ids, p.mask[:, :1])  # noqa: E731
    got = delong.delong_test(one(a), one(b))
    assert got.mean_var == pytest.approx(got.var[0], abs=1e-15)
    assert got.mean_p == pytest.approx(got.p[0], abs=1e-15)
    same = delong.delong_test(a, a)
    assert np.all(same.p == 1.0) and same.mean_p == 1.0


def test_cli_compare_writes_both_tests(tmp_path):
    a, b = _pair(4, n=200)
    save_predictions(tmp_path / "a.npz", a)
    save_predictions(tmp_path / "b.npz", b)
    out = tmp_path / "out"
    argv = [
        "evaluate",
        f"--predictions={tmp_path / 'a.npz'}",
        f"--compare={tmp_path / 'b.npz'}",
        f"--out={out}",
        "--bootstrap=50",
        "--no-plots",
    ]
    assert evaluate.main(argv) == 0
    js = json.loads((out / "paired_a_vs_b.json").read_text())
    ref = delong.delong_test(a, b)
    boot = bs.paired_bootstrap(a, b, n_resamples=50, seed=0)
    for j, name in enumerate(a.label_names):
        row = js["per_label"][name]
        assert row["p_delong"] == pytest.approx(ref.p[j], abs=1e-12)
        assert row["p_bootstrap"] == pytest.approx(boot.p_label[j], abs=1e-12)
    assert js["per_label"]["mean"]["p_delong"] == pytest.approx(ref.mean_p, abs=1e-12)
    assert js["per_label"]["mean"]["p_bootstrap"] == pytest.approx(boot.p_mean, abs=1e-12)
    assert (out / "a_metrics.json").is_file()
