"""The XLA attention form against torch's scaled_dot_product_attention, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cxrjax.models.attention import attention_probs, dot_product_attention


def _inputs(scale: float):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((2, 11, 3, 8)) * scale).astype(np.float32) for _ in range(3)]


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: scores in the hundreds, exp would overflow
def test_matches_torch_forward_and_backward(scale):
    q, k, v = _inputs(scale)
    upstream = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v) * upstream)

    out = dot_product_attention(q, k, v)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    tq, tk, tv = (torch.from_numpy(a).permute(0, 2, 1, 3).requires_grad_() for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    (ref * torch.from_numpy(upstream).permute(0, 2, 1, 3)).sum().backward()
    np.testing.assert_allclose(out, ref.detach().permute(0, 2, 1, 3).numpy(), atol=2e-5 * scale)
    for got, t in zip(grads, (tq, tk, tv), strict=True):
        want = t.grad.permute(0, 2, 1, 3).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=1e-4)


def test_probs_are_the_weights_of_the_output():
    q, k, v = _inputs(1.0)
    probs = np.asarray(attention_probs(q, k))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    recomputed = np.einsum("bhts,bshd->bthd", probs, v)
    np.testing.assert_allclose(recomputed, dot_product_attention(q, k, v), atol=1e-6)
    assert np.abs(recomputed - v.mean(1, keepdims=True)).max() > 1e-2  # not uniform attention


def test_an_unknown_implementation_is_a_config_error():
    from cxrjax.errors import ConfigError

    q, k, v = _inputs(1.0)
    with pytest.raises(ConfigError, match="attention_impl"):
        dot_product_attention(q, k, v, "flash")
