"""DINOv3 ViT checkpoints -> cxrjax parameter trees (official torch hub, transformers, timm).

The three layouts differ only in names: the official ``.pth`` (``storage_tokens``, fused
``attn.qkv`` with a ``bias_mask`` that zeroes the key bias, ``ls1.gamma``, ``mlp.w1/w2/w3`` for
SwiGLU, ``rope_embed.periods``), transformers' ``DINOv3ViTModel`` (``embeddings.*``,
``[model.]layer.N.attention.{q,k,v,o}_proj``, ``layer_scale1.lambda1``, ``mlp.gate/up/down_proj``)
and timm's ``vit_*_patch16_dinov3`` Eva models (``reg_token``, fused ``attn.qkv`` with separate
``q_bias``/``v_bias``, ``gamma_1``, ``mlp.fc1_g/fc1_x``). The key bias is dropped: every source
fixes it at zero (under RoPE it would not cancel in the softmax). Absent query/value biases (timm's
non-``qkvb`` models) become zeros, so one cxrjax architecture serves every source. The trained
``mask_token`` of the official and transformers files is kept (see :mod:`.common`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cxrjax.models import rope
from cxrjax.models.convert.common import (
    Converted,
    Keys,
    block_count,
    qkv_kernel,
    take_mask_token,
)
from cxrjax.models.weights import CheckpointError


def _ln(k: Keys, name: str) -> dict[str, np.ndarray]:
    return {"scale": k[name + ".weight"], "bias": k[name + ".bias"]}


def _linear(w: np.ndarray, b: np.ndarray | None) -> dict[str, np.ndarray]:
    return {"kernel": w.T, "bias": np.zeros(w.shape[0], w.dtype) if b is None else b}


def _block(
    qkv: tuple[np.ndarray, ...],
    qv_bias: tuple[np.ndarray | None, np.ndarray | None],
    out: tuple[np.ndarray, np.ndarray],
    norms: tuple[dict, dict],
    mlp: tuple[dict, dict],
    scales: tuple[np.ndarray, np.ndarray],
    heads: int,
) -> dict[str, Any]:
    """One block from torch (out, in) matrices; ``mlp`` = (fc1, fc2) already in cxrjax form."""
    (qw, kw, vw), (qb, vb), (ow, ob) = qkv, qv_bias, out
    width = qw.shape[1]
    hd = width // heads

    def heads_of(w: np.ndarray, b: np.ndarray | None) -> dict[str, np.ndarray]:
        b = np.zeros(w.shape[0], w.dtype) if b is None else b
        return {"kernel": qkv_kernel(w, heads), "bias": b.reshape(heads, hd)}

    return {
        "norm1": norms[0],
        "norm2": norms[1],
        "attn": {
            "query": heads_of(qw, qb),
            "key": {"kernel": qkv_kernel(kw, heads)},
            "value": heads_of(vw, vb),
            "out": {"kernel": ow.T.reshape(heads, hd, width), "bias": ob},
        },
        "mlp": {"fc1": mlp[0], "fc2": mlp[1]},
        "ls1": {"scale": scales[0]},
        "ls2": {"scale": scales[1]},
    }


def _swiglu(gate: dict[str, np.ndarray], up: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # cxrjax packs SwiGLU's first layer as [gate | value]: silu(first half) * second half.
    return {
        "kernel": np.concatenate([gate["kernel"], up["kernel"]], axis=1),
        "bias": np.concatenate([gate["bias"], up["bias"]]),
    }


def _split_qkv(w: np.ndarray, width: int, source: str, name: str) -> list[np.ndarray]:
    if w.shape[0] != 3 * width:
        raise CheckpointError(f"{source}: {name} has shape {w.shape}, expected 3 x {width} rows")
    return np.split(w, 3, axis=0)


def _zero_key_bias(kb: np.ndarray, source: str, name: str) -> None:
    if np.any(kb != 0):
        raise CheckpointError(
            f"{source}: {name} has a non-zero key bias; DINOv3 fixes it at zero (masked), and "
            "under RoPE cxrjax's DINOv3 has no key bias to put it in"
        )


def _arch(p: dict[str, Any], depth: int, heads: int, swiglu: bool, eps: float, size: int) -> dict:
    kernel = p["embedding"]["kernel"]
    hidden = p["block_0"]["mlp"]["fc1"]["kernel"].shape[1]
    return dict(
        patch_size=int(kernel.shape[0]),
        width=int(kernel.shape[-1]),
        depth=depth,
        num_heads=heads,
        mlp_dim=int(hidden // 2 if swiglu else hidden),
        mlp_kind="swiglu" if swiglu else "gelu",
        num_registers=int(p["registers"].shape[1]) if "registers" in p else 0,
        layerscale_init=1e-5,
        layernorm_eps=eps,
        posemb="rope",
        rope_base=100.0,
        key_bias=False,
        image_size=size,
    )


def _stem(k: Keys, patch: str, cls: str, registers: str, mask: str) -> dict[str, Any]:
    w = k[patch + ".weight"]
    p: dict[str, Any] = {
        "embedding": {"kernel": w.transpose(2, 3, 1, 0), "bias": k[patch + ".bias"]},
        "cls": k[cls],
    }
    if registers in k:
        p["registers"] = k[registers]
    take_mask_token(k, mask, p)
    return p


def convert_official(sd: Mapping[str, np.ndarray], *, source: str = "state dict") -> Converted:
    """The official DINOv3 torch-hub ``.pth`` (``DinoVisionTransformer``) -> cxrjax."""
    k = Keys(sd, source)
    p = _stem(k, "patch_embed.proj", "cls_token", "storage_tokens", "mask_token")
    width = p["embedding"]["kernel"].shape[-1]
    periods = k["rope_embed.periods"]
    head_dim = 4 * periods.shape[0]
    heads = width // head_dim
    if not np.allclose(periods, rope.periods(head_dim, 100.0), rtol=1e-5):
        raise CheckpointError(
            f"{source}: rope_embed.periods are not base 100 ** (4k / head_dim); RoPE with "
            "min/max periods is not supported"
        )
    depth = block_count(sd, r"blocks\.(\d+)\.")
    swiglu = "blocks.0.mlp.w1.weight" in k
    for i in range(depth):
        b = f"blocks.{i}."
        qw, kw, vw = _split_qkv(k[b + "attn.qkv.weight"], width, source, b + "attn.qkv.weight")
        qb = vb = None
        if b + "attn.qkv.bias" in k:
            qb, kb, vb = np.split(k[b + "attn.qkv.bias"], 3)
            if b + "attn.qkv.bias_mask" in k:
                kb = kb * np.split(k[b + "attn.qkv.bias_mask"], 3)[1]
            _zero_key_bias(kb, source, b + "attn.qkv.bias")
        if swiglu:
            fc1 = _swiglu(
                _linear(k[b + "mlp.w1.weight"], k[b + "mlp.w1.bias"]),
                _linear(k[b + "mlp.w2.weight"], k[b + "mlp.w2.bias"]),
            )
            fc2 = _linear(k[b + "mlp.w3.weight"], k[b + "mlp.w3.bias"])
        else:
            fc1 = _linear(k[b + "mlp.fc1.weight"], k[b + "mlp.fc1.bias"])
            fc2 = _linear(k[b + "mlp.fc2.weight"], k[b + "mlp.fc2.bias"])
        p[f"block_{i}"] = _block(
            (qw, kw, vw),
            (qb, vb),
            (k[b + "attn.proj.weight"], k[b + "attn.proj.bias"]),
            (_ln(k, b + "norm1"), _ln(k, b + "norm2")),
            (fc1, fc2),
            (k[b + "ls1.gamma"], k[b + "ls2.gamma"]),
            heads,
        )
    p["encoder_norm"] = _ln(k, "norm")
    arch = _arch(p, depth, heads, swiglu, 1e-5, 224)
    return Converted(p, arch, "dinov3", k.unused())


def convert_hf(
    sd: Mapping[str, np.ndarray], config: Mapping[str, Any], *, source: str = "HF folder"
) -> Converted:
    """transformers ``DINOv3ViTModel`` (a ``model_type: dinov3_vit`` folder) -> cxrjax."""
    k = Keys(sd, source)
    heads, width = int(config["num_attention_heads"]), int(config["hidden_size"])
    swiglu = bool(config.get("use_gated_mlp", False))
    act = config.get("hidden_act", "silu" if swiglu else "gelu")
    if act != ("silu" if swiglu else "gelu"):
        raise CheckpointError(f"{source}: hidden_act {act!r} with use_gated_mlp={swiglu}")
    if float(config.get("rope_theta", 100.0)) != 100.0:
        raise CheckpointError(f"{source}: rope_theta {config['rope_theta']} (cxrjax: 100)")
    e = "embeddings."
    p = _stem(k, e + "patch_embeddings", e + "cls_token", e + "register_tokens", e + "mask_token")
    # The first hub release names blocks 'layer.N', transformers 5 'model.layer.N'.
    enc = "model.layer." if any(key.startswith("model.layer.") for key in sd) else "layer."
    depth = block_count(sd, re.escape(enc) + r"(\d+)\.")

    def lin(name: str) -> dict[str, np.ndarray]:
        return _linear(k[name + ".weight"], k[name + ".bias"] if name + ".bias" in k else None)

    for i in range(depth):
        b = f"{enc}{i}."
        a = b + "attention."
        if a + "k_proj.bias" in k:
            _zero_key_bias(k[a + "k_proj.bias"], source, a + "k_proj.bias")
        opt = {
            n: k[a + n + ".bias"] if a + n + ".bias" in k else None for n in ("q_proj", "v_proj")
        }
        out = lin(a + "o_proj")
        if swiglu:
            fc1 = _swiglu(lin(b + "mlp.gate_proj"), lin(b + "mlp.up_proj"))
        else:
            fc1 = lin(b + "mlp.up_proj")
        p[f"block_{i}"] = _block(
            (k[a + "q_proj.weight"], k[a + "k_proj.weight"], k[a + "v_proj.weight"]),
            (opt["q_proj"], opt["v_proj"]),
            (out["kernel"].T, out["bias"]),
            (_ln(k, b + "norm1"), _ln(k, b + "norm2")),
            (fc1, lin(b + "mlp.down_proj")),
            (k[b + "layer_scale1.lambda1"], k[b + "layer_scale2.lambda1"]),
            heads,
        )
    p["encoder_norm"] = _ln(k, "norm")
    if width % heads:
        raise CheckpointError(f"{source}: hidden_size {width} not divisible by {heads} heads")
    size = config.get("image_size", 224)
    size = int(size[0] if isinstance(size, list | tuple) else size)
    arch = _arch(p, depth, heads, swiglu, float(config.get("layer_norm_eps", 1e-5)), size)
    return Converted(p, arch, "hf", k.unused())


def convert_timm(
    sd: Mapping[str, np.ndarray], *, num_heads: int, source: str = "state dict"
) -> Converted:
    """timm ``vit_*_patch16_dinov3[_qkvb]`` (Eva with DINOv3 RoPE) -> cxrjax."""
    k = Keys(sd, source)
    # timm drops DINOv3's mask token when it loads the weights: there is none to keep.
    p = _stem(k, "patch_embed.proj", "cls_token", "reg_token", "mask_token")
    width = p["embedding"]["kernel"].shape[-1]
    depth = block_count(sd, r"blocks\.(\d+)\.")
    swiglu = "blocks.0.mlp.fc1_g.weight" in k
    # RoPE buffers are derived from the shapes: nothing to convert.
    k.skip(*(key for key in sd if key.startswith("rope.")))

    def lin(name: str) -> dict[str, np.ndarray]:
        return _linear(k[name + ".weight"], k[name + ".bias"])

    for i in range(depth):
        b = f"blocks.{i}."
        qw, kw, vw = _split_qkv(k[b + "attn.qkv.weight"], width, source, b + "attn.qkv.weight")
        qb = k[b + "attn.q_bias"] if b + "attn.q_bias" in k else None
        vb = k[b + "attn.v_bias"] if b + "attn.v_bias" in k else None
        if swiglu:
            fc1 = _swiglu(lin(b + "mlp.fc1_g"), lin(b + "mlp.fc1_x"))
        else:
            fc1 = lin(b + "mlp.fc1")
        p[f"block_{i}"] = _block(
            (qw, kw, vw),
            (qb, vb),
            (k[b + "attn.proj.weight"], k[b + "attn.proj.bias"]),
            (_ln(k, b + "norm1"), _ln(k, b + "norm2")),
            (fc1, lin(b + "mlp.fc2")),
            (k[b + "gamma_1"], k[b + "gamma_2"]),
            num_heads,
        )
    p["encoder_norm"] = _ln(k, "norm")
    if "head.weight" in k and k.sd["head.weight"].ndim == 2:
        p["head"] = {"kernel": k["head.weight"].T, "bias": k["head.bias"]}
    arch = _arch(p, depth, num_heads, swiglu, 1e-5, 224)
    return Converted(p, arch, "timm", k.unused())
