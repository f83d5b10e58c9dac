"""Several prepared datasets as one run: harmonised labels, a seeded mixture, per-source results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cxrjax.data import mixture, pipeline, shards
from cxrjax.data.images import PreprocessOptions
from cxrjax.data.prepare import prepare_dataset
from cxrjax.data.table import RawTable
from cxrjax.engine import trainer
from cxrjax.engine.data import open_training_data
from cxrjax.evaluation.predictions import load_predictions
from tests.conftest import write_tiny_raw_dataset
from tests.test_train import _config

ROOT = Path(__file__).resolve().parents[1]


def _prepare(table: RawTable, out: Path, salt: str) -> Path:
    prepare_dataset(
        table,
        out,
        options=PreprocessOptions(size=32),
        val_fraction=0.2,
        test_fraction=0.2,
        seed=0,
        salt=salt,
        workers=1,
    )
    return out


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A: labels `effusion` (old spelling) and `stripe`, 90 images; B: `pleural_effusion`
    only, 60 other images. Both mark the finding as a bright square."""
    base = tmp_path_factory.mktemp("multi")
    raw_a, raw_b = base / "raw_a", base / "raw_b"
    raw_a.mkdir()
    raw_b.mkdir()
    a = write_tiny_raw_dataset(raw_a, seed=0)
    a = RawTable("a", ["effusion", "stripe"], a.frame.rename(columns={"square": "effusion"}))
    b = write_tiny_raw_dataset(raw_b, n_images=60, seed=5)
    frame = b.frame.drop(columns=["stripe"]).rename(columns={"square": "pleural_effusion"})
    b = RawTable("b", ["pleural_effusion"], frame)
    return _prepare(a, base / "A", "salt-a"), _prepare(b, base / "B", "salt-b")


def _multi_config(sources, epochs=1):
    config = _config("", epochs=epochs)
    config.data.sources = tuple(str(s) for s in sources)
    return config


def test_labels_are_the_canonical_union_and_missing_ones_are_masked(two_sources):
    data = open_training_data(_multi_config(two_sources))
    assert data.label_names == ["pleural_effusion", "stripe"]
    assert data.columns == [[0, 1], [0, -1]]
    batch = data.loader(_multi_config(two_sources), pipeline.Augment(0.0, 0.0)).dataset(0)
    first = next(iter(batch))
    from_b = first["source"] == 1
    assert from_b.any() and (~from_b).any()
    # B lacks `stripe`: masked for its images, never a negative.
    assert not first["mask"][from_b, 1].any()
    assert (first["labels"][from_b, 1] == 0).all()


def test_pos_weight_counts_only_images_that_know_the_label(two_sources):
    data = open_training_data(_multi_config(two_sources))
    summaries = [json.loads((d / "summary.json").read_text()) for d in two_sources]
    train = [s["splits"]["train"] for s in summaries]
    pos = train[0]["positives"]["effusion"] + train[1]["positives"]["pleural_effusion"]
    known = train[0]["images"] + train[1]["images"]
    stripe_known = train[0]["images"] - train[0]["masked"]["stripe"]
    expected = [(known - pos) / pos, (stripe_known - train[0]["positives"]["stripe"])
                / train[0]["positives"]["stripe"]]  # fmt: skip
    np.testing.assert_allclose(data.pos_weight(), expected, rtol=1e-6)


def _draws(sources, weights, steps, batch_size=16):
    """The source of every row of the first `steps` global batches."""
    infos = [shards.load_info(d) for d in sources]
    batches = mixture._MixtureBatch(
        mixture.open_sources(infos, weights),
        mixture.union_labels(infos),
        batch_size=batch_size,
        seed=3,
        augment=pipeline.Augment(),
    )
    return np.concatenate([batches.draws(step)[0] for step in range(steps)])


def test_mixture_draws_the_configured_proportions(two_sources):
    share_b = _draws(two_sources, [0.8, 0.2], steps=400).mean()
    # 6,400 draws: the standard error of a 0.2 share is 0.005.
    assert abs(share_b - 0.2) < 0.02
    by_size = _draws(two_sources, [None, None], steps=400).mean()
    sizes = [shards.load_info(d).splits["train"]["num_examples"] for d in two_sources]
    assert abs(by_size - sizes[1] / sum(sizes)) < 0.02


def test_mixture_is_identical_on_one_and_two_processes(two_sources, monkeypatch):
    infos = [shards.load_info(d) for d in two_sources]
    sources = mixture.open_sources(infos, [None, None])
    labels = mixture.union_labels(infos)

    def rows(process, processes, step):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        monkeypatch.setattr(jax, "process_count", lambda: processes)
        batches = mixture._MixtureBatch(
            sources, labels, batch_size=8, seed=1, augment=pipeline.Augment()
        )
        return batches(step)

    for step in (0, 5):
        one = rows(0, 1, step)
        halves = [rows(p, 2, step) for p in (0, 1)]
        for key in ("image", "labels", "mask", "index", "source"):
            np.testing.assert_array_equal(one[key], np.concatenate([h[key] for h in halves]))


def test_mixture_resumes_mid_epoch_exactly(two_sources):
    config = _multi_config(two_sources)
    data = open_training_data(config)
    loader = data.loader(config, pipeline.Augment())
    straight = iter(loader)
    expected = [next(straight) for _ in range(6)]
    first = iter(loader)
    for _ in range(3):
        next(first)
    resumed = iter(loader)
    resumed.set_state(first.get_state())
    for want in expected[3:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_two_sources_train_one_output_evaluated_on_each(two_sources, tmp_path):
    workdir = tmp_path / "run"
    results = trainer.train_and_evaluate(_multi_config(two_sources, epochs=2), workdir)
    assert results["label_names"] == ["pleural_effusion", "stripe"]
    assert set(results["sources"]) == {"A", "B"}
    assert set(results["sources"]["B"]["test"]["auroc"]) == {"pleural_effusion"}
    assert set(results["sources"]["A"]["test"]["auroc"]) == {"pleural_effusion", "stripe"}
    assert "mean over sources" in results["selection"]
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["sources"]["A"]["val"]["num_examples"] > 0
    # Per-source predictions read like a run trained on that source.
    import tools.compare as compare

    view = compare.load_run(workdir / "sources" / "B")
    assert view.dataset == "B" and "trained on a+b" in view.experiment
    preds = load_predictions(workdir / "sources" / "B" / "predictions_test.npz")
    assert not preds.known[:, 1].any() and preds.known[:, 0].all()


def test_cli_with_two_sources(two_sources, tmp_path):
    a, b = two_sources
    command = [
        sys.executable, "-m", "cxrjax.main", "--config", str(ROOT / "configs" / "demo.py"),
        "--workdir", str(tmp_path / "run"), f"--config.data.sources=('{a}','{b}')",
        "--config.epochs=1", "--config.batch_size=8", "--config.eval_batch_size=8",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["sources"]) == {"A", "B"}
    assert not (tmp_path / "run" / "data").exists()  # no demo phantoms were generated
