"""The evaluate CLI end to end on a small predictions file."""

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from cxrjax import evaluate
from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation.predictions import Predictions, load_predictions, save_predictions


def _preds(n: int = 200) -> Predictions:
    rng = np.random.default_rng(0)
    y = (rng.random((n, 3)) < 0.35).astype(float)
    s = 1 / (1 + np.exp(-(rng.normal(size=(n, 3)) + 1.2 * y)))
    mask = rng.random((n, 3)) > 0.1
    return Predictions(
        labels=y,
        probs=s,
        label_names=["cardiomegaly", "effusion", "pneumonia"],
        ids=[f"h{i}" for i in range(n)],
        mask=mask,
        patients=[f"p{i // 2}" for i in range(n)],
    )


def test_predictions_mode_writes_metrics_json(tmp_path):
    preds = _preds()
    path = tmp_path / "predictions_test.npz"
    save_predictions(path, preds)
    out = tmp_path / "out"
    argv = ["evaluate", f"--predictions={path}", f"--out={out}", "--bootstrap=40"]
    assert evaluate.main(argv) == 0
    js = json.loads((out / "metrics_test.json").read_text())
    assert js["n_cases"] == 200 and js["bootstrap"]["resampling"] == "patient"
    ref = bs.bootstrap(preds, n_resamples=40, seed=0)
    for j, name in enumerate(preds.label_names):
        m = preds.mask[:, j]
        got = js["per_label"][name]
        assert got["auroc"]["point"] == pytest.approx(
            skm.roc_auc_score(preds.labels[m, j], preds.probs[m, j]), abs=1e-12
        )
        assert got["auroc"]["mean"] == pytest.approx(ref.samples["auroc"][:, j].mean(), abs=1e-14)
        assert js["label_counts"][name]["positive"] == int(preds.labels[m, j].sum())
    assert "threshold" not in js["mean"] and "f1" in js["mean"]


def test_chance_level_label_gives_valid_json(tmp_path):
    preds = _preds()
    # Scores that rank every negative above every positive: no threshold beats chance, so the
    # Youden point is +inf (nothing called positive), which JSON must still carry.
    preds.probs[:, 0] = 1 - preds.labels[:, 0] + 0.01 * np.arange(len(preds.ids)) / 1000
    path = tmp_path / "predictions_test.npz"
    save_predictions(path, preds)
    assert evaluate.main(["evaluate", f"--predictions={path}", "--bootstrap=20"]) == 0
    js = json.loads((tmp_path / "metrics_test.json").read_text())
    card = js["per_label"]["cardiomegaly"]
    assert card["threshold"]["point"] is None and card["sensitivity"]["point"] == 0.0
    assert card["specificity"]["mean"] == 1.0


def test_metrics_beside_predictions_by_default(tmp_path):
    path = tmp_path / "run_a.npz"
    save_predictions(path, _preds())
    assert evaluate.main(["evaluate", f"--predictions={path}", "--bootstrap=0"]) == 0
    js = json.loads((tmp_path / "run_a_metrics.json").read_text())
    assert js["per_label"]["effusion"]["auroc"]["mean"] is None  # no resamples drawn


def test_bad_invocations_fail_clearly(tmp_path, capsys):
    assert evaluate.main(["evaluate", f"--predictions={tmp_path / 'missing.npz'}"]) == 2
    assert "missing.npz: no such predictions file" in capsys.readouterr().err
    assert evaluate.main(["evaluate"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    path = tmp_path / "predictions_test.npz"
    save_predictions(path, _preds())
    assert evaluate.main(["evaluate", f"--predictions={path}", "--by-image=x"]) == 2


def test_workdir_mode_predicts_the_runs_dataset(tmp_path, monkeypatch):
    (tmp_path / "run.json").write_text("{}")
    config = {"data": {"dir": str(tmp_path / "data")}, "eval_batch_size": 16}
    (tmp_path / "config.json").write_text(json.dumps(config))
    calls = []

    def fake_predict_run(workdir, data, split, checkpoint, label_map, batch_size, external):
        calls.append((workdir, data, split, checkpoint, label_map, batch_size, external))
        return _preds(), {"tested_on": "x"}

    monkeypatch.setattr(evaluate, "predict_run", fake_predict_run)
    argv = ["evaluate", f"--workdir={tmp_path}", "--split=val", "--checkpoint=latest"]
    assert evaluate.main([*argv, "--bootstrap=10"]) == 0
    assert calls == [(tmp_path, tmp_path / "data", "val", "latest", {}, 16, False)]
    saved = load_predictions(tmp_path / "predictions_val_latest.npz")
    np.testing.assert_array_equal(saved.probs, _preds().probs)
    js = json.loads((tmp_path / "metrics_val_latest.json").read_text())
    assert js["checkpoint"] == "latest" and js["split"] == "val" and js["tested_on"] == "x"
    # Not a run directory, and a malformed --label-map: clear errors, exit 2.
    assert evaluate.main(["evaluate", f"--workdir={tmp_path / 'nope'}"]) == 2
    assert evaluate.main([*argv, "--label-map=effusion"]) == 2


def test_module_entry_point(tmp_path):
    path = tmp_path / "predictions_test.npz"
    save_predictions(path, _preds())
    cmd = [sys.executable, "-m", "cxrjax.evaluate", "--predictions", str(path), "--bootstrap", "20"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "cardiomegaly" in res.stdout and (tmp_path / "metrics_test.json").is_file()
