"""tools/compare.py on small synthetic run directories."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn import metrics as skm

from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation.predictions import Predictions, save_predictions

_spec = importlib.util.spec_from_file_location(
    "compare_tool", Path(__file__).resolve().parents[1] / "tools" / "compare.py"
)
compare_tool = importlib.util.module_from_spec(_spec)
sys.modules["compare_tool"] = compare_tool  # dataclasses look their module up there
_spec.loader.exec_module(compare_tool)

N_BOOT = 30


def _labels(dataset: str, n: int = 90) -> np.ndarray:
    rng = np.random.default_rng(len(dataset))
    return (rng.random((n, 3)) < 0.4).astype(float)


def _write_run(root: Path, dataset: str, init: str, fraction: float, strength: float, seed: int):
    y = _labels(dataset)
    rng = np.random.default_rng(seed)
    s = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + strength * y)))
    run = root / f"{dataset}_{init}_{fraction}_{seed}"
    run.mkdir()
    preds = Predictions(
        labels=y,
        probs=s,
        label_names=["cardiomegaly", "effusion", "atelectasis"],
        ids=[f"h{i}" for i in range(len(y))],
        patients=[f"p{i // 2}" for i in range(len(y))],
    )
    save_predictions(run / "predictions_test.npz", preds)
    config = {"experiment": run.name, "init": init}
    config["data"] = {"dataset": dataset, "train_fraction": fraction}
    (run / "config.json").write_text(json.dumps(config))
    return run, preds


@pytest.fixture
def runs(tmp_path):
    out = {}
    for k, (ds, init, frac, strength) in enumerate(
        [
            ("vindr", "in21k", 1.0, 1.0),
            ("vindr", "dinov2", 1.0, 1.6),
            ("vindr", "in21k", 0.1, 0.5),
            ("vindr", "dinov2", 0.1, 0.9),
            ("cxr14", "in21k", 1.0, 1.0),
            ("cxr14", "dinov2", 1.0, 1.2),
        ]
    ):
        out[(ds, init, frac)] = _write_run(tmp_path, ds, init, frac, strength, seed=k)
    return out


def test_compare_writes_table_and_figures(runs, tmp_path):
    out = tmp_path / "cmp"
    args = [str(runs[k][0]) for k in runs] + ["--out", str(out), f"--bootstrap={N_BOOT}"]
    assert compare_tool.main(args) == 0
    for name in ["comparison.md", "comparison.csv", "comparison.json", "mean_auroc.png"]:
        assert (out / name).is_file(), name
    for name in ["roc_vindr_f1.png", "roc_vindr_f0.1.png", "roc_cxr14_f1.png"]:
        assert (out / name).stat().st_size > 1000, name
    assert (out / "auroc_vs_fraction.png").is_file()
    table = pd.read_csv(out / "comparison.csv")
    assert len(table) == 3 * 4  # three groups, three labels + the label mean each
    md = (out / "comparison.md").read_text(encoding="utf-8")
    assert "| vindr | 1.0 | effusion |" in md and "p dinov2 > in21k (BH)" in md

    # Numbers against a direct computation: bootstrap stats and the sklearn p-value loop, on
    # resamples of patients (the runs carry patient ids, so that is the default).
    (_, a), (_, b) = runs[("vindr", "dinov2", 1.0)], runs[("vindr", "in21k", 1.0)]
    counts = bs.resample_counts(len(a.ids), N_BOOT, seed=0, groups=a.patients)
    row = table[(table.dataset == "vindr") & (table.train_fraction == 1.0)]
    row = row.set_index("label")
    for j, name in enumerate(a.label_names):
        le = 0
        auc_a = []
        for r in range(N_BOOT):
            idx = np.repeat(np.arange(len(a.ids)), counts[r])
            auc_a.append(skm.roc_auc_score(a.labels[idx, j], a.probs[idx, j]))
            le += auc_a[-1] <= skm.roc_auc_score(b.labels[idx, j], b.probs[idx, j])
        assert row.loc[name, "p dinov2>in21k"] == pytest.approx(le / N_BOOT, abs=1e-12)
        assert row.loc[name, "dinov2 auroc_mean"] == pytest.approx(np.mean(auc_a), abs=1e-12)
        assert row.loc[name, "dinov2 auroc_sd"] == pytest.approx(np.std(auc_a, ddof=1), abs=1e-12)

    # BH: one family of all label p-values across datasets and fractions.
    labels_only = table[table.label != compare_tool.MEAN_ROW]
    np.testing.assert_allclose(
        labels_only["p_bh dinov2>in21k"],
        stats.false_discovery_control(labels_only["p dinov2>in21k"]),
        atol=1e-12,
    )

    # A fixed seed reproduces the table.
    assert (
        compare_tool.main(args[:-3] + ["--out", str(tmp_path / "again"), f"--bootstrap={N_BOOT}"])
        == 0
    )
    assert (tmp_path / "again" / "comparison.csv").read_text() == (
        out / "comparison.csv"
    ).read_text()


def test_compare_same_init_two_seeds_and_predictions_files(tmp_path):
    r1, _ = _write_run(tmp_path, "vindr", "scratch", 1.0, 1.0, seed=1)
    r2, _ = _write_run(tmp_path, "vindr", "scratch", 1.0, 1.0, seed=2)
    out = tmp_path / "cmp"
    args = [str(r1 / "predictions_test.npz"), str(r2), "--out", str(out), "--bootstrap=20"]
    assert compare_tool.main([*args, "--by-image"]) == 0
    assert json.loads((out / "comparison.json").read_text())["bootstrap"]["resampling"] == "image"
    table = pd.read_csv(out / "comparison.csv")
    cols = [c for c in table.columns if c.startswith("p ")]
    assert cols == [f"p scratch ({r2.name})>scratch ({r1.name})"]
    assert not (out / "auroc_vs_fraction.png").exists()
    # Same experiment name too (one config run twice): the run directories name the columns.
    for r in (r1, r2):
        config = json.loads((r / "config.json").read_text())
        (r / "config.json").write_text(json.dumps({**config, "experiment": "demo"}))
    assert compare_tool.main(args) == 0
    cols = [c for c in pd.read_csv(out / "comparison.csv").columns if c.startswith("p ")]
    assert cols == [f"p scratch ({r2.name})>scratch ({r1.name})"]


def test_compare_rejects_unpaired_runs(tmp_path, capsys):
    r1, p1 = _write_run(tmp_path, "vindr", "a", 1.0, 1.0, seed=1)
    r2, p2 = _write_run(tmp_path, "vindr", "b", 1.0, 1.0, seed=2)
    perm = np.arange(len(p2.ids))[::-1]
    shuffled = Predictions(p2.labels[perm], p2.probs[perm], p2.label_names, p2.ids[perm])
    save_predictions(r2 / "predictions_test.npz", shuffled)
    assert compare_tool.main([str(r1), str(r2), "--out", str(tmp_path / "o")]) == 2
    assert "different order" in capsys.readouterr().err
    assert compare_tool.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    (r1 / "predictions_test.npz").unlink()
    assert compare_tool.main([str(r1), "--out", str(tmp_path / "o")]) == 2
    assert "cxrjax.evaluate --workdir" in capsys.readouterr().err
