"""Converts a public ViT checkpoint into cxrjax's weights format (safetensors tree + meta.json).

  python tools/convert_checkpoint.py --list
  python tools/convert_checkpoint.py SOURCE --out DIR [--format F] [--variant V] [--sha256 HEX]

SOURCE is a local file or folder (format auto-detected: DINOv2 / DINOv3 torch-hub .pth, timm
.safetensors/.bin/.pth, a Hugging Face folder (ViT, DINOv2, DINOv3, SigLIP, SigLIP 2), an AugReg
or big_vision SigLIP .npz, a cxrjax weights folder or run directory), an http(s) URL, a Hugging
Face repo id, or a registered name: a weights tag (``arch.tag``) or a legacy variant, whose
official file or Hugging Face repo is downloaded. A download is checked against --sha256 when
given; the file's sha256 is always recorded. Name the weights tag with --variant when the shapes
alone cannot tell it (RAD-DINO is shaped like DINOv2 ViT-B/14), so that
``input.normalization=pretrained`` later takes that tag's mean/std.

The study's three initialisations:
  python tools/convert_checkpoint.py vit_b14_dinov2 --out weights/vit_b14_dinov2
  python tools/convert_checkpoint.py vit_b16_in21k --out weights/vit_b16_in21k
  python tools/convert_checkpoint.py runs/sup_med_pretrain --out weights/vit_b16_mimic
and the newer backbones, e.g.:
  python tools/convert_checkpoint.py vit_base_patch14_dinov2.rad_dino --out weights/rad_dino
"""

from __future__ import annotations

import os
import re
import sys
import urllib.request
from pathlib import Path

from absl import flags

from cxrjax import console
from cxrjax.errors import ConfigError
from cxrjax.models import count_params, flops_per_image, get_spec, list_models
from cxrjax.models.convert import (
    DINO_HEAD_FILE,
    FORMATS,
    convert_source,
    detect_format,
    heads_of,
    match_variant,
)
from cxrjax.models.registry import list_aliases, list_architectures, list_pretrained
from cxrjax.models.weights import CheckpointError, save_weights, sha256_file


def _flag_values() -> flags.FlagValues:
    # A private FlagValues: importing this module never clashes with another tool's flags.
    fv = flags.FlagValues()
    flags.DEFINE_string("out", None, "Output weights directory.", flag_values=fv)
    flags.DEFINE_enum("format", None, FORMATS, "Source format (default: detect).", flag_values=fv)
    flags.DEFINE_string(
        "variant", None, "Registered variant (default: infer from shapes).", flag_values=fv
    )
    flags.DEFINE_string(
        "sha256", None, "Expected sha256 of the downloaded/local file.", flag_values=fv
    )
    flags.DEFINE_bool(
        "list", False, "List architectures and weights tags, params and GFLOPs.", flag_values=fv
    )
    flags.DEFINE_string(
        "cache", os.path.expanduser("~/.cache/cxrjax"), "Where downloads are kept.", flag_values=fv
    )
    return fv


def print_variants() -> None:
    """Architectures (shape, size, cost), then weights tags (resolution, mean/std, sources)."""
    print(f"{'architecture':<32}{'params (M)':>11}{'res':>5}{'GFLOPs':>9}{'@224':>8}  family")
    for name in list_architectures():
        spec = get_spec(name)
        at224 = f"{flops_per_image(name, 224):8.1f}" if 224 % spec.patch_size == 0 else "       -"
        print(
            f"{name:<32}{count_params(name) / 1e6:11.1f}{spec.image_size:5d}"
            f"{flops_per_image(name):9.1f}{at224}  {spec.family}"
        )
    print(f"\n{'weights tag':<48}{'res':>5}{'GFLOPs':>9}  {'mean / std':<22}  sources")
    for name in list_pretrained():
        spec = get_spec(name)
        stats = f"{spec.mean[0]:.4g} / {spec.std[0]:.4g}" + (
            "" if len(set(spec.mean)) == 1 else " .."
        )
        print(
            f"{name:<48}{spec.image_size:5d}{flops_per_image(name):9.1f}  {stats:<22}  "
            f"{', '.join(spec.sources.values())}"
        )
    print("\nlegacy names (still accepted):")
    for alias, full in list_aliases().items():
        print(f"  {alias:<22} = {full}")


def fetch(source: str, cache: Path) -> tuple[Path, str | None]:
    """A local path for SOURCE, downloading URLs and variant names; returns (path, variant)."""
    variant = None
    if source in list_models():
        variant = source
        sources = get_spec(source).sources
        # An official file where there is a public URL, else the Hugging Face repository.
        url = sources.get("dinov2_hub") or sources.get("augreg_npz") or sources.get("hf")
        if url is None:
            raise CheckpointError(f"{source} has no downloadable official file; pass a local path")
        source = url
    if not source.startswith(("http://", "https://")):
        if Path(source).exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
            return Path(source), variant
        return _hub_download(source), variant
    dest = cache / source.rsplit("/", 1)[-1]
    if not dest.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {source} -> {dest}", flush=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        try:
            urllib.request.urlretrieve(source, tmp)
        except OSError as e:
            raise CheckpointError(
                f"cannot download {source} ({e}). Offline: download it elsewhere and pass the "
                "local file as SOURCE"
            ) from e
        tmp.replace(dest)
    return dest, variant


def _hub_download(name: str) -> Path:
    """A Hugging Face repo id (``facebook/dinov2-base``) or a timm name (``vit_...lvd142m``)."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{name}: downloading hub names needs huggingface_hub") from e
    try:
        if "/" in name:
            patterns = [
                "config.json",
                "preprocessor_config.json",
                "model.safetensors",
                "pytorch_model.bin",
                DINO_HEAD_FILE,  # RAD-DINO's released DINO head, converted beside the backbone
            ]
            return Path(snapshot_download(name, allow_patterns=patterns))
        return Path(hf_hub_download(f"timm/{name}", "model.safetensors"))
    except Exception as e:  # network, authentication and missing-repo errors alike
        raise CheckpointError(
            f"{name}: not a local path, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}). Offline: download it elsewhere and pass the local path"
        ) from e


def convert(
    source: str,
    out: str,
    *,
    fmt: str | None = None,
    variant: str | None = None,
    sha256: str | None = None,
    cache: str | Path = "~/.cache/cxrjax",
) -> Path:
    """Converts SOURCE into a cxrjax weights directory at ``out``; returns it."""
    if variant is not None:
        get_spec(variant)  # a misspelt --variant fails before anything is downloaded or read
    path, named = fetch(source, Path(cache).expanduser())
    variant = variant or named
    digest = sha256_file(path) if path.is_file() else ""
    if sha256 and digest != sha256.lower():
        raise CheckpointError(f"{path}: sha256 {digest} does not match the expected {sha256}")
    heads = heads_of(variant) if variant else None
    if heads is None and (fmt or "") in ("", "dinov2", "timm"):
        # Torch state dicts do not reveal the head count: infer the variant from shapes first.
        if (fmt or detect_format(path)) in ("dinov2", "timm"):
            probe = convert_source(path, fmt, num_heads=1)
            variant = match_variant(probe.arch)
            heads = heads_of(variant)
    conv = convert_source(path, fmt, num_heads=heads)
    variant = match_variant(conv.arch, variant or conv.variant)
    if conv.arch["num_heads"] != heads_of(variant):
        raise CheckpointError(
            f"{path}: {conv.arch['num_heads']} attention heads, {variant} has {heads_of(variant)}"
        )
    spec = get_spec(variant)
    for field in ("layernorm_eps", "gelu_approximate"):
        want = spec.kwargs.get(field, {"layernorm_eps": 1e-6, "gelu_approximate": False}[field])
        if field in conv.arch and conv.arch[field] != want:
            print(f"note: source uses {field}={conv.arch[field]}, {variant} uses {want}")
    save_weights(
        out,
        conv.params,
        variant=variant,
        source=str(source),
        source_sha256=digest,
        source_format=conv.source_format,
        image_size=conv.arch["image_size"],
        label_names=conv.label_names,
        extra={"arch": conv.arch},
    )
    print(f"wrote {out}: {variant} at {conv.arch['image_size']} px from {conv.source_format}")
    if conv.unused:
        print(f"not converted from the source: {', '.join(conv.unused)}")
    return Path(out)


def _main(fv: flags.FlagValues, positional: list[str]) -> int:
    if fv.list:
        print_variants()
        return 0
    if len(positional) != 1 or not fv.out:
        raise ConfigError(
            "convert_checkpoint.py needs one SOURCE and --out",
            "python tools/convert_checkpoint.py SOURCE --out DIR (or --list)",
        )
    convert(
        positional[0],
        fv.out,
        fmt=fv.format,
        variant=fv.variant,
        sha256=fv.sha256,
        cache=fv.cache,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return console.run_cli(__doc__, _flag_values(), argv, _main)


if __name__ == "__main__":
    sys.exit(main())
