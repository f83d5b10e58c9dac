import csv
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxrjax import predict
from cxrjax.data.images import load_radiograph
from cxrjax.data.splits import salted_hash
from cxrjax.engine import trainer
from cxrjax.engine.inference import Predictor
from cxrjax.engine.step import normalize
from cxrjax.evaluation import rollout
from cxrjax.models.vit import Attention, VisionTransformer
from tests.conftest import write_tiny_raw_dataset
from tests.test_train import _config, predict_split


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    """A 1-epoch run on the tiny dataset, and the raw PNGs its shards were prepared from."""
    workdir = tmp_path_factory.mktemp("predict_run") / "run"
    trainer.train_and_evaluate(_config(tiny_shards, epochs=1), workdir)
    raw = tmp_path_factory.mktemp("predict_raw")
    # Same seed as the tiny_shards fixture: the same pixels, so the same prepared images.
    table = write_tiny_raw_dataset(raw)
    run = Predictor.from_run(workdir, "best")
    return workdir, table.frame, run, jax.jit(run.model.apply, static_argnames="train")


def _write_dicom(path, pixels: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _read_csv(path) -> tuple[list[str], dict[str, np.ndarray]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {r[0]: np.array([float(v) for v in r[1:]], np.float32) for r in rows[1:]}


def _model_input(run: Predictor, path) -> jax.Array:
    """One file as the model sees it, preprocessed and normalised by hand."""
    image = load_radiograph(path, run.preprocessing)
    return normalize(jnp.asarray(image[None]), jnp.asarray(run.mean), jnp.asarray(run.std))


def _direct_probs(run: Predictor, apply, path) -> np.ndarray:
    """Probabilities of one file by a plain model call; `apply` is the jitted model.apply."""
    logits = apply({"params": run.params}, _model_input(run, path), train=False)
    return np.asarray(jax.nn.sigmoid(logits))[0]


def test_predict_cli_matches_predict_split_dicom_and_skips_corrupt(trained, tmp_path, capsys):
    workdir, frame, run, apply = trained
    split = predict_split(workdir)
    by_hash = {salted_hash(i, "test"): p for i, p in zip(frame.image_id, frame.path, strict=True)}
    pngs = [by_hash[i] for i in split.ids[:5]]
    expected = dict(zip(pngs, split.probs[:5], strict=True))
    # Distinct images get distinct probabilities, so matching them to 1e-6 means something.
    assert np.ptp(split.probs[:5], axis=0).min() > 1e-4
    dicom = tmp_path / "scan.dcm"
    _write_dicom(dicom, np.asarray(Image.open(pngs[0])))
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"

    argv = ["predict", "--checkpoint", str(workdir), *pngs, str(corrupt), str(dicom)]
    # A batch of 4 over 4 devices: 7 files take two batches, the second padded.
    assert predict.main([*argv, "--out", str(out), "--batch_size", "4"]) == 0

    captured = capsys.readouterr()
    assert f"skipped {corrupt}" in captured.err
    assert "1 of 7 files skipped" in captured.err
    assert "square" in captured.out and pngs[0] in captured.out
    header, rows = _read_csv(out / "predictions.csv")
    assert header == ["file", *split.label_names]
    assert list(rows) == [*pngs, str(dicom)]
    for png in pngs:
        np.testing.assert_allclose(rows[png], expected[png], atol=1e-6)
    np.testing.assert_allclose(rows[str(dicom)], _direct_probs(run, apply, dicom), atol=1e-6)
    # The DICOM holds the first PNG's pixels: identical raw values, identical prediction.
    np.testing.assert_allclose(rows[str(dicom)], rows[pngs[0]], atol=1e-6)

    document = json.loads((out / "predictions.json").read_text())
    assert document["checkpoint"] == str(workdir) and document["which"] == "best"
    assert [p["file"] for p in document["predictions"]] == list(rows)
    first = document["predictions"][0]["probabilities"]
    assert np.float32([first[n] for n in split.label_names]).tolist() == rows[pngs[0]].tolist()
    assert [s["file"] for s in document["skipped"]] == [str(corrupt)]
    assert "corrupt" in document["skipped"][0]["error"]


def test_predict_fails_only_when_nothing_is_readable(trained, tmp_path, capsys):
    workdir, *_ = trained
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    missing = tmp_path / "missing.dcm"
    argv = ["predict", "--checkpoint", str(workdir), str(corrupt), str(missing)]
    assert predict.main([*argv, "--out", str(tmp_path), "--which", "latest"]) == 1
    err = capsys.readouterr().err
    assert f"skipped {corrupt}" in err and f"skipped {missing}" in err
    assert "2 of 2 files skipped" in err
    document = json.loads((tmp_path / "predictions.json").read_text())
    assert document["which"] == "latest" and document["predictions"] == []
    assert predict.main(["predict", str(corrupt)]) == 2  # no --checkpoint
    assert "--checkpoint" in capsys.readouterr().err


def test_heatmaps_from_a_folder_and_rollout_rows_sum_to_one(trained, tmp_path):
    workdir, frame, run, apply = trained
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/a.png"]):
        Image.open(frame.path[i]).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(workdir), str(folder), "--heatmap", "--out", str(out)]
    assert predict.main(argv) == 0

    document = json.loads((out / "predictions.json").read_text())
    files = [p["file"] for p in document["predictions"]]
    assert files == [str(folder / "a.png"), str(folder / "sub" / "a.png")]
    # Same stem twice: the second overlay gets a distinct name instead of overwriting the first.
    heatmaps = [p["heatmap"] for p in document["predictions"]]
    assert heatmaps == [str(out / "a_heatmap.png"), str(out / "a-2_heatmap.png")]
    size = run.image_size
    for entry in document["predictions"]:
        with Image.open(entry["heatmap"]) as im:
            assert im.size == (size, size) and im.mode == "RGB"
        # The heatmap pass gives the probabilities of the plain forward pass.
        direct = _direct_probs(run, apply, entry["file"])
        probs = [entry["probabilities"][n] for n in run.label_names]
        np.testing.assert_allclose(probs, direct, atol=1e-6)

    x = _model_input(run, files[0])
    _, attentions = jax.jit(lambda p, x: rollout.layer_attentions(run.model, p, x))(run.params, x)
    grid = size // run.model.patch_size
    assert attentions.shape == (run.model.depth, 1, 1 + grid * grid, 1 + grid * grid)
    joint = rollout.rollout(attentions)
    np.testing.assert_allclose(joint.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.asarray(joint) >= 0)


def _tiny_vit(**overrides) -> VisionTransformer:
    kwargs = dict(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32)
    return VisionTransformer(num_classes=3, **{**kwargs, **overrides})


def test_recomputed_attention_is_what_the_model_uses():
    """softmax(q k^T / sqrt(d)) @ v from captured projections equals the input of `out`."""
    model = _tiny_vit(num_registers=2)
    images = np.random.default_rng(1).standard_normal((2, 32, 32, 3), np.float32)
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    # Nonzero biases and larger weights than the init: sharper, less uniform attention.
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda p: np.asarray(p) + 0.3 * rng.standard_normal(p.shape, np.float32), params
    )

    def record_out_input(next_fun, args, kwargs, context):
        module = context.module
        if module.name == "out" and isinstance(module.parent, Attention):
            context.module.sow("intermediates", "attended", args[0])
        return next_fun(*args, **kwargs)

    def is_projection(module, method_name):
        return method_name == "__call__" and module.name in ("query", "key", "value")

    @jax.jit
    def forward(params, images):
        with nn.intercept_methods(record_out_input):
            return model.apply(
                {"params": params},
                images,
                capture_intermediates=is_projection,
                mutable=["intermediates"],
            )

    logits_ref, state = forward(params, images)
    out_inputs = {
        name: block["attn"]["out"]["attended"][0] for name, block in state["intermediates"].items()
    }
    tokens = 1 + 2 + 16  # CLS, two registers, a 4x4 patch grid
    assert sorted(out_inputs) == ["block_0", "block_1"]
    probs_of = jax.jit(rollout.attention_probs)
    head_means = []
    for name, attended in out_inputs.items():
        q, k, v = (
            np.asarray(state["intermediates"][name]["attn"][p]["__call__"][0])
            for p in ("query", "key", "value")
        )
        probs = np.asarray(probs_of(q, k))
        assert probs.shape == (2, 4, tokens, tokens)
        head_means.append(probs.mean(1))
        recomputed = np.einsum("BNTS,BSNH->BTNH", probs, v)
        np.testing.assert_allclose(recomputed, attended, rtol=1e-5, atol=1e-6)
        # The check can fail: scaling by sqrt(width) instead of sqrt(head_dim) is far off.
        logits = np.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(32)
        wrong = np.exp(logits - logits.max(-1, keepdims=True))
        wrong /= wrong.sum(-1, keepdims=True)
        assert np.abs(np.einsum("BNTS,BSNH->BTNH", wrong, v) - attended).max() > 1e-3

    captured_logits, attentions = jax.jit(lambda p, x: rollout.layer_attentions(model, p, x))(
        params, images
    )
    np.testing.assert_allclose(captured_logits, logits_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attentions, np.stack(head_means), atol=1e-6)


def _row_stochastic(rng, layers, tokens) -> np.ndarray:
    a = rng.random((layers, 1, tokens, tokens)).astype(np.float32) ** 3
    return a / a.sum(-1, keepdims=True)


def test_rollout_of_identity_attention_keeps_only_cls():
    joint = rollout.rollout(jnp.broadcast_to(jnp.eye(5), (3, 2, 5, 5)))
    np.testing.assert_array_equal(joint, np.broadcast_to(np.eye(5), (2, 5, 5)))
    patch_map = rollout.cls_patch_map(joint, 1, (2, 2))
    np.testing.assert_array_equal(patch_map, np.zeros((2, 2, 2)))


def test_rollout_single_layer_and_layer_order():
    rng = np.random.default_rng(0)
    a = _row_stochastic(rng, 2, 6)
    eye = np.eye(6, dtype=np.float32)
    np.testing.assert_allclose(rollout.rollout(a[:1])[0], 0.5 * a[0, 0] + 0.5 * eye, atol=1e-7)
    first, second = (0.5 * a[i, 0] + 0.5 * eye for i in range(2))
    joint = np.asarray(rollout.rollout(a)[0])
    np.testing.assert_allclose(joint, second @ first, atol=1e-6)
    # Matrix products do not commute; the later layer must be on the left.
    assert np.abs(joint - first @ second).max() > 1e-3
    np.testing.assert_allclose(joint.sum(-1), 1.0, atol=1e-6)


def test_cls_patch_map_skips_registers_and_keeps_row_major_order():
    joint = np.zeros((1, 7, 7), np.float32)
    joint[0, 0] = [0.5, 0.25, 0.25, 1, 2, 3, 4]  # CLS, 2 registers, 2x2 patches
    joint[0, 1, 3:] = 9  # another token's row must not leak in
    np.testing.assert_array_equal(rollout.cls_patch_map(joint, 3, (2, 2))[0], [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="grid"):
        rollout.cls_patch_map(joint, 1, (2, 2))


def test_overlay_puts_the_hot_colour_where_attention_is():
    gray = np.full((32, 32), 128, np.uint8)
    patch_map = np.zeros((4, 4), np.float32)
    patch_map[0, 3] = 1.0  # top right patch
    rgb = rollout.overlay(gray, patch_map)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    # jet: red at the maximum, blue at the minimum.
    assert rgb[2, 29, 0] > rgb[2, 29, 2] and rgb[29, 2, 2] > rgb[29, 2, 0]
    flat = rollout.overlay(gray, np.ones((4, 4), np.float32))
    assert len(np.unique(flat.reshape(-1, 3), axis=0)) == 1
