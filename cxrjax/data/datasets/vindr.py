"""VinDr-CXR: PhysioNet `vindr-cxr/1.0.0` layout, or the Kaggle competition `train.csv`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrjax.data.datasets._common import (
    MetadataError,
    as_table_frame,
    find_file,
    read_csv_checked,
    select_labels,
)
from cxrjax.data.datasets.labels import MIMIC_LABELS, canonical, normalise, subsets_for
from cxrjax.data.table import RawTable
from cxrjax.errors import ConfigError

AGGREGATIONS = ("majority", "any")
# The study's labels: the seven of its MIMIC-CXR pretraining, then this dataset's own.
STUDY_LABELS = (
    *MIMIC_LABELS,
    "pleural_thickening",
    "lung_opacity",
    "pulmonary_fibrosis",
    "nodule_mass",
)
KAGGLE_CLASSES = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "No finding",
)


def _label_name(column: str) -> str:
    """'Nodule/Mass' -> 'nodule_mass'; a column outside the vocabulary (a later release) is
    kept in snake case rather than refused."""
    return canonical(column) or normalise(column)


def _aggregate(per_reader: pd.DataFrame, aggregation: str) -> pd.DataFrame:
    """(image, reader) rows of 0/1 -> one row per image: mean >= 0.5 (majority) or max (any)."""
    grouped = per_reader.groupby(level="image_id", sort=True)
    if aggregation == "majority":
        return (grouped.mean() >= 0.5).astype(np.float32)
    return grouped.max().astype(np.float32)


def _physionet(raw: Path, aggregation: str) -> tuple[pd.DataFrame, list[str], Path]:
    annotations = raw / "annotations"
    train_path = find_file(annotations, ["image_labels_train.csv"], "VinDr train labels")
    test_path = find_file(annotations, ["image_labels_test.csv"], "VinDr test labels")
    # Some releases spell the reader column rad_ID.
    train = read_csv_checked(train_path, ["image_id"]).rename(columns={"rad_ID": "rad_id"})
    test = read_csv_checked(test_path, ["image_id"]).rename(columns={"rad_ID": "rad_id"})
    if "rad_id" not in train:
        raise MetadataError(f"{train_path}: missing column 'rad_id'; use the file as published")
    label_columns = [c for c in train.columns if c not in ("image_id", "rad_id")]
    missing = [c for c in label_columns if c not in test.columns]
    if missing:
        raise MetadataError(f"{test_path}: missing label column(s) {missing} of {train_path}")
    for path, frame in ((train_path, train), (test_path, test)):
        values = frame[label_columns]
        if not values.isin([0, 1]).all().all():
            column = values.columns[~values.isin([0, 1]).all()][0]
            raise MetadataError(f"{path}: column {column!r} holds values other than 0/1")
    train_images = _aggregate(train.set_index(["image_id", "rad_id"])[label_columns], aggregation)
    if test["image_id"].duplicated().any():
        raise MetadataError(f"{test_path}: expected one consensus row per image_id")
    test_images = test.set_index("image_id")[label_columns].astype(np.float32)
    train_images["split"], test_images["split"] = "train", "test"
    combined = pd.concat([train_images, test_images])
    combined["path"] = [
        os.path.join(raw, split, f"{image_id}.dicom")
        for image_id, split in zip(combined.index, combined["split"], strict=True)
    ]
    combined.columns = [_label_name(c) if c in label_columns else c for c in combined.columns]
    return combined, [_label_name(c) for c in label_columns], train_path


def _kaggle(raw: Path, aggregation: str) -> tuple[pd.DataFrame, list[str], Path]:
    path = find_file(raw, ["train.csv", "vinbigdata-train.csv"], "VinDr Kaggle train.csv")
    boxes = read_csv_checked(path, ["image_id", "class_name", "rad_id"])
    unknown = sorted(set(boxes["class_name"].unique()) - set(KAGGLE_CLASSES))
    if unknown:
        raise MetadataError(f"{path}: column 'class_name' has unknown classes {unknown}")
    # A reader who drew several boxes of one class still casts one vote for it.
    votes = boxes.drop_duplicates(["image_id", "rad_id", "class_name"]).assign(vote=1.0)
    per_reader = votes.pivot_table(
        index=["image_id", "rad_id"], columns="class_name", values="vote", fill_value=0.0
    ).reindex(columns=list(KAGGLE_CLASSES), fill_value=0.0)
    images = _aggregate(per_reader, aggregation)
    images.columns = [_label_name(c) for c in images.columns]
    # The competition's test labels were never published: everything is split downstream.
    images["split"] = ""
    images["path"] = [os.path.join(raw, "train", f"{image_id}.dicom") for image_id in images.index]
    return images, [_label_name(c) for c in KAGGLE_CLASSES], path


def read_vindr(
    raw_dir: Path,
    *,
    labels: str | list[str] | None = None,
    uncertain: str = "zeros",
    aggregation: str = "majority",
) -> RawTable:
    """Reads VinDr-CXR.

    PhysioNet layout (`annotations/image_labels_{train,test}.csv[.gz]`): training labels
    aggregate the three readers (majority: at least half of them; any: at least one), test
    labels are the consensus file; official 15,000 / 3,000 split. Otherwise the Kaggle
    `train.csv` (one row per box or 'No finding' reading), which has no Pneumonia class and no
    test labels: the default label set then drops pneumonia and every image gets split "".
    VinDr has no patient IDs: each image counts as its own patient. `uncertain` is accepted
    for a uniform reader signature; VinDr labels have no uncertain code.
    """
    del uncertain
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation={aggregation!r}; use one of {AGGREGATIONS}")
    raw_dir = Path(raw_dir).expanduser().resolve()
    if (raw_dir / "annotations").is_dir():
        images, available, source = _physionet(raw_dir, aggregation)
        default = STUDY_LABELS
    else:
        images, available, source = _kaggle(raw_dir, aggregation)
        default = tuple(n for n in STUDY_LABELS if n in available)
        if labels is None:
            logging.warning("%s: Kaggle VinDr has no pneumonia class; using %s", source, default)
    # The study reports 8 VinDr labels shared with MIMIC-CXR, but only 7 of its 11 name a MIMIC
    # label (Kaggle: 6, no pneumonia); pass an explicit list to add another.
    names = select_labels(
        labels,
        default=default,
        subsets=subsets_for(available),
        available=available,
        dataset="vindr",
    )
    image_ids = images.index.astype(str)
    table = as_table_frame(
        image_ids,
        images["path"],
        image_ids,
        images["split"],
        {n: images[n].to_numpy() for n in names},
    )
    return RawTable("vindr", names, table)
