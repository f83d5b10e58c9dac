import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax import optim
from cxrjax.config_base import base_config, parse_arg


def _params():
    return {
        "embedding": {"kernel": jnp.ones((2, 2))},
        "block_0": {"w": jnp.ones(2)},
        "block_1": {"w": jnp.ones(2)},
        "encoder_norm": {"scale": jnp.ones(2)},
        "head": {"kernel": jnp.ones((2, 3))},
    }


def _config(**overrides):
    c = base_config("test", "csv")
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


def test_layer_decay_scales_follow_depth():
    scales = optim.layer_decay_scales(_params(), 0.5)
    assert scales["head"]["kernel"] == 1.0 and scales["encoder_norm"]["scale"] == 1.0
    assert scales["block_1"]["w"] == 0.5 and scales["block_0"]["w"] == 0.25
    assert scales["embedding"]["kernel"] == 0.125


def test_layer_decay_scales_the_adam_update_per_layer():
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optim.make_optimizer(_config(lr=1.0, layer_decay=0.5), 10, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is -lr * sign(grad); layer decay scales it.
    np.testing.assert_allclose(updates["head"]["kernel"], -1.0, rtol=1e-4)
    np.testing.assert_allclose(updates["block_0"]["w"], -0.25, rtol=1e-4)
    np.testing.assert_allclose(updates["embedding"]["kernel"], -0.125, rtol=1e-4)


def test_frozen_backbone_trains_only_the_head():
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optim.make_optimizer(_config(lr=0.1, freeze_backbone=True), 10, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["block_0"]["w"]).max()) == 0.0
    assert float(jnp.abs(updates["head"]["kernel"]).min()) > 0.0


def test_schedules():
    constant = optim.learning_rate(_config(lr=1e-5), 100)
    assert constant(0) == constant(99) == pytest.approx(1e-5)
    cosine = optim.learning_rate(_config(lr=1.0, schedule="warmup_cosine", warmup_steps=10), 100)
    assert cosine(0) == 0.0 and cosine(10) == pytest.approx(1.0) and cosine(100) < 1e-6
    with pytest.raises(ValueError, match="warmup_cosine"):
        optim.learning_rate(_config(schedule="linear"), 10)


def test_config_arguments_parse_and_reject_unknown_keys():
    assert parse_arg("dataset=chexpert,seed=2", dataset="vindr", seed="0") == {
        "dataset": "chexpert",
        "seed": "2",
    }
    with pytest.raises(ValueError, match="expected key=value"):
        parse_arg("datset=chexpert", dataset="vindr")
    with pytest.raises(ValueError, match="use one of"):
        base_config("x", "imagenet")
