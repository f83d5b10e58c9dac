"""Raw table -> preprocessed, leak-free ArrayRecord shards (the one path every dataset takes).

`prepare_dataset` hashes identifiers, assigns patient-level splits, checks leakage, decodes and
preprocesses every image in worker processes, writes shards and `dataset_info.json`. An image that
fails to decode is reported (by path on the console, by hashed id in `skipped.json`) and skipped;
the run goes on and the count is part of the summary.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.data import shards, splits
from cxrjax.data.images import ImageReadError, PreprocessOptions, load_radiograph
from cxrjax.data.table import RawTable

SPLITS = ("train", "val", "test")
RECORDS_PER_SHARD = 10_000
SUMMARY_FILE = "summary.json"


def _load_one(args: tuple[str, PreprocessOptions]) -> np.ndarray | str:
    path, options = args
    try:
        return load_radiograph(path, options)
    except ImageReadError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - one unreadable file must never end a long job
        return f"{path}: unexpected {type(e).__name__}: {e}"


def _decoded(paths: Sequence[str], options: PreprocessOptions, workers: int) -> Iterator:
    jobs = [(p, options) for p in paths]
    if workers <= 1:
        yield from map(_load_one, jobs)
        return
    # spawn: the parent may hold JAX threads, which fork would copy in a broken state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_load_one, jobs, chunksize=16)


def split_counts(frame: pd.DataFrame, label_names: list[str]) -> dict[str, dict]:
    """Per split: images, patients, and per label positives and masked entries."""
    out = {}
    for split in SPLITS:
        rows = frame[frame["split"] == split]
        labels = rows[label_names].to_numpy(dtype=np.float32)
        out[split] = {
            "images": len(rows),
            "patients": int(rows["patient_hash"].nunique()),
            "positives": dict(zip(label_names, np.sum(labels == 1, 0).tolist(), strict=True)),
            "masked": dict(zip(label_names, np.isnan(labels).sum(0).tolist(), strict=True)),
        }
    return out


def _pos_weight(labels: np.ndarray) -> list[float]:
    positives = np.sum(labels == 1, axis=0)
    negatives = np.sum(labels == 0, axis=0)
    return (negatives / np.maximum(positives, 1)).astype(float).tolist()


def prepare_dataset(
    table: RawTable,
    out_dir: str | Path,
    *,
    options: PreprocessOptions | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    train_fractions: Sequence[float] = (),
    seed: int = 0,
    salt: str | None = None,
    workers: int | None = None,
    dry_run: bool = False,
) -> dict:
    """Writes shards of `table` into `out_dir` (or, with `dry_run`, only the split summary)."""
    out_dir = Path(out_dir)
    options = options or PreprocessOptions()
    out_dir.mkdir(parents=True, exist_ok=True)
    salt = salt or os.environ.get("CXRJAX_SALT") or secrets.token_hex(16)
    frame = table.frame.reset_index(drop=True).copy()
    frame["split"] = splits.assign_splits(
        frame, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )
    frame["patient_hash"] = [splits.salted_hash(str(p), salt) for p in frame["patient_id"]]
    frame["image_hash"] = [splits.salted_hash(str(i), salt) for i in frame["image_id"]]
    splits.check_leakage(frame["patient_hash"], frame["split"])

    summary = {
        "dataset": table.name,
        "label_names": table.label_names,
        "splits": split_counts(frame, table.label_names),
    }
    if dry_run:
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary

    workers = workers or os.cpu_count() or 1
    writers = {
        s: shards.SplitWriter(out_dir, s, int((frame["split"] == s).sum()), RECORDS_PER_SHARD)
        for s in SPLITS
    }
    written: dict[str, list[int]] = {s: [] for s in SPLITS}
    skipped = []
    all_labels = frame[table.label_names].to_numpy(dtype=np.float32)
    decoded = _decoded(frame["path"].tolist(), options, workers)
    for row, result in zip(frame.itertuples(), decoded, strict=True):
        if isinstance(result, str):
            print(f"skipped: {result}", file=sys.stderr, flush=True)
            skipped.append(
                {"image": row.image_hash, "split": row.split, "error": _strip(result, row.path)}
            )
            continue
        labels = all_labels[row.Index]
        example = shards.Example(result, labels, row.image_hash, row.patient_hash)
        writers[row.split].write(shards.encode(example))
        written[row.split].append(row.Index)

    kept = frame.loc[[i for s in SPLITS for i in written[s]]]
    info = {
        "name": table.name,
        "label_names": table.label_names,
        "image_size": options.size,
        "preprocessing": {k: getattr(options, k) for k in options.__dataclass_fields__},
        "seed": seed,
        "splits": {
            s: {"files": writers[s].close(), "num_examples": writers[s].count} for s in SPLITS
        },
        "pos_weight": _pos_weight(kept[kept["split"] == "train"][table.label_names].to_numpy()),
        "train_fractions": {},
    }
    train_rows = frame.loc[written["train"]]
    for fraction in train_fractions:
        keep = splits.train_subset_mask(train_rows["patient_id"], fraction, seed=seed)
        name = f"train_fraction_{fraction:g}.npy"
        np.save(out_dir / name, np.flatnonzero(keep).astype(np.int64))
        info["train_fractions"][f"{fraction:g}"] = name
    (out_dir / shards.INFO_FILE).write_text(json.dumps(info, indent=2))
    summary["splits"] = split_counts(kept, table.label_names)
    summary["skipped"] = len(skipped)
    (out_dir / "skipped.json").write_text(json.dumps(skipped, indent=2))
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _strip(message: str, path: str) -> str:
    """Error text without the raw path, which may carry patient identifiers."""
    return message.replace(str(path), "<image>")
