"""Tests of the Flax ViT family, its registry and the position-embedding resampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxrjax.models import count_params, create_model, flops_per_image, get_spec, list_models
from cxrjax.models.posemb import resample_grid, resample_posemb


def _init(model, size: int, seed: int = 0):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return model.init({"params": jax.random.key(seed)}, x, train=False)["params"]


# Two blocks keep compilation fast on 2 CPU cores; every code path is the same as at depth 4.
D = dict(depth=2)


@pytest.fixture(scope="module")
def demo_params():
    # Running the initialisers is slow on CPU: draw init-scale random values of the same shapes.
    shapes = jax.eval_shape(lambda: _init(create_model("vit_tiny_demo", 3, **D), 64))
    rng = np.random.default_rng(0)

    def draw(path, s):
        if path[-1].key == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.normal(size=s.shape), jnp.float32)
        return jnp.asarray(0.05 * rng.normal(size=s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply(model, params, x, **kw):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, **kw))(params, x)


def _images(n: int, size: int, seed: int = 0) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


def test_registry_lists_study_variants_with_sources():
    names = list_models()
    for v in ("vit_b14_dinov2", "vit_b16_in21k", "vit_s14_dinov2_reg4", "vit_g14_dinov2"):
        assert v in names
    spec = get_spec("vit_b14_dinov2")
    assert spec.sources["timm"] == "vit_base_patch14_dinov2.lvd142m"
    assert spec.sources["hf"] == "facebook/dinov2-base"
    assert spec.sources["dinov2_hub"].endswith("dinov2_vitb14/dinov2_vitb14_pretrain.pth")
    assert (
        get_spec("vit_b14_dinov2_reg4")
        .sources["dinov2_hub"]
        .endswith("dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth")
    )
    assert get_spec("vit_b16_in21k").sources["timm"] == "vit_base_patch16_224.augreg_in21k"
    assert spec.image_size == 518 and spec.patch_size == 14
    with pytest.raises(ValueError, match="Known variants"):
        get_spec("vit_nope")
    with pytest.raises(ValueError, match="Unknown override"):
        create_model("vit_tiny_demo", 3, not_a_field=1, **D)


def test_param_counts_and_flops_match_published_numbers():
    # ViT-B/16: 86M parameters, 17.6 GMACs at 224 (timm / the ViT paper).
    assert count_params("vit_b16_in21k") == pytest.approx(85.8e6, rel=2e-3)
    assert flops_per_image("vit_b16_in21k", 224) == pytest.approx(2 * 17.56, rel=5e-3)
    # DINOv2 ViT-B/14 at 224 px has 257 tokens: ~46 GFLOPs; ViT-g/14 has 1.1B params.
    assert flops_per_image("vit_b14_dinov2", 224) == pytest.approx(46.3, rel=5e-3)
    assert count_params("vit_g14_dinov2") == pytest.approx(1.1365e9, rel=1e-3)
    assert count_params("vit_s14_dinov2") == pytest.approx(22.06e6, rel=1e-3)
    with pytest.raises(ValueError, match="multiple of the patch"):
        flops_per_image("vit_b16_in21k", 225)


def test_flops_agree_with_xla_cost_analysis():
    # XLA counts every op (norms, softmax, GELU too), so matmuls alone must be slightly below it.
    model = create_model("vit_tiny_demo", 0)
    params = jax.eval_shape(lambda: _init(model, 64))
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, _images(1, 64))
    cost = compiled.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = flops_per_image("vit_tiny_demo", 64) * 1e9
    assert 0.85 * cost["flops"] <= ours <= cost["flops"]


def test_forward_shapes_dtypes_and_headless_features(demo_params):
    model = create_model("vit_tiny_demo", 3, **D)
    params = demo_params
    logits, feats = _apply(model, params, _images(3, 64), return_features=True)
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32
    assert feats.shape == (3, 96)
    # The head is a plain linear map of the final-norm CLS features.
    expected = feats @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    backbone = create_model("vit_tiny_demo", 0, **D)
    shapes = jax.eval_shape(lambda: _init(backbone, 64))
    assert "head" not in shapes
    bparams = {k: v for k, v in params.items() if k != "head"}
    np.testing.assert_allclose(_apply(backbone, bparams, _images(3, 64)), feats, atol=1e-6)


def test_head_zero_init_gives_zero_logits():
    model = create_model("vit_tiny_demo", 4, depth=1, width=16, num_heads=2, mlp_dim=32)
    x = _images(2, 64)
    params = jax.jit(lambda x: model.init({"params": jax.random.key(0)}, x)["params"])(x)
    assert not np.any(np.asarray(params["head"]["kernel"]))
    assert not np.any(np.asarray(_apply(model, params, x)))


def test_bf16_compute_keeps_float32_params_and_stays_close(demo_params):
    f32 = create_model("vit_tiny_demo", 3, **D)
    bf16 = create_model("vit_tiny_demo", 3, dtype="bfloat16", **D)
    params = demo_params
    params_bf = jax.eval_shape(lambda: _init(bf16, 64))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_bf))
    x = _images(4, 64)
    a = _apply(f32, params, x)
    b = _apply(bf16, params, x)
    assert b.dtype == jnp.float32
    rel = np.abs(np.asarray(a - b)).max() / np.abs(np.asarray(a)).max()
    assert rel < 5e-2


def test_dropout_and_drop_path_only_act_in_training(demo_params):
    model = create_model("vit_tiny_demo", 3, dropout=0.1, drop_path=0.2, **D)
    params = demo_params
    x = _images(8, 64)

    @jax.jit
    def run(rng, model=model):
        ev = model.apply({"params": params}, x, train=False)
        tr = model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
        return ev, tr

    ev1, tr1 = run(jax.random.key(1))
    ev2, tr2 = run(jax.random.key(2))
    np.testing.assert_array_equal(ev1, ev2)
    assert not np.allclose(tr1, tr2)
    assert not np.allclose(tr1, ev1)
    plain = create_model("vit_tiny_demo", 3, **D)
    tr = _apply(plain, params, x, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_allclose(tr, ev1, atol=1e-5)


def test_remat_gives_identical_gradients(demo_params):
    x = _images(2, 64)
    params = demo_params
    grads = []
    for remat in (False, True):
        model = create_model("vit_tiny_demo", 3, remat=remat, drop_path=0.1, **D)

        def loss(p, model=model):
            out = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(3)})
            return jnp.sum(out**2)

        grads.append(jax.jit(jax.grad(loss))(params))
    # Some gradients are exactly zero in theory (the key bias), so compare on the global scale.
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads[0]))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_registers_are_parameters_and_change_output(demo_params):
    model = create_model("vit_tiny_demo", 3, num_registers=3, **D)
    shapes = jax.eval_shape(lambda: _init(model, 64))
    assert shapes["registers"].shape == (1, 3, 96)
    x = _images(2, 64)
    params = dict(demo_params, registers=jnp.zeros((1, 3, 96)))
    a = _apply(model, params, x)
    # A random bump: a constant shift per token would be removed by the first LayerNorm.
    bumped = dict(params, registers=jax.random.normal(jax.random.key(9), (1, 3, 96)))
    assert not np.allclose(a, _apply(model, bumped, x))


def test_other_input_sizes_resample_posemb_on_the_fly(demo_params):
    small = create_model("vit_tiny_demo", 3, **D)
    params = demo_params
    x = _images(2, 96)
    on_the_fly = _apply(small, params, x)
    big = create_model("vit_tiny_demo", 3, image_size=96, **D)
    resampled = dict(params)
    resampled["pos_embedding"] = resample_posemb(
        np.asarray(params["pos_embedding"]), 1, (12, 12), "timm"
    )
    np.testing.assert_allclose(on_the_fly, _apply(big, resampled, x), atol=1e-5)
    # Non-square inputs work too.
    assert _apply(small, params, _images(1, 64)[:, :, :48]).shape == (1, 3)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        small.apply({"params": params}, _images(1, 60))


def test_a_few_steps_of_training_fit_a_batch(demo_params):
    model = create_model("vit_tiny_demo", 3, **D)
    params = dict(demo_params, head=jax.tree.map(jnp.zeros_like, demo_params["head"]))
    x = _images(8, 64, seed=5)
    y = (jax.random.uniform(jax.random.key(6), (8, 3)) > 0.5).astype(jnp.float32)
    tx = optax.adamw(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
            return optax.sigmoid_binary_cross_entropy(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for i in range(30):
        params, opt, loss = step(params, opt, jax.random.key(i))
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(2), abs=1e-5)
    assert losses[-1] < 0.5 * losses[0]


def test_resample_is_identity_at_same_size_and_preserves_constants():
    grid = np.random.default_rng(0).normal(size=(1, 5, 5, 4)).astype(np.float32)
    assert resample_grid(grid, (5, 5), "dinov2") is grid
    const = np.full((1, 6, 6, 2), 3.0, np.float32)
    for method in ("dinov2", "timm"):
        for new in ((3, 3), (9, 4)):
            np.testing.assert_allclose(resample_grid(const, new, method), 3.0, rtol=1e-5)


@pytest.mark.parametrize("old,new", [(37, 16), (16, 37), (4, 6), (6, 4), (5, 5)])
def test_resample_matches_torch_interpolate(old, new):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(old * 100 + new)
    grid = rng.normal(size=(1, old, old, 8)).astype(np.float32)
    t = torch.from_numpy(grid).permute(0, 3, 1, 2)
    # DINOv2's interpolate_pos_encoding (offset 0.1, scale_factor, no antialias).
    s = (new + 0.1) / old
    ref = F.interpolate(t, scale_factor=(s, s), mode="bicubic", antialias=False)
    # DINOv2 skips the interpolation when the grid already has the requested size.
    ref = grid if old == new else ref.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(resample_grid(grid, (new, new), "dinov2"), ref, atol=5e-5)
    ours = resample_grid(jnp.asarray(grid), (new, new), "dinov2")
    np.testing.assert_allclose(np.asarray(ours), ref, atol=5e-5)
    # transformers' ViT / Dinov2 interpolate_pos_encoding (size, no antialias).
    ref = F.interpolate(t, size=(new, new), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(resample_grid(grid, (new, new), "hf"), ref, atol=5e-5)
    # timm's resample_abs_pos_embed (size, antialias=True).
    ref = F.interpolate(t, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    ref = ref.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(resample_grid(grid, (new, new), "timm"), ref, atol=5e-5)
