"""CheXpert v1.0 (full and -small): `train.csv` + `patientNNNNN/studyN/viewN_*.jpg`."""

from __future__ import annotations

import os
from pathlib import Path

from cxrjax.data.datasets._common import (
    MetadataError,
    age_bands,
    as_table_frame,
    check_uncertain,
    chexpert_coding,
    coded,
    find_file,
    read_csv_checked,
    select_labels,
)
from cxrjax.data.datasets.labels import MIMIC_LABELS, subsets_for
from cxrjax.data.table import RawTable

# Canonical label name -> CheXpert-labeler column (shared by MIMIC-CXR-JPG).
COLUMNS = {
    "no_finding": "No Finding",
    "enlarged_cardiomediastinum": "Enlarged Cardiomediastinum",
    "cardiomegaly": "Cardiomegaly",
    "lung_opacity": "Lung Opacity",
    "lung_lesion": "Lung Lesion",
    "edema": "Edema",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis",
    "pneumothorax": "Pneumothorax",
    "pleural_effusion": "Pleural Effusion",
    "pleural_other": "Pleural Other",
    "fracture": "Fracture",
    "support_devices": "Support Devices",
}
# The study's labels: the seven of its MIMIC-CXR pretraining, then this dataset's own.
STUDY_LABELS = (
    *MIMIC_LABELS,
    "lung_opacity",
    "lung_lesion",
    "fracture",
)
SUBSETS = subsets_for(COLUMNS)
_PATIENT = r"(patient\d+)"
SEXES = {"Female": "female", "Male": "male"}
# `AP/PA` of the frontal images; LL and RL (a handful) are lateral projections.
VIEWS = {"AP": "AP", "PA": "PA", "LL": "lateral", "RL": "lateral"}


def read_chexpert(
    raw_dir: Path,
    *,
    labels: str | list[str] | None = None,
    uncertain: str = "zeros",
    csv_name: str = "train.csv",
) -> RawTable:
    """Reads CheXpert's frontal images from `train.csv` (the study split it 80/20 by patient).

    raw_dir: the `CheXpert-v1.0[-small]` folder, or the folder above it. CSV paths start with
    the dataset folder's name, so images resolve against the folder above the CSV.
    csv_name: "train.csv" (default) or "valid.csv" (the 234-image expert-labelled set).
    Sex, age band and view come from `Sex`, `Age` and `AP/PA` when the file has them.
    """
    check_uncertain(uncertain)
    raw_dir = Path(raw_dir).expanduser().resolve()
    folders = [raw_dir, *sorted(raw_dir.glob("CheXpert-v1.0*"))]
    for folder in folders:
        try:
            csv_path = find_file(folder, [csv_name, f"chexpert_{csv_name}"], "CheXpert CSV")
            break
        except MetadataError:
            continue
    else:
        raise MetadataError(
            f"{raw_dir}: no {csv_name}[.gz] here or in CheXpert-v1.0*/; point --raw at the "
            "CheXpert-v1.0 or CheXpert-v1.0-small folder"
        )
    columns = [COLUMNS[n] for n in COLUMNS]
    frame = read_csv_checked(csv_path, ["Path", "Frontal/Lateral", *columns])
    names = select_labels(
        labels, default=STUDY_LABELS, subsets=SUBSETS, available=tuple(COLUMNS), dataset="chexpert"
    )
    views = set(frame["Frontal/Lateral"].dropna().unique()) - {"Frontal", "Lateral"}
    if views:
        raise MetadataError(
            f"{csv_path}: column 'Frontal/Lateral' has {sorted(views)}; expected Frontal/Lateral"
        )
    frame = frame[frame["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    patients = frame["Path"].str.extract(_PATIENT, expand=False)
    if patients.isna().any():
        bad = frame["Path"][patients.isna()].iloc[0]
        raise MetadataError(f"{csv_path}: column 'Path' value {bad!r} has no patientNNNNN part")
    values = {
        n: chexpert_coding(frame[COLUMNS[n]], uncertain, path=csv_path, column=COLUMNS[n])
        for n in names
    }
    first = Path(frame["Path"].iloc[0]).parts[0] if len(frame) else ""
    root = csv_path.parent.parent if first.startswith("CheXpert-v1.0") else csv_path.parent
    # os.path.join: pathlib costs seconds over a few hundred thousand rows.
    paths = [os.path.join(root, p) for p in frame["Path"]]
    # The image id drops the dataset folder so full and -small give the same ids.
    image_ids = frame["Path"].str.replace(r"^CheXpert-v1\.0[^/]*/", "", regex=True)
    attributes = {}
    if "Sex" in frame:
        attributes["sex"] = coded(frame["Sex"], SEXES)
    if "Age" in frame:
        attributes["age_band"] = age_bands(frame["Age"])
    if "AP/PA" in frame:
        attributes["view"] = coded(frame["AP/PA"], VIEWS)
    table = as_table_frame(image_ids, paths, patients, [""] * len(frame), values, attributes)
    return RawTable("chexpert", names, table)
