"""Named ViT variants with their pretrained sources (timm-style registry).

A variant fixes the architecture; ``create_model`` applies config overrides (compute dtype,
dropout, stochastic depth, remat, head init, registers, image size) on top of it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.models.vit import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
_AUGREG_URL = "https://storage.googleapis.com/vit_models/augreg/{name}.npz"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the rest of cxrjax needs to know about a variant.

    ``sources`` maps a source kind (``dinov2_hub``, ``timm``, ``hf``, ``augreg_npz``) to its public
    name or URL. ``mean``/``std`` are the input normalisation the pretrained weights expect.
    """

    name: str
    kwargs: dict[str, Any]
    patch_size: int
    image_size: int
    family: str
    sources: dict[str, str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str = ""

    @property
    def width(self) -> int:
        return self.kwargs["width"]


_SIZES = {
    # name: (width, depth, heads, mlp_dim)
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
    "g": (1536, 40, 24, 4096),
}

_REGISTRY: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"variant {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec


def _arch(size: str, patch: int, image_size: int, **extra: Any) -> dict[str, Any]:
    width, depth, heads, mlp = _SIZES[size]
    return dict(
        patch_size=patch,
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
        image_size=image_size,
        **extra,
    )


def _register_all() -> None:
    _register(
        ModelSpec(
            name="vit_tiny_demo",
            kwargs=dict(
                patch_size=8,
                width=96,
                depth=4,
                num_heads=4,
                mlp_dim=384,
                image_size=64,
                posemb_resample="timm",
            ),
            patch_size=8,
            image_size=64,
            family="augreg",
            sources={},
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            description="tiny ViT for tests and CPU demos (64-96 px inputs)",
        )
    )
    _register(
        ModelSpec(
            name="vit_tiny14_dinov2",
            kwargs=dict(
                patch_size=14,
                width=96,
                depth=2,
                num_heads=4,
                mlp_dim=384,
                image_size=28,
                layerscale_init=1e-5,
                posemb_resample="dinov2",
            ),  # fmt: skip
            patch_size=14,
            image_size=28,
            family="dinov2",
            sources={},
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description="tiny DINOv2-shaped ViT (LayerScale, patch 14) for CPU tests",
        )
    )
    augreg = {
        "ti": ("vit_tiny_patch16_224", "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"),
        "s": ("vit_small_patch16_224", "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"),
        "b": ("vit_base_patch16_224", "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"),
        "l": (
            "vit_large_patch16_224",
            "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1",
        ),
    }
    hf_in21k = {
        "b": "google/vit-base-patch16-224-in21k",
        "l": "google/vit-large-patch16-224-in21k",
    }
    for size, (timm_name, npz) in augreg.items():
        name = "vit_ti16" if size == "ti" else f"vit_{size}16_in21k"
        # The official file first: it is what tools and error messages offer to download.
        sources = {"augreg_npz": _AUGREG_URL.format(name=npz), "timm": f"{timm_name}.augreg_in21k"}
        if size in hf_in21k:
            # The HF in21k checkpoints come from the original ViT release, not AugReg.
            sources["hf"] = hf_in21k[size]
        _register(
            ModelSpec(
                name=name,
                kwargs=_arch(size, 16, 224, posemb_resample="timm"),
                patch_size=16,
                image_size=224,
                family="augreg",
                sources=sources,
                mean=INCEPTION_MEAN,
                std=INCEPTION_STD,
                description=f"ViT-{size.upper()}/16 supervised on ImageNet-21k (AugReg)",
            )
        )
    timm_size = {"s": "small", "b": "base", "l": "large", "g": "giant"}
    hf_size = {"s": "small", "b": "base", "l": "large", "g": "giant"}
    for size in ("s", "b", "l", "g"):
        for reg in (False, True):
            arch = f"dinov2_vit{size}14"
            extra: dict[str, Any] = dict(layerscale_init=1e-5)
            if size == "g":
                extra["mlp_kind"] = "swiglu"
            if reg:
                # The register models were released with antialiased, offset-free interpolation
                # (hub: interpolate_antialias=True, interpolate_offset=0.0), which is timm's.
                extra.update(num_registers=4, posemb_resample="timm")
            else:
                extra["posemb_resample"] = "dinov2"
            timm_name = f"vit_{timm_size[size]}_patch14_" + ("reg4_" if reg else "") + "dinov2"
            hf = f"facebook/dinov2-{hf_size[size]}"
            if reg:
                hf = f"facebook/dinov2-with-registers-{hf_size[size]}"
            _register(
                ModelSpec(
                    name=f"vit_{size}14_dinov2" + ("_reg4" if reg else ""),
                    kwargs=_arch(size, 14, 518, **extra),
                    patch_size=14,
                    image_size=518,
                    family="dinov2",
                    sources={
                        "dinov2_hub": _DINOV2_URL.format(arch=arch, reg="_reg4" if reg else ""),
                        "timm": f"{timm_name}.lvd142m",
                        "hf": hf,
                    },
                    mean=IMAGENET_MEAN,
                    std=IMAGENET_STD,
                    description=f"DINOv2 ViT-{size.upper()}/14"
                    + (" with 4 registers" if reg else "")
                    + " (self-supervised, LVD-142M)",
                )
            )


_register_all()


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a glob pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_spec(variant: str) -> ModelSpec:
    """The registered spec of ``variant``; unknown names raise with the list of known ones."""
    try:
        return _REGISTRY[variant]
    except KeyError:
        raise ValueError(
            f"Unknown model variant {variant!r}. Known variants: {', '.join(list_models())}"
        ) from None


_OVERRIDABLE = {f.name for f in dataclasses.fields(VisionTransformer)} - {"num_classes", "parent"}
_OVERRIDABLE -= {"name"}


def _as_dtype(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return jnp.dtype(value).type
        except TypeError:
            raise ValueError(f"Unknown dtype {value!r}; use e.g. 'float32' or 'bfloat16'") from None
    return value


def model_kwargs(variant: str, **overrides: Any) -> dict[str, Any]:
    """The module kwargs of ``variant`` with config overrides applied and validated."""
    spec = get_spec(variant)
    unknown = set(overrides) - _OVERRIDABLE
    if unknown:
        raise ValueError(
            f"Unknown override(s) {sorted(unknown)} for {variant}; valid: {sorted(_OVERRIDABLE)}"
        )
    kwargs = dict(spec.kwargs)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if "dtype" in kwargs:
        kwargs["dtype"] = _as_dtype(kwargs["dtype"])
    if kwargs["image_size"] % kwargs["patch_size"]:
        raise ValueError(
            f"image_size {kwargs['image_size']} is not a multiple of the patch size "
            f"{kwargs['patch_size']} of {variant}"
        )
    return kwargs


def create_model(variant: str, num_classes: int, **overrides: Any) -> VisionTransformer:
    """Builds the Flax module of a registered variant.

    Overrides (``None`` means keep the variant's default): ``dtype`` (compute dtype; params stay
    float32), ``dropout``, ``drop_path``, ``remat``, ``head_zero_init``, ``num_registers``,
    ``image_size`` (sets the stored position-embedding grid), ``attention_impl``, ...
    ``num_classes=0`` builds a headless feature extractor.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    return VisionTransformer(num_classes=num_classes, **model_kwargs(variant, **overrides))


def count_params(variant: str, num_classes: int = 0, **overrides: Any) -> int:
    """Parameter count without allocating the parameters (shape evaluation only)."""
    model = create_model(variant, num_classes, **overrides)
    size = model.image_size
    shapes = jax.eval_shape(
        lambda: model.init(
            {"params": jax.random.key(0)}, jnp.zeros((1, size, size, 3), jnp.float32)
        )
    )
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def flops_per_image(variant: str, image_size: int | None = None, num_classes: int = 0) -> float:
    """Forward GFLOPs for one image (matmuls only, 2 FLOPs per multiply-accumulate).

    Counts the patch embedding, QKV/output projections, both attention matmuls, the MLP and the
    head; norms, softmax and activations are ignored, as is conventional.
    """
    spec = get_spec(variant)
    k = spec.kwargs
    size = image_size or spec.image_size
    p, d, hidden = k["patch_size"], k["width"], k["mlp_dim"]
    if size % p:
        raise ValueError(f"image_size {size} is not a multiple of the patch size {p}")
    n = (size // p) ** 2
    t = n + 1 + k.get("num_registers", 0)
    mlp_macs = 3 * t * d * hidden if k.get("mlp_kind") == "swiglu" else 2 * t * d * hidden
    block = 4 * t * d * d + 2 * t * t * d + mlp_macs
    macs = n * p * p * 3 * d + k["depth"] * block + d * num_classes
    return 2.0 * macs / 1e9
