"""timm ``VisionTransformer`` and official DINOv2 state dicts, both ways.

In: timm files (``.safetensors``/``.bin``/``.pth``) and the DINOv2 torch-hub ``.pth`` (block
chunks, ``register_tokens``, packed SwiGLU ``w12``/``w3``, the trained ``mask_token``) -> cxrjax.
Out: cxrjax weights -> a timm-named safetensors file plus the timm architecture name and
constructor arguments. Register models use timm's layout: the CLS position folded into
``cls_token`` and ``pos_embed`` holding patch positions only (``no_embed_class=True``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrjax.models.convert.common import Converted, Keys, block_count, qkv_kernel, take_mask_token
from cxrjax.models.registry import get_spec
from cxrjax.models.weights import CheckpointError, read_weights

_TIMM_SIZE = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1536: "giant"}


def _posemb_with_prefix(pos: np.ndarray, cls_token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """timm's no_embed_class layout (pos for patches only) -> CLS-inclusive layout."""
    n = pos.shape[1]
    if int(round(n**0.5)) ** 2 == n:
        # timm folded the CLS position into cls_token already, so its position is zero here.
        return np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1), cls_token
    return pos, cls_token


def convert_timm(
    sd: Mapping[str, np.ndarray], *, num_heads: int, source: str = "state dict"
) -> Converted:
    """timm ``VisionTransformer`` or official DINOv2 state dict -> cxrjax params."""
    # Official DINOv2 with block chunks names blocks 'blocks.<chunk>.<global index>.'.
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    k = Keys(sd, source)
    depth = block_count(sd, r"blocks\.(\d+)\.")
    w = k["patch_embed.proj.weight"]
    width, patch = w.shape[0], w.shape[2]
    pos, cls = _posemb_with_prefix(k["pos_embed"], k["cls_token"])
    p: dict[str, Any] = {
        "embedding": {"kernel": w.transpose(2, 3, 1, 0), "bias": k["patch_embed.proj.bias"]},
        "cls": cls,
        "pos_embedding": pos,
        "encoder_norm": {"scale": k["norm.weight"], "bias": k["norm.bias"]},
    }
    for name in ("reg_token", "register_tokens"):
        if name in k:
            p["registers"] = k[name]
    # timm drops the mask token when it loads DINOv2; the official file keeps it.
    take_mask_token(k, "mask_token", p)
    layerscale = "blocks.0.ls1.gamma" in k
    swiglu = "blocks.0.mlp.w12.weight" in k
    fc1, fc2 = ("mlp.w12", "mlp.w3") if swiglu else ("mlp.fc1", "mlp.fc2")
    hidden = k.sd[f"blocks.0.{fc1}.weight"].shape[0]
    if not swiglu and "blocks.0.mlp.fc2.weight" in k:
        # timm's SwiGLUPacked keeps DINOv2's packed w12 under the name fc1.
        swiglu = k.sd["blocks.0.mlp.fc2.weight"].shape[1] * 2 == hidden
    for i in range(depth):
        b = f"blocks.{i}."
        qkv_w, qkv_b = k[b + "attn.qkv.weight"], k[b + "attn.qkv.bias"]
        if qkv_w.shape != (3 * width, width):
            raise CheckpointError(
                f"{source}: {b}attn.qkv.weight has shape {qkv_w.shape}, "
                f"expected {(3 * width, width)}"
            )
        qs, ks, vs = np.split(qkv_w, 3, axis=0)
        qb, kb, vb = np.split(qkv_b, 3, axis=0)
        hd = width // num_heads
        proj = k[b + "attn.proj.weight"]
        block: dict[str, Any] = {
            "norm1": {"scale": k[b + "norm1.weight"], "bias": k[b + "norm1.bias"]},
            "norm2": {"scale": k[b + "norm2.weight"], "bias": k[b + "norm2.bias"]},
            "attn": {
                "query": {"kernel": qkv_kernel(qs, num_heads), "bias": qb.reshape(num_heads, hd)},
                "key": {"kernel": qkv_kernel(ks, num_heads), "bias": kb.reshape(num_heads, hd)},
                "value": {"kernel": qkv_kernel(vs, num_heads), "bias": vb.reshape(num_heads, hd)},
                "out": {
                    "kernel": proj.T.reshape(num_heads, hd, width),
                    "bias": k[b + "attn.proj.bias"],
                },
            },
            "mlp": {
                "fc1": {"kernel": k[b + fc1 + ".weight"].T, "bias": k[b + fc1 + ".bias"]},
                "fc2": {"kernel": k[b + fc2 + ".weight"].T, "bias": k[b + fc2 + ".bias"]},
            },
        }
        if layerscale:
            block["ls1"] = {"scale": k[b + "ls1.gamma"]}
            block["ls2"] = {"scale": k[b + "ls2.gamma"]}
        p[f"block_{i}"] = block
    if "head.weight" in k and k.sd["head.weight"].ndim == 2:
        p["head"] = {"kernel": k["head.weight"].T, "bias": k["head.bias"]}
    arch = dict(
        patch_size=int(patch),
        width=int(width),
        depth=depth,
        num_heads=num_heads,
        mlp_dim=int(hidden // 2 if swiglu else hidden),
        mlp_kind="swiglu" if swiglu else "gelu",
        num_registers=int(p["registers"].shape[1]) if "registers" in p else 0,
        layerscale_init=1e-5 if layerscale else None,
        image_size=int(round((pos.shape[1] - 1) ** 0.5)) * int(patch),
    )
    fmt = "dinov2" if ("mask_token" in k or "register_tokens" in k) else "timm"
    return Converted(p, arch, fmt, k.unused())


# --------------------------------------------------------------------------- out


def to_timm_state_dict(flat: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """cxrjax flat params -> timm VisionTransformer state dict (numpy, float32).

    Keys timm's ViT has no place for (the SSL mask token and DINO head) are left out.
    """
    sd: dict[str, np.ndarray] = {}
    kern = flat["embedding/kernel"]
    sd["patch_embed.proj.weight"] = kern.transpose(3, 2, 0, 1)
    sd["patch_embed.proj.bias"] = flat["embedding/bias"]
    pos, cls = flat["pos_embedding"], flat["cls"]
    if "registers" in flat:
        sd["reg_token"] = flat["registers"]
        sd["cls_token"] = cls + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:]
    else:
        sd["cls_token"], sd["pos_embed"] = cls, pos
    sd["norm.weight"], sd["norm.bias"] = flat["encoder_norm/scale"], flat["encoder_norm/bias"]
    i = 0
    while f"block_{i}/norm1/scale" in flat:
        b, t = f"block_{i}/", f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[t + n + ".weight"], sd[t + n + ".bias"] = (
                flat[b + n + "/scale"],
                flat[b + n + "/bias"],
            )
        qkv = [flat[f"{b}attn/{n}/kernel"] for n in ("query", "key", "value")]
        width = qkv[0].shape[0]
        sd[t + "attn.qkv.weight"] = np.concatenate([q.reshape(width, -1).T for q in qkv], axis=0)
        sd[t + "attn.qkv.bias"] = np.concatenate(
            [flat[f"{b}attn/{n}/bias"].reshape(-1) for n in ("query", "key", "value")]
        )
        sd[t + "attn.proj.weight"] = flat[b + "attn/out/kernel"].reshape(-1, width).T
        sd[t + "attn.proj.bias"] = flat[b + "attn/out/bias"]
        for fc in ("fc1", "fc2"):
            sd[f"{t}mlp.{fc}.weight"] = flat[f"{b}mlp/{fc}/kernel"].T
            sd[f"{t}mlp.{fc}.bias"] = flat[f"{b}mlp/{fc}/bias"]
        for ls in ("ls1", "ls2"):
            if f"{b}{ls}/scale" in flat:
                sd[f"{t}{ls}.gamma"] = flat[f"{b}{ls}/scale"]
        i += 1
    if qkv[0].shape[1] != num_heads:
        raise CheckpointError(f"attention has {qkv[0].shape[1]} heads, expected {num_heads}")
    if "head/kernel" in flat:
        sd["head.weight"], sd["head.bias"] = flat["head/kernel"].T, flat["head/bias"]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def timm_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """timm architecture name and constructor kwargs reproducing the exported model."""
    spec = get_spec(meta["variant"])
    kw = spec.kwargs
    size = _TIMM_SIZE.get(kw["width"], "custom")
    name = f"vit_{size}_patch{kw['patch_size']}_"
    if spec.family == "dinov2":
        name += ("reg4_" if kw.get("num_registers") else "") + "dinov2"
    else:
        name += "224"
    kwargs: dict[str, Any] = dict(
        img_size=int(meta["image_size"]),
        patch_size=kw["patch_size"],
        embed_dim=kw["width"],
        depth=kw["depth"],
        num_heads=kw["num_heads"],
        num_classes=int(meta.get("num_classes", 0)),
    )
    if kw.get("mlp_kind") == "swiglu":
        kwargs["mlp_ratio"] = 2 * kw["mlp_dim"] / kw["width"]
        kwargs["mlp_layer"] = "SwiGLUPacked (timm.layers), act_layer=torch.nn.SiLU"
    else:
        kwargs["mlp_ratio"] = kw["mlp_dim"] / kw["width"]
    if kw.get("layerscale_init") is not None:
        kwargs["init_values"] = kw["layerscale_init"]
    if kw.get("num_registers"):
        kwargs.update(reg_tokens=kw["num_registers"], no_embed_class=True)
    return {
        "architecture": name,
        "kwargs": kwargs,
        "label_names": meta.get("label_names"),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "source": meta.get("source"),
    }


def export_timm(weights: str | Path, out: str | Path) -> Path:
    """Writes ``out`` (.safetensors, timm names) and ``out`` with suffix .json (timm name and
    kwargs, labels, mean/std); returns ``out``."""
    from safetensors.numpy import save_file

    flat, meta = read_weights(weights)
    spec = get_spec(meta["variant"])
    if spec.family not in ("augreg", "dinov2"):
        # DINOv3 and SigLIP are other timm classes (Eva, attention-pool ViT) with other names.
        raise CheckpointError(
            f"{weights}: exporting {spec.family} weights ({meta['variant']}) is not supported; "
            "timm export covers the ViT and DINOv2 families"
        )
    sd = to_timm_state_dict(flat, spec.kwargs["num_heads"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt"})
    out.with_suffix(".json").write_text(json.dumps(timm_config(meta), indent=2) + "\n")
    return out
