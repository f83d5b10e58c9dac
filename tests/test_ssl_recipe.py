"""The SSL recipe's pieces that can silently go wrong: where the mask token lands, the per-
parameter rates and decay, the frozen last layer, the block masks against DINOv2's generator,
the DINO head against a torch transcription, and the per-module clipping."""

import math
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxrjax.models import create_model
from cxrjax.ssl import objective, schedules
from cxrjax.ssl.heads import DINOHead
from cxrjax.ssl.multicrop import block_mask

SIZE = 32  # vit_tiny_demo (patch 8): a 4 x 4 grid


@pytest.fixture(scope="module")
def tiny():
    model = create_model("vit_tiny_demo", 0, image_size=SIZE, dtype="float32")
    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    return model, params


def test_mask_token_replaces_exactly_the_masked_patches(tiny):
    model, params = tiny
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    masks = np.zeros((1, 16), bool)
    masks[0, [1, 6]] = True  # patches (0, 1) and (1, 2) of the 4 x 4 grid
    b = a.copy()
    b[0, 0:8, 8:16] = rng.normal(size=(8, 8, 3))  # only the content of patch 1 changes
    b[0, 8:16, 16:24] = rng.normal(size=(8, 8, 3))  # and of patch 6
    token = jnp.asarray(rng.normal(size=(model.width,)), jnp.float32)

    def enc(x, t=token):
        return objective.encode(
            model, params, jnp.asarray(x), train=False, masks=masks, mask_token=t
        )

    # The masked patches' pixels are invisible; the token itself is seen.
    np.testing.assert_allclose(enc(a), enc(b), atol=1e-5)
    # (A constant shift of the token would be invisible: every LayerNorm removes it.)
    other = jnp.asarray(rng.normal(size=(model.width,)), jnp.float32)
    assert not np.allclose(enc(a), enc(a, other), atol=1e-3)
    c = a.copy()
    c[0, 0:8, 0:8] += 1.0  # an unmasked patch (0) does change the output
    assert not np.allclose(enc(a), enc(c), atol=1e-3)


def test_lr_scales_and_no_decay_groups(tiny):
    _, backbone = tiny
    student = {"backbone": backbone, "mask_token": jnp.zeros(96)}
    student["dino_head"] = DINOHead(16, 32, 8).init(jax.random.key(1), jnp.zeros((1, 96)))["params"]
    scales = schedules.lr_scales(student, 0.9, 0.2)
    assert scales["backbone"]["embedding"]["kernel"] == pytest.approx(0.9**5 * 0.2)
    assert scales["backbone"]["cls"] == pytest.approx(0.9**5)
    assert scales["mask_token"] == pytest.approx(0.9**5)  # layer 0, as in DINOv2
    assert scales["backbone"]["block_3"]["mlp"]["fc1"]["kernel"] == pytest.approx(0.9)
    assert scales["backbone"]["encoder_norm"]["scale"] == 1.0
    assert all(s == 1.0 for s in jax.tree.leaves(scales["dino_head"]))
    flat = {
        tuple(str(getattr(k, "key", k)) for k in path): schedules._no_decay(
            tuple(str(getattr(k, "key", k)) for k in path)
        )
        for path, _ in jax.tree_util.tree_leaves_with_path(student)
    }
    no_decay = {k for k, v in flat.items() if v}
    assert ("backbone", "encoder_norm", "scale") in no_decay
    assert ("backbone", "block_0", "mlp", "fc1", "bias") in no_decay
    for decayed in [
        ("mask_token",),
        ("backbone", "cls"),
        ("dino_head", "prototypes"),
        ("dino_head", "gain"),
        ("backbone", "embedding", "kernel"),
    ]:
        assert decayed not in no_decay, decayed


def _optimizer_config(**overrides) -> ml_collections.ConfigDict:
    """The ssl fields `schedules.make_optimizer` reads: constant lr and wd, no layer decay."""
    return ml_collections.ConfigDict(
        dict(
            lr=1e-2,
            min_lr=0.0,
            warmup_epochs=0,
            wd=0.04,
            wd_end=0.04,
            momentum=0.9,
            warmup_teacher_temp=0.04,
            teacher_temp=0.04,
            teacher_temp_warmup_epochs=0,
            layer_decay=1.0,
            patch_embed_lr_mult=1.0,
            grad_clip=3.0,
            **overrides,
        )
    )


def _four_optimizer_steps(ssl: ml_collections.ConfigDict) -> list[dict]:
    """The student (a DINO head, a one-leaf backbone, a mask token) before and after each of
    four optimizer steps with unit gradients."""
    head = DINOHead(8, 16, 4)
    params = {
        "dino_head": head.init(jax.random.key(0), jnp.zeros((1, 6)))["params"],
        "backbone": {"w": jnp.ones(3)},
        "mask_token": jnp.zeros(3),
    }
    sch = schedules.make_schedules(ssl, 10, 1)
    tx = schedules.make_optimizer(ssl, sch, params, 1)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    history = [params]
    for _ in range(4):
        updates, state = tx.update(grads, state, history[-1])
        history.append(jax.tree.map(lambda p, u: p + u, history[-1], updates))
    return history


def test_last_layer_stays_frozen_for_the_configured_steps():
    ssl = _optimizer_config(freeze_prototypes_epochs=2)
    history = _four_optimizer_steps(ssl)
    for name in ("prototypes", "gain"):
        before = [np.asarray(h["dino_head"][name]) for h in history]
        np.testing.assert_array_equal(before[0], before[1])
        np.testing.assert_array_equal(before[1], before[2])  # steps 0 and 1 frozen
        assert not np.array_equal(before[2], before[3])  # thawed at step 2
    mlp = [np.asarray(h["dino_head"]["mlp_0"]["kernel"]) for h in history]
    assert not np.array_equal(mlp[0], mlp[1])  # the rest of the head trains from step 0


def test_heads_only_warmup_holds_the_backbone_and_mask_token():
    ssl = _optimizer_config(freeze_prototypes_epochs=0, heads_only_epochs=2)
    history = _four_optimizer_steps(ssl)
    for part in (lambda h: h["backbone"]["w"], lambda h: h["mask_token"]):
        values = [np.asarray(part(h)) for h in history]
        np.testing.assert_array_equal(values[0], values[2])  # steps 0 and 1: heads only
        assert not np.array_equal(values[2], values[3])  # the backbone trains from step 2
    mlp = [np.asarray(h["dino_head"]["mlp_0"]["kernel"]) for h in history]
    assert not np.array_equal(mlp[0], mlp[1])  # the heads train from step 0


def test_clipping_is_per_module():
    tx = schedules.clip_per_module(1.0)
    grads = {
        "backbone": {"w": jnp.full(4, 0.1)},
        "mask_token": jnp.zeros(2),
        "dino_head": {"w": jnp.full(4, 100.0)},
    }
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(out["backbone"]["w"], 0.1)  # under its own bound: untouched
    assert float(jnp.linalg.norm(out["dino_head"]["w"])) == pytest.approx(1.0)


def _reference_mask(rng: random.Random, grid: int, num_masking: int) -> np.ndarray:
    """DINOv2's MaskingGenerator (dinov2/data/masking.py), min 4 patches, max 0.5 N."""
    mask = np.zeros((grid, grid), bool)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    max_num = int(0.5 * grid * grid)

    def one(max_patches):
        delta = 0
        for _ in range(10):
            area = rng.uniform(4, max_patches)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
                covered = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - covered <= max_patches:
                    delta += int(h * w - covered)
                    mask[top : top + h, left : left + w] = True
                if delta > 0:
                    break
        return delta

    count = 0
    while count < num_masking:
        delta = one(min(num_masking - count, max_num))
        if delta == 0:
            break
        count += delta
    return mask.reshape(-1)


def test_block_masks_match_the_reference_statistics():
    grid, n = 16, 400  # ViT-B/14 at 224
    rng, ref_rng = np.random.default_rng(0), random.Random(0)
    targets = [int(grid * grid * r) for r in np.random.default_rng(1).uniform(0.1, 0.5, n)]
    ours = np.array([block_mask(rng, grid, t).sum() for t in targets])
    ref = np.array([_reference_mask(ref_rng, grid, t).sum() for t in targets])
    assert (ours <= np.array(targets)).all()
    # The masked share of the grid, on average and spread, as the reference's.
    assert abs(ours.mean() - ref.mean()) / (grid * grid) < 0.03
    assert abs(ours.std() - ref.std()) / (grid * grid) < 0.03


def test_dino_head_matches_a_torch_transcription():
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    d, hidden, bottleneck, k = 12, 16, 8, 10
    mlp = nn.Sequential(
        nn.Linear(d, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, bottleneck),
    )
    last = nn.utils.weight_norm(nn.Linear(bottleneck, k, bias=False))
    with torch.no_grad():
        last.weight_g.copy_(torch.rand(k, 1) + 0.5)  # a trained, non-unit gain (RAD-DINO)
    x = torch.randn(5, d)
    with torch.no_grad():
        want = last(nn.functional.normalize(mlp(x), dim=-1, p=2)).numpy()
    params = {
        f"mlp_{i}": {
            "kernel": mlp[j].weight.detach().numpy().T,
            "bias": mlp[j].bias.detach().numpy(),
        }
        for i, j in enumerate((0, 2, 4))
    }
    params["prototypes"] = last.weight_v.detach().numpy().T
    params["gain"] = last.weight_g.detach().numpy().reshape(-1)
    head = DINOHead(k, hidden, bottleneck, 3)
    got = head.apply({"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_gain_stays_at_one_when_frozen():
    ssl = _optimizer_config(freeze_prototypes_epochs=0, freeze_gain=True)
    head = DINOHead(8, 16, 4)
    params = {
        "dino_head": head.init(jax.random.key(0), jnp.zeros((1, 6)))["params"],
        "backbone": {"w": jnp.ones(3)},
        "mask_token": jnp.zeros(3),
    }
    tx = schedules.make_optimizer(ssl, schedules.make_schedules(ssl, 10, 1), params, 1)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    new = params
    for _ in range(3):
        updates, state = tx.update(grads, state, new)
        new = jax.tree.map(lambda p, u: p + u, new, updates)
    np.testing.assert_array_equal(np.asarray(new["dino_head"]["gain"]), 1.0)
    assert not np.array_equal(new["dino_head"]["prototypes"], params["dino_head"]["prototypes"])


def _tiny_dino_ibot(tiny, centering: str, rows: int, mask_token: float):
    """A 16-prototype DINO + iBOT setup on the tiny ViT: config, heads, student, teacher, batch."""
    from cxrjax.ssl.config import ssl_base_config
    from cxrjax.ssl.step import build_heads

    model, params = tiny
    c = ssl_base_config("t")
    c.crops.global_size, c.crops.local_size, c.crops.num_local = SIZE, 16, 1
    c.ssl.prototypes, c.ssl.head_hidden_dim, c.ssl.head_bottleneck_dim = 16, 16, 8
    c.ssl.centering = centering
    heads = build_heads(c)
    head_params = heads["dino_head"].init(jax.random.key(1), jnp.zeros((1, model.width)))
    student = {"backbone": params, "dino_head": head_params["params"]}
    student["mask_token"] = jnp.full((model.width,), mask_token)
    teacher = {k: v for k, v in student.items() if k != "mask_token"}
    rng = np.random.default_rng(0)
    batch = {
        "global": jnp.asarray(rng.integers(0, 255, (rows, 2, SIZE, SIZE)), jnp.uint8),
        "local": jnp.asarray(rng.integers(0, 255, (rows, 1, 16, 16)), jnp.uint8),
        "mask": jnp.asarray(rng.random((rows, 2, 16)) < 0.3),
    }
    return c, heads, student, teacher, batch


def test_centering_step_updates_the_centres_from_the_teacher_scores(tiny):
    from cxrjax.ssl.step import NEW_CENTERS, initial_centers, make_loss
    from cxrjax.ssl.trainer import crop_options

    model, _ = tiny
    c, heads, student, teacher, batch = _tiny_dino_ibot(tiny, "centering", rows=3, mask_token=0.0)
    c.ssl.center_momentum = 0.8
    mean, std = jnp.zeros(3), jnp.ones(3)
    centers = initial_centers(c.ssl)
    assert set(centers) == {"dino", "ibot"}
    centers = {k: v + 0.5 for k, v in centers.items()}
    loss_fn = make_loss(model, heads, crop_options(c, 8), c.ssl, mean, std)
    loss, parts = loss_fn(student, teacher, batch, jax.random.key(0), 0.04, centers)
    # The teacher's CLS scores, computed here directly.
    from cxrjax.engine.step import normalize

    images = normalize(batch["global"].reshape(6, SIZE, SIZE), mean, std)
    tokens = objective.encode(model, teacher["backbone"], images, train=False)
    scores = heads["dino_head"].apply({"params": teacher["dino_head"]}, tokens[:, 0])
    want = 0.8 * 0.5 + 0.2 * np.asarray(scores).mean(0)
    np.testing.assert_allclose(np.asarray(parts[NEW_CENTERS]["dino"]), want, rtol=1e-5)
    # Sinkhorn-Knopp gives other targets, hence another loss (and no centres).
    c.ssl.centering = "sinkhorn_knopp"
    loss_sk, parts_sk = make_loss(model, heads, crop_options(c, 8), c.ssl, mean, std)(
        student, teacher, batch, jax.random.key(0), 0.04
    )
    assert NEW_CENTERS not in parts_sk
    assert abs(float(loss) - float(loss_sk)) > 1e-4


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_accumulation_averages_the_interleaved_micro_batches(tiny, centering):
    """ssl.accum_steps=2: loss, parts and gradients are the means over rows 0, 2 and rows 1, 3
    (each with its own rng), and DINOv1 centres pass from the first micro-batch to the second."""
    from cxrjax.ssl.step import (
        NEW_CENTERS,
        accumulated_value_and_grad,
        initial_centers,
        make_loss,
    )
    from cxrjax.ssl.trainer import crop_options

    model, _ = tiny
    c, heads, student, teacher, batch = _tiny_dino_ibot(tiny, centering, rows=4, mask_token=0.1)
    loss_fn = make_loss(model, heads, crop_options(c, 8), c.ssl, jnp.zeros(3), jnp.ones(3))
    centers = initial_centers(c.ssl) if centering == "centering" else None
    key = jax.random.key(3)
    TEMP = 0.5
    (loss, parts), grads = accumulated_value_and_grad(loss_fn, 2)(
        student, teacher, batch, key, TEMP, centers
    )

    # Jitted, as the scan is: op-by-op and fused float32 differ by ~1e-4 relative here.
    single = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    want_loss, want_grads, carried = 0.0, None, centers
    for j in range(2):
        chunk = {k: v[j::2] for k, v in batch.items()}
        (lj, pj), gj = single(student, teacher, chunk, jax.random.fold_in(key, j), TEMP, carried)
        carried = pj.get(NEW_CENTERS, carried)
        want_loss += lj / 2
        want_grads = gj if want_grads is None else jax.tree.map(jnp.add, want_grads, gj)
    want_grads = jax.tree.map(lambda g: g / 2, want_grads)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-7)
    if centering == "centering":
        for name in carried:
            np.testing.assert_allclose(parts[NEW_CENTERS][name], carried[name], rtol=1e-5)
    # The whole batch at once is another loss (the targets are normalised per micro-batch).
    (full, _), _ = single(student, teacher, batch, key, TEMP, centers)
    assert not np.isclose(float(full), float(loss))


def test_accumulation_that_does_not_divide_the_batch_is_a_config_error(tiny):
    from cxrjax.errors import ConfigError
    from cxrjax.ssl.step import accumulated_value_and_grad

    def loss_fn(student, teacher, batch, rng, temp, centers=None):
        return jnp.sum(student["w"] * batch["global"].sum()), {}

    run = accumulated_value_and_grad(loss_fn, 2)
    with pytest.raises(ConfigError, match="accum_steps=2"):
        run({"w": jnp.ones(2)}, {}, {"global": jnp.ones((3, 2))}, jax.random.key(0), 0.04)
