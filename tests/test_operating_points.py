"""Thresholds chosen on validation and held fixed on test."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from cxrjax import evaluate
from cxrjax.errors import ConfigError
from cxrjax.evaluation import operating_points as op
from cxrjax.evaluation.predictions import Predictions, save_predictions


def _preds(seed: int, n: int = 240, prefix: str = "v") -> Predictions:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < 0.3).astype(float)
    s = np.round(1 / (1 + np.exp(-(rng.normal(size=(n, 3)) + 1.5 * y))), 2)
    return Predictions(
        labels=y,
        probs=s,
        label_names=["a", "b", "c"],
        ids=[f"{prefix}{i}" for i in range(n)],
        mask=rng.random((n, 3)) > 0.1,
    )


def _direct(y, s, rule):
    """Exhaustive search over every observed score and +inf, by the rule's definition."""
    y = y.astype(bool)
    candidates = sorted({*s.tolist(), np.inf})
    sens = {t: np.mean(s[y] >= t) for t in candidates}
    spec = {t: np.mean(s[~y] < t) for t in candidates}
    if rule.kind == "youden":
        fpr, tpr, thr = skm.roc_curve(y, s)
        return thr[
            np.argmax(np.round(tpr * y.sum()) * (~y).sum() - np.round(fpr * (~y).sum()) * y.sum())
        ]
    if rule.kind == "sensitivity":
        ok = [t for t in candidates if sens[t] >= rule.target - 1e-12]
        best = max(spec[t] for t in ok)
        return max(t for t in ok if spec[t] == best)
    ok = [t for t in candidates if spec[t] >= rule.target - 1e-12]
    best = max(sens[t] for t in ok)
    # Among equally sensitive thresholds the highest (best specificity).
    return max(t for t in ok if sens[t] == best)


@pytest.mark.parametrize(
    "text", ["youden", "sensitivity=0.95", "sensitivity=0.8", "specificity=0.9", "specificity=0.5"]
)
def test_rules_pick_the_threshold_an_exhaustive_search_picks(text):
    rule = op.parse_rule(text)
    p = _preds(0)
    got = op.choose_thresholds(p.labels, p.probs, p.mask, rule)
    for j in range(3):
        k = p.mask[:, j]
        y, s = p.labels[k, j], p.probs[k, j]
        assert got[j] == _direct(y, s, rule), (text, j)
        called = s >= got[j]
        if rule.kind == "sensitivity":
            assert called[y == 1].mean() >= rule.target
        if rule.kind == "specificity":
            assert (~called[y == 0]).mean() >= rule.target


def test_parse_rule_rejects_bad_rules():
    assert str(op.parse_rule("sensitivity=0.95")) == "sensitivity=0.95"
    for bad in ["youden=1", "sensitivity", "sensitivity=x", "specificity=1.5", "f1"]:
        with pytest.raises(ConfigError):
            op.parse_rule(bad)


def test_cli_applies_the_validation_thresholds_to_test(tmp_path):
    val, test = _preds(1, prefix="v"), _preds(2, n=300, prefix="t")
    save_predictions(tmp_path / "predictions_val.npz", val)
    save_predictions(tmp_path / "predictions_test.npz", test)
    argv = [
        "evaluate",
        f"--predictions={tmp_path / 'predictions_test.npz'}",
        f"--thresholds-from={tmp_path / 'predictions_val.npz'}",
        "--operating-point=sensitivity=0.9",
        "--bootstrap=30",
        "--no-plots",
    ]
    assert evaluate.main(argv) == 0
    js = json.loads((tmp_path / "metrics_test.json").read_text())
    expected = op.choose_thresholds(
        val.labels, val.probs, val.mask, op.parse_rule("sensitivity=0.9")
    )
    assert js["operating_point"]["rule"] == "sensitivity=0.9"
    for j, name in enumerate(test.label_names):
        t = js["operating_point"]["thresholds"][name]
        assert t == expected[j]
        m = js["per_label"][name]
        assert m["fixed_threshold"]["point"] == t
        k = test.mask[:, j]
        y, called = test.labels[k, j], test.probs[k, j] >= t
        tn, fp, fn, tp = skm.confusion_matrix(y, called, labels=[0, 1]).ravel()
        assert m["fixed_sensitivity"]["point"] == pytest.approx(tp / (tp + fn), abs=1e-12)
        assert m["fixed_specificity"]["point"] == pytest.approx(tn / (tn + fp), abs=1e-12)
        assert m["fixed_ppv"]["point"] == pytest.approx(tp / (tp + fp), abs=1e-12)
        assert m["fixed_npv"]["point"] == pytest.approx(tn / (tn + fn), abs=1e-12)
        assert m["fixed_f1"]["point"] == pytest.approx(skm.f1_score(y, called), abs=1e-12)
        assert m["fixed_sensitivity"]["n_valid"] == 30
    assert "fixed_threshold" not in js["mean"] and "fixed_sensitivity" in js["mean"]


def test_cli_rejects_validation_predictions_of_other_labels(tmp_path, capsys):
    val, test = _preds(1), _preds(2, prefix="t")
    val.label_names = ["x", "y", "z"]
    save_predictions(tmp_path / "val.npz", val)
    save_predictions(tmp_path / "predictions_test.npz", test)
    argv = ["evaluate", f"--predictions={tmp_path / 'predictions_test.npz'}", "--bootstrap=0"]
    assert evaluate.main([*argv, f"--thresholds-from={tmp_path / 'val.npz'}"]) == 2
    assert "has labels" in capsys.readouterr().err
    assert evaluate.main([*argv, "--operating-point=sens=1"]) == 2
