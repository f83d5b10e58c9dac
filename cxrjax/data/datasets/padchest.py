"""PadChest: the 160K labels CSV + 16-bit PNGs in folders named by `ImageDir`."""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.data.datasets._common import (
    MetadataError,
    as_table_frame,
    coded,
    find_file,
    read_csv_checked,
    select_labels,
)
from cxrjax.data.datasets.labels import subsets_for
from cxrjax.data.table import RawTable

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
FRONTAL_PROJECTIONS = ("PA", "AP", "AP_horizontal")
# Canonical label name -> the exact PadChest terms (after stripping) that make it positive.
# PadChest has no bare "hernia" or "congestion" term: the study's names match the one term
# that carries the word ("hiatal hernia", "hilar congestion"). nodule_mass is either finding.
TERMS = {
    "cardiomegaly": ("cardiomegaly",),
    "pleural_effusion": ("pleural effusion",),
    "pneumonia": ("pneumonia",),
    "atelectasis": ("atelectasis",),
    "no_finding": ("normal",),
    "consolidation": ("consolidation",),
    "pneumothorax": ("pneumothorax",),
    "emphysema": ("emphysema",),
    "hernia": ("hiatal hernia",),
    "scoliosis": ("scoliosis",),
    "congestion": ("hilar congestion",),
    "aortic_elongation": ("aortic elongation",),
    "kyphosis": ("kyphosis",),
    "copd_signs": ("COPD signs",),
    "pleural_thickening": ("pleural thickening",),
    "nodule_mass": ("nodule", "mass"),
    "infiltration": ("infiltrates",),
}
STUDY_LABELS = tuple(TERMS)
SUBSETS = subsets_for(TERMS)
SEXES = {"F": "female", "M": "male"}
# AP_horizontal: an AP film of a patient lying down.
VIEWS = {"AP": "AP", "PA": "PA", "AP_horizontal": "supine", "L": "lateral"}
_COLUMNS = ("ImageID", "ImageDir", "PatientID", "Projection", "Labels")


def parse_labels(text: object, *, path: Path, row: int) -> set[str] | None:
    """One `Labels` cell -> set of stripped terms; None for a blank (unlabelled) cell."""
    if not isinstance(text, str):
        return None
    try:
        # literal_eval only evaluates Python literals, so an odd cell cannot run code.
        terms = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise MetadataError(
            f"{path}: column 'Labels' row {row} is not a Python list string: {text[:60]!r}"
        ) from e
    if not isinstance(terms, list):
        raise MetadataError(f"{path}: column 'Labels' row {row} is not a list: {text[:60]!r}")
    return {str(t).strip() for t in terms} - {""}


def read_padchest(
    raw_dir: Path,
    *,
    labels: str | list[str] | None = None,
    uncertain: str = "zeros",
    projections: tuple[str, ...] = FRONTAL_PROJECTIONS,
) -> RawTable:
    """Reads PadChest's frontal (PA, AP, AP_horizontal) images.

    A blank `Labels` cell (no report labels) keeps the image with every label masked; `['']`
    is a labelled report with none of the findings. No official split: split "" everywhere.
    `uncertain` is accepted for a uniform reader signature; PadChest has no uncertain code.
    Sex (`PatientSex_DICOM`) and view (`Projection`; AP_horizontal is supine) are kept; the age
    would need the birth and study dates, which are not read.
    """
    del uncertain
    raw_dir = Path(raw_dir).expanduser().resolve()
    csv_path = find_file(raw_dir, [CSV_NAME], "PadChest labels CSV")
    frame = read_csv_checked(
        csv_path,
        _COLUMNS,
        usecols=lambda c: c in (*_COLUMNS, "PatientSex_DICOM"),
        dtype={"ImageID": str, "ImageDir": str, "PatientID": str, "Projection": str},
    )
    names = select_labels(
        labels, default=STUDY_LABELS, subsets=SUBSETS, available=tuple(TERMS), dataset="padchest"
    )
    frame = frame[frame["Projection"].isin(projections)].reset_index(drop=True)
    if frame["ImageDir"].isna().any() or frame["PatientID"].isna().any():
        raise MetadataError(f"{csv_path}: a frontal row lacks ImageDir or PatientID")
    # Many reports share one Labels string: parse each distinct string once.
    codes, distinct = pd.factorize(frame["Labels"])
    present, first_row = np.unique(codes, return_index=True)
    first_row = first_row[present >= 0]
    parsed = [
        parse_labels(t, path=csv_path, row=int(r)) for t, r in zip(distinct, first_row, strict=True)
    ]
    per_string = np.array(
        [[bool(terms & set(TERMS[n])) for n in names] for terms in parsed], dtype=np.float32
    ).reshape(len(distinct), len(names))
    matrix = per_string[codes]
    blank = codes < 0
    if blank.any():
        logging.warning("%s: %d images have no labels; kept masked", csv_path, int(blank.sum()))
    matrix[blank] = np.nan
    values = {name: matrix[:, k] for k, name in enumerate(names)}
    image_dir = pd.to_numeric(frame["ImageDir"], errors="coerce")
    if image_dir.isna().any():
        raise MetadataError(f"{csv_path}: column 'ImageDir' must be a folder number")
    paths = [
        os.path.join(raw_dir, str(int(d)), i)
        for d, i in zip(image_dir, frame["ImageID"], strict=True)
    ]
    attributes = {"view": coded(frame["Projection"], VIEWS)}
    if "PatientSex_DICOM" in frame:
        attributes["sex"] = coded(frame["PatientSex_DICOM"], SEXES)
    table = as_table_frame(
        frame["ImageID"], paths, frame["PatientID"], [""] * len(frame), values, attributes
    )
    return RawTable("padchest", names, table)
