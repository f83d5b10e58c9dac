"""Issue 22's statistics: patient-level default, the small-sample rule, degenerate cases and the
input checks of evaluate and compare, each against an independent reference."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from cxrjax import evaluate
from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation import delong, pipeline, subgroups
from cxrjax.evaluation.predictions import Predictions, save_predictions
from cxrjax.evaluation.sample_rule import SampleRule

_spec = importlib.util.spec_from_file_location(
    "compare_tool_stats", Path(__file__).resolve().parents[1] / "tools" / "compare.py"
)
compare_tool = importlib.util.module_from_spec(_spec)
sys.modules["compare_tool_stats"] = compare_tool
_spec.loader.exec_module(compare_tool)

NAMES = ["cardiomegaly", "effusion", "pneumonia"]


def _strict_load(path: Path) -> dict:
    """json.loads that fails on NaN / Infinity, as strict parsers do."""

    def refuse(token):
        raise AssertionError(f"{path} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _clustered(n_patients: int = 150, per_patient: int = 4, seed: int = 0) -> Predictions:
    """Several strongly correlated images per patient: one finding and one score per patient."""
    rng = np.random.default_rng(seed)
    y_pat = (rng.random((n_patients, 3)) < 0.35).astype(float)
    s_pat = rng.normal(size=(n_patients, 3)) + 1.0 * y_pat
    y = np.repeat(y_pat, per_patient, axis=0)
    s = np.repeat(s_pat, per_patient, axis=0) + 0.1 * rng.normal(size=y.shape)
    n = len(y)
    return Predictions(
        labels=y,
        probs=1 / (1 + np.exp(-s)),
        label_names=NAMES,
        ids=[f"h{i:04d}" for i in range(n)],
        patients=[f"p{i // per_patient:04d}" for i in range(n)],
    )


def _patient_bootstrap_sd(preds: Predictions, n_resamples: int, seed: int) -> np.ndarray:
    """Per-label AUROC SD of a plain patient bootstrap: draw patients, take all their images."""
    patients, inverse = np.unique(preds.patients, return_inverse=True)
    rows = [np.flatnonzero(inverse == p) for p in range(len(patients))]
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_resamples):
        drawn = rng.integers(0, len(patients), len(patients))
        idx = np.concatenate([rows[p] for p in drawn])
        aucs.append(
            [skm.roc_auc_score(preds.labels[idx, j], preds.probs[idx, j]) for j in range(3)]
        )
    return np.std(aucs, axis=0, ddof=1)


def test_default_sd_is_the_patient_level_bootstraps(tmp_path):
    preds = _clustered()
    path = tmp_path / "predictions_test.npz"
    save_predictions(path, preds)
    assert (
        evaluate.main(["evaluate", f"--predictions={path}", "--bootstrap=200", "--no-plots"]) == 0
    )
    js = _strict_load(tmp_path / "metrics_test.json")
    assert js["bootstrap"]["resampling"] == "patient"
    ref = _patient_bootstrap_sd(preds, 200, seed=0)
    got = np.array([js["per_label"][n]["auroc"]["sd"] for n in NAMES])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    # The study's image-level protocol, on request: about half as wide on 4 images a patient.
    assert evaluate.main(
        ["evaluate", f"--predictions={path}", "--bootstrap=200", "--no-plots", "--by-image",
         f"--out={tmp_path / 'img'}"]
    ) == 0  # fmt: skip
    by_image = _strict_load(tmp_path / "img" / "metrics_test.json")
    assert by_image["bootstrap"]["resampling"] == "image"
    sd_image = np.array([by_image["per_label"][n]["auroc"]["sd"] for n in NAMES])
    assert np.all(sd_image < 0.7 * got)


def _one_positive(n: int = 200, seed: int = 1) -> tuple[Predictions, Predictions]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < 0.4).astype(float)
    y[:, 2] = 0.0
    y[7, 2] = 1.0  # a single positive: no AUROC under the rule
    s_a = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 1.5 * y)))
    s_b = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 0.8 * y)))
    make = lambda s: Predictions(y, s, NAMES, [f"h{i}" for i in range(n)])  # noqa: E731
    return make(s_a), make(s_b)


def test_one_positive_label_is_reported_with_counts_and_kept_out(tmp_path, capsys):
    a, b = _one_positive()
    pa, pb = tmp_path / "a.npz", tmp_path / "b.npz"
    save_predictions(pa, a)
    save_predictions(pb, b)
    argv = ["evaluate", f"--predictions={pa}", f"--compare={pb}", "--bootstrap=50", "--no-plots"]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "small-sample rule: pneumonia: only 1 positive (the rule needs 10 of each class)" in printed
    )
    js = _strict_load(tmp_path / "a_metrics.json")
    assert js["sample_rule"]["min_positives"] == 10 and js["labels_in_mean"] == NAMES[:2]
    reason = "only 1 positive (the rule needs 10 of each class)"
    assert js["excluded_labels"]["pneumonia"] == {"positive": 1, "negative": 199, "reason": reason}
    assert js["label_counts"]["pneumonia"] == {"known": 200, "positive": 1, "negative": 199}
    assert js["per_label"]["pneumonia"]["auroc"]["point"] is None
    mean_ref = np.mean([skm.roc_auc_score(a.labels[:, j], a.probs[:, j]) for j in (0, 1)])
    assert js["mean"]["auroc"]["point"] == pytest.approx(mean_ref, abs=1e-12)
    paired = _strict_load(tmp_path / "paired_a_vs_b.json")
    assert paired["per_label"]["pneumonia"]["p_delong"] is None
    assert paired["per_label"]["pneumonia"]["n_positive"] == 1
    mean = paired["per_label"]["mean"]
    assert mean["p_delong"] is not None and 0 <= mean["p_delong"] <= 1
    # The DeLong total is that of the two passing labels alone.
    two = [Predictions(p.labels[:, :2], p.probs[:, :2], NAMES[:2], p.ids) for p in (a, b)]
    assert mean["delong_var"] == pytest.approx(delong.delong_test(*two).mean_var, rel=1e-12)
    # Benjamini-Hochberg across the labels, as scipy computes it.
    p = [paired["per_label"][n]["p_bootstrap"] for n in NAMES[:2]]
    bh = stats.false_discovery_control(p, method="bh")
    got = [paired["per_label"][n]["p_bootstrap_bh"] for n in NAMES[:2]]
    np.testing.assert_allclose(got, bh, atol=1e-15)


def test_two_sided_delong_p_at_zero_variance():
    y = np.array([1.0] * 12 + [0.0] * 15)[:, None]
    ids = [f"h{i}" for i in range(len(y))]
    perfect = Predictions(y, 0.2 + 0.6 * y, ["x"], ids)
    flat = Predictions(y, np.full(y.shape, 0.5), ["x"], ids)
    # Perfect vs constant: every placement differs by exactly 0.5, so the variance is zero and
    # the difference certain: p = 0 both ways (the paired bootstrap never sees A <= B either).
    res = delong.delong_test(perfect, flat)
    assert res.var[0] == 0 and res.p[0] == 0.0 and res.p_two_sided[0] == 0.0
    res = delong.delong_test(flat, perfect)
    assert res.p[0] == 1.0 and res.p_two_sided[0] == 0.0
    res = delong.delong_test(perfect, perfect)
    assert res.p[0] == 1.0 and res.p_two_sided[0] == 1.0
    assert res.mean_p_two_sided == 1.0
    boot = bs.paired_bootstrap(perfect, flat, 30, 0, rule=SampleRule(2, 2))
    assert boot.p_label[0] == 0.0


def test_fixed_threshold_metrics_follow_the_resample_weights():
    rng = np.random.default_rng(3)
    y = (rng.random((300, 1)) < 0.4).astype(float)
    s = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 1.2 * y)))
    preds = Predictions(y, s, ["x"], [f"h{i}" for i in range(300)])
    res = bs.bootstrap(preds, 60, 5, thresholds=np.array([0.5]))
    counts = bs.resample_counts(300, 60, 5)
    sens, npv = [], []
    for r in range(60):
        idx = np.repeat(np.arange(300), counts[r])
        tn, fp, fn, tp = skm.confusion_matrix(y[idx, 0], s[idx, 0] >= 0.5).ravel()
        sens.append(tp / (tp + fn))
        npv.append(tn / (tn + fn))
    np.testing.assert_allclose(res.samples["fixed_sensitivity"][:, 0], sens, atol=1e-14)
    np.testing.assert_allclose(res.samples["fixed_npv"][:, 0], npv, atol=1e-14)
    width = res.to_json()["per_label"]["x"]["fixed_sensitivity"]
    assert width["ci_high"] - width["ci_low"] > 0.02


def test_subgroup_gap_over_three_groups_and_the_rule(tmp_path):
    rng = np.random.default_rng(4)
    n = 900
    band = rng.choice(["20-29", "40-49", "60-69", "80-89"], n, p=[0.3, 0.3, 0.35, 0.05])
    y = (rng.random((n, 2)) < 0.4).astype(float)
    strength = {"20-29": 2.0, "40-49": 1.0, "60-69": 0.4, "80-89": 3.0}
    s = rng.normal(size=y.shape) + np.array([strength[b] for b in band])[:, None] * y
    y[band == "80-89", 1] = 0.0  # the small group has no positive of label 1: it fails the rule
    y[np.flatnonzero(band == "80-89")[:2], 1] = 1.0
    preds = Predictions(y, 1 / (1 + np.exp(-s)), ["a", "b"], [f"h{i}" for i in range(n)])
    counts = bs.resample_counts(n, 30, 0)
    out = subgroups.subgroup_report(preds, {"age_band": band}, counts)["age_band"]
    groups = out["groups"]
    ref = {
        g: [skm.roc_auc_score(y[band == g, j], preds.probs[band == g, j]) for j in (0, 1)]
        for g in ("20-29", "40-49", "60-69", "80-89")
    }
    for g in ref:
        assert groups[g]["per_label"]["a"]["auroc"]["point"] == pytest.approx(ref[g][0], abs=1e-12)
    assert groups["80-89"]["per_label"]["b"]["auroc"]["point"] is None
    assert groups["80-89"]["per_label"]["b"]["excluded"].startswith("only 2 positives")
    # Label a: max - min over all four groups; label b: over the three that pass.
    a_vals = [ref[g][0] for g in ref]
    assert out["gap"]["a"]["point"] == pytest.approx(max(a_vals) - min(a_vals), abs=1e-12)
    b_vals = [ref[g][1] for g in ("20-29", "40-49", "60-69")]
    assert out["gap"]["b"]["point"] == pytest.approx(max(b_vals) - min(b_vals), abs=1e-12)
    # Every group's mean covers both labels: the 80-89 group, lacking b, has none.
    assert out["labels_in_mean"] == ["a", "b"]
    assert groups["80-89"]["mean"]["auroc"]["point"] is None
    assert groups["80-89"]["mean_excluded_by"] == ["b"]
    means = [np.mean(ref[g]) for g in ("20-29", "40-49", "60-69")]
    assert groups["40-49"]["mean"]["auroc"]["point"] == pytest.approx(means[1], abs=1e-12)
    assert out["gap"]["mean"]["point"] == pytest.approx(max(means) - min(means), abs=1e-12)
    assert {out["gap"]["mean"]["highest"], out["gap"]["mean"]["lowest"]} <= set(ref) - {"80-89"}


def _split(n: int, seed: int, positives: bool = True) -> Predictions:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.4).astype(float)
    if not positives:
        y[:, 1] = 0.0
    s = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 1.5 * y)))
    return Predictions(y, s, ["a", "b"], [f"h{seed}_{i}" for i in range(n)])


def test_thresholds_without_validation_positives_and_test_without_positives(tmp_path, capsys):
    val, test = _split(120, 0, positives=False), _split(150, 1, positives=False)
    save_predictions(tmp_path / "predictions_val.npz", val)
    save_predictions(tmp_path / "predictions_test.npz", test)
    argv = [
        "evaluate", f"--predictions={tmp_path / 'predictions_test.npz'}", "--bootstrap=30",
        f"--thresholds-from={tmp_path / 'predictions_val.npz'}", "--no-plots",
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    assert (
        "--thresholds-from: b: no threshold (validation has 0 positives" in capsys.readouterr().out
    )
    js = _strict_load(tmp_path / "metrics_test.json")
    assert js["operating_point"]["thresholds"]["b"] is None
    assert js["per_label"]["b"]["fixed_specificity"]["point"] is None
    # A threshold from other validation predictions: specificity and NPV are defined on a test
    # split without positives, sensitivity is not.
    save_predictions(tmp_path / "predictions_val.npz", _split(120, 0))
    assert evaluate.main(argv) == 0
    js = _strict_load(tmp_path / "metrics_test.json")
    t = js["operating_point"]["thresholds"]["b"]
    b = js["per_label"]["b"]
    assert b["fixed_specificity"]["point"] == pytest.approx(np.mean(test.probs[:, 1] < t))
    assert b["fixed_npv"]["point"] == 1.0 and b["fixed_sensitivity"]["point"] is None
    assert b["auroc"]["point"] is None and "b" in js["excluded_labels"]


def _bad(tmp_path: Path, argv: list[str], capsys, expected: str) -> None:
    assert evaluate.main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


def test_bad_inputs_exit_2_before_any_output(tmp_path, capsys):
    good = tmp_path / "predictions_test.npz"
    save_predictions(good, _split(100, 2))
    data = good.read_bytes()
    for name, content in [("empty.npz", b""), ("cut.npz", data[: len(data) // 2])]:
        (tmp_path / name).write_bytes(content)
        _bad(tmp_path, [f"--predictions={tmp_path / name}"], capsys, "not a readable")
    no_rows = _split(100, 2)
    save_predictions(
        tmp_path / "none.npz", Predictions(no_rows.labels[:0], no_rows.probs[:0], ["a", "b"], [])
    )
    _bad(tmp_path, [f"--predictions={tmp_path / 'none.npz'}"], capsys, "holds no cases")
    masked = _split(100, 2)
    masked.mask = np.zeros(masked.labels.shape, bool)
    save_predictions(tmp_path / "masked.npz", masked)
    _bad(tmp_path, [f"--predictions={tmp_path / 'masked.npz'}"], capsys, "every label")
    _bad(tmp_path, [f"--predictions={good}", "--label-map=a=b"], capsys, "needs --workdir")
    _bad(
        tmp_path, [f"--predictions={good}", "--operating-point=youden"], capsys, "--thresholds-from"
    )
    for flag in ("thresholds-from", "calibrate-on"):
        _bad(tmp_path, [f"--predictions={good}", f"--{flag}={good}"], capsys, "evaluated file")
    other = tmp_path / "other.npz"
    save_predictions(other, _split(100, 3))  # other ids: does not pair
    _bad(tmp_path, [f"--predictions={good}", f"--compare={other}"], capsys, "not paired")
    _bad(tmp_path, [f"--predictions={good}", "--min-per-class=1"], capsys, "at least 2")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in written if n.endswith(".json") or n.startswith("reliability")]
    # compare.py: the same unreadable file, an error and exit 2.
    assert compare_tool.main([str(tmp_path / "cut.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_warnings_for_a_temperature_at_its_bound_and_logits(tmp_path, capsys):
    val = _split(200, 4)
    val.probs[:, 0] = np.where(val.labels[:, 0] == 1, 0.6, 0.4)  # separable: T -> 0
    save_predictions(tmp_path / "val.npz", val)
    test = _split(200, 5)
    save_predictions(tmp_path / "predictions_test.npz", test)
    argv = ["evaluate", f"--predictions={tmp_path / 'predictions_test.npz'}", "--bootstrap=10"]
    assert evaluate.main([*argv, f"--calibrate-on={tmp_path / 'val.npz'}", "--no-plots"]) == 0
    assert "the temperature of a is at its bound" in capsys.readouterr().out
    js = _strict_load(tmp_path / "metrics_test.json")
    assert js["calibration"]["at_bound"] == ["a"]
    logits = _split(200, 5)
    logits.probs = np.log(logits.probs / (1 - logits.probs))
    save_predictions(tmp_path / "predictions_test.npz", logits)
    assert evaluate.main([*argv, "--no-plots"]) == 0
    assert "lie outside [0, 1]" in capsys.readouterr().out
    assert _strict_load(tmp_path / "metrics_test.json")["per_label"]["a"]["brier"]["point"] is None


def test_compare_pairs_external_predictions_by_the_datasets_labels(tmp_path):
    rng = np.random.default_rng(6)
    n = 160
    y = (rng.random((n, 3)) < 0.4).astype(float)
    ids, patients = [f"h{i}" for i in range(n)], [f"p{i // 2}" for i in range(n)]
    names_b = ["COVID-19", "Viral Pneumonia", "normal"]
    run_b = tmp_path / "run_b"
    run_b.mkdir()
    s = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 1.5 * y)))
    save_predictions(
        run_b / "predictions_test.npz", Predictions(y, s, names_b, ids, None, patients)
    )
    config = {"experiment": "b", "init": "scratch", "data": {"dataset": "hospital_b"}}
    (run_b / "config.json").write_text(json.dumps(config))
    run_a = tmp_path / "run_a"
    run_a.mkdir()
    (run_a / "config.json").write_text(json.dumps({"experiment": "a", "init": "dinov2"}))
    a_on_b = tmp_path / "a_on_b"
    a_on_b.mkdir()
    s_a = 1 / (1 + np.exp(-(rng.normal(size=(n, 2)) + 1.0 * y[:, :2])))
    external = Predictions(
        y[:, :2], s_a, names_b[:2], ids, None, patients, model_label_names=["covid19", "pneumonia"]
    )
    save_predictions(a_on_b / "predictions_test.npz", external)
    pipeline.write_json(
        a_on_b / "metrics_test.json",
        {"workdir": str(run_a), "trained_on": "hospital_a", "tested_on": "hospital_b"},
    )
    out = tmp_path / "cmp"
    args = [str(run_b), str(a_on_b / "predictions_test.npz"), "--out", str(out), "--bootstrap=20"]
    assert compare_tool.main(args) == 0
    js = _strict_load(out / "comparison.json")
    labels = [r["label"] for r in js["rows"]]
    assert labels == ["COVID-19", "Viral Pneumonia", compare_tool.MEAN_ROW]
    assert js["bootstrap"]["resampling"] == "patient"
    assert {r["column"] for r in js["runs"]} == {"scratch", "dinov2 (trained on hospital_a)"}
