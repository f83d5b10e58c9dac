"""A folder of unlabeled radiographs, for self-supervised pretraining: images only, no labels.

Every image `cxrjax.data.images.find_images` finds under the folder (recursively: DICOM, PNG,
JPEG) becomes one row with zero labels. Patient IDs come from an optional CSV with the columns
`path` (relative to the folder, or absolute) and `patient_id`; without one, every image is its
own patient. Either way the IDs are hashed by preparation like any dataset's, and the
patient-level split still applies (`--val-fraction 0 --test-fraction 0` keeps every image for
training).
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrjax.data.datasets._common import MetadataError, as_table_frame, read_csv_checked
from cxrjax.data.images import find_images
from cxrjax.data.table import RawTable


def read_folder(raw: Path, *, csv: Path | None = None) -> RawTable:
    """The images under `raw`, with patient IDs from `csv` (path, patient_id) when given."""
    raw = Path(raw).expanduser().resolve()
    if not raw.is_dir():
        raise MetadataError(f"{raw}: no such folder; point --raw at the folder of images")
    paths = find_images([raw])
    # The relative path identifies an image within the folder (and is hashed before writing).
    image_ids = [os.path.relpath(p, raw) for p in paths]
    if csv is None:
        patients = image_ids
    else:
        patients = _patients_from_csv(Path(csv).expanduser().resolve(), raw, image_ids)
    frame = as_table_frame(image_ids, paths, patients, [""] * len(paths), {})
    return RawTable("folder", [], frame)


def _patients_from_csv(csv: Path, raw: Path, image_ids: list[str]) -> list[str]:
    if not csv.is_file():
        raise MetadataError(f"{csv}: patient CSV not found; pass an existing --csv or none")
    frame = read_csv_checked(csv, ["path", "patient_id"], dtype=str, keep_default_na=False)
    by_image = {}
    for path, patient in zip(
        frame["path"].str.strip(), frame["patient_id"].str.strip(), strict=True
    ):
        key = os.path.relpath(path, raw) if os.path.isabs(path) else os.path.normpath(path)
        by_image[key] = patient
    missing = [i for i in image_ids if not by_image.get(i)]
    if missing:
        raise MetadataError(
            f"{csv}: no patient_id for {len(missing)} image(s), e.g. {missing[0]!r}",
            "list every image of the folder (path relative to it) with its patient_id, or drop "
            "--csv to count each image as its own patient",
        )
    return [by_image[i] for i in image_ids]
