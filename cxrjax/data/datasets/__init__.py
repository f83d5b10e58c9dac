"""One reader per public chest X-ray dataset, each returning a `RawTable`.

Readers parse the published label files only; they never open or stat an image, so a dry run
works with the metadata alone.
"""

from __future__ import annotations

from collections.abc import Callable

from cxrjax.data.datasets._common import MetadataError
from cxrjax.data.datasets.chestxray14 import read_chestxray14
from cxrjax.data.datasets.chexpert import read_chexpert
from cxrjax.data.datasets.folder import read_folder
from cxrjax.data.datasets.generic_csv import read_csv
from cxrjax.data.datasets.mimic import read_mimic
from cxrjax.data.datasets.padchest import read_padchest
from cxrjax.data.datasets.vindr import read_vindr
from cxrjax.data.table import RawTable

READERS: dict[str, Callable[..., RawTable]] = {
    "vindr": read_vindr,
    "chestxray14": read_chestxray14,
    "chexpert": read_chexpert,
    "mimic": read_mimic,
    "padchest": read_padchest,
    "csv": read_csv,
    "folder": read_folder,
}

__all__ = [
    "READERS",
    "MetadataError",
    "read_chestxray14",
    "read_chexpert",
    "read_csv",
    "read_folder",
    "read_mimic",
    "read_padchest",
    "read_vindr",
]
