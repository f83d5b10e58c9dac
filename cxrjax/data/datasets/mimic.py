"""MIMIC-CXR-JPG 2.0.0: the chexpert, metadata and split CSVs + `files/p1X/p<subject>/s<study>`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from cxrjax.data.datasets._common import (
    MetadataError,
    as_table_frame,
    check_uncertain,
    chexpert_coding,
    find_file,
    read_csv_checked,
    select_labels,
)
from cxrjax.data.datasets.chexpert import COLUMNS, SUBSETS
from cxrjax.data.datasets.labels import MIMIC_LABELS
from cxrjax.data.table import RawTable

FRONTAL_VIEWS = ("PA", "AP")
_SPLITS = {"train": "train", "validate": "val", "test": "test"}


def read_mimic(
    raw_dir: Path,
    *,
    labels: str | list[str] | None = None,
    uncertain: str = "zeros",
    official_split: bool = True,
    views: tuple[str, ...] = FRONTAL_VIEWS,
) -> RawTable:
    """Reads MIMIC-CXR-JPG: one row per PA/AP image, labelled by its study's CheXpert labels.

    official_split: use `mimic-cxr-2.0.0-split.csv` (train/validate/test); False leaves the split
    to the seeded patient-level 80/20 the study used. Images whose study has no row in the
    chexpert file (no labelled report) are kept with every label masked (NaN) and logged.
    """
    check_uncertain(uncertain)
    raw_dir = Path(raw_dir).expanduser().resolve()
    prefix = "mimic-cxr-2.0.0-"
    chexpert_path = find_file(raw_dir, [f"{prefix}chexpert.csv"], "MIMIC chexpert labels")
    meta_path = find_file(raw_dir, [f"{prefix}metadata.csv"], "MIMIC metadata")
    columns = [COLUMNS[n] for n in COLUMNS]
    ids = ["subject_id", "study_id"]
    chexpert = read_csv_checked(chexpert_path, [*ids, *columns])
    meta = read_csv_checked(meta_path, ["dicom_id", *ids, "ViewPosition"])
    names = select_labels(
        labels,
        default=MIMIC_LABELS,
        subsets=SUBSETS,
        available=tuple(COLUMNS),
        dataset="mimic",
    )
    if chexpert.duplicated(ids).any():
        raise MetadataError(f"{chexpert_path}: a (subject_id, study_id) pair occurs twice")
    meta = meta[meta["ViewPosition"].isin(views)]
    merged = meta.merge(chexpert, on=ids, how="left", indicator=True)
    merged = merged.reset_index(drop=True)
    unlabelled = (merged["_merge"] == "left_only").to_numpy()
    if unlabelled.any():
        logging.warning(
            "%s: %d images have no CheXpert labels; kept with every label masked",
            raw_dir,
            int(unlabelled.sum()),
        )
    if official_split:
        split_path = find_file(raw_dir, [f"{prefix}split.csv"], "MIMIC split file")
        split_frame = read_csv_checked(split_path, ["dicom_id", "split"])
        unknown = set(split_frame["split"].unique()) - set(_SPLITS)
        if unknown:
            raise MetadataError(
                f"{split_path}: column 'split' has unknown values {sorted(unknown)}"
            )
        mapping = dict(zip(split_frame["dicom_id"], split_frame["split"].map(_SPLITS), strict=True))
        split = merged["dicom_id"].map(mapping).fillna("")
    else:
        split = np.full(len(merged), "")
    subject = merged["subject_id"].astype(np.int64).astype(str)
    study = merged["study_id"].astype(np.int64).astype(str)
    paths = [
        os.path.join(raw_dir, "files", f"p{s[:2]}", f"p{s}", f"s{t}", f"{d}.jpg")
        for s, t, d in zip(subject, study, merged["dicom_id"], strict=True)
    ]
    values = {
        n: chexpert_coding(merged[COLUMNS[n]], uncertain, path=chexpert_path, column=COLUMNS[n])
        for n in names
    }
    for column in values.values():
        column[unlabelled] = np.nan
    table = as_table_frame(merged["dicom_id"], paths, subject, split, values)
    return RawTable("mimic", names, table)
