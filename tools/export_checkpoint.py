"""Exports cxrjax weights as a timm-compatible safetensors file, so PyTorch users can load them.

  python tools/export_checkpoint.py WEIGHTS_DIR --out model.safetensors

Writes ``model.safetensors`` in timm's ``VisionTransformer`` naming and ``model.json`` beside it
with the timm architecture name and constructor arguments (``timm.create_model(name,
pretrained=False, **kwargs)`` then ``load_state_dict``), the label names and the input
normalisation. Register models use timm's layout: the CLS position folded into ``cls_token`` and
``pos_embed`` holding patch positions only (``no_embed_class=True``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from cxrjax.models import get_spec
from cxrjax.models.weights import CheckpointError, read_weights

_TIMM_SIZE = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1536: "giant"}


def define_flags() -> None:
    """Defined only when run as a script, so importing this module never clashes flags."""
    flags.DEFINE_string("out", None, "Output .safetensors file.")


def to_timm_state_dict(flat: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """cxrjax flat params -> timm VisionTransformer state dict (numpy, float32)."""
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


def timm_config(meta: dict[str, Any]) -> dict[str, Any]:
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


def export(weights: str | Path, out: str | Path) -> Path:
    """Writes ``out`` (.safetensors) and ``out`` with suffix .json; returns the weights path."""
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


def main(argv: list[str]) -> None:
    if len(argv) != 2 or not flags.FLAGS.out:
        raise app.UsageError("usage: export_checkpoint.py WEIGHTS_DIR --out model.safetensors")
    try:
        path = export(argv[1], flags.FLAGS.out)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
