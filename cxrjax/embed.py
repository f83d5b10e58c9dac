"""CLS features (and logits when the model has a head) of a trained run or converted weights.

  python -m cxrjax.embed --checkpoint RUN_OR_WEIGHTS_DIR --input X [X ...] --out features.npy
      [--which best|latest] [--normalization unit|zscore|pretrained] [--batch_size 32]

X is either one ``.npy`` float32 batch (N, H, W, 3) that is used exactly as given (already
normalised: no preprocessing, so features can be compared with another implementation), or
radiograph files (PNG/JPEG/DICOM, or folders of them). Files go through the one inference path
(`cxrjax.engine.inference.Predictor`): a run directory applies its own training preprocessing
and input normalisation; converted weights take the default preparation at their resolution and
``--normalization`` (default ``unit``, the study's [0, 1]). Writes ``features.npy`` (N, width)
float32 and, with a head, ``features.logits.npy`` (N, num_labels); image order is the sorted
input order.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags

from cxrjax import console
from cxrjax.data.images import ImageReadError, find_images
from cxrjax.engine.inference import Predictor, read_radiographs
from cxrjax.engine.step import NORMALIZATIONS
from cxrjax.errors import ConfigError


def _flag_values() -> flags.FlagValues:
    # A private FlagValues: importing this module never clashes with the trainer's flags.
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "Run directory or converted weights.", flag_values=fv)
    flags.DEFINE_multi_string(
        "input", None, "A .npy batch, image files or folders.", flag_values=fv
    )
    flags.DEFINE_string("out", None, "Output .npy file for the features.", flag_values=fv)
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of a run.", flag_values=fv)
    flags.DEFINE_enum(
        "normalization",
        None,
        list(NORMALIZATIONS),
        "Converted weights only (default unit): the input normalisation.",
        flag_values=fv,
    )
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", flag_values=fv)
    return fv


def embed_files(
    predictor: Predictor, files: Sequence[str], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of radiograph files, prepared as the predictor's training images."""
    feats, logits = [], []
    bar = console.progress(total=len(files), desc="embed", unit="img")
    for chunk in read_radiographs(files, predictor.preprocessing, batch_size):
        bar.update(len(chunk))
        for _, image in chunk:
            if isinstance(image, ImageReadError):
                raise image
        out = predictor.outputs(np.stack([image for _, image in chunk]))
        feats.append(out["features"])
        logits.append(out["logits"])
    bar.close()
    return np.concatenate(feats), np.concatenate(logits)


def run(
    checkpoint: str,
    inputs: Sequence[str],
    out: str,
    *,
    which: str = "best",
    normalization: str | None = None,
    batch_size: int = 32,
) -> Path:
    """Writes features (and logits) for ``inputs``; returns the features path."""
    predictor = Predictor.load(checkpoint, which, normalization)
    if len(inputs) == 1 and inputs[0].endswith(".npy"):
        images = np.load(inputs[0], allow_pickle=False)
        if images.dtype != np.float32:
            raise ConfigError(
                f"{inputs[0]}: dtype {images.dtype}, expected float32 (already normalised)",
                "Save the batch as float32, or pass the image files instead.",
            )
        outs = [
            predictor.outputs_of_normalised(images[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]
        feats = np.concatenate([o["features"] for o in outs])
        logits = np.concatenate([o["logits"] for o in outs])
    else:
        feats, logits = embed_files(predictor, find_images(inputs), batch_size)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, feats)
    if predictor.model.num_classes:
        np.save(out_path.with_suffix(".logits.npy"), logits)
    return out_path


def _main(fv: flags.FlagValues, positional: list[str]) -> int:
    if not (fv.checkpoint and fv.input and fv.out):
        raise ConfigError(
            "--checkpoint, --input and --out are required",
            "python -m cxrjax.embed --checkpoint C --input X --out F.npy",
        )
    path = run(
        fv.checkpoint,
        fv.input,
        fv.out,
        which=fv.which,
        normalization=fv.normalization,
        batch_size=fv.batch_size,
    )
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return console.run_cli(__doc__, _flag_values(), argv, _main)


if __name__ == "__main__":
    sys.exit(main())
