import json

import numpy as np

from configs import demo
from cxrjax.data import shards
from cxrjax.engine import step, trainer
from cxrjax.engine.inference import Predictor
from cxrjax.run_dir import RunDir


def _config(data_dir, epochs=2):
    c = demo.get_config()
    c.data.dir = str(data_dir)
    c.data.demo_patients = 0
    c.epochs = epochs
    c.batch_size = 8
    c.eval_batch_size = 8
    c.log_every_steps = 2
    c.checkpoint_every_steps = 3
    c.warmup_steps = 2
    return c


def predict_split(workdir, split="test", which="best"):
    """A run's predictions on a split of the dataset its config names, through the Predictor."""
    info = shards.load_info(RunDir(workdir).read_config().data.dir)
    predictor = Predictor.from_run(workdir, which)
    return predictor.predict_split(info, split, batch_size=8)


def latest_params(workdir, fsdp=False):
    """(step, params) of the latest checkpoint, restored onto this process's mesh."""
    import jax
    import jax.numpy as jnp

    from cxrjax import checkpoint, sharding
    from cxrjax.engine.state import build_model

    model = build_model(_config(""), 2, 32)
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))["params"]
    )
    target = checkpoint.abstract(
        shapes, sharding.state_shardings(shapes, sharding.make_mesh(), fsdp=fsdp)
    )
    ckpt = checkpoint.Checkpointer(RunDir(workdir))
    try:
        return ckpt.latest_step(), ckpt.restore_params("latest", target)
    finally:
        ckpt.close()


def test_train_writes_results_checkpoints_events_and_resumes(tiny_shards, tmp_path, capsys):
    workdir = tmp_path / "run"
    results = trainer.train_and_evaluate(_config(tiny_shards), workdir)
    info = json.loads((tiny_shards / "dataset_info.json").read_text())
    steps_per_epoch = info["splits"]["train"]["num_examples"] // 8
    assert results["steps"] == 2 * steps_per_epoch
    saved = json.loads((workdir / "results.json").read_text())
    assert set(saved["test"]["auroc"]) == {"square", "stripe"}
    assert saved["test"]["num_examples"] == info["splits"]["test"]["num_examples"]
    assert 0.0 <= saved["val"]["mean_auroc"] <= 1.0
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert (workdir / "checkpoints" / str(results["steps"])).is_dir()
    assert list((workdir / "best").iterdir())
    assert (workdir / "predictions_test.npz").is_file()
    out = capsys.readouterr().out
    assert "val mean AUROC" in out and "parameters" in out
    assert (workdir / "parameters.txt").is_file()

    # Same workdir, more epochs: continues from the last checkpoint instead of step 0.
    more = trainer.train_and_evaluate(_config(tiny_shards, epochs=3), workdir)
    assert more["steps"] == 3 * steps_per_epoch
    out = capsys.readouterr().out
    assert f"resumed from step {2 * steps_per_epoch}" in out
    assert f"trained {steps_per_epoch} steps" in out


def test_predict_split_matches_saved_predictions(tiny_shards, tmp_path):
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(_config(tiny_shards, epochs=1), workdir)
    preds = predict_split(workdir)
    saved = np.load(workdir / "predictions_test.npz")
    np.testing.assert_allclose(preds.probs, saved["probs"], atol=1e-6)
    np.testing.assert_array_equal(preds.ids, saved["ids"])


def test_loss_ignores_masked_labels_and_weights_positives():
    import jax.numpy as jnp

    logits = jnp.array([[2.0, -1.0]])
    labels = jnp.array([[1.0, 0.0]])
    loss_masked = step.bce_loss(logits, labels, jnp.array([[1.0, 0.0]]), jnp.array([3.0, 1.0]))
    expected = 3.0 * np.log1p(np.exp(-2.0))
    np.testing.assert_allclose(loss_masked, expected, rtol=1e-6)


def test_device_augmentation_trains(tiny_shards, tmp_path):
    config = _config(tiny_shards, epochs=1)
    config.input.augment_on_device = True
    results = trainer.train_and_evaluate(config, tmp_path / "run")
    assert np.isfinite(results["test"]["mean_auroc"])


def test_lora_run_trains_only_adapters_and_head_and_reloads(tiny_shards, tmp_path):
    config = _config(tiny_shards, epochs=1)
    config.model.lora_rank = 4
    config.model.lora_targets = ("query", "value", "fc1")
    workdir = tmp_path / "lora"
    trainer.train_and_evaluate(config, workdir)
    facts = json.loads((workdir / "run.json").read_text())
    assert facts["model_options"]["lora_rank"] == 4
    # Inference rebuilds the adapters from run.json and reproduces the saved predictions.
    preds = predict_split(workdir)
    saved = np.load(workdir / "predictions_test.npz")
    np.testing.assert_array_equal(preds.probs, saved["probs"])
    # The frozen backbone kept its initial values; adapters and head moved.
    import jax

    from cxrjax.engine.state import build_model

    model = build_model(config, 2, 32)
    init = model.init({"params": jax.random.key(config.seed)}, np.zeros((1, 32, 32, 3)))["params"]
    _, trained = latest_params_of(workdir, model)
    kernel = ("block_0", "attn", "query", "kernel")
    assert np.array_equal(_get(init, kernel), _get(trained, kernel))
    assert not np.array_equal(_get(init, ("head", "kernel")), _get(trained, ("head", "kernel")))
    lora_b = [k for k in _get(trained, kernel[:3]) if "lora_b" in k]
    assert lora_b and np.abs(np.asarray(_get(trained, (*kernel[:3], lora_b[0])))).max() > 0


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def latest_params_of(workdir, model):
    import jax
    import jax.numpy as jnp

    from cxrjax import checkpoint, sharding

    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))["params"]
    )
    target = checkpoint.abstract(shapes, sharding.state_shardings(shapes, sharding.make_mesh()))
    ckpt = checkpoint.Checkpointer(RunDir(workdir))
    try:
        return ckpt.latest_step(), ckpt.restore_params("latest", target)
    finally:
        ckpt.close()
