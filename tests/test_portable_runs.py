"""A trained run is a portable model: it predicts, evaluates and embeds after being copied to
another path with its prepared dataset gone, and it tests on another dataset (external
validation) on the labels both share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrjax import embed, evaluate, predict
from cxrjax.data.images import PreprocessOptions, load_radiograph
from cxrjax.data.prepare import prepare_dataset
from cxrjax.data.table import RawTable
from cxrjax.engine import step, trainer
from cxrjax.engine.inference import Predictor
from cxrjax.evaluation.predictions import load_predictions
from tests.conftest import write_tiny_raw_dataset
from tests.test_train import _config

ROOT = Path(__file__).resolve().parents[1]


def _prepare(table: RawTable, out: Path) -> Path:
    prepare_dataset(
        table,
        out,
        options=PreprocessOptions(size=32),
        val_fraction=0.2,
        test_fraction=0.3,
        seed=0,
        salt="portable",
        workers=1,
    )
    return out


def _renamed(table: RawTable, names: dict[str, str]) -> RawTable:
    frame = table.frame.rename(columns=names)
    return RawTable(table.name, [names.get(n, n) for n in table.label_names], frame)


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """A 2-epoch z-scored run on its own dataset (labels pleural_effusion, stripe), the raw
    files, and every output made before the run directory was copied and the dataset deleted."""
    base = tmp_path_factory.mktemp("portable")
    raw = base / "raw"
    raw.mkdir()
    table = _renamed(write_tiny_raw_dataset(raw), {"square": "pleural_effusion"})
    data = _prepare(table, base / "data")
    workdir = base / "run"
    config = _config(data, epochs=2)
    assert config.input.normalization == "zscore"
    trainer.train_and_evaluate(config, workdir)

    files = sorted(str(p) for p in raw.glob("*.png"))[:6]
    before = {"out": base / "before"}
    assert (
        predict.main(["predict", "--checkpoint", str(workdir), *files, "--out", str(base / "p0")])
        == 0
    )
    before["predict"] = json.loads((base / "p0" / "predictions.json").read_text())
    before["embed"] = np.load(embed.run(str(workdir), files, str(base / "f0.npy")))
    evaluate.main(["evaluate", "--workdir", str(workdir), "--out", str(base / "e0")])
    before["metrics"] = json.loads((base / "e0" / "metrics_test.json").read_text())

    # Move the run and the dataset; the run's own config still names the old dataset path.
    copy = base / "elsewhere" / "run-copy"
    shutil.copytree(workdir, copy)
    moved = base / "moved-data"
    shutil.move(data, moved)
    shutil.rmtree(workdir)
    return {"copy": copy, "moved": moved, "files": files, "before": before, "table": table}


def _probabilities(document):
    return [list(p["probabilities"].values()) for p in document["predictions"]]


def test_predict_embed_evaluate_on_a_copied_run_without_its_dataset(portable, tmp_path):
    copy, files, before = portable["copy"], portable["files"], portable["before"]
    assert predict.main(["predict", "--checkpoint", str(copy), *files, "--out", str(tmp_path)]) == 0
    after = json.loads((tmp_path / "predictions.json").read_text())
    np.testing.assert_array_equal(_probabilities(after), _probabilities(before["predict"]))

    features = np.load(embed.run(str(copy), files, str(tmp_path / "f.npy")))
    np.testing.assert_array_equal(features, before["embed"])

    # Dataset gone: the run's saved test predictions are evaluated, giving the same numbers.
    assert evaluate.main(["evaluate", "--workdir", str(copy), "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics_test.json").read_text())
    assert metrics["per_label"] == before["metrics"]["per_label"]
    # The dataset moved: --data points at it and the run predicts it afresh, identically.
    argv = ["evaluate", "--workdir", str(copy), "--data", str(portable["moved"])]
    assert evaluate.main([*argv, "--out", str(tmp_path / "d")]) == 0
    metrics = json.loads((tmp_path / "d" / "metrics_test.json").read_text())
    assert metrics["per_label"] == before["metrics"]["per_label"]


def test_embed_of_a_zscore_run_equals_the_features_predict_uses(portable, tmp_path):
    copy, files = portable["copy"], portable["files"]
    features = np.load(embed.run(str(copy), files, str(tmp_path / "f.npy")))
    predictor = Predictor.from_run(copy)
    images = np.stack([load_radiograph(f, predictor.preprocessing) for f in files])
    np.testing.assert_allclose(features, predictor.outputs(images)["features"], atol=1e-6)
    # The check can fail: [0, 1] inputs (what embed fed before) give other features.
    unit = step.forward(
        predictor.model, predictor.params, step.normalize(jnp.asarray(images), 0, 1)
    )
    assert np.abs(np.asarray(unit["features"]) - features).max() > 1e-2


def test_external_validation_matches_labels_by_vocabulary_and_label_map(portable, tmp_path, capsys):
    # Another "hospital": other images, its CSV calls the finding `Effusion`, and a label of
    # its own (`stripe_mark`) that only --label-map can pair with the run's `stripe`.
    raw = tmp_path / "raw"
    raw.mkdir()
    other = write_tiny_raw_dataset(raw, n_images=60, seed=3)
    other = _renamed(other, {"square": "Effusion", "stripe": "stripe_mark"})
    data = _prepare(other, tmp_path / "hospital_b")
    out = tmp_path / "external"
    # 12 test images: below the default rule of 10 per class, which is not what this checks.
    argv = ["evaluate", "--workdir", str(portable["copy"]), "--data", str(data), "--out", str(out)]
    argv += ["--min-per-class", "2"]
    assert evaluate.main([*argv, "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "labels not matched: run ['stripe'], dataset ['stripe_mark']" in printed
    metrics = json.loads((out / "metrics_test.json").read_text())
    assert metrics["matched_labels"] == [["pleural_effusion", "pleural_effusion"]]
    assert list(metrics["per_label"]) == ["pleural_effusion"]
    preds = load_predictions(out / "predictions_test.npz")
    assert preds.label_names == ["pleural_effusion"]
    expected = roc_auc_score(preds.labels[:, 0], preds.probs[:, 0])
    assert metrics["per_label"]["pleural_effusion"]["auroc"]["point"] == pytest.approx(expected)
    # tools/compare.py names it after the run that made it, on the dataset it was tested on.
    import tools.compare as compare

    external = compare.load_run(out / "predictions_test.npz")
    assert external.init == "demo (trained on tiny)" and external.dataset == "tiny"

    mapped = tmp_path / "mapped"
    argv = [
        *argv[:-3],
        str(mapped),
        *argv[-2:],
        "--label-map",
        "stripe_mark=stripe",
        "--bootstrap",
        "50",
    ]
    assert evaluate.main(argv) == 0
    metrics = json.loads((mapped / "metrics_test.json").read_text())
    # Named as the dataset names them; the model output that scored each stays beside.
    assert list(metrics["per_label"]) == ["pleural_effusion", "stripe_mark"]
    preds = load_predictions(mapped / "predictions_test.npz")
    assert preds.model_label_names == ["pleural_effusion", "stripe"]
    known = preds.mask[:, 1]
    expected = roc_auc_score(preds.labels[known, 1], preds.probs[known, 1])
    assert metrics["per_label"]["stripe_mark"]["auroc"]["point"] == pytest.approx(expected)
    assert metrics["trained_on"] == "tiny" and metrics["tested_on"] == "tiny"


def test_a_misspelt_label_exits_2_without_a_traceback(tiny_shards, tmp_path):
    command = [
        sys.executable,
        "-m",
        "cxrjax.main",
        "--config",
        str(ROOT / "configs" / "demo.py"),
        "--workdir",
        str(tmp_path / "run"),
        f"--config.data.dir={tiny_shards}",
        "--config.data.labels=('squarre',)",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert "error: labels ['squarre'] are not in the shards" in done.stderr
    assert "Fix config.data.labels" in done.stderr


def test_a_private_csv_with_sex_and_age_reaches_evaluate_subgroups(portable, tmp_path, capsys):
    """tools/prepare_data.py --dataset csv --name --attributes: a hospital's CSV with its own
    column names (`Gender` M/F, DICOM-style `PatientAge`), evaluated by subgroup."""
    import tools.prepare_data as prepare_data

    raw = tmp_path / "raw"
    raw.mkdir()
    table = write_tiny_raw_dataset(raw, n_images=80, seed=5)
    frame = table.frame.rename(columns={"square": "Effusion"}).drop(columns=["image_id"])
    frame["Gender"] = ["M" if i % 3 else "F" for i in range(len(frame))]
    frame["PatientAge"] = [f"{40 + (i % 4) * 15:03d}Y" for i in range(len(frame))]
    frame.loc[0, "Gender"] = "unknown"
    frame.to_csv(raw / "labels.csv", index=False)
    data = tmp_path / "hospital_c"
    argv = ["--dataset", "csv", "--raw", str(raw), "--out", str(data), "--size", "32"]
    argv += ["--name", "hospital_c", "--attributes", "sex=Gender", "age=PatientAge"]
    assert prepare_data.main([*argv, "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 80 cells of column 'Gender' are not a known sex value" in printed
    info = json.loads((data / "dataset_info.json").read_text())
    # The attribute columns are not labels, though PatientAge's digits could pass for numbers.
    assert info["name"] == "hospital_c" and info["label_names"] == ["pleural_effusion", "stripe"]

    out = tmp_path / "external"
    argv = ["evaluate", "--workdir", str(portable["copy"]), "--data", str(data), "--out", str(out)]
    argv += ["--min-per-class", "2", "--bootstrap", "20", "--subgroups", "--no-plots"]
    assert evaluate.main(argv) == 0
    metrics = json.loads((out / "metrics_test.json").read_text())
    assert metrics["tested_on"] == "hospital_c"
    assert set(metrics["subgroups"]["sex"]["groups"]) <= {"female", "male"}
    assert set(metrics["subgroups"]["age_band"]["groups"]) <= {"40-49", "50-59", "70-79", "80-89"}
    assert len(metrics["subgroups"]["age_band"]["groups"]) >= 2
