"""Hugging Face transformers ViTs: ``ViTModel`` / ``ViTForImageClassification``, ``Dinov2Model``
and ``Dinov2WithRegistersModel`` folders (RAD-DINO is a ``Dinov2Model``) -> cxrjax.

DINOv3 and SigLIP folders have converters of their own (:mod:`.dinov3`, :mod:`.siglip`);
:func:`cxrjax.models.convert.source.convert_source` picks one from ``config.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrjax.models.convert.common import (
    Converted,
    Keys,
    block_count,
    qkv_kernel,
    read_state_dict,
    take_mask_token,
)
from cxrjax.models.weights import CheckpointError


def read_hf_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a transformers model folder."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: unreadable ({e})") from e


def read_hf_weights(folder: Path) -> dict[str, np.ndarray]:
    """The (unsharded) weights of a transformers model folder."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise CheckpointError(
        f"{folder}: no model.safetensors or pytorch_model.bin (sharded HF checkpoints: merge them)"
    )


def convert_hf(
    sd: Mapping[str, np.ndarray], config: Mapping[str, Any], *, source: str = "HF folder"
) -> Converted:
    """transformers ``ViTModel`` / ``Dinov2Model`` / ``Dinov2WithRegistersModel`` -> cxrjax."""
    prefix = ""
    for cand in ("vit.", "dinov2.", "dinov2_with_registers."):
        if any(key.startswith(cand + "embeddings.") for key in sd):
            prefix = cand
    k = Keys(sd, source)
    e = prefix + "embeddings."
    heads = int(config["num_attention_heads"])
    width = int(config["hidden_size"])
    hd = width // heads
    w = k[e + "patch_embeddings.projection.weight"]
    p: dict[str, Any] = {
        "embedding": {
            "kernel": w.transpose(2, 3, 1, 0),
            "bias": k[e + "patch_embeddings.projection.bias"],
        },
        "cls": k[e + "cls_token"],
        "pos_embedding": k[e + "position_embeddings"],
        "encoder_norm": {
            "scale": k[prefix + "layernorm.weight"],
            "bias": k[prefix + "layernorm.bias"],
        },
    }
    if e + "register_tokens" in k:
        p["registers"] = k[e + "register_tokens"]
    take_mask_token(k, e + "mask_token", p)
    enc = prefix + "encoder.layer."
    depth = block_count(sd, re.escape(enc) + r"(\d+)\.")
    is_dinov2 = f"{enc}0.norm1.weight" in k
    swiglu = bool(config.get("use_swiglu_ffn", False))
    for i in range(depth):
        b = f"{enc}{i}."
        att = b + "attention.attention."

        def qkv(name: str, att: str = att) -> dict[str, np.ndarray]:
            return {
                "kernel": qkv_kernel(k[att + name + ".weight"], heads),
                "bias": k[att + name + ".bias"].reshape(heads, hd),
            }

        out_w = k[b + "attention.output.dense.weight"]
        if is_dinov2:
            n1, n2 = "norm1", "norm2"
            f1, f2 = ("mlp.weights_in", "mlp.weights_out") if swiglu else ("mlp.fc1", "mlp.fc2")
        else:
            n1, n2 = "layernorm_before", "layernorm_after"
            f1, f2 = "intermediate.dense", "output.dense"
        block: dict[str, Any] = {
            "norm1": {"scale": k[b + n1 + ".weight"], "bias": k[b + n1 + ".bias"]},
            "norm2": {"scale": k[b + n2 + ".weight"], "bias": k[b + n2 + ".bias"]},
            "attn": {
                "query": qkv("query"),
                "key": qkv("key"),
                "value": qkv("value"),
                "out": {
                    "kernel": out_w.T.reshape(heads, hd, width),
                    "bias": k[b + "attention.output.dense.bias"],
                },
            },
            "mlp": {
                "fc1": {"kernel": k[b + f1 + ".weight"].T, "bias": k[b + f1 + ".bias"]},
                "fc2": {"kernel": k[b + f2 + ".weight"].T, "bias": k[b + f2 + ".bias"]},
            },
        }
        if is_dinov2:
            block["ls1"] = {"scale": k[b + "layer_scale1.lambda1"]}
            block["ls2"] = {"scale": k[b + "layer_scale2.lambda1"]}
        p[f"block_{i}"] = block
    labels = None
    # ViTForImageClassification's classifier reads the CLS token, as cxrjax's head does;
    # Dinov2ForImageClassification's reads CLS + mean patch token (2x width) and is not a match.
    if "classifier.weight" in k and k.sd["classifier.weight"].shape[1] == width:
        p["head"] = {"kernel": k["classifier.weight"].T, "bias": k["classifier.bias"]}
        id2label = config.get("id2label") or {}
        if len(id2label) == p["head"]["bias"].shape[0]:
            labels = [
                id2label[str(i)] if str(i) in id2label else id2label[i]
                for i in range(len(id2label))
            ]
    act = config.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_python"):
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (GELU variants only)")
    hidden = p["block_0"]["mlp"]["fc1"]["kernel"].shape[1]
    arch = dict(
        patch_size=int(w.shape[2]),
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=int(hidden // 2 if swiglu else hidden),
        mlp_kind="swiglu" if swiglu else "gelu",
        gelu_approximate=act in ("gelu_new", "gelu_pytorch_tanh"),
        num_registers=int(p["registers"].shape[1]) if "registers" in p else 0,
        layerscale_init=float(config.get("layerscale_value", 1.0)) if is_dinov2 else None,
        layernorm_eps=float(config.get("layer_norm_eps", 1e-12)),
        image_size=int(round((p["pos_embedding"].shape[1] - 1) ** 0.5)) * int(w.shape[2]),
    )
    return Converted(p, arch, "hf", k.unused(), label_names=labels)
