"""Vision Transformer in Flax Linen covering classic AugReg ViTs and DINOv2 (big_vision style).

Parameters are a plain pytree; names follow big_vision (``embedding``, ``cls``, ``pos_embedding``,
``block_N``, ``encoder_norm``, ``head``) so the AugReg ``.npz`` maps almost one to one and
the converters in :mod:`cxrjax.models.convert` stay simple.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.posemb import resample_posemb

Dtype = Any

# big_vision's initialisers: these only matter when training from scratch.
_dense_kernel_init = nn.initializers.xavier_uniform()
_dense_bias_init = nn.initializers.normal(stddev=1e-6)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (DINOv2 / CaiT)."""

    init_value: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * scale.astype(self.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, rescaling survivors."""

    rate: float

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("dropout")
        mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Attention(nn.Module):
    """Multi-head self-attention through ``jax.nn.dot_product_attention`` (cuDNN on GPU)."""

    num_heads: int
    impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def proj(name: str) -> jnp.ndarray:
            return nn.DenseGeneral(
                (self.num_heads, head_dim),
                dtype=self.dtype,
                kernel_init=_dense_kernel_init,
                bias_init=nn.initializers.zeros,
                name=name,
            )(x)

        q, k, v = proj("query"), proj("key"), proj("value")
        impl = None if self.impl == "auto" else self.impl
        if self.impl == "auto" and jax.default_backend() == "gpu" and self.dtype != jnp.float32:
            # jax defaults to the XLA path; cuDNN's flash kernel needs bf16/fp16 and must be asked.
            impl = "cudnn"
        y = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=_dense_kernel_init,
            bias_init=nn.initializers.zeros,
            name="out",
        )(y)


class Mlp(nn.Module):
    """Transformer MLP: GELU (exact or tanh) or SwiGLU (DINOv2 ViT-g)."""

    hidden_dim: int
    kind: str = "gelu"
    gelu_approximate: bool = False
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        width = x.shape[-1]
        dense = dict(dtype=self.dtype, kernel_init=_dense_kernel_init, bias_init=_dense_bias_init)
        if self.kind == "gelu":
            h = nn.Dense(self.hidden_dim, name="fc1", **dense)(x)
            h = nn.gelu(h, approximate=self.gelu_approximate)
        elif self.kind == "swiglu":
            # fc1 packs both halves, as timm's SwiGLUPacked and DINOv2's w12 do.
            h = nn.Dense(2 * self.hidden_dim, name="fc1", **dense)(x)
            h1, h2 = jnp.split(h, 2, axis=-1)
            h = nn.silu(h1) * h2
        else:
            raise ValueError(f"Unknown mlp kind {self.kind!r}; use 'gelu' or 'swiglu'")
        h = nn.Dropout(self.dropout)(h, deterministic)
        h = nn.Dense(width, name="fc2", **dense)(h)
        return nn.Dropout(self.dropout)(h, deterministic)


class Block(nn.Module):
    """Pre-norm transformer block with optional LayerScale and stochastic depth."""

    num_heads: int
    mlp_dim: int
    mlp_kind: str = "gelu"
    gelu_approximate: bool = False
    layerscale_init: float | None = None
    layernorm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path: float = 0.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name=name)

        def scale(name: str, y: jnp.ndarray) -> jnp.ndarray:
            if self.layerscale_init is None:
                return y
            return LayerScale(self.layerscale_init, dtype=self.dtype, name=name)(y)

        y = Attention(self.num_heads, impl=self.attention_impl, dtype=self.dtype, name="attn")(
            norm("norm1")(x)
        )
        y = nn.Dropout(self.dropout)(y, deterministic)
        x = x + DropPath(self.drop_path)(scale("ls1", y), deterministic)
        y = Mlp(
            self.mlp_dim,
            kind=self.mlp_kind,
            gelu_approximate=self.gelu_approximate,
            dropout=self.dropout,
            dtype=self.dtype,
            name="mlp",
        )(norm("norm2")(x), deterministic)
        return x + DropPath(self.drop_path)(scale("ls2", y), deterministic)


class VisionTransformer(nn.Module):
    """ViT with a CLS token, optional register tokens, final norm and a linear multi-label head.

    ``num_classes=0`` builds a headless backbone that returns the normed CLS features.

    ``image_size`` fixes the stored position-embedding grid; other inputs whose sides are
    multiples of the patch size get the grid resampled on the fly by ``posemb_resample``, exactly
    as the reference implementation of that family does (so a DINOv2 model kept at 518 px and fed
    224 px images computes what the torch-hub model computes).
    """

    num_classes: int
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    mlp_kind: str = "gelu"
    gelu_approximate: bool = False
    image_size: int = 224
    num_registers: int = 0
    layerscale_init: float | None = None
    layernorm_eps: float = 1e-6
    posemb_resample: str = "timm"
    dropout: float = 0.0
    drop_path: float = 0.0
    head_zero_init: bool = True
    remat: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    def setup_check(self, images: jnp.ndarray) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Expected images of shape (B, H, W, 3), got {images.shape}")
        h, w = images.shape[1:3]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"Image size {h}x{w} is not divisible by the patch size {self.patch_size}; "
                "resize or crop the input to a multiple of it."
            )
        return h // self.patch_size, w // self.patch_size

    @nn.compact
    def __call__(
        self, images: jnp.ndarray, *, train: bool = False, return_features: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """Returns float32 logits (B, num_classes), and the normed CLS features when asked."""
        gh, gw = self.setup_check(images)
        deterministic = not train
        x = nn.Conv(
            self.width,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
            name="embedding",
        )(images.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, gh * gw, self.width)

        grid = self.image_size // self.patch_size
        posemb = self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=0.02),
            (1, 1 + grid * grid, self.width),
        )
        posemb = resample_posemb(posemb, 1, (gh, gw), self.posemb_resample, (grid, grid))
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(self.dtype), x], 1)
        x = x + posemb.astype(self.dtype)
        if self.num_registers:
            # Registers carry no position embedding and sit between CLS and patches (DINOv2).
            reg = self.param(
                "registers", nn.initializers.normal(1e-6), (1, self.num_registers, self.width)
            )
            reg = jnp.broadcast_to(reg, (b, self.num_registers, self.width)).astype(self.dtype)
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
        x = nn.Dropout(self.dropout)(x, deterministic)

        block_cls: Callable[..., nn.Module] = Block
        if self.remat:
            block_cls = nn.remat(Block, static_argnums=(2,))
        for i in range(self.depth):
            # Stochastic-depth rate grows linearly with depth, as in timm and DINOv2.
            dpr = self.drop_path * i / max(self.depth - 1, 1)
            x = block_cls(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                mlp_kind=self.mlp_kind,
                gelu_approximate=self.gelu_approximate,
                layerscale_init=self.layerscale_init,
                layernorm_eps=self.layernorm_eps,
                dropout=self.dropout,
                drop_path=dpr,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                name=f"block_{i}",
            )(x, deterministic)
        x = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="encoder_norm")(x)
        features = x[:, 0].astype(jnp.float32)
        if not self.num_classes:
            # A headless backbone (feature extraction) returns its CLS features as "logits".
            return (features, features) if return_features else features
        head_init = nn.initializers.zeros if self.head_zero_init else _dense_kernel_init
        logits = nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            kernel_init=head_init,
            bias_init=nn.initializers.zeros,
            name="head",
        )(features)
        if return_features:
            return logits, features
        return logits
