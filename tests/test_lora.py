"""LoRA adapters: zero-initialised B is the base model bitwise, merging is exact to 1e-5, and
the optimizer trains only the adapters and the head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax import optim
from cxrjax.config_base import base_config
from cxrjax.models import create_model
from cxrjax.models.lora import LORA_TARGETS, merge_lora
from cxrjax.models.pretrained import load_pretrained
from cxrjax.models.weights import flatten, save_weights

D = dict(depth=2)
ALL = dict(lora_rank=4, lora_alpha=8.0, lora_targets=LORA_TARGETS)


def _init(model, size: int = 64):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return model.init({"params": jax.random.key(0)}, x)["params"]


def _x(seed: int = 0):
    return jax.random.normal(jax.random.key(seed), (2, 64, 64, 3), jnp.float32)


def _strip(params):
    return merge_lora(jax.tree.map(np.asarray, params))


@pytest.mark.parametrize("variant", ["vit_tiny_demo", "vit_small_patch16_dinov3"])
def test_zero_b_is_the_base_model_bitwise(variant):
    kw = dict(D, width=64, num_heads=4, mlp_dim=128) if "dinov3" in variant else D
    lora = create_model(variant, 3, head_zero_init=False, **kw, **ALL)
    base = create_model(variant, 3, head_zero_init=False, **kw)
    params = _init(lora)
    keys = flatten(params)
    assert sum(k.endswith("lora_b") for k in keys) == 2 * len(LORA_TARGETS)
    base_params = {k: v for k, v in keys.items() if not k.endswith(("lora_a", "lora_b"))}
    assert set(base_params) == set(flatten(_init(base)))
    x = _x()
    ours = lora.apply({"params": params}, x)
    ref = base.apply({"params": _strip(params)}, x)
    assert np.array_equal(np.asarray(ours), np.asarray(ref))


def test_merged_equals_adapted():
    model = create_model("vit_tiny_demo", 3, head_zero_init=False, **D, **ALL)
    params = _init(model)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            rng.normal(0, 0.05, v.shape).astype(np.float32)
            if p[-1].key == "lora_b"
            else np.asarray(v)
        ),
        params,
    )
    base = create_model("vit_tiny_demo", 3, head_zero_init=False, **D)
    x = _x(1)
    adapted = np.asarray(model.apply({"params": params}, x))
    merged = np.asarray(base.apply({"params": merge_lora(params, alpha=8.0)}, x))
    assert np.abs(adapted).max() > 1e-3 and np.abs(adapted - merged).max() <= 1e-5
    # The adapters do change the function: merging with the wrong alpha does not match.
    wrong = np.asarray(base.apply({"params": merge_lora(params, alpha=4.0)}, x))
    assert np.abs(adapted - wrong).max() > 1e-4


def test_optimizer_trains_only_adapters_and_head():
    model = create_model("vit_tiny_demo", 3, head_zero_init=False, **D, lora_rank=2)
    params = _init(model)
    config = base_config("lora", "csv")
    config.model.lora_rank = 2
    config.lr, config.wd = 0.1, 0.1
    tx = optim.make_optimizer(config, 10, params)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, _x(2)) ** 2)

    grads = jax.grad(loss)(params)
    # stop_gradient: no weight gradient is computed for the adapted kernels.
    assert float(jnp.abs(grads["block_0"]["attn"]["query"]["kernel"]).max()) == 0.0
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = flatten(updates)
    for key, u in flat.items():
        moving = float(jnp.abs(u).max()) > 0
        should = key.startswith("head/") or key.endswith("lora_b")
        assert moving == should or key.endswith("lora_a"), key
    assert not any(float(jnp.abs(u).max()) for k, u in flat.items() if "encoder_norm" in k)


def test_pretrained_weights_load_into_a_lora_model(tmp_path):
    base = create_model("vit_tiny_demo", 0, **D)
    path = save_weights(
        tmp_path / "w",
        jax.tree.map(np.asarray, _init(base)),
        variant="vit_tiny_demo",
        source="test",
        source_sha256="",
        source_format="cxrjax",
        image_size=64,
    )
    lora = create_model("vit_tiny_demo", 0, **D, lora_rank=2)
    loaded, report = load_pretrained(str(path), _init(lora), variant="vit_tiny_demo", image_size=64)
    assert report.reinitialised and all(
        k.endswith("lora_a") or k.endswith("lora_b") for k in report.reinitialised
    )
    x = _x(3)
    np.testing.assert_array_equal(
        np.asarray(lora.apply({"params": loaded}, x)),
        np.asarray(base.apply({"params": _init(base)}, x)),
    )
