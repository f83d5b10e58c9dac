"""Vision Transformer in Flax Linen: AugReg ViTs, DINOv2, DINOv3 and SigLIP image towers.

(Slightly over ~400 lines: one module per transformer part, kept beside the model that uses them.)

Parameters are a plain pytree; names follow big_vision (``embedding``, ``cls``, ``pos_embedding``,
``block_N``, ``encoder_norm``, ``map_head``, ``head``) so the AugReg ``.npz`` maps almost one to
one and the converters in :mod:`cxrjax.models.convert` stay simple. The families differ only in
options: learned absolute position embeddings (with or without a CLS token) or DINOv3's 2-D RoPE,
a key bias or none, GELU (exact or tanh) or SwiGLU, and CLS, mean-patch or MAP pooling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.errors import ConfigError
from cxrjax.models.attention import dot_product_attention
from cxrjax.models.lora import LORA_TARGETS, Projection, lora_scale
from cxrjax.models.posemb import resample_posemb
from cxrjax.models.rope import rope_tables

Dtype = Any
Rope = tuple[jnp.ndarray, jnp.ndarray] | None
POOLS = ("cls", "mean", "cls_mean", "map")

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
    """Multi-head self-attention (:mod:`cxrjax.models.attention`: cuDNN on GPU, XLA otherwise).

    ``key_bias=False`` drops the key bias (DINOv3 masks it to zero; softmax is invariant to it
    anyway). ``rope`` rotates the patch tokens of queries and keys inside their projections.
    """

    num_heads: int
    impl: str = "auto"
    key_bias: bool = True
    lora_rank: int = 0
    lora_scale: float = 1.0
    lora_targets: tuple[str, ...] = ()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, rope: Rope = None) -> jnp.ndarray:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ConfigError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def proj(name: str, features: tuple[int, ...], axis: tuple[int, ...], **kw: Any):
            return Projection(
                features,
                axis=axis,
                kernel_init=_dense_kernel_init,
                bias_init=nn.initializers.zeros,
                lora_rank=self.lora_rank if name in self.lora_targets else 0,
                lora_scale=self.lora_scale,
                dtype=self.dtype,
                name=name,
                **kw,
            )

        heads = (self.num_heads, head_dim)
        q = proj("query", heads, (-1,))(x, rope)
        k = proj("key", heads, (-1,), use_bias=self.key_bias)(x, rope)
        v = proj("value", heads, (-1,))(x)
        y = dot_product_attention(q, k, v, _attention_impl(self))
        return proj("out", (width,), (-2, -1))(y)


def _attention_impl(module: nn.Module) -> str:
    if module.impl != "auto":
        return module.impl
    if jax.default_backend() == "gpu" and module.dtype != jnp.float32:
        # cuDNN's flash kernel needs bf16/fp16 and must be asked for.
        return "cudnn"
    return "xla"


class Mlp(nn.Module):
    """Transformer MLP: GELU (exact or tanh) or SwiGLU (DINOv2 ViT-g, DINOv3 ViT-S+)."""

    hidden_dim: int
    kind: str = "gelu"
    gelu_approximate: bool = False
    dropout: float = 0.0
    lora_rank: int = 0
    lora_scale: float = 1.0
    lora_targets: tuple[str, ...] = ()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        def dense(name: str, features: int) -> Projection:
            return Projection(
                (features,),
                kernel_init=_dense_kernel_init,
                bias_init=_dense_bias_init,
                lora_rank=self.lora_rank if name in self.lora_targets else 0,
                lora_scale=self.lora_scale,
                dtype=self.dtype,
                name=name,
            )

        width = x.shape[-1]
        if self.kind == "gelu":
            h = dense("fc1", self.hidden_dim)(x)
            h = nn.gelu(h, approximate=self.gelu_approximate)
        elif self.kind == "swiglu":
            # fc1 packs both halves (gate, then value), as timm's SwiGLUPacked and DINOv2's w12.
            h = dense("fc1", 2 * self.hidden_dim)(x)
            h1, h2 = jnp.split(h, 2, axis=-1)
            h = nn.silu(h1) * h2
        else:
            raise ConfigError(f"Unknown mlp kind {self.kind!r}; use 'gelu' or 'swiglu'")
        h = nn.Dropout(self.dropout)(h, deterministic)
        h = dense("fc2", width)(h)
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
    key_bias: bool = True
    lora_rank: int = 0
    lora_scale: float = 1.0
    lora_targets: tuple[str, ...] = ()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool, rope: Rope = None) -> jnp.ndarray:
        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name=name)

        def scale(name: str, y: jnp.ndarray) -> jnp.ndarray:
            if self.layerscale_init is None:
                return y
            return LayerScale(self.layerscale_init, dtype=self.dtype, name=name)(y)

        lora = dict(
            lora_rank=self.lora_rank, lora_scale=self.lora_scale, lora_targets=self.lora_targets
        )
        y = Attention(
            self.num_heads,
            impl=self.attention_impl,
            key_bias=self.key_bias,
            dtype=self.dtype,
            name="attn",
            **lora,
        )(norm("norm1")(x), rope)
        y = nn.Dropout(self.dropout)(y, deterministic)
        x = x + DropPath(self.drop_path)(scale("ls1", y), deterministic)
        y = Mlp(
            self.mlp_dim,
            kind=self.mlp_kind,
            gelu_approximate=self.gelu_approximate,
            dropout=self.dropout,
            dtype=self.dtype,
            name="mlp",
            **lora,
        )(norm("norm2")(x), deterministic)
        return x + DropPath(self.drop_path)(scale("ls2", y), deterministic)


class MAPHead(nn.Module):
    """Multi-head attention pooling (big_vision ``MAPHead``, SigLIP's ``head``).

    A learned probe attends over all tokens; a LayerNorm + MLP residual follows. Returns (B, D).
    """

    num_heads: int
    mlp_dim: int
    gelu_approximate: bool = True
    layernorm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, _, width = x.shape
        head_dim = width // self.num_heads
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width))
        probe = jnp.broadcast_to(probe, (b, 1, width)).astype(self.dtype)

        def proj(name: str, features: tuple[int, ...], axis: tuple[int, ...]) -> Projection:
            return Projection(
                features, axis=axis, kernel_init=_dense_kernel_init, dtype=self.dtype, name=name
            )

        heads = (self.num_heads, head_dim)
        q = proj("query", heads, (-1,))(probe)
        k, v = proj("key", heads, (-1,))(x), proj("value", heads, (-1,))(x)
        y = dot_product_attention(q, k, v)
        y = proj("out", (width,), (-2, -1))(y)
        h = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="norm")(y)
        y = y + Mlp(
            self.mlp_dim, gelu_approximate=self.gelu_approximate, dtype=self.dtype, name="mlp"
        )(h, True)
        return y[:, 0]


class VisionTransformer(nn.Module):
    """ViT with optional CLS and register tokens, final norm, pooling and a linear head.

    ``num_classes=0`` builds a headless backbone that returns its pooled features.

    Position information: ``posemb="learned"`` (big_vision layout: one embedding per patch, plus
    one for the CLS token when there is one) or ``"rope"`` (DINOv3: no stored embedding, any
    grid). A learned ``image_size`` grid fed other inputs whose sides are multiples of the patch
    size is resampled on the fly by ``posemb_resample``, exactly as the reference implementation
    of that family does (so a DINOv2 model kept at 518 px and fed 224 px images computes what the
    torch-hub model computes).

    ``pool``: "cls" (the normed CLS token), "mean" (mean of the normed patch tokens), "cls_mean"
    (both concatenated, DINOv2/v3's linear-probe features) or "map" (attention pooling, SigLIP).
    ``lora_rank > 0`` adds LoRA adapters to the ``lora_targets`` projections of every block.
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
    class_token: bool = True
    num_registers: int = 0
    posemb: str = "learned"
    rope_base: float = 100.0
    key_bias: bool = True
    layerscale_init: float | None = None
    layernorm_eps: float = 1e-6
    posemb_resample: str = "timm"
    pool: str = "cls"
    dropout: float = 0.0
    drop_path: float = 0.0
    head_zero_init: bool = True
    remat: bool = False
    attention_impl: str = "auto"
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("query", "value")
    dtype: Dtype = jnp.float32

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the CLS token (if any) and the registers."""
        return int(self.class_token) + self.num_registers

    def patch_grid(self, images: jnp.ndarray) -> tuple[int, int]:
        """The (rows, columns) patch grid of (B, H, W, 3) ``images``; checks the options too."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"Expected images of shape (B, H, W, 3), got {images.shape}")
        if self.pool not in POOLS or (self.pool in ("cls", "cls_mean") and not self.class_token):
            raise ConfigError(f"pool={self.pool!r} needs one of {POOLS} (cls needs a CLS token)")
        if self.posemb not in ("learned", "rope"):
            raise ConfigError(f"posemb={self.posemb!r}: use 'learned' or 'rope'")
        if set(self.lora_targets) - set(LORA_TARGETS):
            raise ConfigError(f"lora_targets {self.lora_targets}: choose from {LORA_TARGETS}")
        h, w = images.shape[1:3]
        if h % self.patch_size or w % self.patch_size:
            raise ConfigError(
                f"Image size {h}x{w} is not divisible by the patch size {self.patch_size}; "
                "resize or crop the input to a multiple of it."
            )
        return h // self.patch_size, w // self.patch_size

    @nn.compact
    def __call__(
        self, images: jnp.ndarray, *, train: bool = False, return_features: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """Returns float32 logits (B, num_classes), and the pooled features when asked."""
        gh, gw = self.patch_grid(images)
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
        n_cls = int(self.class_token)
        posemb, rope = None, None
        if self.posemb == "learned":
            grid = self.image_size // self.patch_size
            posemb = self.param(
                "pos_embedding",
                nn.initializers.normal(stddev=0.02),
                (1, n_cls + grid * grid, self.width),
            )
            posemb = resample_posemb(posemb, n_cls, (gh, gw), self.posemb_resample, (grid, grid))
        else:
            head_dim = self.width // self.num_heads
            rope = tuple(jnp.asarray(t) for t in rope_tables(gh, gw, head_dim, self.rope_base))
        if self.class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
            cls = jnp.broadcast_to(cls, (b, 1, self.width)).astype(self.dtype)
            x = jnp.concatenate([cls, x], 1)
        if posemb is not None:
            x = x + posemb.astype(self.dtype)
        if self.num_registers:
            # Registers carry no position embedding and sit between CLS and patches (DINOv2/v3).
            reg = self.param(
                "registers", nn.initializers.normal(1e-6), (1, self.num_registers, self.width)
            )
            reg = jnp.broadcast_to(reg, (b, self.num_registers, self.width)).astype(self.dtype)
            x = jnp.concatenate([x[:, :n_cls], reg, x[:, n_cls:]], axis=1)
        x = nn.Dropout(self.dropout)(x, deterministic)

        block_cls: Callable[..., nn.Module] = Block
        if self.remat:
            block_cls = nn.remat(Block, static_argnums=(2,))
        lora_rank = self.lora_rank
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
                key_bias=self.key_bias,
                lora_rank=lora_rank,
                lora_scale=lora_scale(lora_rank, self.lora_alpha) if lora_rank else 1.0,
                lora_targets=tuple(self.lora_targets),
                dtype=self.dtype,
                name=f"block_{i}",
            )(x, deterministic, rope)
        x = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="encoder_norm")(x)
        features = self._pool(x).astype(jnp.float32)
        if not self.num_classes:
            # A headless backbone (feature extraction) returns its pooled features as "logits".
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

    def _pool(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.pool == "map":
            return MAPHead(
                self.num_heads,
                self.mlp_dim,
                gelu_approximate=self.gelu_approximate,
                layernorm_eps=self.layernorm_eps,
                dtype=self.dtype,
                name="map_head",
            )(x)
        patches = x[:, self.num_prefix_tokens :].mean(axis=1)
        if self.pool == "mean":
            return patches
        if self.pool == "cls_mean":
            return jnp.concatenate([x[:, 0], patches], axis=-1)
        return x[:, 0]
