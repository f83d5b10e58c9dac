"""Conversion of public ViT checkpoints into cxrjax parameter trees.

(Longer than ~400 lines on purpose: one converter per foreign format, each a key-by-key map
that reads best next to the others it mirrors.)

Sources: the official DINOv2 and DINOv3 torch-hub ``.pth`` files, timm files (``.safetensors``/
``.bin``/``.pth``), Hugging Face transformers folders (``config.json`` + weights), the AugReg /
big_vision JAX ``.npz`` files (ViTs and SigLIP image towers) and cxrjax's own weights directories
and run directories. DINOv3 and SigLIP have modules of their own (:mod:`.convert_dinov3`,
:mod:`.convert_siglip`); this one detects the format and dispatches. Torch files are
read with ``torch.load(weights_only=True)``: a pickle that needs arbitrary code is refused.

Each converter returns a :class:`Converted`: the parameter tree plus the architecture it implies,
so the caller can check it against a registered variant before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrjax.models.lora import merge_lora
from cxrjax.models.registry import get_spec, list_architectures
from cxrjax.models.weights import (
    META_FILE,
    PARAMS_FILE,
    CheckpointError,
    flatten,
    read_weights,
    unflatten,
)
from cxrjax.run_dir import RunDir

FORMATS = ("dinov2", "dinov3", "timm", "hf", "augreg_npz", "cxrjax", "cxrjax_run")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclasses.dataclass
class Converted:
    """A converted checkpoint: params (nested numpy dict), inferred architecture, provenance."""

    params: dict[str, Any]
    arch: dict[str, Any]
    source_format: str
    unused: list[str]
    label_names: list[str] | None = None
    variant: str | None = None


# --------------------------------------------------------------------------- reading sources


def detect_format(source: str | Path) -> str:
    """Guesses the format of a local file or folder; raises naming the path when it cannot."""
    p = Path(source)
    if p.is_dir():
        if (p / META_FILE).is_file() and (p / PARAMS_FILE).is_file():
            return "cxrjax"
        if RunDir(p).is_run():
            return "cxrjax_run"
        if (p / "config.json").is_file():
            return "hf"
        raise CheckpointError(
            f"{p}: a folder that is neither a Hugging Face model (config.json + weights), a "
            f"cxrjax weights folder ({META_FILE} + {PARAMS_FILE}) nor a cxrjax run (run.json)"
        )
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.suffix == ".npz":
        return "augreg_npz"
    if p.suffix in _TORCH_SUFFIXES:
        keys = set(read_state_dict(p))
        if any(k.startswith(("embeddings.", "vit.", "dinov2.", "encoder.layer.")) for k in keys):
            return "hf"
        if "storage_tokens" in keys:
            return "dinov3"
        if "mask_token" in keys or "register_tokens" in keys or any(".mlp.w12." in k for k in keys):
            return "dinov2"
        if any(k.startswith("blocks.") for k in keys):
            return "timm"
        raise CheckpointError(
            f"{p}: keys {sorted(keys)[:6]} are not those of a DINOv2/v3, timm or HF ViT; pass "
            f"--format explicitly if it is one of {FORMATS}"
        )
    raise CheckpointError(
        f"{p}: unknown file type {p.suffix!r}; expected "
        f"{', '.join(_TORCH_SUFFIXES)}, .npz, or a folder"
    )


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    # Training checkpoints nest the weights; torch-hub and timm files are flat.
    for key in ("model", "state_dict", "teacher", "model_ema"):
        if key in sd and isinstance(sd[key], Mapping):
            return _unwrap(sd[key])
    return sd


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A torch state dict as float32 numpy arrays, without executing pickled code."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            sd = load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{p}: unreadable safetensors file ({e}); truncated?") from e
        except TypeError:
            sd = _torch_safetensors(p)  # bfloat16 tensors: numpy has no such dtype
        return {k: np.asarray(v, np.float32) for k, v in sd.items()}
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{p}: reading torch files needs PyTorch: pip install torch") from e
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"{p}: not a readable weights-only torch file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Truncated files and pickles that need "
            "code to load are refused; re-download it or save it with torch.save(state_dict)"
        ) from e
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{p}: holds a {type(sd).__name__}, not a state dict")
    sd = _unwrap(sd)
    return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}


def _torch_safetensors(p: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(p)).items()}


# --------------------------------------------------------------------------- timm / DINOv2


class _Keys:
    """A state dict that remembers which keys were consumed, so leftovers can be reported."""

    def __init__(self, sd: Mapping[str, np.ndarray], source: str):
        self.sd = dict(sd)
        self.used: set[str] = set()
        self.source = source

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise CheckpointError(f"{self.source}: missing key {key!r}")
        self.used.add(key)
        return self.sd[key]

    def skip(self, *keys: str) -> None:
        """Marks keys as deliberately left out (derived buffers), so they are not reported."""
        self.used.update(key for key in keys if key in self.sd)

    def unused(self) -> list[str]:
        return sorted(set(self.sd) - self.used)


def _qkv_kernel(w: np.ndarray, heads: int) -> np.ndarray:
    # torch Linear (out, in) -> flax DenseGeneral (in, heads, head_dim)
    return w.T.reshape(w.shape[1], heads, w.shape[0] // heads)


def _block_count(keys: Any, pattern: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not idx or idx != set(range(len(idx))):
        raise CheckpointError(f"no consecutive transformer blocks matching {pattern!r}")
    return len(idx)


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
    k = _Keys(sd, source)
    depth = _block_count(sd, r"blocks\.(\d+)\.")
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
                "query": {"kernel": _qkv_kernel(qs, num_heads), "bias": qb.reshape(num_heads, hd)},
                "key": {"kernel": _qkv_kernel(ks, num_heads), "bias": kb.reshape(num_heads, hd)},
                "value": {"kernel": _qkv_kernel(vs, num_heads), "bias": vb.reshape(num_heads, hd)},
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


# --------------------------------------------------------------------------- Hugging Face


def _hf_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: unreadable ({e})") from e


def _hf_weights(folder: Path) -> dict[str, np.ndarray]:
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
    k = _Keys(sd, source)
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
    enc = prefix + "encoder.layer."
    depth = _block_count(sd, re.escape(enc) + r"(\d+)\.")
    is_dinov2 = f"{enc}0.norm1.weight" in k
    swiglu = bool(config.get("use_swiglu_ffn", False))
    for i in range(depth):
        b = f"{enc}{i}."
        att = b + "attention.attention."

        def qkv(name: str, att: str = att) -> dict[str, np.ndarray]:
            return {
                "kernel": _qkv_kernel(k[att + name + ".weight"], heads),
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


# --------------------------------------------------------------------------- AugReg / big_vision


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            return {key: np.asarray(z[key], np.float32) for key in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"{p}: unreadable .npz ({e}); truncated or not a weights file?"
        ) from e
    except Exception as e:  # zipfile.BadZipFile and friends
        raise CheckpointError(f"{p}: unreadable .npz ({type(e).__name__}: {e})") from e


def unscan(tree: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """big_vision's scanned layout (``prefix/...`` stacked on axis 0) -> ``prefix_i/...`` keys."""
    stacked = {key: v for key, v in tree.items() if key.startswith(prefix + "/")}
    out = {key: v for key, v in tree.items() if key not in stacked}
    if stacked:
        depth = next(iter(stacked.values())).shape[0]
        for key, v in stacked.items():
            for i in range(depth):
                out[key.replace(prefix + "/", f"{prefix}_{i}/", 1)] = v[i]
    return out


def convert_augreg(npz: Mapping[str, np.ndarray], *, source: str = "npz") -> Converted:
    """vit_jax / big_vision ViT ``.npz`` (unscanned or scanned blocks) -> cxrjax params."""
    npz = {key.removeprefix("params/"): v for key, v in npz.items()}
    t = "Transformer/"
    npz = unscan(npz, t + "encoderblock")
    k = _Keys(npz, source)
    depth = _block_count(npz, re.escape(t) + r"encoderblock_(\d+)/")
    pos_key = t + "posembed_input/pos_embedding"
    p: dict[str, Any] = {
        "embedding": {"kernel": k["embedding/kernel"], "bias": k["embedding/bias"]},
        "cls": k["cls"],
        "pos_embedding": k[pos_key],
        "encoder_norm": {"scale": k[t + "encoder_norm/scale"], "bias": k[t + "encoder_norm/bias"]},
    }

    def sub(block: str, kind: str) -> list[str]:
        # vit_jax numbers sub-modules LayerNorm_0/_2, MlpBlock_3; big_vision LayerNorm_0/_1, ...
        names = {key[len(block) :].split("/")[0] for key in npz if key.startswith(block)}
        return sorted((n for n in names if n.startswith(kind)), key=lambda n: int(n.split("_")[-1]))

    for i in range(depth):
        b = f"{t}encoderblock_{i}/"
        (ln1, ln2), (att,), (mlp,) = sub(b, "LayerNorm_"), sub(b, "MultiHead"), sub(b, "MlpBlock_")
        dense = sub(b + mlp + "/", "Dense_")

        def get(*parts: str, b: str = b) -> dict[str, np.ndarray]:
            base = b + "/".join(parts) + "/"
            return {"kernel": k[base + "kernel"], "bias": k[base + "bias"]}

        p[f"block_{i}"] = {
            "norm1": {"scale": k[f"{b}{ln1}/scale"], "bias": k[f"{b}{ln1}/bias"]},
            "norm2": {"scale": k[f"{b}{ln2}/scale"], "bias": k[f"{b}{ln2}/bias"]},
            "attn": {n: get(att, n) for n in ("query", "key", "value", "out")},
            "mlp": {"fc1": get(mlp, dense[0]), "fc2": get(mlp, dense[1])},
        }
    if "head/kernel" in k and k.sd["head/kernel"].size:
        p["head"] = {"kernel": k["head/kernel"], "bias": k["head/bias"]}
    q = p["block_0"]["attn"]["query"]["kernel"]
    kern = p["embedding"]["kernel"]
    arch = dict(
        patch_size=int(kern.shape[0]),
        width=int(kern.shape[-1]),
        depth=depth,
        num_heads=int(q.shape[1]),
        mlp_dim=int(p["block_0"]["mlp"]["fc1"]["kernel"].shape[1]),
        mlp_kind="gelu",
        num_registers=0,
        layerscale_init=None,
        image_size=int(round((p["pos_embedding"].shape[1] - 1) ** 0.5)) * int(kern.shape[0]),
    )
    return Converted(p, arch, "augreg_npz", k.unused())


# --------------------------------------------------------------------------- cxrjax


def convert_cxrjax_run(run_dir: str | Path, which: str = "best") -> Converted:
    """A cxrjax run directory (orbax checkpoints + run.json) -> its parameters and labels."""
    import jax
    import orbax.checkpoint as ocp

    layout = RunDir(run_dir)
    d = layout.path.absolute()
    # The raw facts: conversion needs only variant, labels and size, which every run recorded.
    run = json.loads((d / RunDir.FACTS).read_text())

    def steps_in(sub: Path) -> list[int]:
        return sorted(int(s.name) for s in sub.glob("[0-9]*") if s.is_dir())

    # The best-by-validation parameters when the run saved any, else the latest train state.
    sub = layout.best
    if which != "best" or not steps_in(sub):
        sub = layout.checkpoints
    steps = steps_in(sub)
    if not steps:
        raise CheckpointError(
            f"{d}: no saved step under best/ or checkpoints/; train the run first"
        )
    step_dir = sub / str(steps[-1])
    item = "params" if sub == layout.best else "state"
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(step_dir / item)
    params = restored if item == "params" else restored["params"]
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    if any(key.endswith(("/lora_a", "/lora_b")) for key in flatten(params)):
        # A LoRA run: fold the adapters in with the alpha it trained with.
        params = merge_lora(params, layout.read_config().model.get("lora_alpha"))
    spec = get_spec(run["variant"])
    arch = dict(spec.kwargs, image_size=int(run["image_size"]))
    return Converted(
        params,
        arch,
        "cxrjax_run",
        [],
        label_names=list(run.get("label_names") or []) or None,
        variant=run["variant"],
    )


def convert_source(
    source: str | Path, fmt: str | None = None, *, num_heads: int | None = None
) -> Converted:
    """Converts a local file or folder; ``fmt`` overrides detection, ``num_heads`` is needed
    for timm state dicts (their shapes do not reveal it) unless a variant supplies it."""
    from cxrjax.models import convert_dinov3, convert_siglip

    fmt = fmt or detect_format(source)
    p = Path(source)
    if fmt == "dinov3":
        return convert_dinov3.convert_official(read_state_dict(p), source=str(p))
    if fmt in ("dinov2", "timm"):
        if num_heads is None:
            raise CheckpointError(f"{p}: pass --variant so the number of attention heads is known")
        sd = read_state_dict(p)
        if "pos_embed" not in sd and "reg_token" in sd:
            # timm's DINOv3 (an Eva with RoPE) stores no position embedding.
            return convert_dinov3.convert_timm(sd, num_heads=num_heads, source=str(p))
        return convert_timm(sd, num_heads=num_heads, source=str(p))
    if fmt == "hf":
        folder = p if p.is_dir() else p.parent
        sd = _hf_weights(folder) if p.is_dir() else read_state_dict(p)
        config = _hf_config(folder)
        if config.get("model_type") == "dinov3_vit":
            return convert_dinov3.convert_hf(sd, config, source=str(p))
        if convert_siglip.is_siglip_config(config):
            return convert_siglip.convert_hf(sd, config, source=str(p))
        return convert_hf(sd, config, source=str(p))
    if fmt == "augreg_npz":
        npz = read_npz(p)
        if convert_siglip.is_big_vision_siglip(npz):
            return convert_siglip.convert_big_vision(npz, source=str(p))
        return convert_augreg(npz, source=str(p))
    if fmt == "cxrjax":
        flat, meta = read_weights(p)
        spec = get_spec(meta["variant"])
        return Converted(
            unflatten(flat),
            dict(spec.kwargs, image_size=meta["image_size"]),
            "cxrjax",
            [],
            label_names=meta.get("label_names"),
            variant=meta["variant"],
        )
    if fmt == "cxrjax_run":
        return convert_cxrjax_run(p)
    raise CheckpointError(f"unknown format {fmt!r}; use one of {FORMATS}")


# What the weights' shapes and names fix; resolution, resampling and pooling (other than MAP,
# which has parameters) are choices made on top.
_ARCH_KEYS = (
    "patch_size",
    "width",
    "depth",
    "mlp_dim",
    "mlp_kind",
    "num_registers",
    "class_token",
    "posemb",
    "key_bias",
)


def _shape_of(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    shape = {a: kwargs.get(a, _default(a)) for a in _ARCH_KEYS}
    shape["layerscale"] = kwargs.get("layerscale_init") is not None
    shape["map_head"] = kwargs.get("pool") == "map"
    return shape


def match_variant(arch: Mapping[str, Any], variant: str | None = None) -> str:
    """The registered architecture with ``arch``'s shape; checks ``variant`` when one is given
    (any name ``get_spec`` accepts: an ``arch.tag`` or a legacy name is kept as given)."""
    got = _shape_of(arch)
    if variant is not None:
        want = _shape_of(get_spec(variant).kwargs)
        if got != want:
            diff = {a: (got[a], want[a]) for a in got if got[a] != want[a]}
            raise CheckpointError(
                f"the checkpoint is not a {variant}: (checkpoint, {variant}) differ in {diff}"
            )
        return variant
    matches = [n for n in list_architectures() if _shape_of(get_spec(n).kwargs) == got]
    if len(matches) != 1:
        raise CheckpointError(
            f"cannot tell the variant of a checkpoint with {got} "
            f"(candidates: {matches or 'none'}); pass --variant"
        )
    return matches[0]


def _default(field: str) -> Any:
    from cxrjax.models.vit import VisionTransformer

    return {f.name: f.default for f in dataclasses.fields(VisionTransformer)}[field]


def heads_of(variant: str) -> int:
    return int(get_spec(variant).kwargs["num_heads"])
