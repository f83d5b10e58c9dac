"""Architectures and pretrained-weights tags (timm's habit: ``arch.tag``).

An *architecture* (``vit_base_patch16``, ``vit_base_patch14_dinov2``, ``vit_small_patch16_dinov3``,
``vit_so400m_patch14_siglip``, ...) fixes the module's shape and defaults; scratch training uses
it alone. A *weights tag* (``.augreg_in21k``, ``.lvd142m``, ``.rad_dino``, ``.lvd1689m``,
``.webli``, ...) names one set of pretrained weights of it and carries what using them needs: the
sources they come from, the resolution they were trained at (the stored position-embedding grid),
the input mean/std they expect, and the position-embedding resampling rule of the code they were
trained with. ``get_spec`` resolves any of

* ``arch.tag``: that tag;
* ``arch``: the architecture with its first (default) tag, as timm does;
* a legacy name (``vit_b16_in21k``, ``vit_b14_dinov2``, ...): the tag it always meant, so
  existing configs, converted weights (``meta.json``) and run directories keep working.

``create_model`` applies config overrides (compute dtype, dropout, stochastic depth, remat, head
init, pooling, LoRA, image size) on top of the resolved spec.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.errors import ConfigError
from cxrjax.models import catalog
from cxrjax.models.vit import VisionTransformer

IMAGENET_MEAN = catalog.IMAGENET_MEAN
IMAGENET_STD = catalog.IMAGENET_STD
INCEPTION_MEAN = catalog.INCEPTION_MEAN
INCEPTION_STD = catalog.INCEPTION_STD


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the rest of cxrjax needs to know about an architecture with its weights.

    ``kwargs`` are the module's (the tag's resolution and resampling rule applied). ``sources``
    maps a source kind (``dinov2_hub``, ``timm``, ``hf``, ``augreg_npz``, ``big_vision_npz``) to
    its public name or URL. ``mean``/``std`` are the input normalisation the weights expect.
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
    arch: str = ""
    tag: str | None = None

    @property
    def width(self) -> int:
        return self.kwargs["width"]


def list_architectures(pattern: str = "*") -> list[str]:
    """Architecture names matching a glob pattern, sorted."""
    return sorted(n for n in catalog.ARCHITECTURES if fnmatch.fnmatch(n, pattern))


def list_pretrained(pattern: str = "*") -> list[str]:
    """``arch.tag`` names matching a glob pattern, sorted."""
    names = (f"{a}.{t}" for a, tags in catalog.TAGS.items() for t in tags)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def list_aliases() -> dict[str, str]:
    """Legacy variant names and the ``arch.tag`` each stands for."""
    return dict(sorted(catalog.ALIASES.items()))


def list_models(pattern: str = "*") -> list[str]:
    """Every name ``get_spec`` accepts (architectures, ``arch.tag``, legacy names), sorted."""
    names = [*catalog.ARCHITECTURES, *list_pretrained(), *catalog.ALIASES]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def get_spec(variant: str) -> ModelSpec:
    """The spec of an architecture, ``arch.tag`` or legacy name; unknown names raise."""
    full = catalog.ALIASES.get(variant, variant)
    arch_name, _, tag_name = full.partition(".")
    arch = catalog.ARCHITECTURES.get(arch_name)
    tags = catalog.TAGS.get(arch_name, {})
    if arch is None or (tag_name and tag_name not in tags):
        raise ConfigError(
            f"Unknown model variant {variant!r}",
            f"Known variants: {', '.join(list_models())}",
        )
    if not tag_name and tags:
        tag_name = next(iter(tags))
    kwargs = dict(arch.kwargs)
    if tag_name:
        tag = tags[tag_name]
        kwargs["image_size"] = tag.image_size or kwargs["image_size"]
        if tag.posemb_resample:
            kwargs["posemb_resample"] = tag.posemb_resample
        sources, mean, std = dict(tag.sources), tag.mean, tag.std
        description = f"{arch.description}; {tag.description}"
    else:
        sources, mean, std, description = {}, arch.mean, arch.std, arch.description
    return ModelSpec(
        name=variant,
        kwargs=kwargs,
        patch_size=kwargs["patch_size"],
        image_size=kwargs["image_size"],
        family=arch.family,
        sources=sources,
        mean=mean,
        std=std,
        description=description,
        arch=arch_name,
        tag=tag_name or None,
    )


_OVERRIDABLE = {f.name for f in dataclasses.fields(VisionTransformer)} - {"num_classes", "parent"}
_OVERRIDABLE -= {"name"}


def _as_dtype(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return jnp.dtype(value).type
        except TypeError:
            raise ConfigError(
                f"Unknown dtype {value!r}; use e.g. 'float32' or 'bfloat16'"
            ) from None
    return value


def model_kwargs(variant: str, **overrides: Any) -> dict[str, Any]:
    """The module kwargs of ``variant`` with config overrides applied and validated."""
    spec = get_spec(variant)
    unknown = set(overrides) - _OVERRIDABLE
    if unknown:
        raise ConfigError(
            f"Unknown override(s) {sorted(unknown)} for {variant}; valid: {sorted(_OVERRIDABLE)}"
        )
    kwargs = dict(spec.kwargs)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if "dtype" in kwargs:
        kwargs["dtype"] = _as_dtype(kwargs["dtype"])
    if "lora_targets" in kwargs:
        kwargs["lora_targets"] = tuple(kwargs["lora_targets"])
    if kwargs["image_size"] % kwargs["patch_size"]:
        raise ConfigError(
            f"image_size {kwargs['image_size']} is not a multiple of the patch size "
            f"{kwargs['patch_size']} of {variant}"
        )
    return kwargs


def create_model(variant: str, num_classes: int, **overrides: Any) -> VisionTransformer:
    """Builds the Flax module of a registered variant.

    Overrides (``None`` means keep the variant's default): ``dtype`` (compute dtype; params stay
    float32), ``dropout``, ``drop_path``, ``remat``, ``head_zero_init``, ``num_registers``,
    ``image_size`` (sets the stored position-embedding grid), ``attention_impl``, ``pool``,
    ``lora_rank``, ``lora_alpha``, ``lora_targets``, ... ``num_classes=0`` builds a headless
    feature extractor.
    """
    if num_classes < 0:
        raise ConfigError(f"num_classes must be >= 0, got {num_classes}")
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

    Counts the patch embedding, QKV/output projections, both attention matmuls, the MLP, the MAP
    head and the classifier; norms, softmax, RoPE and activations are ignored, as is conventional.
    """
    spec = get_spec(variant)
    k = {f.name: f.default for f in dataclasses.fields(VisionTransformer)} | spec.kwargs
    size = image_size or spec.image_size
    p, d, hidden = k["patch_size"], k["width"], k["mlp_dim"]
    if size % p:
        raise ConfigError(f"image_size {size} is not a multiple of the patch size {p}")
    n = (size // p) ** 2
    t = n + int(k["class_token"]) + k["num_registers"]
    mlp_macs = 3 * t * d * hidden if k["mlp_kind"] == "swiglu" else 2 * t * d * hidden
    block = 4 * t * d * d + 2 * t * t * d + mlp_macs
    macs = n * p * p * 3 * d + k["depth"] * block
    if k["pool"] == "map":
        # One probe query: its projection, keys/values of every token, output and the MLP.
        macs += 2 * d * d + 2 * t * d * d + 2 * t * d + 2 * d * hidden
    features = 2 * d if k["pool"] == "cls_mean" else d
    macs += features * num_classes
    return 2.0 * macs / 1e9
