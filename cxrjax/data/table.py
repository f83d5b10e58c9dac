"""The one shape every dataset reader returns: a table of raw images with labels.

Each reader in `cxrjax.data.datasets` turns a dataset's published label files into a
`RawTable`; `cxrjax.data.prepare` turns any `RawTable` into shards. Nothing downstream of
the table knows which dataset it came from.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

# Columns every table carries besides one float column per label.
REQUIRED_COLUMNS = ("image_id", "path", "patient_id", "split")
# Values allowed in the `split` column; "" means "assign a patient-level split".
OFFICIAL_SPLITS = ("train", "val", "test", "")


@dataclasses.dataclass
class RawTable:
    """Images of one dataset with their labels.

    `frame` has the columns `image_id` (unique, raw identifier: it never leaves the raw data
    unhashed), `path` (absolute path of the image file), `patient_id` (raw; hashed before
    anything is written), `split` (one of OFFICIAL_SPLITS) and one float column per name in
    `label_names` holding 1.0 (positive), 0.0 (negative) or NaN (unknown: masked in the loss
    and in the metrics).
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

    def labels(self) -> np.ndarray:
        """(N, L) float32 with NaN for masked entries."""
        return self.frame[self.label_names].to_numpy(dtype=np.float32)
