"""NIH ChestX-ray14: `Data_Entry_2017*.csv` + `train_val_list.txt` / `test_list.txt` + PNGs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from cxrjax.data.datasets._common import (
    MetadataError,
    age_bands,
    as_table_frame,
    coded,
    read_csv_checked,
    select_labels,
)
from cxrjax.data.datasets.labels import MIMIC_LABELS, subsets_for
from cxrjax.data.table import RawTable

# Canonical label name -> code in `Finding Labels`.
CODES = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "pleural_effusion": "Effusion",
    "emphysema": "Emphysema",
    "fibrosis": "Fibrosis",
    "hernia": "Hernia",
    "infiltration": "Infiltration",
    "mass": "Mass",
    "no_finding": "No Finding",
    "nodule": "Nodule",
    "pleural_thickening": "Pleural_Thickening",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
}
# The study's 14: the seven of its MIMIC-CXR pretraining, then ChestX-ray14's (no Infiltration).
STUDY_LABELS = (
    *MIMIC_LABELS,
    "fibrosis",
    "emphysema",
    "hernia",
    "pleural_thickening",
    "edema",
    "nodule",
    "mass",
)
SUBSETS = subsets_for(CODES)
SEXES = {"F": "female", "M": "male"}
VIEWS = {"AP": "AP", "PA": "PA"}


def _image_paths(raw: Path, names: list[str]) -> list[str]:
    """Maps image names to files in `images/` or NIH's `images_001/images/...` folders.

    Lists the (at most a dozen) folders once instead of stat-ing every image, so a metadata-only
    run works without the images and a full run does not pay 112k stats up front.
    """
    folders = sorted(raw.glob("images_*/images")) + sorted(raw.glob("images_*"))
    where: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name.endswith(".png"):
                    where.setdefault(entry.name, folder)
    default = raw / "images"
    # os.path.join: pathlib costs seconds over a few hundred thousand rows.
    return [os.path.join(where.get(name, default), name) for name in names]


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def read_chestxray14(
    raw_dir: Path, *, labels: str | list[str] | None = None, uncertain: str = "zeros"
) -> RawTable:
    """Reads ChestX-ray14 from its download folder.

    Official split from `train_val_list.txt` / `test_list.txt` when both are present; without
    them every image gets split "" (a seeded patient-level split is made downstream).
    `uncertain` is accepted for a uniform reader signature; NIH labels have no uncertain code.
    Sex, age band and view come from `Patient Gender`, `Patient Age` and `View Position` when
    the file has them.
    """
    del uncertain
    raw_dir = Path(raw_dir).expanduser().resolve()
    entries = sorted(raw_dir.glob("Data_Entry_2017*.csv*"))
    if not entries:
        raise MetadataError(
            f"{raw_dir}: no Data_Entry_2017*.csv[.gz]; point --raw at the ChestX-ray14 folder"
        )
    csv_path = entries[-1]  # v2020 sorts after the original 2017 file
    frame = read_csv_checked(
        csv_path, ["Image Index", "Finding Labels", "Patient ID"], dtype={"Patient ID": str}
    )
    names = select_labels(
        labels, default=STUDY_LABELS, subsets=SUBSETS, available=tuple(CODES), dataset="chestxray14"
    )
    findings = frame["Finding Labels"].fillna("").str.split("|")
    known = set(CODES.values())
    for codes in findings:
        unknown = set(codes) - known
        if unknown:
            raise MetadataError(
                f"{csv_path}: column 'Finding Labels' has unknown code(s) {sorted(unknown)}; "
                f"known: {sorted(known)}"
            )
    values = {
        name: np.fromiter((CODES[name] in codes for codes in findings), np.float32, len(frame))
        for name in names
    }
    train_list, test_list = raw_dir / "train_val_list.txt", raw_dir / "test_list.txt"
    if train_list.is_file() and test_list.is_file():
        train, test = _read_list(train_list), _read_list(test_list)
        split = [
            "test" if n in test else "train" if n in train else "" for n in frame["Image Index"]
        ]
    else:
        logging.warning("%s: no train_val_list.txt/test_list.txt; splitting by patient", raw_dir)
        split = [""] * len(frame)
    image_names = frame["Image Index"].tolist()
    attributes = {}
    if "Patient Gender" in frame:
        attributes["sex"] = coded(frame["Patient Gender"], SEXES)
    if "Patient Age" in frame:
        attributes["age_band"] = age_bands(frame["Patient Age"])
    if "View Position" in frame:
        attributes["view"] = coded(frame["View Position"], VIEWS)
    table = as_table_frame(
        image_names,
        _image_paths(raw_dir, image_names),
        frame["Patient ID"],
        split,
        values,
        attributes,
    )
    return RawTable("chestxray14", names, table)
