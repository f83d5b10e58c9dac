"""The one shape every dataset reader returns: a table of raw images with labels.

Each reader in `cxrjax.data.datasets` turns a dataset's published label files into a
`RawTable`; `cxrjax.data.prepare` turns any `RawTable` into shards. Nothing downstream of
the table knows which dataset it came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

# Columns every table carries besides one float column per label.
REQUIRED_COLUMNS = ("image_id", "path", "patient_id", "split")
# Values allowed in the `split` column; "" means "assign a patient-level split".
OFFICIAL_SPLITS = ("train", "val", "test", "")

# Optional coarse, non-identifying attributes for subgroup evaluation, and their values ("" is
# unknown). Ages are kept only as 10-year bands, 90 and over as one band; no dates, no ids.
AGE_BANDS = (*(f"{10 * k}-{10 * k + 9}" for k in range(9)), "90+")
ATTRIBUTE_VALUES = {
    "sex": ("female", "male"),
    "age_band": AGE_BANDS,
    "view": ("AP", "PA", "lateral", "supine"),
}
# Written by preparation: per split, salted image-id hash -> the attributes known for it.
ATTRIBUTES_FILE = "attributes.json"
# Ages above this are data-entry errors (ChestX-ray14's 2017 file has a few 400-year-olds).
_MAX_AGE = 120


def age_band(age: float) -> str:
    """'60-69' for 64.5; '90+' from 90; '' for a missing or impossible age."""
    if age is None or not math.isfinite(age) or not 0 <= age <= _MAX_AGE:
        return ""
    return AGE_BANDS[min(int(age) // 10, len(AGE_BANDS) - 1)]


def read_attributes(directory: str | Path) -> dict[str, dict[str, str]] | None:
    """Image hash -> {attribute: value} over every split of a prepared dataset; None if none."""
    path = Path(directory) / ATTRIBUTES_FILE
    if not path.is_file():
        return None
    splits = json.loads(path.read_text())["splits"]
    return {h: attrs for split in splits.values() for h, attrs in split.items()}


@dataclasses.dataclass
class RawTable:
    """Images of one dataset with their labels.

    `frame` has the columns `image_id` (unique, raw identifier: it never leaves the raw data
    unhashed), `path` (absolute path of the image file), `patient_id` (raw; hashed before
    anything is written), `split` (one of OFFICIAL_SPLITS) and one float column per name in
    `label_names` holding 1.0 (positive), 0.0 (negative) or NaN (unknown: masked in the loss
    and in the metrics). Readers whose metadata has them add the optional string columns of
    ATTRIBUTE_VALUES (sex, age_band, view), "" where unknown.
    """

    name: str
    label_names: list[str]
    frame: pd.DataFrame

    def __post_init__(self) -> None:
        missing = [c for c in (*REQUIRED_COLUMNS, *self.label_names) if c not in self.frame]
        if missing:
            raise ValueError(f"{self.name}: table lacks columns {missing}")
        bad = set(self.frame["split"].unique()) - set(OFFICIAL_SPLITS)
        if bad:
            raise ValueError(
                f"{self.name}: unknown split values {sorted(bad)}; use {OFFICIAL_SPLITS}"
            )
        if self.frame["image_id"].duplicated().any():
            dup = self.frame["image_id"][self.frame["image_id"].duplicated()].iloc[0]
            raise ValueError(f"{self.name}: image_id {dup!r} occurs twice")
        for name in self.attribute_names:
            bad = set(self.frame[name].unique()) - {"", *ATTRIBUTE_VALUES[name]}
            if bad:
                raise ValueError(
                    f"{self.name}: column {name!r} has {sorted(bad)[:5]}; use "
                    f"{ATTRIBUTE_VALUES[name]} or '' (unknown)"
                )

    @property
    def attribute_names(self) -> list[str]:
        """The optional attribute columns this table carries, in ATTRIBUTE_VALUES order."""
        return [name for name in ATTRIBUTE_VALUES if name in self.frame]

    def labels(self) -> np.ndarray:
        """(N, L) float32 with NaN for masked entries."""
        return self.frame[self.label_names].to_numpy(dtype=np.float32)
