"""The DINOv2 objective against direct numpy references, and the teacher as the student's EMA."""

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxrjax.ssl import objective


def _numpy_sinkhorn(scores, temp, iterations=3):
    """DINOv2's sinkhorn_knopp_teacher, line by line, in float64."""
    q = np.exp(scores / temp).T  # K x B
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sinkhorn_knopp_matches_numpy_and_normalises():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, (12, 7))
    got = np.asarray(objective.sinkhorn_knopp(jnp.asarray(scores, jnp.float32), 0.07, 3))
    want = _numpy_sinkhorn(scores, 0.07)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Rows (samples) are distributions; iterated on, prototypes are used equally (B / K each).
    np.testing.assert_allclose(got.sum(1), 1, rtol=1e-5)
    converged = np.asarray(objective.sinkhorn_knopp(jnp.asarray(scores, jnp.float32), 0.07, 200))
    np.testing.assert_allclose(converged.sum(0), 12 / 7, rtol=1e-3)


def test_sinkhorn_knopp_ignores_invalid_rows():
    rng = np.random.default_rng(1)
    scores = rng.uniform(-1, 1, (10, 5))
    valid = np.arange(10) < 6
    got = np.asarray(objective.sinkhorn_knopp(jnp.asarray(scores), 0.1, 3, jnp.asarray(valid)))
    np.testing.assert_allclose(got[:6], _numpy_sinkhorn(scores[:6], 0.1), rtol=1e-4, atol=1e-6)
    assert not got[6:].any()


def test_dino_loss_equals_numpy_cross_entropy():
    rng = np.random.default_rng(2)
    b, n, k, temp = 3, 4, 6, 0.1
    s_global, s_local = rng.normal(size=(b, 2, k)), rng.normal(size=(b, n, k))
    t = rng.dirichlet(np.ones(k), size=(b, 2))
    pairs = []
    for i in range(2):  # student global crop i against the teacher's other global crop
        pairs.append(-(t[:, 1 - i] * _log_softmax(s_global[:, i] / temp)).sum(-1).mean())
    for j in range(n):
        for i in range(2):
            pairs.append(-(t[:, i] * _log_softmax(s_local[:, j] / temp)).sum(-1).mean())
    got = objective.dino_loss(jnp.asarray(s_global), jnp.asarray(s_local), jnp.asarray(t), temp)
    np.testing.assert_allclose(float(got), np.mean(pairs), rtol=1e-5)


def test_ibot_loss_only_over_masked_patches():
    rng = np.random.default_rng(3)
    images, slots, k, temp = 4, 5, 6, 0.1
    s, t = rng.normal(size=(images, slots, k)), rng.dirichlet(np.ones(k), size=(images, slots))
    valid = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0] * 5, [1, 1, 1, 1, 1]], bool)
    ce = -(t * _log_softmax(s / temp)).sum(-1)
    want = np.mean([ce[i][valid[i]].mean() if valid[i].any() else 0.0 for i in range(images)])
    # The step's flat layout: the masked patches of all images, then padding.
    weights = (valid / np.maximum(valid.sum(1, keepdims=True), 1))[valid]
    flat_s, flat_t = s[valid], t[valid]
    pad = 3
    flat_s = np.concatenate([flat_s, rng.normal(size=(pad, k))])
    flat_t = np.concatenate([flat_t, np.zeros((pad, k))])
    weights = np.concatenate([weights, np.zeros(pad)])
    got = objective.ibot_loss(*map(jnp.asarray, (flat_s, flat_t, weights)), images, temp)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Changing the student at padding slots changes nothing.
    flat_s[-pad:] = rng.normal(size=(pad, k)) * 10
    got2 = objective.ibot_loss(*map(jnp.asarray, (flat_s, flat_t, weights)), images, temp)
    assert float(got2) == pytest.approx(float(got), rel=1e-6)


def test_koleo_equals_nearest_neighbour_reference():
    x = np.random.default_rng(4).normal(size=(9, 5))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(u[:, None] - u[None], axis=-1) + np.diag(np.full(9, np.inf))
    want = -np.log(d.min(1) + 1e-8).mean()
    np.testing.assert_allclose(float(objective.koleo_loss(jnp.asarray(x))), want, rtol=1e-4)


def _depends_on_inputs(closed, which):
    """Whether each output of a jaxpr depends on the inputs at positions `which`."""
    jaxpr = closed.jaxpr
    dependent = {v for i, v in enumerate(jaxpr.invars) if i in which}
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, jex_core.Literal) and v in dependent for v in eqn.invars):
            dependent.update(eqn.outvars)
    return [not isinstance(v, jex_core.Literal) and v in dependent for v in jaxpr.outvars]


def test_teacher_gets_no_gradient():
    """The gradient with respect to the teacher is a constant (zero): nothing flows back."""
    from cxrjax.models import create_model
    from cxrjax.ssl.config import ssl_base_config
    from cxrjax.ssl.step import build_heads, make_loss
    from cxrjax.ssl.trainer import _student_shapes, crop_options

    c = ssl_base_config("t")
    c.crops.global_size, c.crops.local_size, c.crops.num_local = 16, 8, 1
    c.ssl.prototypes, c.ssl.head_hidden_dim, c.ssl.head_bottleneck_dim = 16, 16, 8
    model = create_model("vit_tiny_demo", 0, image_size=16, dtype="float32")
    heads = build_heads(c)
    loss_fn = make_loss(model, heads, crop_options(c, 8), c.ssl, jnp.zeros(3), jnp.ones(3))
    student = jax.eval_shape(lambda: _student_shapes(model, heads, 16))
    teacher = {k: v for k, v in student.items() if k != "mask_token"}
    batch = {
        "global": jax.ShapeDtypeStruct((4, 2, 16, 16), jnp.uint8),
        "local": jax.ShapeDtypeStruct((4, 1, 8, 8), jnp.uint8),
        "mask": jax.ShapeDtypeStruct((4, 2, 4), jnp.bool_),
    }

    def grads(student, teacher, batch):
        return jax.grad(lambda s, t: loss_fn(s, t, batch, jax.random.key(0), 0.05)[0], (0, 1))(
            student, teacher
        )

    closed = jax.make_jaxpr(grads)(student, teacher, batch)
    n_student = len(jax.tree.leaves(student))
    inputs = range(len(closed.jaxpr.invars))
    flows = _depends_on_inputs(closed, set(inputs))
    student_grads, teacher_grads = flows[:n_student], flows[n_student:]
    assert len(teacher_grads) == len(jax.tree.leaves(teacher))
    assert not any(teacher_grads), "a teacher gradient depends on the inputs"
    assert all(student_grads), "a student gradient is a constant"


def test_schedules_follow_dinov2():
    from cxrjax.ssl import schedules

    s = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            min_lr=1e-6,
            warmup_epochs=1,
            wd=0.04,
            wd_end=0.2,
            momentum=0.992,
            warmup_teacher_temp=0.04,
            teacher_temp=0.07,
            teacher_temp_warmup_epochs=2,
        )
    )
    sch = schedules.make_schedules(s, total_steps=101, steps_per_epoch=10)
    assert float(sch.momentum(0)) == pytest.approx(0.992)
    assert float(sch.momentum(100)) == pytest.approx(1.0, abs=1e-4)
    assert float(sch.wd(0)) == pytest.approx(0.04)
    assert float(sch.wd(100)) == pytest.approx(0.2, abs=1e-3)
    assert float(sch.teacher_temp(0)) == pytest.approx(0.04)
    assert float(sch.teacher_temp(10)) == pytest.approx(0.055)
    assert float(sch.teacher_temp(50)) == pytest.approx(0.07)
    assert float(sch.lr(0)) == 0 and float(sch.lr(10)) == pytest.approx(1e-3)
    assert float(sch.lr(100)) == pytest.approx(1e-6, abs=1e-6)


def _numpy_dino_v1_teacher(outputs, temp, momentum=0.9):
    """DINOv1's DINOLoss teacher side, line by line, in float64: the targets of each batch of
    `outputs` (a sequence of (N, K) teacher scores) with the centre updated after each."""
    center = np.zeros((1, outputs[0].shape[1]))
    targets = []
    for teacher_output in outputs:
        x = (teacher_output - center) / temp
        e = np.exp(x - x.max(-1, keepdims=True))
        targets.append(e / e.sum(-1, keepdims=True))
        batch_center = np.sum(teacher_output, axis=0, keepdims=True) / len(teacher_output)
        center = center * momentum + batch_center * (1 - momentum)
    return targets, center[0]


def test_centering_matches_dino_v1_over_several_batches():
    rng = np.random.default_rng(5)
    outputs = [rng.normal(size=(6, 9)) + 2.0 * np.arange(9) / 9 for _ in range(4)]
    want, want_center = _numpy_dino_v1_teacher(outputs, 0.04, 0.9)
    center = jnp.zeros(9)
    for scores, expected in zip(outputs, want, strict=True):
        scores = jnp.asarray(scores, jnp.float32)
        got = np.asarray(objective.center_teacher(scores, center, 0.04))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
        center = objective.updated_center(center, scores, 0.9)
    np.testing.assert_allclose(np.asarray(center), want_center, rtol=1e-5, atol=1e-6)
    # A prototype every sample favours is pulled back: after the updates, the favoured last
    # columns carry less target mass than the raw softmax gives them.
    raw = np.asarray(jax.nn.softmax(jnp.asarray(outputs[-1]) / 0.04, axis=-1))
    assert want[-1][:, -1].mean() < raw[:, -1].mean()


def test_centering_ignores_invalid_rows():
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(8, 5))
    valid = np.arange(8) < 5
    targets = np.asarray(
        objective.center_teacher(jnp.asarray(scores), jnp.ones(5), 0.1, jnp.asarray(valid))
    )
    assert not targets[5:].any()
    np.testing.assert_allclose(targets[:5].sum(1), 1, rtol=1e-5)
    center = objective.updated_center(jnp.zeros(5), jnp.asarray(scores), 0.5, jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(center), 0.5 * scores[:5].mean(0), rtol=1e-5)
