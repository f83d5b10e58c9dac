"""Conversion of public ViT checkpoints into cxrjax parameter trees, and back to timm.

One module per foreign format (:mod:`.timm` in and out, :mod:`.hf`, :mod:`.big_vision`,
:mod:`.dinov3`, :mod:`.siglip`, :mod:`.dino_head`, :mod:`.run` for cxrjax's own), the shared
pieces in :mod:`.common`, detection and dispatch in :mod:`.source`. Modules import only from
:mod:`.common` and from each other downwards, never from this package's ``__init__``.
"""

from cxrjax.models.convert.common import Converted, read_state_dict
from cxrjax.models.convert.dino_head import DINO_HEAD_FILE, convert_dino_head
from cxrjax.models.convert.run import convert_cxrjax_run, convert_cxrjax_weights
from cxrjax.models.convert.source import (
    FORMATS,
    convert_source,
    detect_format,
    heads_of,
    match_variant,
)
from cxrjax.models.convert.timm import convert_timm, export_timm, timm_config, to_timm_state_dict

__all__ = [
    "DINO_HEAD_FILE",
    "FORMATS",
    "Converted",
    "convert_cxrjax_run",
    "convert_cxrjax_weights",
    "convert_dino_head",
    "convert_source",
    "convert_timm",
    "detect_format",
    "export_timm",
    "heads_of",
    "match_variant",
    "read_state_dict",
    "timm_config",
    "to_timm_state_dict",
]
