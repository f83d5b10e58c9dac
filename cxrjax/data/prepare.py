"""Raw table -> preprocessed, leak-free ArrayRecord shards (the one path every dataset takes).

(Longer than ~400 lines on purpose: planning, resuming, verifying and writing shards share one
progress record, and splitting them would spread its invariants over several modules.)

`prepare_dataset` hashes identifiers, assigns patient-level splits, checks leakage, decodes and
preprocesses every image in worker processes, writes shards and `dataset_info.json`. An image that
fails to decode is reported (by path on the console, by hashed id in `skipped.json`) and skipped;
the run goes on and the count is part of the summary.

A preparation resumes where it stopped. The images of each shard are fixed before it is written
(shard k of a split holds a fixed block of the split's rows in table order), so any shard can be
written on its own. Besides the shards, the output folder holds:

- `progress.json`: the settings and command-line options, a fingerprint of the table, a check
  value of the salt and, per finished shard, its record count, size, SHA-256 and skipped images;
  replaced atomically after each shard is committed, kept once complete.
- `progress.salt`: the salt (owner-only) while the preparation is unfinished, so a rerun hashes
  identifiers the same way; deleted on completion, as the salt must not travel with the shards.
- `<shard>.partial`: the shard being written, renamed to its own name once complete.
- `attributes.json`: only for tables with attribute columns (sex, age band, view): per split,
  salted image hash -> the attributes known for that image, for subgroup evaluation.
- `dataset_info.json`: written last; its presence means the dataset is complete.

A rerun with the same settings verifies the finished shards (size, SHA-256, record count), writes
the missing and damaged ones and the rest, and ends byte-identical to an uninterrupted run. A
rerun with other settings is refused, naming them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrjax.data import shards, splits
from cxrjax.data.images import ImageReadError, PreprocessOptions, load_radiograph
from cxrjax.data.table import ATTRIBUTES_FILE, RawTable
from cxrjax.errors import ConfigError, CxrjaxError

SPLITS = ("train", "val", "test")
RECORDS_PER_SHARD = 10_000
SUMMARY_FILE = "summary.json"
SKIPPED_FILE = "skipped.json"
PROGRESS_FILE = "progress.json"
SALT_FILE = "progress.salt"
_PROGRESS_FORMAT = 1


class OutputFolderError(CxrjaxError):
    """The output folder cannot be written, or holds a preparation this one must not touch."""


@dataclasses.dataclass(frozen=True)
class _Shard:
    name: str
    split: str
    rows: np.ndarray  # frame rows, in record order


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


def split_counts(
    frame: pd.DataFrame, label_names: list[str], attribute_names: Sequence[str] = ()
) -> dict[str, dict]:
    """Per split: images, patients, per label positives and masked entries, and per attribute
    the images of each value ("" counted as "unknown")."""
    out = {}
    for split in SPLITS:
        rows = frame[frame["split"] == split]
        labels = rows[label_names].to_numpy(dtype=np.float32)
        out[split] = {
            "images": len(rows),
            "patients": int(rows["patient_id"].nunique()),
            "positives": dict(zip(label_names, np.sum(labels == 1, 0).tolist(), strict=True)),
            "masked": dict(zip(label_names, np.isnan(labels).sum(0).tolist(), strict=True)),
        }
        if attribute_names:
            out[split]["attributes"] = {
                name: {
                    value or "unknown": int(count)
                    for value, count in sorted(rows[name].value_counts().items())
                }
                for name in attribute_names
            }
    return out


def _pos_weight(labels: np.ndarray) -> list[float]:
    positives = np.sum(labels == 1, axis=0)
    known = positives + np.sum(labels == 0, axis=0)
    return shards.pos_weight(positives, known).astype(float).tolist()


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
    records_per_shard: int = RECORDS_PER_SHARD,
    command: Mapping[str, object] | None = None,
) -> dict:
    """Writes shards of `table` into `out_dir` (or, with `dry_run`, only the split summary).

    Resumes an unfinished preparation of the same settings in `out_dir` and does nothing to a
    finished one (see the module docstring); refuses a folder prepared with other settings.
    `command`: the command-line options, keyed as typed ("--size"), recorded and compared besides
    the settings. The salt is `salt`, else $CXRJAX_SALT, else the unfinished run's, else random.
    """
    out_dir = Path(out_dir)
    options = options or PreprocessOptions()
    if records_per_shard < 1:
        raise ConfigError(
            f"records per shard must be at least 1, not {records_per_shard}", "use e.g. 10000"
        )
    given_salt = salt or os.environ.get("CXRJAX_SALT")
    frame = table.frame.reset_index(drop=True).copy()
    frame["split"] = splits.assign_splits(
        frame, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )
    # Computed now, over all rows, so a bad fraction fails before any image is decoded.
    subsets = {
        f"{f:g}": splits.train_subset_mask(frame["patient_id"], f, seed=seed)
        for f in train_fractions
    }
    _check_writable(out_dir)
    if dry_run:
        if (out_dir / PROGRESS_FILE).exists():
            raise OutputFolderError(
                f"{out_dir} holds a preparation; a dry run would replace its {SUMMARY_FILE}",
                "give the dry run another --out",
            )
        _hash_ids(frame, given_salt or secrets.token_hex(16))
        summary = {
            "dataset": table.name,
            "label_names": table.label_names,
            "splits": split_counts(frame, table.label_names, table.attribute_names),
        }
        shards.write_atomic(out_dir / SUMMARY_FILE, _json(summary))
        return summary

    record = {
        "format": _PROGRESS_FORMAT,
        # Through JSON, so it compares equal to the stored one (tuples become lists, paths text).
        "command": None if command is None else json.loads(json.dumps(dict(command), default=str)),
        "settings": {
            "dataset": table.name,
            "labels": list(table.label_names),
            **dataclasses.asdict(options),
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "train_fractions": [float(f) for f in train_fractions],
            "seed": seed,
            "records_per_shard": records_per_shard,
        },
        "images": len(frame),
        # The table as read (official splits), not the assigned splits.
        "table": _fingerprint(table.frame, table.label_names),
    }
    progress = _open_progress(out_dir, record, given_salt)
    plan = _plan(frame, records_per_shard)
    finished = _verified(out_dir, progress)
    progress["shards"] = {name: progress["shards"][name] for name in finished}
    if len(finished) == len(plan) and (out_dir / shards.INFO_FILE).is_file():
        print(f"{out_dir} is complete ({len(plan)} shards verified); nothing to do", flush=True)
        return _summary(table, frame, plan, progress)

    salt = _resolve_salt(given_salt, out_dir, progress, plan, finished)
    _hash_ids(frame, salt)
    todo = [s for s in plan if s.name not in finished]
    if finished:
        print(f"resuming in {out_dir}: {len(finished)} of {len(plan)} shards kept", flush=True)
    _warn_if_short_of_space(out_dir, sum(len(s.rows) for s in todo), options.size, len(todo))
    try:
        # The folder stops claiming completeness before any shard of it is rewritten.
        (out_dir / shards.INFO_FILE).unlink(missing_ok=True)
        if _read_salt(out_dir) != salt:
            shards.write_atomic(out_dir / SALT_FILE, salt.encode(), private=True)
        progress["salt_check"] = _salt_check(salt)
        _write_progress(out_dir, progress)
        _write_shards(out_dir, todo, frame, table.label_names, options, workers, progress)
        summary = _summary(table, frame, plan, progress)
        _write_outputs(out_dir, table, frame, plan, progress, options, seed, subsets, summary)
    except OSError as e:
        raise OutputFolderError(
            f"cannot write the dataset to {out_dir}: {e}",
            "free space or fix the folder, then rerun the same command: it keeps the finished "
            "shards and writes the rest",
        ) from e
    # Only now: until dataset_info.json exists, a rerun needs the salt to match the shards.
    (out_dir / SALT_FILE).unlink(missing_ok=True)
    return summary


def _plan(frame: pd.DataFrame, records_per_shard: int) -> list[_Shard]:
    """Every shard and its rows: a split's rows in table order, cut into contiguous blocks."""
    plan = []
    for split in SPLITS:
        rows = np.flatnonzero((frame["split"] == split).to_numpy())
        sizes = shards.shard_sizes(len(rows), records_per_shard)
        starts = np.cumsum([0, *sizes])
        plan += [
            _Shard(shards.shard_name(split, k, len(sizes)), split, rows[starts[k] : starts[k + 1]])
            for k in range(len(sizes))
        ]
    return plan


def _hash_ids(frame: pd.DataFrame, salt: str) -> None:
    frame["patient_hash"] = [splits.salted_hash(str(p), salt) for p in frame["patient_id"]]
    frame["image_hash"] = [splits.salted_hash(str(i), salt) for i in frame["image_id"]]
    splits.check_leakage(frame["patient_hash"], frame["split"])


def _fingerprint(frame: pd.DataFrame, label_names: Sequence[str]) -> str:
    """SHA-256 of what the shards are made of: every row's ids, path, split and labels, in order."""
    columns = ["image_id", "patient_id", "path", "split", *label_names]
    return hashlib.sha256(frame[columns].to_csv(index=False).encode()).hexdigest()


def _salt_check(salt: str) -> str:
    """Tells whether a salt is the one finished shards were hashed with, without storing it."""
    return hashlib.sha256(f"cxrjax-salt-check\x00{salt}".encode()).hexdigest()


def _json(value: object) -> bytes:
    return json.dumps(value, indent=2).encode()


def _check_writable(out_dir: Path) -> None:
    """Fails before any decoding when `out_dir` cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A real file rather than os.access, which misses read-only mounts and root's view.
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise OutputFolderError(
            f"cannot write to the output folder {out_dir}: {e.strerror or e}",
            "choose another --out, or make this folder writable",
        ) from e


def _warn_if_short_of_space(out_dir: Path, images: int, size: int, num_shards: int) -> None:
    # Raw uint8 pixels plus ~100 bytes of header, ids and index per record, 128 KiB per file.
    need = images * (size * size + 100) + num_shards * 131_072
    free = shutil.disk_usage(out_dir).free
    if free < need:
        print(
            f"warning: {out_dir} has {free / 1e9:.1f} GB free; the shards need about "
            f"{need / 1e9:.1f} GB",
            file=sys.stderr,
            flush=True,
        )


def _read_progress(out_dir: Path) -> dict | None:
    path = out_dir / PROGRESS_FILE
    try:
        progress = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise OutputFolderError(
            f"cannot read {path} ({e})", f"delete {out_dir} and prepare again, or use another --out"
        ) from e
    if progress.get("format") != _PROGRESS_FORMAT:
        raise OutputFolderError(
            f"{path} has format {progress.get('format')!r}; this cxrjax reads {_PROGRESS_FORMAT}",
            f"prepare with the cxrjax that wrote it, use another --out, or delete {out_dir}",
        )
    return progress


def _write_progress(out_dir: Path, progress: dict) -> None:
    # Sorted keys: the file is the same whatever order the shards were finished in.
    text = json.dumps(progress, indent=1, sort_keys=True)
    shards.write_atomic(out_dir / PROGRESS_FILE, text.encode())


def _open_progress(out_dir: Path, record: dict, given_salt: str | None) -> dict:
    """The progress of the preparation in `out_dir` (new if none), once it is this one's."""
    progress = _read_progress(out_dir)
    if progress is None:
        if (out_dir / shards.INFO_FILE).exists():
            raise OutputFolderError(
                f"{out_dir} holds a dataset without {PROGRESS_FILE} (prepared by an older "
                "cxrjax or another tool), which this preparation would overwrite",
                f"use another --out, or delete {out_dir} to prepare it anew",
            )
        return {**record, "salt_check": None, "shards": {}}
    _check_same_preparation(out_dir, progress, record)
    if given_salt and progress["salt_check"] not in (None, _salt_check(given_salt)):
        raise ConfigError(
            f"the salt given (CXRJAX_SALT) is not the one the shards in {out_dir} were hashed with",
            "unset CXRJAX_SALT to resume with the stored salt, use another --out, or delete "
            f"{out_dir} to prepare it anew",
        )
    return progress


def _differences(existing: Mapping, now: Mapping) -> list[str]:
    keys = dict.fromkeys([*now, *existing])
    return [
        f"{key}: existing {json.dumps(existing.get(key))}, now {json.dumps(now.get(key))}"
        for key in keys
        if existing.get(key) != now.get(key)
    ]


def _check_same_preparation(out_dir: Path, progress: dict, record: dict) -> None:
    """Refuses to mix two preparations in one folder, naming what differs."""
    fix = (
        "rerun the original command to finish (or keep) that preparation, use another --out, or "
        f"delete {out_dir} to prepare it anew"
    )
    # The command names options as typed; the settings cover callers without a command line.
    for key in ("command", "settings"):
        if progress[key] is not None and record[key] is not None:
            different = _differences(progress[key], record[key])
            if different:
                raise ConfigError(
                    f"{out_dir} holds a preparation with other options: " + "; ".join(different),
                    fix,
                )
    if progress["table"] != record["table"]:
        raise ConfigError(
            f"{out_dir} was prepared from other images or labels than the raw data holds now "
            f"({progress['images']:,} images then, {record['images']:,} now)",
            fix,
        )


def _verified(out_dir: Path, progress: dict) -> list[str]:
    """The recorded shards whose files are intact; the others are reported and will be redone."""
    if progress["shards"]:
        print(f"verifying {len(progress['shards'])} finished shards in {out_dir}", flush=True)
    finished = []
    for name, entry in progress["shards"].items():
        digest = shards.ShardDigest(entry["records"], entry["size"], entry["sha256"])
        if shards.shard_intact(out_dir / name, digest):
            finished.append(name)
        else:
            print(
                f"{name}: missing or damaged (size, SHA-256 or record count differ from "
                f"{PROGRESS_FILE}); it is to be written again",
                file=sys.stderr,
                flush=True,
            )
    return finished


def _read_salt(out_dir: Path) -> str | None:
    try:
        return (out_dir / SALT_FILE).read_text()
    except FileNotFoundError:
        return None


def _resolve_salt(
    given: str | None, out_dir: Path, progress: dict, plan: list[_Shard], finished: list[str]
) -> str:
    """The salt the shards still to write must use: that of the finished ones, if any."""
    if given:
        return given  # already checked against the finished shards'
    stored = _read_salt(out_dir)
    if stored is not None and progress["salt_check"] in (None, _salt_check(stored)):
        return stored
    if not finished:
        return secrets.token_hex(16)
    missing = [s.name for s in plan if s.name not in finished]
    named = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    raise OutputFolderError(
        f"{len(missing)} shard(s) of {out_dir} must be written ({named}), which needs the salt "
        f"the other shards were hashed with; {SALT_FILE} is gone (it is deleted when a "
        "preparation completes)",
        "set CXRJAX_SALT to that salt and rerun the same command, or delete "
        f"{out_dir} and prepare it anew",
    )


def _write_shards(
    out_dir: Path,
    todo: list[_Shard],
    frame: pd.DataFrame,
    label_names: list[str],
    options: PreprocessOptions,
    workers: int | None,
    progress: dict,
) -> None:
    """Decodes the images of `todo` and commits shard after shard, recording each in progress."""
    labels = frame[label_names].to_numpy(dtype=np.float32)
    paths = frame["path"].astype(str).tolist()
    image_hash, patient_hash = frame["image_hash"].tolist(), frame["patient_hash"].tolist()
    rows = [int(r) for shard in todo for r in shard.rows]
    decoded = _decoded([paths[r] for r in rows], options, workers or os.cpu_count() or 1)
    bar = tqdm(
        total=len(frame),
        initial=len(frame) - len(rows),
        unit="image",
        desc="preparing",
        # Not a terminal (CI, a log file): a line every few seconds rather than a stream.
        mininterval=1 if sys.stderr.isatty() else 5,
    )
    # closing: an error stops the worker pool instead of letting it decode the remaining images.
    with contextlib.closing(decoded), bar:
        for shard in todo:
            skipped = []
            with shards.ShardWriter(out_dir / shard.name) as writer:
                for offset, row in enumerate(shard.rows):
                    result = next(decoded)
                    bar.update()
                    if isinstance(result, str):
                        tqdm.write(f"skipped: {result}", file=sys.stderr)
                        error = _strip(result, paths[row])
                        skipped.append({"row": offset, "image": image_hash[row], "error": error})
                        continue
                    example = shards.Example(
                        result, labels[row], image_hash[row], patient_hash[row]
                    )
                    writer.write(shards.encode(example))
                digest = writer.commit()
            # Recorded after the rename: a crash in between leaves a complete shard that is not
            # listed, which the rerun writes again; a listed shard is always a renamed one.
            progress["shards"][shard.name] = {**dataclasses.asdict(digest), "skipped": skipped}
            _write_progress(out_dir, progress)


def _kept(plan: list[_Shard], progress: dict) -> dict[str, list[int]]:
    """Per split, the frame rows in the shards in record order (the skipped ones left out)."""
    kept: dict[str, list[int]] = {s: [] for s in SPLITS}
    for shard in plan:
        skipped = {entry["row"] for entry in progress["shards"][shard.name]["skipped"]}
        kept[shard.split] += [int(r) for k, r in enumerate(shard.rows) if k not in skipped]
    return kept


def _summary(table: RawTable, frame: pd.DataFrame, plan: list[_Shard], progress: dict) -> dict:
    kept = _kept(plan, progress)
    rows = frame.loc[[r for s in SPLITS for r in kept[s]]]
    return {
        "dataset": table.name,
        "label_names": table.label_names,
        "splits": split_counts(rows, table.label_names, table.attribute_names),
        "skipped": sum(len(progress["shards"][s.name]["skipped"]) for s in plan),
    }


def _write_outputs(
    out_dir: Path,
    table: RawTable,
    frame: pd.DataFrame,
    plan: list[_Shard],
    progress: dict,
    options: PreprocessOptions,
    seed: int,
    subsets: dict[str, np.ndarray],
    summary: dict,
) -> None:
    """Everything after the shards, dataset_info.json last (its presence means complete)."""
    kept = _kept(plan, progress)
    info = {
        "name": table.name,
        "label_names": table.label_names,
        "image_size": options.size,
        "preprocessing": dataclasses.asdict(options),
        "seed": seed,
        "splits": {
            s: {
                "files": [shard.name for shard in plan if shard.split == s],
                "num_examples": len(kept[s]),
            }
            for s in SPLITS
        },
        "pos_weight": _pos_weight(frame.loc[kept["train"], table.label_names].to_numpy()),
        "train_fractions": {},
    }
    for key, in_subset in subsets.items():
        name = f"train_fraction_{key}.npy"
        buffer = io.BytesIO()
        np.save(buffer, np.flatnonzero(in_subset[kept["train"]]).astype(np.int64))
        shards.write_atomic(out_dir / name, buffer.getvalue())
        info["train_fractions"][key] = name
    skipped = [
        {"image": entry["image"], "split": shard.split, "error": entry["error"]}
        for shard in plan
        for entry in progress["shards"][shard.name]["skipped"]
    ]
    shards.write_atomic(out_dir / SKIPPED_FILE, _json(skipped))
    if table.attribute_names:
        shards.write_atomic(out_dir / ATTRIBUTES_FILE, _json(_attributes(frame, kept, table)))
    shards.write_atomic(out_dir / SUMMARY_FILE, _json(summary))
    shards.write_atomic(out_dir / shards.INFO_FILE, _json(info))


def _attributes(frame: pd.DataFrame, kept: dict[str, list[int]], table: RawTable) -> dict:
    """The attributes.json content: per split, image hash -> its known (non-empty) attributes."""
    names = table.attribute_names
    hashes = frame["image_hash"].tolist()
    # Plain lists: .at per cell costs seconds over a few hundred thousand images.
    columns = {n: frame[n].tolist() for n in names}
    return {
        "format": 1,
        "attributes": names,
        "splits": {
            split: {
                hashes[r]: {n: columns[n][r] for n in names if columns[n][r]} for r in kept[split]
            }
            for split in SPLITS
        },
    }


def _strip(message: str, path: str) -> str:
    """Error text without the raw path, which may carry patient identifiers."""
    return message.replace(str(path), "<image>")
