"""One entry for every foreign format: detect it, convert it, match a registered variant.

Sources: the official DINOv2 and DINOv3 torch-hub ``.pth`` files, timm files (``.safetensors``/
``.bin``/``.pth``), Hugging Face transformers folders (``config.json`` + weights; a
``dino_head.safetensors`` beside the weights, as RAD-DINO releases, is converted too), the
AugReg / big_vision JAX ``.npz`` files (ViTs and SigLIP image towers) and cxrjax's own weights
directories and run directories. Each format has its module in this package; this one only
detects and dispatches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrjax.models.convert import big_vision, dinov3, hf, siglip, timm
from cxrjax.models.convert.common import TORCH_SUFFIXES, Converted, read_state_dict
from cxrjax.models.convert.dino_head import DINO_HEAD_FILE, convert_dino_head
from cxrjax.models.convert.run import convert_cxrjax_run, convert_cxrjax_weights
from cxrjax.models.registry import get_spec, list_architectures
from cxrjax.models.vit import VisionTransformer
from cxrjax.models.weights import DINO_HEAD, META_FILE, PARAMS_FILE, CheckpointError
from cxrjax.run_dir import RunDir

FORMATS = ("dinov2", "dinov3", "timm", "hf", "augreg_npz", "cxrjax", "cxrjax_run")


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
    if p.suffix in TORCH_SUFFIXES:
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
        f"{', '.join(TORCH_SUFFIXES)}, .npz, or a folder"
    )


def _convert_hf(p: Path) -> Converted:
    """A transformers folder (or a weights file inside one), with its DINO head when released."""
    folder = p if p.is_dir() else p.parent
    sd = hf.read_hf_weights(folder) if p.is_dir() else read_state_dict(p)
    config = hf.read_hf_config(folder)
    if config.get("model_type") == "dinov3_vit":
        conv = dinov3.convert_hf(sd, config, source=str(p))
    elif siglip.is_siglip_config(config):
        return siglip.convert_hf(sd, config, source=str(p))
    else:
        conv = hf.convert_hf(sd, config, source=str(p))
    head_file = folder / DINO_HEAD_FILE
    if head_file.is_file():
        head, unused = convert_dino_head(
            read_state_dict(head_file), width=conv.arch["width"], source=str(head_file)
        )
        conv.params[DINO_HEAD] = head
        conv.unused += [f"{DINO_HEAD_FILE}:{key}" for key in unused]
    return conv


def convert_source(
    source: str | Path, fmt: str | None = None, *, num_heads: int | None = None
) -> Converted:
    """Converts a local file or folder; ``fmt`` overrides detection, ``num_heads`` is needed
    for timm state dicts (their shapes do not reveal it) unless a variant supplies it."""
    fmt = fmt or detect_format(source)
    p = Path(source)
    if fmt == "dinov3":
        return dinov3.convert_official(read_state_dict(p), source=str(p))
    if fmt in ("dinov2", "timm"):
        if num_heads is None:
            raise CheckpointError(f"{p}: pass --variant so the number of attention heads is known")
        sd = read_state_dict(p)
        if "pos_embed" not in sd and "reg_token" in sd:
            # timm's DINOv3 (an Eva with RoPE) stores no position embedding.
            return dinov3.convert_timm(sd, num_heads=num_heads, source=str(p))
        return timm.convert_timm(sd, num_heads=num_heads, source=str(p))
    if fmt == "hf":
        return _convert_hf(p)
    if fmt == "augreg_npz":
        npz = big_vision.read_npz(p)
        if siglip.is_big_vision_siglip(npz):
            return siglip.convert_big_vision(npz, source=str(p))
        return big_vision.convert_augreg(npz, source=str(p))
    if fmt == "cxrjax":
        return convert_cxrjax_weights(p)
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
    return {f.name: f.default for f in dataclasses.fields(VisionTransformer)}[field]


def heads_of(variant: str) -> int:
    """The attention heads of a registered variant (torch state dicts do not reveal them)."""
    return int(get_spec(variant).kwargs["num_heads"])
