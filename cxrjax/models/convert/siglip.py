"""SigLIP / SigLIP 2 / MedSigLIP image towers -> cxrjax parameter trees.

Sources: transformers folders of ``SiglipVisionModel`` or a whole ``SiglipModel`` (the image
tower is taken, the text tower left out), ``Siglip2VisionModel`` folders (its patch embedding is
a linear layer over (row, column, channel)-flattened patches, the same weights as a convolution),
and big_vision ``.npz`` files (``params/img/...``, blocks scanned or not). The image tower has no
CLS token, a learned position embedding on the patches only, tanh-GELU MLPs and the MAP
attention-pooling head whose output is the image embedding (``pooler_output``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cxrjax.models.convert.big_vision import unscan
from cxrjax.models.convert.common import Converted, Keys, block_count, qkv_kernel
from cxrjax.models.weights import CheckpointError

_VISION_TYPES = ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")


def _arch(p: dict[str, Any], depth: int, heads: int, eps: float, resample: str) -> dict[str, Any]:
    kernel = p["embedding"]["kernel"]
    grid = int(round(p["pos_embedding"].shape[1] ** 0.5))
    if grid * grid != p["pos_embedding"].shape[1]:
        raise CheckpointError(
            f"position embedding of {p['pos_embedding'].shape[1]} patches is not a square grid"
        )
    return dict(
        patch_size=int(kernel.shape[0]),
        width=int(kernel.shape[-1]),
        depth=depth,
        num_heads=heads,
        mlp_dim=int(p["block_0"]["mlp"]["fc1"]["kernel"].shape[1]),
        mlp_kind="gelu",
        gelu_approximate=True,
        class_token=False,
        num_registers=0,
        layerscale_init=None,
        layernorm_eps=eps,
        pool="map",
        posemb_resample=resample,
        image_size=grid * int(kernel.shape[0]),
    )


def convert_hf(
    sd: Mapping[str, np.ndarray], config: Mapping[str, Any], *, source: str = "HF folder"
) -> Converted:
    """transformers ``SiglipVisionModel`` / ``SiglipModel`` / ``Siglip2VisionModel`` -> cxrjax."""
    cfg = config.get("vision_config") or config
    prefix = "vision_model." if any(key.startswith("vision_model.") for key in sd) else ""
    # A whole SiglipModel: only the image tower is converted; the text tower is not "unused".
    k = Keys({key: v for key, v in sd.items() if key.startswith(prefix)}, source)
    heads = int(cfg.get("num_attention_heads", 12))
    if not cfg.get("vision_use_head", True) or prefix + "head.probe" not in k:
        raise CheckpointError(
            f"{source}: this SigLIP image tower has no MAP head (vision_use_head=false, e.g. a "
            "PaliGemma encoder); cxrjax's SigLIP features are the MAP head's output"
        )
    act = cfg.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise CheckpointError(f"{source}: hidden_act {act!r}; SigLIP uses tanh GELU")
    e = prefix + "embeddings."
    w = k[e + "patch_embedding.weight"]
    if w.ndim == 2:
        # Siglip2's Linear over patches flattened as (row, column, channel).
        patch = int(cfg["patch_size"])
        kernel = w.T.reshape(patch, patch, 3, w.shape[0])
    else:
        kernel = w.transpose(2, 3, 1, 0)
    p: dict[str, Any] = {
        "embedding": {"kernel": kernel, "bias": k[e + "patch_embedding.bias"]},
        "pos_embedding": k[e + "position_embedding.weight"][None],
    }
    width = kernel.shape[-1]
    hd = width // heads

    def lin(name: str) -> dict[str, np.ndarray]:
        return {"kernel": k[name + ".weight"].T, "bias": k[name + ".bias"]}

    def heads_of(wt: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        return {"kernel": qkv_kernel(wt, heads), "bias": b.reshape(heads, hd)}

    def out_of(wt: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        return {"kernel": wt.T.reshape(heads, hd, width), "bias": b}

    def ln(name: str) -> dict[str, np.ndarray]:
        return {"scale": k[name + ".weight"], "bias": k[name + ".bias"]}

    enc = prefix + "encoder.layers."
    depth = block_count(k.sd, re.escape(enc) + r"(\d+)\.")
    for i in range(depth):
        b, a = f"{enc}{i}.", f"{enc}{i}.self_attn."
        attn = {
            n: heads_of(k[f"{a}{n[0]}_proj.weight"], k[f"{a}{n[0]}_proj.bias"])
            for n in ("query", "key", "value")
        }
        attn["out"] = out_of(k[a + "out_proj.weight"], k[a + "out_proj.bias"])
        p[f"block_{i}"] = {
            "norm1": ln(b + "layer_norm1"),
            "norm2": ln(b + "layer_norm2"),
            "attn": attn,
            "mlp": {"fc1": lin(b + "mlp.fc1"), "fc2": lin(b + "mlp.fc2")},
        }
    p["encoder_norm"] = ln(prefix + "post_layernorm")
    h = prefix + "head."
    in_w = np.split(k[h + "attention.in_proj_weight"], 3)
    in_b = np.split(k[h + "attention.in_proj_bias"], 3)
    p["map_head"] = {
        "probe": k[h + "probe"],
        **{
            n: heads_of(wt, bb)
            for n, wt, bb in zip(("query", "key", "value"), in_w, in_b, strict=True)
        },
        "out": out_of(k[h + "attention.out_proj.weight"], k[h + "attention.out_proj.bias"]),
        "norm": ln(h + "layernorm"),
        "mlp": {"fc1": lin(h + "mlp.fc1"), "fc2": lin(h + "mlp.fc2")},
    }
    # SiglipVisionModel resamples like transformers' ViTs; Siglip2 with antialiased bilinear.
    resample = "siglip2" if w.ndim == 2 else "hf"
    arch = _arch(p, depth, heads, float(cfg.get("layer_norm_eps", 1e-6)), resample)
    return Converted(p, arch, "hf", k.unused())


def is_big_vision_siglip(npz: Mapping[str, np.ndarray]) -> bool:
    return any(key.removeprefix("params/").startswith("img/") for key in npz)


def convert_big_vision(npz: Mapping[str, np.ndarray], *, source: str = "npz") -> Converted:
    """A big_vision SigLIP ``.npz`` (``params/img/...``; the text tower is left out) -> cxrjax."""
    img = {
        key.removeprefix("params/").removeprefix("img/"): v
        for key, v in npz.items()
        if key.removeprefix("params/").startswith("img/")
    }
    t = "Transformer/"
    img = unscan(img, t + "encoderblock")
    k = Keys(img, source)
    p: dict[str, Any] = {
        "embedding": {"kernel": k["embedding/kernel"], "bias": k["embedding/bias"]},
        "pos_embedding": k["pos_embedding"],
        "encoder_norm": {"scale": k[t + "encoder_norm/scale"], "bias": k[t + "encoder_norm/bias"]},
    }

    def dense(base: str) -> dict[str, np.ndarray]:
        return {"kernel": k[base + "/kernel"], "bias": k[base + "/bias"]}

    def norm(base: str) -> dict[str, np.ndarray]:
        return {"scale": k[base + "/scale"], "bias": k[base + "/bias"]}

    def mlp(base: str) -> dict[str, Any]:
        return {"fc1": dense(base + "/Dense_0"), "fc2": dense(base + "/Dense_1")}

    depth = block_count(img, re.escape(t) + r"encoderblock_(\d+)/")
    for i in range(depth):
        b = f"{t}encoderblock_{i}/"
        p[f"block_{i}"] = {
            "norm1": norm(b + "LayerNorm_0"),
            "norm2": norm(b + "LayerNorm_1"),
            "attn": {
                n: dense(f"{b}MultiHeadDotProductAttention_0/{n}")
                for n in ("query", "key", "value", "out")
            },
            "mlp": mlp(b + "MlpBlock_0"),
        }
    m = "MAPHead_0/"
    if m + "probe" not in k:
        raise CheckpointError(f"{source}: no img/MAPHead_0: not a SigLIP image tower (pool 'map')")
    p["map_head"] = {
        "probe": k[m + "probe"],
        **{
            n: dense(f"{m}MultiHeadDotProductAttention_0/{n}")
            for n in ("query", "key", "value", "out")
        },
        "norm": norm(m + "LayerNorm_0"),
        "mlp": mlp(m + "MlpBlock_0"),
    }
    heads = int(p["block_0"]["attn"]["query"]["kernel"].shape[1])
    # big_vision resamples with jax.image.resize; cxrjax's SigLIP tags use transformers' rule.
    arch = _arch(p, depth, heads, 1e-6, "hf")
    return Converted(p, arch, "big_vision_npz", k.unused())


def is_siglip_config(config: Mapping[str, Any]) -> bool:
    return config.get("model_type") in _VISION_TYPES
