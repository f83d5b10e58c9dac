"""The embedded demo dataset: phantom radiographs generated, then prepared like any real dataset."""

from __future__ import annotations

from pathlib import Path

from cxrjax.data import phantoms, shards
from cxrjax.data.datasets import read_csv
from cxrjax.data.images import PreprocessOptions
from cxrjax.data.prepare import prepare_dataset


def ensure_demo_dataset(directory: str | Path, *, patients: int, image_size: int) -> Path:
    """Generates raw phantom files under `directory/raw` and shards in `directory` (once)."""
    directory = Path(directory)
    if (directory / shards.INFO_FILE).is_file():
        return directory
    print(
        f"writing {patients} phantom patients (DICOM, PNG, JPG) to {directory / 'raw'}", flush=True
    )
    csv_path = phantoms.write_phantom_dataset(directory / "raw", n_patients=patients, seed=0)
    table = read_csv(csv_path)
    summary = prepare_dataset(
        table,
        directory,
        options=PreprocessOptions(size=image_size),
        val_fraction=0.15,
        test_fraction=0.2,
        seed=0,
        salt="cxrjax-demo",
    )
    counts = {s: v["images"] for s, v in summary["splits"].items()}
    print(
        f"prepared demo shards in {directory}: {counts}, skipped {summary['skipped']}", flush=True
    )
    return directory
