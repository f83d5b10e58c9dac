"""The data of the registry: architectures, their pretrained-weights tags and legacy names.

Kept apart from :mod:`cxrjax.models.registry` (which resolves names) so that adding weights is an
edit to tables only. Resampling rules (``posemb_resample``) name the code the weights were
trained and are used with: ``dinov2`` (official DINOv2), ``timm`` (timm, DINOv2 register models),
``hf`` (transformers' bicubic ``interpolate_pos_encoding``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
# microsoft/rad-dino's preprocessor_config.json (image_mean / image_std, one grey value per
# channel); rad-dino-maira-2 ships the same RAD-DINO processor. Not re-checked offline.
RAD_DINO_MEAN = (0.5307, 0.5307, 0.5307)
RAD_DINO_STD = (0.2583, 0.2583, 0.2583)

_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
_AUGREG_URL = "https://storage.googleapis.com/vit_models/augreg/{name}.npz"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Module kwargs and family; ``mean``/``std`` only matter for architectures without tags."""

    kwargs: dict[str, Any]
    family: str
    description: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class Weights:
    """One pretrained-weights tag: sources, resolution, input statistics, resampling rule."""

    sources: dict[str, str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    image_size: int | None = None  # None: the architecture's
    posemb_resample: str | None = None  # None: the architecture's


ARCHITECTURES: dict[str, Architecture] = {}
TAGS: dict[str, dict[str, Weights]] = {}
ALIASES: dict[str, str] = {}

_SIZES = {
    # name: (width, depth, heads, mlp_dim)
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "giant": (1536, 40, 24, 4096),
    "so400m": (1152, 27, 16, 4304),
}


def _shape(size: str, patch: int, image_size: int, **extra: Any) -> dict[str, Any]:
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


def _arch(name: str, arch: Architecture, **tags: Weights) -> None:
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} registered twice")
    ARCHITECTURES[name] = arch
    if tags:
        TAGS[name] = tags


def _register_small() -> None:
    _arch(
        "vit_tiny_demo",
        Architecture(
            dict(patch_size=8, width=96, depth=4, num_heads=4, mlp_dim=384, image_size=64),
            "augreg",
            "tiny ViT for tests and CPU demos (64-96 px inputs)",
            INCEPTION_MEAN,
            INCEPTION_STD,
        ),
    )
    _arch(
        "vit_tiny14_dinov2",
        Architecture(
            dict(
                patch_size=14,
                width=96,
                depth=2,
                num_heads=4,
                mlp_dim=384,
                image_size=28,
                layerscale_init=1e-5,
                posemb_resample="dinov2",
            ),
            "dinov2",
            "tiny DINOv2-shaped ViT (LayerScale, patch 14) for CPU tests",
        ),
    )


def _register_augreg() -> None:
    npz = {
        "tiny": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
        "small": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
        "base": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
        "large": "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1",
    }
    legacy = {"tiny": "vit_ti16", "small": "vit_s16_in21k", "base": "vit_b16_in21k"}
    legacy["large"] = "vit_l16_in21k"
    for size, file in npz.items():
        name = f"vit_{size}_patch16"
        tags = {
            # The official file first: it is what tools and error messages offer to download.
            "augreg_in21k": Weights(
                {"augreg_npz": _AUGREG_URL.format(name=file), "timm": f"{name}_224.augreg_in21k"},
                INCEPTION_MEAN,
                INCEPTION_STD,
                "supervised on ImageNet-21k (AugReg, big_vision)",
            )
        }
        if size in ("base", "large"):
            # The original ViT release (google/vit-*-in21k on the HF hub), not AugReg.
            tags["orig_in21k"] = Weights(
                {"hf": f"google/vit-{size}-patch16-224-in21k", "timm": f"{name}_224.orig_in21k"},
                INCEPTION_MEAN,
                INCEPTION_STD,
                "supervised on ImageNet-21k (original ViT release)",
                posemb_resample="hf",
            )
        _arch(
            name,
            Architecture(
                _shape(size, 16, 224, posemb_resample="timm"),
                "augreg",
                f"ViT-{size.capitalize()}/16",
            ),
            **tags,
        )
        ALIASES[legacy[size]] = f"{name}.augreg_in21k"


def _register_dinov2() -> None:
    short = {"small": "s", "base": "b", "large": "l", "giant": "g"}
    for size, s in short.items():
        for reg in (False, True):
            extra: dict[str, Any] = dict(layerscale_init=1e-5)
            if size == "giant":
                extra["mlp_kind"] = "swiglu"
            if reg:
                # The register models were released with antialiased, offset-free interpolation
                # (hub: interpolate_antialias=True, interpolate_offset=0.0), which is timm's.
                extra.update(num_registers=4, posemb_resample="timm")
            else:
                extra["posemb_resample"] = "dinov2"
            name = f"vit_{size}_patch14_" + ("reg4_" if reg else "") + "dinov2"
            hub = f"dinov2_vit{s}14"
            hf = f"facebook/dinov2-with-registers-{size}" if reg else f"facebook/dinov2-{size}"
            tags = {
                "lvd142m": Weights(
                    {
                        "dinov2_hub": _DINOV2_URL.format(arch=hub, reg="_reg4" if reg else ""),
                        "timm": f"{name}.lvd142m",
                        "hf": hf,
                    },
                    IMAGENET_MEAN,
                    IMAGENET_STD,
                    "self-supervised on LVD-142M (DINOv2)",
                )
            }
            if size == "base" and not reg:
                # RAD-DINO: DINOv2 ViT-B/14 continued on chest radiographs (Microsoft), a
                # transformers Dinov2Model at 518 px, so transformers' resampling applies.
                for tag, repo, what in (
                    ("rad_dino", "microsoft/rad-dino", "RAD-DINO"),
                    ("rad_dino_maira2", "microsoft/rad-dino-maira-2", "RAD-DINO (MAIRA-2)"),
                ):
                    tags[tag] = Weights(
                        {"hf": repo},
                        RAD_DINO_MEAN,
                        RAD_DINO_STD,
                        f"self-supervised on chest radiographs ({what})",
                        posemb_resample="hf",
                    )
            description = f"DINOv2 ViT-{s.upper()}/14" + (" with 4 registers" if reg else "")
            _arch(name, Architecture(_shape(size, 14, 518, **extra), "dinov2", description), **tags)
            ALIASES[f"vit_{s}14_dinov2" + ("_reg4" if reg else "")] = f"{name}.lvd142m"


def _register_dinov3() -> None:
    common = dict(
        posemb="rope",
        rope_base=100.0,
        key_bias=False,
        num_registers=4,
        layerscale_init=1e-5,
        layernorm_eps=1e-5,
    )
    for size, hub, extra in (
        ("small", "vits16", {}),
        ("small_plus", "vits16plus", dict(mlp_kind="swiglu")),
        ("base", "vitb16", {}),
        ("large", "vitl16", {}),
    ):
        name = f"vit_{size}_patch16_dinov3"
        shape = _shape(size.removesuffix("_plus"), 16, 224, **common, **extra)
        label = {"small": "S", "small_plus": "S+", "base": "B", "large": "L"}[size]
        _arch(
            name,
            Architecture(shape, "dinov3", f"DINOv3 ViT-{label}/16 (2-D RoPE, 4 storage tokens)"),
            lvd1689m=Weights(
                {
                    "hf": f"facebook/dinov3-{hub}-pretrain-lvd1689m",
                    "timm": f"{name}.lvd1689m",
                    "dinov3_hub": f"dinov3_{hub} (torch.hub; weights URL from Meta on request)",
                },
                IMAGENET_MEAN,
                IMAGENET_STD,
                "self-supervised on LVD-1689M (DINOv3)",
            ),
        )


def _register_siglip() -> None:
    common = dict(
        class_token=False,
        pool="map",
        gelu_approximate=True,
        layernorm_eps=1e-6,
        posemb_resample="hf",
    )

    def tag(repo: str, what: str, image_size: int | None = None, **more: str) -> Weights:
        return Weights({"hf": repo, **more}, INCEPTION_MEAN, INCEPTION_STD, what, image_size)

    _arch(
        "vit_base_patch16_siglip",
        Architecture(_shape("base", 16, 224, **common), "siglip", "SigLIP ViT-B/16 image tower"),
        webli=tag(
            "google/siglip-base-patch16-224",
            "SigLIP on WebLI, 224 px",
            timm="vit_base_patch16_siglip_224.webli",
        ),
        v2_webli=tag(
            "google/siglip2-base-patch16-224",
            "SigLIP 2 on WebLI, 224 px",
            timm="vit_base_patch16_siglip_224.v2_webli",
        ),
    )
    # The "384 px" So400m/14 weights see a 27 x 27 patch grid: their stride-14 convolution drops
    # the last 6 pixels, so 378 px inputs are what they compute on.
    _arch(
        "vit_so400m_patch14_siglip",
        Architecture(_shape("so400m", 14, 378, **common), "siglip", "SigLIP So400m/14 image tower"),
        webli=tag(
            "google/siglip-so400m-patch14-384",
            "SigLIP on WebLI, 384 px (27 x 27 patches: 378 px)",
            timm="vit_so400m_patch14_siglip_384.webli",
        ),
        v2_webli=tag(
            "google/siglip2-so400m-patch14-384",
            "SigLIP 2 on WebLI, 384 px (27 x 27 patches: 378 px)",
            timm="vit_so400m_patch14_siglip_384.v2_webli",
        ),
        medsiglip=tag("google/medsiglip-448", "MedSigLIP (medical images), 448 px", 448),
    )


_register_small()
_register_augreg()
_register_dinov2()
_register_dinov3()
_register_siglip()
