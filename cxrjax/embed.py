"""CLS features (and logits when the checkpoint has a head) of a converted or trained model.

  python -m cxrjax.embed --checkpoint WEIGHTS_DIR --input X [X ...] --out features.npy

X is either one ``.npy`` float32 batch (N, H, W, 3) that is used exactly as given (already
normalised: no preprocessing, so features can be compared with another implementation), or
radiograph files (PNG/JPEG/DICOM, or folders of them) preprocessed as cxrjax's data preparation
does (squash-resize, min-max, histogram equalisation) to the checkpoint's resolution, scaled to
[0, 1] and normalised per ``--normalization``. Writes ``features.npy`` (N, width) float32 and,
with a head, ``features.logits.npy`` (N, num_labels); image order is the sorted input order.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cxrjax.models import create_model, get_spec
from cxrjax.models.weights import CheckpointError, read_weights, unflatten

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


def define_flags() -> None:
    """Defined only when run as a script, so importing this module never clashes flags."""
    flags.DEFINE_string("checkpoint", None, "cxrjax weights directory.")
    flags.DEFINE_multi_string("input", None, "A .npy batch, image files or folders.")
    flags.DEFINE_string("out", None, "Output .npy file for the features.")
    flags.DEFINE_enum(
        "normalization",
        "unit",
        ["unit", "pretrained"],
        "Image inputs: 'unit' feeds [0, 1] (the study), 'pretrained' the variant's mean/std.",
    )
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")


def load_model(checkpoint: str | Path):
    """(model, params, meta) for a cxrjax weights directory, at its stored resolution."""
    flat, meta = read_weights(checkpoint)
    model = create_model(
        meta["variant"], int(meta.get("num_classes", 0)), image_size=meta["image_size"]
    )
    return model, unflatten(flat), meta


def embed_array(
    model, params, images: np.ndarray, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of an (N, H, W, 3) float32 batch; logits equal features when headless."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected an (N, H, W, 3) batch, got shape {images.shape}")
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, return_features=True))
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
        lo, fe = fn(params, jnp.asarray(images[i : i + batch_size], jnp.float32))
        logits.append(np.asarray(lo))
        feats.append(np.asarray(fe))
    return np.concatenate(feats), np.concatenate(logits)


def image_paths(inputs: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.suffix.lower() in _IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not paths:
        raise FileNotFoundError(
            f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {list(inputs)}"
        )
    return paths


def load_images(paths: Sequence[Path], size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Radiograph files -> (N, size, size, 3) float32, as the trainer feeds them."""
    from cxrjax.data.images import PreprocessOptions, load_radiograph

    options = PreprocessOptions(size=size)
    out = np.empty((len(paths), size, size, 3), np.float32)
    for i, p in enumerate(paths):
        gray = load_radiograph(p, options).astype(np.float32) / 255.0
        out[i] = (gray[..., None] - mean) / std
    return out


def run(
    checkpoint: str,
    inputs: Sequence[str],
    out: str,
    normalization: str = "unit",
    batch_size: int = 32,
) -> Path:
    """Writes features (and logits) for ``inputs``; returns the features path."""
    model, params, meta = load_model(checkpoint)
    if len(inputs) == 1 and inputs[0].endswith(".npy"):
        images = np.load(inputs[0], allow_pickle=False)
        if images.dtype != np.float32:
            raise ValueError(f"{inputs[0]}: dtype {images.dtype}, expected float32 (normalised)")
    else:
        spec = get_spec(meta["variant"])
        if normalization == "pretrained":
            mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
        else:
            mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
        images = load_images(image_paths(inputs), meta["image_size"], mean, std)
    feats, logits = embed_array(model, params, images, batch_size)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, feats)
    if meta.get("num_classes"):
        np.save(out_path.with_suffix(".logits.npy"), logits)
    return out_path


def main(argv: list[str]) -> None:
    del argv
    if not (flags.FLAGS.checkpoint and flags.FLAGS.input and flags.FLAGS.out):
        raise app.UsageError("usage: python -m cxrjax.embed --checkpoint C --input X --out F.npy")
    try:
        path = run(
            flags.FLAGS.checkpoint,
            flags.FLAGS.input,
            flags.FLAGS.out,
            flags.FLAGS.normalization,
            flags.FLAGS.batch_size,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
