"""The jitted train step's options against direct computations: accumulation, EMA, skipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrjax.engine import step as train
from cxrjax.models import create_model

MEAN, STD = jnp.zeros(3), jnp.ones(3)


def _setup(batch_size=8):
    model = create_model("vit_tiny_demo", 2, image_size=32, depth=2)
    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))["params"]
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (batch_size, 32, 32), np.uint8)),
        "labels": jnp.asarray(rng.integers(0, 2, (batch_size, 2)).astype(np.float32)),
        "mask": jnp.ones((batch_size, 2), bool),
    }
    return model, params, batch


def _state(params, tx, ema=False):
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if ema:
        state["ema"] = params
    return state


def test_accumulated_gradients_equal_the_full_batch():
    model, params, batch = _setup()
    tx = optax.sgd(0.1)
    pos_weight = jnp.ones(2)
    full = train.make_train_step(model, tx, MEAN, STD, pos_weight, jax.random.key(1))
    accum = train.make_train_step(
        model, tx, MEAN, STD, pos_weight, jax.random.key(1), accum_steps=2
    )
    a, metrics_a = jax.jit(full)(_state(params, tx), batch)
    b, metrics_b = jax.jit(accum)(_state(params, tx), batch)
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_ema_tracks_the_parameters():
    model, params, batch = _setup()
    tx = optax.sgd(0.1)
    step = train.make_train_step(
        model, tx, MEAN, STD, jnp.ones(2), jax.random.key(1), ema_decay=0.9
    )
    state, _ = jax.jit(step)(_state(params, tx, ema=True), batch)
    for e, p0, p1 in zip(
        jax.tree.leaves(state["ema"]),
        jax.tree.leaves(params),
        jax.tree.leaves(state["params"]),
        strict=True,
    ):
        np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, rtol=1e-5, atol=1e-7)


def test_non_finite_step_keeps_the_state_and_advances_the_step():
    model, params, batch = _setup()
    tx = optax.sgd(0.1)
    batch = {**batch, "labels": batch["labels"].at[0, 0].set(jnp.nan)}
    step = train.make_train_step(model, tx, MEAN, STD, jnp.ones(2), jax.random.key(1))
    state, metrics = jax.jit(step)(_state(params, tx), batch)
    assert not bool(metrics["finite"]) and int(state["step"]) == 1
    for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)
