"""What every converter shares: the result type, a key-tracking state dict, torch-file reading.

Each converter returns a :class:`Converted`: the parameter tree plus the architecture it implies,
so the caller can check it against a registered variant before anything is written. Torch files
are read with ``torch.load(weights_only=True)``: a pickle that needs arbitrary code is refused.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrjax.models.weights import MASK_TOKEN, CheckpointError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclasses.dataclass
class Converted:
    """A converted checkpoint: params (nested numpy dict), inferred architecture, provenance."""

    params: dict[str, Any]
    arch: dict[str, Any]
    source_format: str
    unused: list[str]
    label_names: list[str] | None = None
    variant: str | None = None


class Keys:
    """A state dict that remembers which keys were consumed, so leftovers can be reported."""

    def __init__(self, sd: Mapping[str, np.ndarray], source: str):
        self.sd = dict(sd)
        self.used: set[str] = set()
        self.source = source

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise CheckpointError(f"{self.source}: missing key {key!r}")
        self.used.add(key)
        return self.sd[key]

    def skip(self, *keys: str) -> None:
        """Marks keys as deliberately left out (derived buffers), so they are not reported."""
        self.used.update(key for key in keys if key in self.sd)

    def unused(self) -> list[str]:
        return sorted(set(self.sd) - self.used)


def qkv_kernel(w: np.ndarray, heads: int) -> np.ndarray:
    """torch Linear (out, in) -> flax DenseGeneral (in, heads, head_dim)."""
    return w.T.reshape(w.shape[1], heads, w.shape[0] // heads)


def block_count(keys: Iterable[str], pattern: str) -> int:
    """The number of transformer blocks, whose indices (group 1 of ``pattern``) run 0..n-1."""
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not idx or idx != set(range(len(idx))):
        raise CheckpointError(f"no consecutive transformer blocks matching {pattern!r}")
    return len(idx)


def take_mask_token(k: Keys, key: str, params: dict[str, Any]) -> None:
    """Stores the checkpoint's trained mask token under ``MASK_TOKEN`` with shape (width,).

    DINOv2 / DINOv3 pretraining replaces masked patch embeddings by it (iBOT); continued
    pretraining must start from the trained vector, not from zeros. Sources store it as (1, D)
    or (1, 1, D).
    """
    if key not in k:
        return
    token = k[key]
    width = params["embedding"]["kernel"].shape[-1]
    if token.size != width:
        raise CheckpointError(f"{k.source}: {key} has shape {token.shape}, expected {width} values")
    params[MASK_TOKEN] = token.reshape(width)


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    # Training checkpoints nest the weights; torch-hub and timm files are flat.
    for key in ("model", "state_dict", "teacher", "model_ema"):
        if key in sd and isinstance(sd[key], Mapping):
            return _unwrap(sd[key])
    return sd


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A torch state dict as float32 numpy arrays, without executing pickled code."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            sd = load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{p}: unreadable safetensors file ({e}); truncated?") from e
        except TypeError:
            sd = _torch_safetensors(p)  # bfloat16 tensors: numpy has no such dtype
        return {k: np.asarray(v, np.float32) for k, v in sd.items()}
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{p}: reading torch files needs PyTorch: pip install torch") from e
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"{p}: not a readable weights-only torch file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Truncated files and pickles that need "
            "code to load are refused; re-download it or save it with torch.save(state_dict)"
        ) from e
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{p}: holds a {type(sd).__name__}, not a state dict")
    sd = _unwrap(sd)
    return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}


def _torch_safetensors(p: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(p)).items()}
