"""Helpers shared by the dataset readers: finding label files, checking columns, label sets."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.data.datasets.labels import canonical
from cxrjax.data.table import age_band
from cxrjax.errors import ConfigError, CxrjaxError

UNCERTAIN_POLICIES = ("zeros", "ones", "mask")


class MetadataError(CxrjaxError, ValueError):
    """A label file that does not have the published layout; names the file and the fix."""


def find_file(raw: Path, names: Sequence[str], what: str) -> Path:
    """The first of `names` (or its `.gz`) found directly in `raw`."""
    for name in names:
        for candidate in (raw / name, raw / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    tried = ", ".join(f"{n}[.gz]" for n in names)
    raise MetadataError(f"{raw}: no {what} found (looked for {tried}); point --raw at the folder")


def read_csv_checked(path: Path, columns: Iterable[str], **kwargs) -> pd.DataFrame:
    """pandas.read_csv (gzip by suffix) that fails naming the file and any missing column."""
    try:
        frame = pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as e:
        raise MetadataError(f"{path}: cannot parse as CSV ({e}); re-download the file") from e
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MetadataError(
            f"{path}: missing column(s) {missing}; found {list(frame.columns)[:12]}. "
            "Use the file exactly as published."
        )
    return frame


def select_labels(
    labels: str | Sequence[str] | None,
    *,
    default: Sequence[str],
    subsets: Mapping[str, Sequence[str]],
    available: Sequence[str],
    dataset: str,
) -> list[str]:
    """Resolves the label choice: None -> study default, a str -> named subset, else a list.

    Names in a list may use any dataset's spelling ("Effusion", "Pleural Effusion"); they resolve
    to the canonical names in `available`.
    """
    if labels is None:
        chosen = list(default)
    elif isinstance(labels, str):
        named = {"default": default, "all": available, **subsets}
        if labels not in named:
            raise ConfigError(
                f"{dataset}: unknown label set {labels!r}",
                f"use one of {sorted(named)} or an explicit list of label names",
            )
        chosen = list(named[labels])
    else:
        chosen = [name if name in available else canonical(name) or name for name in labels]
    # Report unknown names as the user spelt them.
    given = chosen if labels is None or isinstance(labels, str) else list(labels)
    unknown = [g for g, name in zip(given, chosen, strict=True) if name not in available]
    if unknown:
        raise ConfigError(f"{dataset}: unknown label(s) {unknown}", f"available: {list(available)}")
    if not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(
            f"{dataset}: label list {chosen} is empty or repeats a name",
            "name each label once",
        )
    return chosen


def check_uncertain(uncertain: str) -> None:
    if uncertain not in UNCERTAIN_POLICIES:
        raise ConfigError(f"uncertain={uncertain!r}; use one of {UNCERTAIN_POLICIES}")


def chexpert_coding(values: pd.Series, uncertain: str, *, path: Path, column: str) -> np.ndarray:
    """CheXpert-labeler codes -> float labels.

    1 positive, 0 negative, blank (not mentioned) negative as in the study, -1 (uncertain) by
    policy: "zeros" (study), "ones" or "mask" (NaN, ignored by loss and metrics).
    """
    numeric = pd.to_numeric(values, errors="coerce")
    bad = values.notna() & (numeric.isna() | ~numeric.isin([1.0, 0.0, -1.0]))
    if bad.any():
        raise MetadataError(
            f"{path}: column {column!r} has code {values[bad].iloc[0]!r}; the CheXpert labeler "
            "writes only 1, 0, -1 or blank. Use the file exactly as published."
        )
    out = (numeric == 1.0).to_numpy(dtype=np.float32)
    uncertain_rows = (numeric == -1.0).to_numpy()
    out[uncertain_rows] = {"zeros": 0.0, "ones": 1.0, "mask": np.nan}[uncertain]
    return out


def coded(values: pd.Series, codes: Mapping[str, str]) -> list[str]:
    """A metadata column mapped through `codes` (e.g. {"M": "male"}); other values -> ""."""
    return [codes.get(v, "") if isinstance(v, str) else "" for v in values]


def age_bands(values: pd.Series) -> list[str]:
    """Ages in years (numbers or numeric text) -> RawTable age bands, "" where unusable."""
    return [age_band(a) for a in pd.to_numeric(values, errors="coerce").to_numpy(np.float64)]


def as_table_frame(
    image_id: Iterable[str],
    path: Iterable[str],
    patient_id: Iterable[str],
    split: Iterable[str],
    labels: Mapping[str, np.ndarray],
    attributes: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Assembles the RawTable frame with the column order every reader uses.

    `attributes`: optional sex / age_band / view columns (see `cxrjax.data.table`).
    """
    frame = pd.DataFrame(
        {
            "image_id": pd.Series(list(image_id), dtype=str),
            "path": pd.Series(list(path), dtype=str),
            "patient_id": pd.Series(list(patient_id), dtype=str),
            "split": pd.Series(list(split), dtype=str),
        }
    )
    for name, column in labels.items():
        frame[name] = np.asarray(column, dtype=np.float32)
    for name, column in (attributes or {}).items():
        frame[name] = pd.Series(list(column), dtype=str)
    return frame
