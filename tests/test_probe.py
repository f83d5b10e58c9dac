"""tools/probe.py: a frozen backbone's cached features and a head trained on them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from cxrjax.data import shards
from cxrjax.engine.inference import Predictor
from cxrjax.models.weights import save_weights
from tests.test_models_pretrained import random_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import probe  # noqa: E402


def test_probe_caches_features_and_learns_a_visible_finding(tiny_shards, tmp_path):
    weights = save_weights(
        tmp_path / "w",
        random_params("vit_tiny_demo", 0, 32),
        variant="vit_tiny_demo",
        source="test",
        source_sha256="",
        source_format="cxrjax",
        image_size=32,
    )
    out = tmp_path / "probe"
    argv = ["--checkpoint", str(weights), "--data", str(tiny_shards), "--out", str(out)]
    assert probe.main([*argv, "--steps", "300", "--bootstrap", "50"]) == 0
    metrics = json.loads((out / "metrics_test.json").read_text())
    assert metrics["probe"]["best_step"] > 0
    # The cached features are the predictor's pooled features of the shard images.
    predictor = Predictor.from_weights(weights)
    rows = predictor.split_outputs(shards.load_info(tiny_shards), "test", "features", 64, [0, 1])
    cached = np.load(out / "features_test.npz")
    np.testing.assert_allclose(cached["features"], rows["features"], atol=1e-5)
    np.testing.assert_array_equal(cached["ids"], rows["ids"])
    assert set(metrics["per_label"]) == {"square", "stripe"}
    # Same backbone and data again: the features are reused, not recomputed.
    stamp = (out / "features_train.npz").stat().st_mtime_ns
    assert probe.main([*argv, "--steps", "50", "--bootstrap", "0", "--head", "mlp"]) == 0
    assert (out / "features_train.npz").stat().st_mtime_ns == stamp


def test_head_learns_an_informative_feature_and_is_selected_on_validation():
    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 2, (n, 2)).astype(np.float32)
        features = rng.normal(size=(n, 16)).astype(np.float32)
        features[:, 3] += 3 * labels[:, 0]  # label 0 is linearly visible, label 1 is noise
        mask = np.ones((n, 2), bool)
        mask[::7, 1] = False
        ids = np.array([f"{i:016x}" for i in range(n)])
        return {"features": features, "labels": labels, "mask": mask, "ids": ids, "patients": ids}

    train, val = split(400), split(200)
    head, step, score = probe.train_head(train, val, ["a", "b"], steps=300, lr=1e-2)
    assert 0 < step <= 300 and 0.6 < score < 1.0
    probs = probe.apply_head(head, (val["features"] - head["mean"]) / head["std"])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(val["labels"][:, 0], np.asarray(probs)[:, 0]) > 0.95


def test_probe_reports_a_missing_dataset(tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path), "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]
    assert probe.main(argv) == 2
    assert "no prepared dataset" in capsys.readouterr().err
