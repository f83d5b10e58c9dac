"""Architectures apart from weights tags; legacy names keep resolving to what they meant."""

from __future__ import annotations

import importlib

import pytest

from cxrjax.engine.step import input_stats
from cxrjax.errors import ConfigError
from cxrjax.models import get_spec, list_models
from cxrjax.models.convert import match_variant
from cxrjax.models.pretrained import conversion_command
from cxrjax.models.registry import list_aliases, list_architectures, list_pretrained


def test_legacy_names_are_aliases_of_tags():
    aliases = list_aliases()
    assert aliases["vit_b16_in21k"] == "vit_base_patch16.augreg_in21k"
    assert aliases["vit_b14_dinov2"] == "vit_base_patch14_dinov2.lvd142m"
    assert aliases["vit_s14_dinov2_reg4"] == "vit_small_patch14_reg4_dinov2.lvd142m"
    for alias, full in aliases.items():
        old, new = get_spec(alias), get_spec(full)
        assert old.kwargs == new.kwargs and old.sources == new.sources and old.mean == new.mean
        assert old.name == alias  # recorded names stay as written
    assert set(aliases) <= set(list_models())


def test_architecture_name_takes_its_default_tag_and_tags_their_own_values():
    arch = get_spec("vit_base_patch14_dinov2")
    assert arch.tag == "lvd142m" and arch.kwargs["posemb_resample"] == "dinov2"
    rad = get_spec("vit_base_patch14_dinov2.rad_dino")
    assert rad.arch == "vit_base_patch14_dinov2" and rad.image_size == 518
    assert rad.mean == (0.5307,) * 3 and rad.std == (0.2583,) * 3
    assert rad.kwargs["posemb_resample"] == "hf"  # transformers' Dinov2Model
    assert {k: v for k, v in rad.kwargs.items() if k != "posemb_resample"} == {
        k: v for k, v in arch.kwargs.items() if k != "posemb_resample"
    }
    np_mean, np_std = input_stats("pretrained", "vit_base_patch14_dinov2.rad_dino_maira2")
    assert list(np_mean) == pytest.approx([0.5307] * 3) and list(np_std) == pytest.approx(
        [0.2583] * 3
    )
    assert list(input_stats("pretrained", "vit_so400m_patch14_siglip.medsiglip")[1]) == [0.5] * 3
    # An architecture without tags (scratch/test shapes) has no sources.
    assert get_spec("vit_tiny_demo").tag is None and get_spec("vit_tiny_demo").sources == {}


def test_listing_and_unknown_names():
    assert "vit_small_plus_patch16_dinov3" in list_architectures("*dinov3")
    assert "vit_base_patch16_dinov3.lvd1689m" in list_pretrained()
    assert not any("." in n for n in list_architectures())
    for bad in ("vit_nope", "vit_base_patch16.nope", "vit_nope.lvd142m"):
        with pytest.raises(ConfigError, match="Known variants"):
            get_spec(bad)


def test_shapes_match_architectures_not_tags():
    kw = get_spec("vit_base_patch16_dinov3").kwargs
    assert match_variant(kw) == "vit_base_patch16_dinov3"
    assert (
        match_variant(kw, "vit_base_patch16_dinov3.lvd1689m") == "vit_base_patch16_dinov3.lvd1689m"
    )
    # RAD-DINO and DINOv2 share a shape: a tag is never guessed, the architecture is returned.
    assert match_variant(get_spec("vit_b14_dinov2").kwargs) == "vit_base_patch14_dinov2"


@pytest.mark.parametrize(
    "config,arg,source",
    [
        ("ssl_nonmed_dinov3", None, "facebook/dinov3-vitb16-pretrain-lvd1689m"),
        ("ssl_med_raddino", None, "microsoft/rad-dino"),
        ("ssl_med_raddino", "weights=rad_dino_maira2", "microsoft/rad-dino-maira-2"),
        ("siglip", None, "google/medsiglip-448"),
        ("siglip", "init=siglip2", "google/siglip2-so400m-patch14-384"),
    ],
)
def test_study_arm_configs_name_their_conversion_command(config, arg, source):
    c = importlib.import_module(f"configs.{config}").get_config(arg)
    get_spec(c.model.variant)
    assert c.model.init_hint == conversion_command(c.model.init_from, c.model.variant)
    assert c.model.init_hint.startswith(f"python tools/convert_checkpoint.py {source} ")
    assert f"--variant {c.model.variant} --out {c.model.init_from}" in c.model.init_hint
