"""Tests of cxrjax's weights format, load_pretrained and conversion of cxrjax run directories."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.errors import MissingInputError
from cxrjax.models import create_model
from cxrjax.models.convert import convert_source, detect_format
from cxrjax.models.posemb import resample_posemb
from cxrjax.models.pretrained import (
    CheckpointError,
    MissingCheckpointError,
    load_pretrained,
)
from cxrjax.models.weights import flatten, read_weights, save_weights

LABELS = ["cardiomegaly", "effusion", "pneumonia"]


def random_params(variant: str, num_classes: int, size: int, seed: int = 0, **kw):
    """Random parameters of the right shapes without running the (slow on CPU) initialisers."""
    model = create_model(variant, num_classes, image_size=size, **kw)
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, size, size, 3)))
    )["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


@pytest.fixture
def ckpt(tmp_path):
    params = random_params("vit_tiny_demo", 3, 64)
    out = save_weights(
        tmp_path / "w",
        params,
        variant="vit_tiny_demo",
        source="test",
        source_sha256="0" * 64,
        source_format="cxrjax",
        image_size=64,
        label_names=LABELS,
    )
    return out, params


def _same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_round_trip_loads_everything(ckpt):
    path, params = ckpt
    flat, meta = read_weights(path / "params.safetensors")
    assert meta["variant"] == "vit_tiny_demo" and meta["num_classes"] == 3
    assert meta["label_names"] == LABELS and len(flat) == len(flatten(params))
    target = random_params("vit_tiny_demo", 3, 64, seed=1)
    loaded, report = load_pretrained(str(path), target, variant="vit_tiny_demo", image_size=64)
    _same(loaded, params)
    assert not report.reinitialised and not report.unused and not report.resampled
    assert "loaded" in str(report)


def test_resolution_change_resamples_posemb(ckpt):
    path, params = ckpt
    target = random_params("vit_tiny_demo", 3, 96, seed=1)
    loaded, report = load_pretrained(str(path), target, variant="vit_tiny_demo", image_size=96)
    assert "pos_embedding" in report.resampled and "96 px" in report.resampled["pos_embedding"]
    expected = resample_posemb(params["pos_embedding"], 1, (12, 12), "timm")
    np.testing.assert_allclose(loaded["pos_embedding"], expected, rtol=1e-6)
    np.testing.assert_array_equal(
        loaded["block_0"]["mlp"]["fc1"]["kernel"], params["block_0"]["mlp"]["fc1"]["kernel"]
    )


def test_head_reinitialised_when_labels_differ(ckpt):
    path, params = ckpt
    target = random_params("vit_tiny_demo", 5, 64, seed=2)
    loaded, report = load_pretrained(str(path), target, variant="vit_tiny_demo", image_size=64)
    np.testing.assert_array_equal(loaded["head"]["kernel"], target["head"]["kernel"])
    reason = report.reinitialised["head/kernel"]
    assert "label sets differ" in reason and "3 outputs" in reason and "cardiomegaly" in reason
    np.testing.assert_array_equal(loaded["cls"], params["cls"])
    # Same size, other labels: still re-initialised.
    target3 = random_params("vit_tiny_demo", 3, 64, seed=3)
    loaded, report = load_pretrained(
        str(path), target3, variant="vit_tiny_demo", image_size=64, label_names=["a", "b", "c"]
    )
    np.testing.assert_array_equal(loaded["head"]["bias"], target3["head"]["bias"])
    assert "label sets differ" in report.reinitialised["head/bias"]
    # A headless target leaves the head unused.
    _, report = load_pretrained(
        str(path), random_params("vit_tiny_demo", 0, 64), variant="vit_tiny_demo", image_size=64
    )
    assert report.unused == ["head/bias", "head/kernel"]


def test_missing_and_wrong_checkpoints_are_clear(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(MissingCheckpointError) as e:
        load_pretrained(str(tmp_path / "nowhere"), {}, variant="vit_b14_dinov2", image_size=224)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg
    assert "python tools/convert_checkpoint.py https://dl.fbaipublicfiles.com/dinov2/" in msg
    assert "--variant vit_b14_dinov2" in msg
    bigger = random_params("vit_tiny_demo", 3, 64, width=128, num_heads=4, mlp_dim=256)
    with pytest.raises(CheckpointError, match=r"params.safetensors: .*shape"):
        load_pretrained(str(path), bigger, variant="vit_tiny_demo", image_size=64)
    deeper = random_params("vit_tiny_demo", 3, 64, depth=5)
    with pytest.raises(CheckpointError, match="lacks 1[0-9] parameter.*block_4"):
        load_pretrained(str(path), deeper, variant="vit_tiny_demo", image_size=64)
    data = (path / "params.safetensors").read_bytes()
    (path / "params.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(str(path), bigger, variant="vit_tiny_demo", image_size=64)


def test_cxrjax_run_directory_converts_with_labels(tmp_path):
    from cxrjax.checkpoint import Checkpointer
    from cxrjax.run_dir import RunDir

    run = tmp_path / "run"
    params = random_params("vit_tiny_demo", 3, 64)
    ckptr = Checkpointer(RunDir(run), async_save=False)
    ckptr.save_best(7, jax.tree.map(jnp.asarray, params), 0.81)
    ckptr.wait()
    ckptr.close()
    (run / "run.json").write_text(
        json.dumps({"variant": "vit_tiny_demo", "label_names": LABELS, "image_size": 64})
    )
    assert detect_format(run) == "cxrjax_run"
    conv = convert_source(run)
    assert conv.variant == "vit_tiny_demo" and conv.label_names == LABELS
    _same(conv.params, params)

    import tools.convert_checkpoint as cli

    out = cli.convert(str(run), str(tmp_path / "mimic"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["label_names"] == LABELS and meta["source_format"] == "cxrjax_run"
    # Fine-tuning on another label set re-initialises the head and says so.
    target = random_params("vit_tiny_demo", 2, 64)
    _, report = load_pretrained(str(out), target, variant="vit_tiny_demo", image_size=64)
    assert set(report.reinitialised) == {"head/kernel", "head/bias"}


def test_cxrjax_run_without_best_uses_latest_state(tmp_path):
    from cxrjax.checkpoint import Checkpointer
    from cxrjax.run_dir import RunDir

    run = tmp_path / "run"
    params = random_params("vit_tiny_demo", 3, 64)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": jax.tree.map(jnp.asarray, params),
        "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)},
    }
    ckptr = Checkpointer(RunDir(run), async_save=False)
    ckptr.save(5, state, b'{"iterator": 1}')
    ckptr.wait()
    ckptr.close()
    (run / "run.json").write_text(
        json.dumps({"variant": "vit_tiny_demo", "label_names": LABELS, "image_size": 64})
    )
    _same(convert_source(run).params, params)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text((run / "run.json").read_text())
    with pytest.raises(MissingInputError, match="no checkpoint in"):
        convert_source(empty)
