"""A released DINOv2-style DINO head (RAD-DINO's ``dino_head.safetensors``) -> cxrjax's layout.

DINOv2's ``DINOHead`` is ``mlp`` (Linear layers at ``mlp.0``, ``mlp.2``, ``mlp.4`` with GELUs
between them, or a single ``mlp`` Linear), an L2 normalisation, and ``last_layer``: a Linear
without bias under weight norm, stored as ``weight_g`` (K, 1) / ``weight_v`` (K, bottleneck)
(``torch.nn.utils.weight_norm``) or ``parametrizations.weight.original0`` / ``original1``
(``torch.nn.utils.parametrizations.weight_norm``). Its row k is ``g_k * v_k / |v_k|``, so a score
is the cosine between the bottleneck and prototype k, times the trained gain ``g_k``.

cxrjax's :class:`cxrjax.ssl.heads.DINOHead` names the layers ``mlp_<i>`` (kernels transposed),
keeps the prototypes as columns of ``prototypes`` (bottleneck, K) and the gain as ``gain`` (K,).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cxrjax.models.convert.common import Keys
from cxrjax.models.weights import CheckpointError

DINO_HEAD_FILE = "dino_head.safetensors"

_LAST = (
    ("last_layer.weight_g", "last_layer.weight_v"),
    (
        "last_layer.parametrizations.weight.original0",
        "last_layer.parametrizations.weight.original1",
    ),
)


def _prefix(keys: list[str], source: str) -> str:
    # Heads saved out of a training checkpoint keep its module path ('dino_head.', 'student.').
    found = {key[: key.index("last_layer.")] for key in keys if "last_layer." in key}
    if len(found) != 1:
        raise CheckpointError(
            f"{source}: expected one DINO head (keys '...last_layer.*' and '...mlp.*'), found "
            f"{sorted(found) or 'none'} among {sorted(keys)[:6]}"
        )
    return found.pop()


def convert_dino_head(
    sd: Mapping[str, np.ndarray], *, width: int, source: str = "DINO head"
) -> tuple[dict[str, Any], list[str]]:
    """(the head's params in cxrjax's layout, keys of ``sd`` that were not converted)."""
    pre = _prefix(list(sd), source)
    k = Keys(sd, source)
    if any(re.match(re.escape(pre) + r"mlp\.\d+\.running_mean$", key) for key in sd):
        raise CheckpointError(
            f"{source}: a DINO head with BatchNorm (use_bn=True); cxrjax's head has none"
        )
    linear = re.compile(re.escape(pre) + r"mlp\.(\d+)\.weight$")
    layers = sorted(int(m.group(1)) for key in sd if (m := linear.match(key)))
    names = [f"{pre}mlp.{i}" for i in layers] or [f"{pre}mlp"]
    p: dict[str, Any] = {}
    for i, name in enumerate(names):
        w = k[name + ".weight"]
        # DINOHead(mlp_bias=False) has no biases: zeros compute the same.
        b = k[name + ".bias"] if name + ".bias" in k else np.zeros(w.shape[0], w.dtype)
        p[f"mlp_{i}"] = {"kernel": w.T, "bias": b}
    if p["mlp_0"]["kernel"].shape[0] != width:
        raise CheckpointError(
            f"{source}: the head reads {p['mlp_0']['kernel'].shape[0]} features, the backbone "
            f"has width {width}"
        )
    for g_key, v_key in _LAST:
        if pre + v_key in k:
            v, g = k[pre + v_key], k[pre + g_key].reshape(-1)
            break
    else:
        # No weight norm (removed before saving): the gain is each row's norm.
        v = k[pre + "last_layer.weight"]
        g = np.linalg.norm(v, axis=1)
    if v.shape[1] != p[f"mlp_{len(names) - 1}"]["kernel"].shape[1] or g.shape != v.shape[:1]:
        raise CheckpointError(f"{source}: last_layer {v.shape} does not follow the MLP's output")
    p["prototypes"] = v.T
    p["gain"] = g
    return p, k.unused()
