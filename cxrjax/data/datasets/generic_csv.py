"""Generic CSV format for private collections such as UKA-CXR.

One row per image: `path` (absolute, or relative to the image root), `patient_id`, optional
`image_id` (default: the path as written) and `split` (train / val / test, blank = assign), and
label columns; with `attributes`, coarse sex / age / view columns for subgroup evaluation (only
"female"/"male", 10-year age bands and AP/PA/lateral/supine are kept, never the raw values).
Graded labels (e.g. 0-4 severity) become binary with `grade >= threshold`; blank cells are
unknown (NaN, masked). A label column in any dataset's spelling of a known finding (`Effusion`)
is stored under its canonical name (`pleural_effusion`); other columns keep theirs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax import console
from cxrjax.data.datasets._common import (
    MetadataError,
    age_bands,
    as_table_frame,
    read_csv_checked,
)
from cxrjax.data.datasets.labels import canonical
from cxrjax.data.table import RawTable

RESERVED = ("path", "patient_id", "image_id", "split")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "test": "test",
    "": "",
}


# --attributes KEY[=COLUMN]: the table attribute each key fills, and how raw cells map to it.
ATTRIBUTE_KEYS = {"sex": "sex", "age": "age_band", "view": "view"}
_SEX = {"m": "male", "male": "male", "man": "male", "f": "female", "female": "female",
        "woman": "female"}  # fmt: skip
_VIEW = {"ap": "AP", "pa": "PA", "lateral": "lateral", "lat": "lateral", "ll": "lateral",
         "rl": "lateral", "l": "lateral", "supine": "supine", "ap supine": "supine"}  # fmt: skip


def parse_attributes(specs: list[str], columns: list[str], csv: Path) -> dict[str, str]:
    """`["sex", "age=PatientAge"]` -> {"sex": column, "age_band": column}: a key alone names the
    column of that name (any case)."""
    by_lower = {c.lower(): c for c in columns}
    out = {}
    for spec in specs:
        key, _, column = spec.partition("=")
        if key not in ATTRIBUTE_KEYS:
            raise MetadataError(
                f"--attributes {spec!r}: {key!r} is not an attribute; use sex, age or view, "
                "optionally as KEY=COLUMN (e.g. age=PatientAge)"
            )
        found = column if column in columns else by_lower.get((column or key).lower())
        if found is None:
            raise MetadataError(
                f"{csv}: no column {column or key!r} for --attributes {spec}; found "
                f"{columns[:12]}. Pass KEY=COLUMN with the file's column name"
            )
        out[ATTRIBUTE_KEYS[key]] = found
    return out


def _attribute_values(frame: pd.DataFrame, attributes: dict[str, str], csv: Path) -> dict:
    """The coarse values of each attribute; cells that map to none are counted on the console."""
    out = {}
    for attribute, column in attributes.items():
        raw = frame[column].astype(str).str.strip()
        if attribute == "age_band":
            # "64", "64.5" or DICOM's "064Y": the number, then its 10-year band.
            values = age_bands(raw.str.extract(r"^(\d+(?:\.\d+)?)\s*[yY]?$")[0])
        else:
            codes = _SEX if attribute == "sex" else _VIEW
            values = [codes.get(v.lower(), "") for v in raw]
        unusable = int(sum(1 for v, r in zip(values, raw, strict=True) if not v and r))
        if unusable:
            console.say(
                f"{csv}: {unusable} of {len(raw)} cells of column {column!r} are not a known "
                f"{attribute} value; those images have it unknown"
            )
        out[attribute] = values
    return out


def _binary_labels(
    frame: pd.DataFrame, names: list[str], threshold: float | None, csv: Path
) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        raw = frame[name]
        blank = raw.isna() | (raw.astype(str).str.strip() == "")
        values = pd.to_numeric(raw.where(~blank), errors="coerce")
        bad = ~blank & values.isna()
        if bad.any():
            raise MetadataError(
                f"{csv}: label column {name!r} holds non-numeric value {raw[bad].iloc[0]!r}; "
                "labels must be numbers (0/1, or grades with --threshold) or blank"
            )
        if threshold is None:
            if not values.dropna().isin([0.0, 1.0]).all():
                example = values[~values.isin([0.0, 1.0]) & values.notna()].iloc[0]
                raise MetadataError(
                    f"{csv}: label column {name!r} holds {example:g}, not 0/1; pass --threshold "
                    "to binarise graded labels, or --labels to choose only the label columns"
                )
            binary = values
        else:
            binary = (values >= threshold).astype(np.float32).where(values.notna())
        out[name] = binary.to_numpy(dtype=np.float32)
    return out


def _label_columns(requested: list[str], columns: list[str], csv: Path) -> list[str]:
    """The CSV column of each requested label: the column of that name, else the one naming the
    same finding (`--labels pleural_effusion` finds column `Effusion`)."""
    by_finding = {canonical(c): c for c in reversed(columns) if canonical(c)}
    found = [name if name in columns else by_finding.get(canonical(name)) for name in requested]
    missing = [name for name, column in zip(requested, found, strict=True) if column is None]
    if missing:
        raise MetadataError(
            f"{csv}: no column for label(s) {missing}; found {columns[:12]}. Pass --labels with "
            "column names of the file"
        )
    return found


def _check_distinct(columns: list[str], names: list[str], csv: Path) -> None:
    first: dict[str, str] = {}
    for column, name in zip(columns, names, strict=True):
        if name in first:
            raise MetadataError(
                f"{csv}: label columns {first[name]!r} and {column!r} both name {name!r}; pass "
                "--labels with one of them"
            )
        first[name] = column


def read_csv(
    raw: Path,
    *,
    csv: Path | None = None,
    labels: list[str] | None = None,
    threshold: float | None = None,
    name: str | None = None,
    attributes: list[str] | None = None,
) -> RawTable:
    """Reads a generic labels CSV.

    raw: the CSV itself, or a folder holding `labels.csv` (or `csv`). Relative image paths are
      resolved against `raw` when it is a folder, else against the CSV's folder.
    labels: label columns, by column name or canonical name; None takes every numeric column
      other than path, patient_id, image_id and split.
    threshold: graded labels become `value >= threshold`; None requires 0/1 values.
    name: the dataset's name in every JSON, table and comparison; None: the folder's name.
    attributes: `sex`, `age`, `view`, each optionally `KEY=COLUMN` (see `parse_attributes`).
    """
    raw = Path(raw).expanduser().resolve()
    if raw.is_file():
        csv_path, root = raw, raw.parent
    elif raw.is_dir():
        csv_path = Path(csv).expanduser().resolve() if csv is not None else raw / "labels.csv"
        root = raw
    else:
        raise MetadataError(f"{raw}: no such file or folder; pass the labels CSV or its folder")
    if not csv_path.is_file():
        raise MetadataError(f"{csv_path}: labels CSV not found; pass --csv or put labels.csv there")
    # Read as text so identifiers keep their leading zeros; labels are parsed explicitly.
    frame = read_csv_checked(csv_path, ["path", "patient_id"], dtype=str, keep_default_na=False)
    if frame.empty:
        raise MetadataError(f"{csv_path}: has no rows")
    attribute_columns = parse_attributes(list(attributes or ()), list(frame.columns), csv_path)
    if labels is None:
        reserved = (*RESERVED, *attribute_columns.values())
        candidates = [c for c in frame.columns if c not in reserved]
        columns = [
            c
            for c in candidates
            if pd.to_numeric(frame[c].replace("", np.nan), errors="coerce").notna().sum()
            == (frame[c] != "").sum()
            and (frame[c] != "").any()
        ]
        if not columns:
            raise MetadataError(f"{csv_path}: no numeric label column; pass --labels")
        skipped = [c for c in candidates if c not in columns]
        if skipped:
            console.say(f"{csv_path}: not label columns (not 0/1 or numbers): {skipped}")
    else:
        columns = _label_columns(labels, list(frame.columns), csv_path)
    names = [canonical(c) or c for c in columns]
    _check_distinct(columns, names, csv_path)
    by_column = _binary_labels(frame.replace("", np.nan), columns, threshold, csv_path)
    label_values = {name: by_column[c] for c, name in zip(columns, names, strict=True)}

    paths = frame["path"].str.strip()
    if (paths == "").any():
        row = int(np.flatnonzero(paths == "")[0]) + 2
        raise MetadataError(f"{csv_path}: line {row} has an empty path")
    patients = frame["patient_id"].str.strip()
    if (patients == "").any():
        row = int(np.flatnonzero(patients == "")[0]) + 2
        raise MetadataError(
            f"{csv_path}: line {row} has an empty patient_id; every image needs one"
        )
    # os.path.join keeps absolute paths as they are and is much faster than pathlib.
    absolute = [os.path.join(root, p) for p in paths]
    image_ids = frame["image_id"].str.strip() if "image_id" in frame else paths
    if "split" in frame:
        split = frame["split"].str.strip().str.lower()
        unknown = sorted(set(split) - set(_SPLIT_ALIASES))
        if unknown:
            raise MetadataError(
                f"{csv_path}: column 'split' has {unknown}; use train, val, test or blank"
            )
        split = split.map(_SPLIT_ALIASES)
    else:
        split = [""] * len(frame)
    table_frame = as_table_frame(
        image_ids,
        absolute,
        patients,
        split,
        label_values,
        _attribute_values(frame, attribute_columns, csv_path),
    )
    if table_frame["image_id"].duplicated().any():
        dup = table_frame["image_id"][table_frame["image_id"].duplicated()].iloc[0]
        raise MetadataError(f"{csv_path}: image {dup!r} is listed twice")
    return RawTable(name or root.name, names, table_frame)
