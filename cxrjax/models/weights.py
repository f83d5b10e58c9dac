"""cxrjax's converted-weights format: a safetensors tree plus a JSON of provenance.

A weights directory holds ``params.safetensors`` (float32 arrays under flattened ``/``-joined
keys such as ``block_3/attn/query/kernel``) and ``meta.json``::

    {"format": "cxrjax-weights/1", "variant": ..., "source": ..., "source_sha256": ...,
     "source_format": ..., "image_size": ..., "num_classes": ..., "label_names": [...] or null}

Beside the backbone, converted self-supervised checkpoints keep what continued pretraining
needs (fine-tuning's loader reports these keys as unused):

- ``mask_token`` (width,): the trained token that DINOv2 / DINOv3 / RAD-DINO put in place of
  masked patch embeddings (iBOT), the SSL student's ``mask_token``;
- ``dino_head/mlp_<i>/{kernel,bias}``, ``dino_head/prototypes`` (bottleneck, K) and
  ``dino_head/gain`` (K,): a released DINO head (RAD-DINO's ``dino_head.safetensors``) in the
  layout of ``cxrjax.ssl.heads.DINOHead``; ``gain`` is the weight-norm magnitude of each
  prototype (scores are cosines times it).

safetensors holds no code, so reading a file someone sent is safe, unlike a pickle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from cxrjax.errors import CxrjaxError

FORMAT = "cxrjax-weights/1"
PARAMS_FILE = "params.safetensors"
META_FILE = "meta.json"
MASK_TOKEN = "mask_token"
DINO_HEAD = "dino_head"


class MissingCheckpointError(CxrjaxError, FileNotFoundError):
    """Converted weights are absent; the message names the path and the command that makes them."""


class CheckpointError(CxrjaxError, ValueError):
    """A checkpoint exists but cannot be used: truncated, another architecture, a missing key."""


# Parameter trees travel flat under "/"-joined paths (``block_3/attn/query/kernel``), the keys
# of params.safetensors; these two wrappers fix that separator in one place.
def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts -> {'a/b/c': leaf}; empty sub-dicts are dropped."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dicts, the inverse of `flatten`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(
    out_dir: str | Path,
    params: Mapping[str, Any],
    *,
    variant: str,
    source: str,
    source_sha256: str,
    source_format: str,
    image_size: int,
    label_names: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``params`` (nested dict of arrays) and its provenance to ``out_dir``."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flatten(params).items()}
    num_classes = int(flat["head/bias"].shape[0]) if "head/bias" in flat else 0
    if label_names is not None and len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label names for a head with {num_classes} outputs")
    meta = {
        "format": FORMAT,
        "variant": variant,
        "source": source,
        "source_sha256": source_sha256,
        "source_format": source_format,
        "image_size": int(image_size),
        "num_classes": num_classes,
        "label_names": list(label_names) if label_names is not None else None,
        **(extra or {}),
    }
    # Write to temporary names first so an interrupted conversion never looks complete.
    tmp_params, tmp_meta = out / (PARAMS_FILE + ".tmp"), out / (META_FILE + ".tmp")
    save_file(flat, str(tmp_params), metadata={"format": FORMAT, "variant": variant})
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    tmp_params.replace(out / PARAMS_FILE)
    tmp_meta.replace(out / META_FILE)
    return out


def weights_dir(path: str | Path) -> Path:
    """The weights directory for a path naming it, its safetensors file or its JSON."""
    p = Path(path)
    return p.parent if p.name in (PARAMS_FILE, META_FILE) else p


def read_weights(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(flat params, meta) of a cxrjax weights directory; clear errors for absent or bad files."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    d = weights_dir(path)
    params_file, meta_file = d / PARAMS_FILE, d / META_FILE
    if not params_file.is_file() or not meta_file.is_file():
        raise MissingCheckpointError(
            f"no converted weights at {d} (needs {PARAMS_FILE} + {META_FILE})"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is not valid JSON ({e}); re-run the conversion") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{meta_file} has format {meta.get('format')!r}, expected {FORMAT!r}; re-run the "
            "conversion with tools/convert_checkpoint.py"
        )
    try:
        flat = load_file(str(params_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{params_file} is unreadable ({e}); it may be truncated: re-run the conversion"
        ) from e
    return flat, meta
