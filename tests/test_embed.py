"""python -m cxrjax.embed: features of .npy batches (exact) and of radiograph files."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from PIL import Image

from cxrjax import embed
from cxrjax.data.images import PreprocessOptions, find_images, load_radiograph
from cxrjax.engine.inference import Predictor
from cxrjax.models import create_model
from cxrjax.models.weights import save_weights
from tests.test_models_pretrained import random_params


def _weights(tmp_path, num_classes: int):
    params = random_params("vit_tiny_demo", num_classes, 64)
    path = save_weights(
        tmp_path / f"w{num_classes}",
        params,
        variant="vit_tiny_demo",
        source="test",
        source_sha256="",
        source_format="cxrjax",
        image_size=64,
        label_names=[f"l{i}" for i in range(num_classes)] if num_classes else None,
    )
    return path, params


def test_npy_batch_gives_exact_features_and_logits(tmp_path):
    path, params = _weights(tmp_path, 2)
    x = np.random.default_rng(0).normal(size=(5, 64, 64, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = embed.run(str(path), [str(tmp_path / "x.npy")], str(tmp_path / "f.npy"), batch_size=2)
    feats, logits = np.load(out), np.load(tmp_path / "f.logits.npy")
    model = create_model("vit_tiny_demo", 2)
    ref_logits, ref_feats = jax.jit(
        lambda p, x: model.apply({"params": p}, x, return_features=True)
    )(params, x)
    assert feats.shape == (5, 96) and logits.shape == (5, 2)
    np.testing.assert_allclose(feats, ref_feats, atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)


def test_image_files_are_preprocessed_like_training(tmp_path):
    path, _ = _weights(tmp_path, 0)
    rng = np.random.default_rng(1)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.png", "a.png"):
        Image.fromarray(rng.integers(0, 255, (100, 80), dtype=np.uint8)).save(folder / name)
    out = embed.run(str(path), [str(folder)], str(tmp_path / "f.npy"))
    feats = np.load(out)
    assert feats.shape == (2, 96)
    assert not (tmp_path / "f.logits.npy").exists()
    # Sorted order, and identical to the predictor's features of the preprocessed images.
    paths = find_images([str(folder)])
    assert [Path(p).name for p in paths] == ["a.png", "b.png"]
    predictor = Predictor.from_weights(path)
    images = np.stack([load_radiograph(p, PreprocessOptions(size=64)) for p in paths])
    np.testing.assert_allclose(feats, predictor.outputs(images)["features"], atol=1e-6)
    # Converted weights take --normalization; a run directory refuses it (it has its own).
    pretrained = np.load(
        embed.run(str(path), [str(folder)], str(tmp_path / "g.npy"), normalization="pretrained")
    )
    assert np.abs(pretrained - feats).max() > 1e-3
