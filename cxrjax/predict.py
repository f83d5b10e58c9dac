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
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image

from cxrjax import sharding
from cxrjax.data.images import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    ImageReadError,
    PreprocessOptions,
    load_radiograph,
)
from cxrjax.evaluation import rollout
from cxrjax.train import (
    MissingInputError,
    Run,
    input_stats,
    load_run,
    make_predict_step,
    normalize,
)

CSV_FILE = "predictions.csv"
JSON_FILE = "predictions.json"


def _flag_values() -> flags.FlagValues:
    # A private FlagValues, as in cxrjax.evaluate: the trainer's entry point defines flags too
    # and both may be imported in one process.
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "Run directory to predict with.", flag_values=fv)
    flags.DEFINE_enum(
        "which", "best", ["best", "latest"], "Which checkpoint of the run.", flag_values=fv
    )
    flags.DEFINE_string("out", ".", "Directory for the CSV, JSON and heatmaps.", flag_values=fv)
    flags.DEFINE_bool(
        "heatmap", False, "Write an attention-rollout overlay per image.", flag_values=fv
    )
    flags.DEFINE_integer(
        "batch_size", 0, "Images per forward pass (0: the run's eval_batch_size).", flag_values=fv
    )
    return fv


def _looks_like_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def collect_files(paths: Sequence[str]) -> list[str]:
    """Files as given (unchecked: unreadable ones are reported later), folders expanded.

    A folder contributes, recursively and sorted, its files with an image or DICOM suffix and
    suffix-less files with the DICOM preamble (MIMIC-style names); anything else in it is
    ignored rather than reported, since folders often hold notes and metadata.
    """
    known = DICOM_SUFFIXES + IMAGE_SUFFIXES
    files = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            files.append(given)
            continue
        for found in sorted(p for p in path.rglob("*") if p.is_file()):
            if found.name.startswith("."):
                continue
            suffix = found.suffix.lower()
            if suffix in known or (not suffix and _looks_like_dicom(found)):
                files.append(str(found))
    return files


@dataclasses.dataclass
class Outcome:
    """What became of the files: probabilities of the read ones, errors of the skipped ones."""

    label_names: list[str]
    files: list[str]  # read files, in input order
    probs: np.ndarray  # (len(files), num_labels) float32
    heatmaps: list[str | None]  # per read file: the written overlay PNG, if asked for
    skipped: list[tuple[str, str]]  # (file, error message)


def _read_chunks(
    files: Sequence[str], options: PreprocessOptions, chunk: int
) -> Iterator[list[tuple[str, np.ndarray | ImageReadError]]]:
    """The files, read and preprocessed `chunk` at a time, in input order."""

    def read(path: str) -> np.ndarray | ImageReadError:
        try:
            return load_radiograph(path, options)
        except ImageReadError as e:
            return e

    # Decoding releases the GIL, so threads overlap it; reading one chunk at a time bounds
    # memory when a folder holds thousands of images.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), chunk):
            names = files[start : start + chunk]
            yield list(zip(names, pool.map(read, names), strict=True))


def _heatmap_path(out_dir: Path, file: str, used: set[str]) -> Path:
    # Distinct inputs can share a stem (DICOM series are often 1.dcm, 2.dcm in many folders).
    stem = Path(file).stem
    name, n = f"{stem}_heatmap.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}_heatmap.png"
    used.add(name)
    return out_dir / name


def make_forward(run: Run, heatmap: bool) -> Callable[[Any, Any], tuple[Any, Any]]:
    """A jitted (params, uint8 (B, H, W)) -> (probabilities, rollout patch maps or None).

    The input normalisation and sigmoid are the trainer's; with `heatmap` the same forward pass
    also captures the attention, so the probabilities come from one model call either way.
    """
    mean, std = (jnp.asarray(v) for v in input_stats(run.config))
    if not heatmap:
        predict_step = make_predict_step(run.model, mean, std)
        return jax.jit(lambda params, images: (predict_step(params, {"image": images}), None))

    model = run.model
    num_prefix = 1 + model.num_registers

    def forward(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, attentions = rollout.layer_attentions(model, params, normalize(images, mean, std))
        grid = (images.shape[1] // model.patch_size, images.shape[2] // model.patch_size)
        maps = rollout.cls_patch_map(rollout.rollout(attentions), num_prefix, grid)
        return jax.nn.sigmoid(logits.astype(jnp.float32)), maps

    return jax.jit(forward)


def predict_files(
    run: Run,
    files: Sequence[str],
    *,
    batch_size: int = 0,
    heatmap_dir: Path | None = None,
    report: Callable[[str, str], None] | None = None,
) -> Outcome:
    """Probabilities (and, with `heatmap_dir`, overlay PNGs) for `files` under a loaded run.

    batch_size 0 uses the run's eval_batch_size; every batch is
    padded to one size, a multiple of the device count, so the step compiles once.
    report(file, message) is called for each unreadable file, which is then skipped.
    """
    skipped: list[tuple[str, str]] = []

    def skip(name: str, message: str) -> None:
        skipped.append((name, message))
        if report is not None:
            report(name, message)

    devices = run.mesh.size
    wanted = min(batch_size or run.config.eval_batch_size, max(len(files), 1))
    padded_size = -(-wanted // devices) * devices
    forward = make_forward(run, heatmap_dir is not None)
    options = PreprocessOptions(**run.info.preprocessing)
    data_sharding = sharding.data_sharding(run.mesh)
    if heatmap_dir is not None:
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    names, probs, heatmaps = [], [], []
    for chunk in _read_chunks(files, options, padded_size):
        batch_names, images = [], []
        for name, image in chunk:
            if isinstance(image, ImageReadError):
                skip(name, str(image))
            else:
                batch_names.append(name)
                images.append(image)
        if not images:
            continue
        stacked = np.zeros((padded_size, *images[0].shape), np.uint8)
        stacked[: len(images)] = np.stack(images)
        batch_probs, maps = forward(run.params, jax.device_put(stacked, data_sharding))
        names.extend(batch_names)
        probs.append(np.asarray(batch_probs)[: len(images)])
        if heatmap_dir is None:
            heatmaps.extend([None] * len(images))
            continue
        maps = np.asarray(maps)
        for name, image, patch_map in zip(batch_names, images, maps, strict=False):
            path = _heatmap_path(heatmap_dir, name, used)
            Image.fromarray(rollout.overlay(image, patch_map)).save(path)
            heatmaps.append(str(path))
    num_labels = len(run.label_indices)
    return Outcome(
        label_names=run.label_names,
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
        raise ValueError("--checkpoint W (a run directory) is required")
    if not files:
        raise ValueError("give at least one image file or folder to predict")
    inputs = collect_files(files)
    if not inputs:
        raise ValueError(f"no DICOM, PNG or JPEG files in {', '.join(files)}")
    loaded = load_run(fv.checkpoint, fv.which)
    out_dir = Path(fv.out)

    def report(name: str, message: str) -> None:
        print(f"skipped {name}: {message}", file=sys.stderr)

    outcome = predict_files(
        loaded,
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
    argv = list(sys.argv if argv is None else argv)
    fv = _flag_values()
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(fv.get_help())
        return 0
    try:
        files = fv(argv)[1:]
        return run(fv, files)
    except (flags.Error, ValueError, FileNotFoundError, MissingInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
