"""Predict new radiographs with a trained run, optionally with attention-rollout heatmaps.

  python -m cxrjax.predict --checkpoint W FILE_OR_FOLDER... [--out DIR] [--heatmap]
      [--which best|latest] [--batch_size N]

W is a run directory. Each DICOM, PNG or JPEG file (folders: every such file below them) gets the
preprocessing its training images had and the trainer's input normalisation; the per-label
probabilities are printed and written to DIR/predictions.csv and DIR/predictions.json (DIR
defaults to the current directory). --heatmap also writes DIR/<stem>_heatmap.png per image: the
attention rollout of the CLS token over the patches, on the preprocessed image. Unreadable files
are reported and skipped; the exit status is non-zero only when no file could be read.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags
from PIL import Image

from cxrjax import console
from cxrjax.data.images import ImageReadError, find_images
from cxrjax.engine.inference import Predictor, read_radiographs
from cxrjax.errors import ConfigError
from cxrjax.evaluation import rollout

CSV_FILE = "predictions.csv"
JSON_FILE = "predictions.json"


def _flag_values() -> flags.FlagValues:
    # A private FlagValues: the trainer's entry point defines flags too and both may be
    # imported in one process.
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "Run directory to predict with.", flag_values=fv)
    flags.DEFINE_enum(
        "which", "best", ["best", "latest"], "Which checkpoint of the run.", flag_values=fv
    )
    flags.DEFINE_string("out", ".", "Directory for the CSV, JSON and heatmaps.", flag_values=fv)
    flags.DEFINE_bool(
        "heatmap", False, "Write an attention-rollout overlay per image.", flag_values=fv
    )
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", flag_values=fv)
    return fv


@dataclasses.dataclass
class Outcome:
    """What became of the files: probabilities of the read ones, errors of the skipped ones."""

    label_names: list[str]
    files: list[str]  # read files, in input order
    probs: np.ndarray  # (len(files), num_labels) float32
    heatmaps: list[str | None]  # per read file: the written overlay PNG, if asked for
    skipped: list[tuple[str, str]]  # (file, error message)


def _heatmap_path(out_dir: Path, file: str, used: set[str]) -> Path:
    # Distinct inputs can share a stem (DICOM series are often 1.dcm, 2.dcm in many folders).
    stem = Path(file).stem
    name, n = f"{stem}_heatmap.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}_heatmap.png"
    used.add(name)
    return out_dir / name


def predict_files(
    predictor: Predictor,
    files: Sequence[str],
    *,
    batch_size: int = 64,
    heatmap_dir: Path | None = None,
    report: Callable[[str, str], None] | None = None,
) -> Outcome:
    """Probabilities (and, with `heatmap_dir`, overlay PNGs) for `files` under a predictor.

    report(file, message) is called for each unreadable file, which is then skipped.
    """
    skipped: list[tuple[str, str]] = []
    if heatmap_dir is not None:
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    names, probs, heatmaps = [], [], []
    bar = console.progress(total=len(files), desc="predict", unit="img")
    for chunk in read_radiographs(files, predictor.preprocessing, batch_size):
        bar.update(len(chunk))
        batch_names, images = [], []
        for name, image in chunk:
            if isinstance(image, ImageReadError):
                skipped.append((name, str(image)))
                if report is not None:
                    report(name, str(image))
            else:
                batch_names.append(name)
                images.append(image)
        if not images:
            continue
        names.extend(batch_names)
        if heatmap_dir is None:
            probs.append(predictor.outputs(np.stack(images))["probs"])
            heatmaps.extend([None] * len(images))
            continue
        batch_probs, maps = predictor.heatmaps(np.stack(images))
        probs.append(batch_probs)
        for name, image, patch_map in zip(batch_names, images, maps, strict=True):
            path = _heatmap_path(heatmap_dir, name, used)
            Image.fromarray(rollout.overlay(image, patch_map)).save(path)
            heatmaps.append(str(path))
    bar.close()
    num_labels = len(predictor.label_names)
    return Outcome(
        label_names=predictor.label_names,
        files=names,
        probs=np.concatenate(probs) if probs else np.zeros((0, num_labels), np.float32),
        heatmaps=heatmaps,
        skipped=skipped,
    )


def format_table(outcome: Outcome) -> str:
    """One row per read file, one column of probabilities per label."""
    width = max([len("file"), *(len(f) for f in outcome.files)])
    cols = [max(len(n), 6) for n in outcome.label_names]
    rows = [
        [f"{'file':<{width}}"]
        + [f"{n:>{c}}" for n, c in zip(outcome.label_names, cols, strict=True)]
    ]
    for name, p in zip(outcome.files, outcome.probs, strict=True):
        rows.append([f"{name:<{width}}"] + [f"{v:>{c}.4f}" for v, c in zip(p, cols, strict=True)])
    return "\n".join("  ".join(r) for r in rows)


def write_outputs(out_dir: Path, outcome: Outcome, meta: dict[str, Any]) -> tuple[Path, Path]:
    """Writes predictions.csv (file, one column per label) and predictions.json (also `meta`,
    the heatmap paths and the skipped files with their errors). Probabilities are written as
    the exact float32 values, so reading them back reproduces the model's output."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / CSV_FILE, out_dir / JSON_FILE
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", *outcome.label_names])
        for name, p in zip(outcome.files, outcome.probs, strict=True):
            writer.writerow([name, *(float(v) for v in p)])
    predictions = []
    for name, p, heatmap in zip(outcome.files, outcome.probs, outcome.heatmaps, strict=True):
        entry: dict[str, Any] = {
            "file": name,
            "probabilities": {n: float(v) for n, v in zip(outcome.label_names, p, strict=True)},
        }
        if heatmap is not None:
            entry["heatmap"] = heatmap
        predictions.append(entry)
    document = {
        **meta,
        "labels": outcome.label_names,
        "predictions": predictions,
        "skipped": [{"file": name, "error": message} for name, message in outcome.skipped],
    }
    json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return csv_path, json_path


def run(fv: flags.FlagValues, files: Sequence[str]) -> int:
    """Predicts as the parsed flags say; returns the exit status."""
    if not fv.checkpoint:
        raise ConfigError("--checkpoint is required", "Pass --checkpoint RUN_DIR.")
    if not files:
        raise ConfigError("no input given", "Give at least one image file or folder to predict.")
    inputs = find_images(files, must_exist=False)
    predictor = Predictor.from_run(fv.checkpoint, fv.which)
    out_dir = Path(fv.out)

    def report(name: str, message: str) -> None:
        print(f"skipped {name}: {message}", file=sys.stderr, flush=True)

    outcome = predict_files(
        predictor,
        inputs,
        batch_size=fv.batch_size,
        heatmap_dir=out_dir if fv.heatmap else None,
        report=report,
    )
    if outcome.files:
        print(format_table(outcome))
    meta = {"checkpoint": str(fv.checkpoint), "which": fv.which}
    csv_path, json_path = write_outputs(out_dir, outcome, meta)
    print(f"{len(outcome.files)} of {len(inputs)} files predicted: {csv_path}, {json_path}")
    if outcome.skipped:
        print(
            f"{len(outcome.skipped)} of {len(inputs)} files skipped (unreadable)", file=sys.stderr
        )
    return 0 if outcome.files else 1


def main(argv: list[str] | None = None) -> int:
    return console.run_cli(__doc__, _flag_values(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
