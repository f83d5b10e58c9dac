"""Loading converted pretrained weights into a freshly initialised parameter tree.

The trainer initialises its model for the configured variant, labels and resolution, then calls
:func:`load_pretrained`: every backbone parameter must come from the checkpoint (a missing or
mis-shaped one means another architecture and is an error), position embeddings are resampled
to the new grid the way the variant's reference code does it, and the head is re-initialised,
with the reason reported, when the label sets differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrjax.data.datasets.labels import canonical
from cxrjax.models.posemb import resample_posemb
from cxrjax.models.registry import get_spec
from cxrjax.models.weights import (
    CheckpointError,
    MissingCheckpointError,
    flatten,
    read_weights,
    unflatten,
    weights_dir,
)

__all__ = ["CheckpointError", "LoadReport", "MissingCheckpointError", "load_pretrained"]

# Parameters a checkpoint may lack: they are task- or option-specific, not backbone weights
# (LoRA adapters start from their own initialisation: zero B, so the base model's function).
_OPTIONAL_PREFIXES = ("head/", "registers")
_OPTIONAL_SUFFIXES = ("/lora_a", "/lora_b")


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_pretrained` did with each parameter."""

    path: str
    source: str
    source_variant: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    resampled: dict[str, str] = dataclasses.field(default_factory=dict)
    reinitialised: dict[str, str] = dataclasses.field(default_factory=dict)
    unused: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"  source: {self.source} (variant {self.source_variant})",
            f"  loaded: {len(self.loaded)} arrays",
        ]
        lines += [f"  resampled {k}: {v}" for k, v in self.resampled.items()]
        lines += [f"  re-initialised {k}: {v}" for k, v in self.reinitialised.items()]
        if self.unused:
            lines.append(f"  unused from checkpoint: {', '.join(self.unused)}")
        return "\n".join(lines)


def conversion_command(path: str | Path, variant: str) -> str:
    """The command that creates converted weights for ``variant`` at ``path``.

    SOURCE is the official file when there is a public URL, else the Hugging Face repository
    (``tools/convert_checkpoint.py`` downloads either; gated repositories need a login).
    """
    sources = get_spec(variant).sources
    source = next(
        (sources[s] for s in ("dinov2_hub", "augreg_npz", "hf") if s in sources), "SOURCE"
    )
    return f"python tools/convert_checkpoint.py {source} --variant {variant} --out {path}"


def load_pretrained(
    path: str,
    params: Any,
    *,
    variant: str,
    image_size: int,
    label_names: Sequence[str] | None = None,
) -> tuple[dict[str, Any], LoadReport]:
    """Returns ``params`` with every matching array replaced from the checkpoint, and a report.

    ``params`` is the target model's freshly initialised tree (it supplies shapes, and the values
    of anything re-initialised). ``label_names``, when given and the checkpoint records its own,
    re-initialises a same-sized head whose labels differ.
    """
    try:
        flat_ckpt, meta = read_weights(path)
    except MissingCheckpointError:
        raise MissingCheckpointError(
            f"no converted weights at {path}.\nCreate them with:\n  "
            f"{conversion_command(path, variant)}\n"
            "(or a local file/folder as SOURCE: a DINOv2 .pth, a timm or HF checkpoint, an AugReg "
            ".npz, or a cxrjax run directory)"
        ) from None
    params_file = weights_dir(path) / "params.safetensors"
    spec_kwargs = get_spec(variant).kwargs
    resample = spec_kwargs.get("posemb_resample", "timm")
    num_prefix = int(spec_kwargs.get("class_token", True))
    target = flatten(params)
    report = LoadReport(
        path=str(path), source=str(meta.get("source")), source_variant=str(meta.get("variant"))
    )
    head_reason = _head_mismatch(flat_ckpt, target, meta, label_names)
    out: dict[str, np.ndarray] = {}
    missing = []
    for key, init in target.items():
        if key.startswith("head/") and head_reason:
            out[key] = init
            report.reinitialised[key] = head_reason
            continue
        if key not in flat_ckpt:
            if key.startswith(_OPTIONAL_PREFIXES) or key.endswith(_OPTIONAL_SUFFIXES):
                out[key] = init
                report.reinitialised[key] = "not in the checkpoint"
            else:
                missing.append(key)
            continue
        value = flat_ckpt[key]
        if key == "pos_embedding" and value.shape != init.shape:
            value = _resample(value, init.shape, resample, num_prefix, params_file)
            old = meta.get("image_size")
            report.resampled[key] = (
                f"{flat_ckpt[key].shape} ({old} px) -> {init.shape} ({image_size} px), "
                f"{resample} bicubic"
            )
        if value.shape != init.shape:
            raise CheckpointError(
                f"{params_file}: {key} has shape {value.shape}, the {variant} model needs "
                f"{init.shape}; the checkpoint is of another architecture (it was converted as "
                f"{meta.get('variant')!r})"
            )
        out[key] = value.astype(np.asarray(init).dtype)
        report.loaded.append(key)
    if missing:
        raise CheckpointError(
            f"{params_file} lacks {len(missing)} parameter(s) of {variant}, e.g. "
            f"{', '.join(missing[:5])}; it was converted as {meta.get('variant')!r}: convert the "
            f"checkpoint for {variant} or choose the matching variant"
        )
    report.unused = sorted(k for k in flat_ckpt if k not in target)
    return unflatten(out), report


def _head_mismatch(
    ckpt: dict[str, np.ndarray],
    target: dict[str, np.ndarray],
    meta: dict[str, Any],
    label_names: Sequence[str] | None,
) -> str | None:
    """Why the checkpoint's head cannot be used for the target, or None when it can."""
    if "head/kernel" not in target:
        return None
    ckpt_labels = meta.get("label_names")
    if "head/kernel" not in ckpt:
        return "the checkpoint has no head"
    n_ckpt, n_target = ckpt["head/kernel"].shape[-1], target["head/kernel"].shape[-1]
    if ckpt["head/kernel"].shape != target["head/kernel"].shape:
        names = f" {ckpt_labels}" if ckpt_labels else ""
        return (
            f"label sets differ: the checkpoint's head has {n_ckpt} outputs{names}, "
            f"the model {n_target}"
        )
    if (
        label_names is not None
        and ckpt_labels is not None
        and [canonical(n) or n for n in ckpt_labels] != [canonical(n) or n for n in label_names]
    ):
        return f"label sets differ: checkpoint {list(ckpt_labels)}, model {list(label_names)}"
    return None


def _resample(
    value: np.ndarray, shape: tuple[int, ...], method: str, num_prefix: int, params_file: Path
) -> np.ndarray:
    """Resamples a (1, num_prefix + n*n, D) position embedding to ``shape``."""
    n_old, n_new = value.shape[1] - num_prefix, shape[1] - num_prefix
    side_old, side_new = int(round(n_old**0.5)), int(round(n_new**0.5))
    if side_old**2 != n_old or side_new**2 != n_new or value.shape[2] != shape[2]:
        raise CheckpointError(
            f"{params_file}: pos_embedding {value.shape} cannot be resampled to {shape}"
        )
    return resample_posemb(value, num_prefix, (side_new, side_new), method, (side_old, side_old))
