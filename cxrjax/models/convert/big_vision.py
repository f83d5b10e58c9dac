"""AugReg (vit_jax) and big_vision ViT ``.npz`` files -> cxrjax, and the helpers SigLIP's
big_vision towers share (reading, un-scanning stacked blocks)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrjax.models.convert.common import Converted, Keys, block_count
from cxrjax.models.weights import CheckpointError


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` as float32, refusing pickled objects."""
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
    k = Keys(npz, source)
    depth = block_count(npz, re.escape(t) + r"encoderblock_(\d+)/")
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
