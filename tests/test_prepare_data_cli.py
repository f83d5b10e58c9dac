"""tools/prepare_data.py end to end: each dataset's published layout -> shards, dry runs, errors."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrjax.data import shards, splits
from cxrjax.data.images import PreprocessOptions, load_radiograph

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "prepare_data.py"
METADATA = ROOT.parent / "shared" / "data" / "metadata"
SALT = "test-salt"


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pixels(seed: int, bits: int = 8, shape=(40, 52)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = (yy + xx) / (shape[0] + shape[1]) * 0.7 + rng.uniform(0, 0.3, shape)
    return (img * (2**bits - 1)).astype(np.uint16 if bits > 8 else np.uint8)


def _image(path: Path, seed: int, bits: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed, bits)).save(path)


def _dicom(path: Path, seed: int, photometric: str) -> None:
    pixels = _pixels(seed, 12).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def _vindr(raw: Path) -> list[str]:
    labels = ["Cardiomegaly", "Pleural effusion", "Pneumonia", "No finding", "Other"]
    header = "image_id,rad_id," + ",".join(labels)
    rows = []
    for i in range(6):
        for r in range(3):
            rows.append(f"tr{i},R{r},{int(i % 2 == 0)},{int(r == 0)},0,{int(i % 2)},0")
        _dicom(raw / "train" / f"tr{i}.dicom", i, "MONOCHROME1" if i % 2 else "MONOCHROME2")
    _text(raw / "annotations" / "image_labels_train.csv", header + "\n" + "\n".join(rows) + "\n")
    _text(
        raw / "annotations" / "image_labels_test.csv",
        "image_id," + ",".join(labels) + "\nte0,1,1,1,0,0\nte1,0,0,0,1,0\n",
    )
    for i in range(2):
        _dicom(raw / "test" / f"te{i}.dicom", 10 + i, "MONOCHROME2")
    return ["--labels", "cardiomegaly", "pleural_effusion", "pneumonia", "no_finding"]


def _chestxray14(raw: Path) -> list[str]:
    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
    )
    findings = ["Cardiomegaly", "No Finding", "Effusion|Mass", "Hernia", "No Finding", "Nodule"]
    lines, names = [], []
    for i, finding in enumerate(findings):
        name = f"0000000{i}_000.png"
        names.append(name)
        lines.append(f"{name},{finding},0,{i},50,M,PA,2000,2000,0.1,0.1")
        _image(raw / "images" / name, i)
    _text(raw / "Data_Entry_2017_v2020.csv", header + "\n".join(lines) + "\n")
    _text(raw / "train_val_list.txt", "\n".join(names[:4]) + "\n")
    _text(raw / "test_list.txt", "\n".join(names[4:]) + "\n")
    return []


def _chexpert(raw: Path) -> list[str]:
    folder = "CheXpert-v1.0-small"
    header = (
        "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
        "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
        "Pleural Effusion,Pleural Other,Fracture,Support Devices\n"
    )
    lines = []
    for i in range(8):
        view = "frontal" if i != 3 else "lateral"
        rel = f"{folder}/train/patient{i:05d}/study1/view1_{view}.jpg"
        code = ["1.0", "0.0", "-1.0", ""][i % 4]
        lines.append(f"{rel},Male,50,{view.title()},PA,,,{code},,,,,,,1.0,,,,")
        _image(raw / rel, i)
    _text(raw / folder / "train.csv", header + "\n".join(lines) + "\n")
    return ["--uncertain", "mask"]


def _mimic(raw: Path) -> list[str]:
    cols = (
        "Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
        "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
        "Pneumothorax,Support Devices"
    )
    chex, meta, split = [], [], []
    for i in range(6):
        subject, study, dicom = 10000000 + i, 50000000 + i, f"d{i}"
        chex.append(f"{subject},{study},," + ("1.0" if i % 2 else "-1.0") + ",,,,,,,,,,,,")
        meta.append(f"{dicom},{subject},{study},PA,3000,2500")
        split.append(f"{dicom},{study},{subject}," + ["train", "validate", "test"][i % 3])
        _image(raw / "files" / "p10" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", i)
    _text(
        raw / "mimic-cxr-2.0.0-chexpert.csv.gz",
        "subject_id,study_id," + cols + "\n" + "\n".join(chex) + "\n",
    )
    _text(
        raw / "mimic-cxr-2.0.0-metadata.csv.gz",
        "dicom_id,subject_id,study_id,ViewPosition,Rows,Columns\n" + "\n".join(meta) + "\n",
    )
    _text(
        raw / "mimic-cxr-2.0.0-split.csv.gz",
        "dicom_id,study_id,subject_id,split\n" + "\n".join(split) + "\n",
    )
    return []


def _padchest(raw: Path) -> list[str]:
    lines = []
    terms = ["'normal'", "'cardiomegaly', ' scoliosis'", "' nodule'", "''", "'COPD signs'"]
    for i in range(8):
        image_id, folder = f"img{i}.png", i % 3
        lines.append(f'{i},{image_id},{folder},P{i // 2},PA,"[{terms[i % len(terms)]}]"')
        _image(raw / str(folder) / image_id, i, bits=16)
    _text(
        raw / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
        ",ImageID,ImageDir,PatientID,Projection,Labels\n" + "\n".join(lines) + "\n",
    )
    return []


def _generic(raw: Path) -> list[str]:
    lines = []
    for i in range(7):
        lines.append(f"img/{i}.png,pat{i // 2},{i % 5},{int(i % 3 == 0)}")
        if i != 6:  # the last row's file is missing: skipped, the run completes
            _image(raw / "img" / f"{i}.png", i, bits=16 if i % 2 else 8)
    _text(raw / "labels.csv", "path,patient_id,congestion,healthy\n" + "\n".join(lines) + "\n")
    return ["--threshold", "3"]


FIXTURES = {
    "vindr": _vindr,
    "chestxray14": _chestxray14,
    "chexpert": _chexpert,
    "mimic": _mimic,
    "padchest": _padchest,
    "csv": _generic,
}


@pytest.mark.parametrize("dataset", sorted(FIXTURES))
def test_end_to_end_each_dataset(tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("CXRJAX_SALT", SALT)
    raw, out = tmp_path / "raw", tmp_path / "out"
    extra = FIXTURES[dataset](raw)
    argv = ["--dataset", dataset, "--raw", str(raw), "--out", str(out), "--size", "32"]
    argv += ["--workers", "1", "--train-fraction", "0.5", *extra]
    assert _tool().main(argv) == 0

    args = _tool()._parser().parse_args(argv)
    table = _tool().read_table(args)
    info = shards.load_info(out)
    assert info.label_names == table.label_names and info.image_size == 32
    index_of = {splits.salted_hash(str(i), SALT): k for k, i in table.frame["image_id"].items()}
    seen = 0
    options = PreprocessOptions(size=32)
    for split in ("train", "val", "test"):
        if not info.splits[split]["num_examples"]:
            continue
        source = ArrayRecordDataSource(info.files(split))
        for k in range(len(source)):
            record = shards.decode(source[k])
            row = table.frame.loc[index_of[record["id"]]]
            np.testing.assert_array_equal(record["image"], load_radiograph(row["path"], options))
            np.testing.assert_array_equal(
                record["labels"], row[table.label_names].to_numpy(np.float32)
            )
            # Only the salted hash of the patient leaves the raw data.
            assert record["patient"] == splits.salted_hash(str(row["patient_id"]), SALT)
            seen += 1
    summary = json.loads((out / "summary.json").read_text())
    missing = 1 if dataset == "csv" else 0
    assert summary["skipped"] == missing
    assert seen == len(table.frame) - missing


def test_dry_run_counts_and_writes_no_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXRJAX_SALT", SALT)
    raw, out = tmp_path / "raw", tmp_path / "out"
    _chestxray14(raw)
    for png in (raw / "images").iterdir():
        png.unlink()  # metadata only: the dry run must not need the images
    argv = ["--dataset", "chestxray14", "--raw", str(raw), "--out", str(out), "--dry-run"]
    assert _tool().main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["test"]["images"] == 2  # official test_list.txt
    assert sum(s["images"] for s in summary["splits"].values()) == 6
    assert sum(s["positives"]["no_finding"] for s in summary["splits"].values()) == 2
    assert not list(out.glob("*.array_record"))
    printed = capsys.readouterr().out
    assert "no_finding" in printed and "images" in printed


def test_no_official_split_resplits_by_patient(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRJAX_SALT", SALT)
    raw = tmp_path / "raw"
    _mimic(raw)
    base = ["--dataset", "mimic", "--raw", str(raw), "--dry-run"]
    assert _tool().main([*base, "--out", str(tmp_path / "a")]) == 0
    official = json.loads((tmp_path / "a" / "summary.json").read_text())["splits"]
    # The fixture's split file: train, validate, test in turn over six images.
    assert [official[s]["images"] for s in ("train", "val", "test")] == [2, 2, 2]
    argv = [*base, "--out", str(tmp_path / "b"), "--no-official-split", "--test-fraction", "0.5"]
    assert _tool().main(argv) == 0
    table = _tool().read_table(_tool()._parser().parse_args([*argv]))
    assert set(table.frame["split"]) == {""}
    resplit = json.loads((tmp_path / "b" / "summary.json").read_text())["splits"]
    assert sum(s["images"] for s in resplit.values()) == 6


def test_bad_metadata_exits_before_image_work(tmp_path, capsys):
    raw = tmp_path / "raw"
    _text(raw / "labels.csv", "path,cardiomegaly\na.png,1\n")
    out = tmp_path / "out"
    code = _tool().main(["--dataset", "csv", "--raw", str(raw), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(raw / "labels.csv") in err and "patient_id" in err
    assert not out.exists()


def test_bench_prints_rates_for_each_file_type(tmp_path):
    raw = tmp_path / "raw"
    _vindr(raw)
    lines = [f"{p.relative_to(raw)},p{i}" for i, p in enumerate(sorted(raw.rglob("*.dicom")))]
    _image(raw / "x.png", 0)
    lines.append("x.png,px")
    _text(raw / "bench.csv", "path,patient_id,y\n" + "\n".join(f"{ln},1" for ln in lines) + "\n")
    result = subprocess.run(
        [sys.executable, str(TOOL), "--dataset", "csv", "--raw", str(raw / "bench.csv")]
        + ["--out", str(tmp_path / "o"), "--bench", "20", "--size", "32"],
        capture_output=True,
        text=True,
        check=True,
    )
    rates = [ln for ln in result.stdout.splitlines() if ln.startswith("bench")]
    assert {ln.split()[1] for ln in rates} == {"dicom", "png"}
    assert {ln.split()[2] for ln in rates} == {"workers=1:", "workers=2:"}
    assert all("images/s" in ln for ln in rates)


def _independent_counts(dataset: str) -> tuple[int, int, str, int]:
    """(images, patients, a label, its positives) counted with the csv module, not the readers."""
    name = {
        "chestxray14": "Data_Entry_2017_v2020.csv.gz",
        "chexpert": "chexpert_train.csv.gz",
        "padchest": "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
        "vindr": "vinbigdata-train.csv.gz",
    }[dataset]
    with gzip.open(METADATA / name, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    col = header.index
    if dataset == "chestxray14":
        patients = {r[col("Patient ID")] for r in rows}
        positives = sum("Pneumothorax" in r[col("Finding Labels")].split("|") for r in rows)
        return len(rows), len(patients), "pneumothorax", positives
    if dataset == "chexpert":
        rows = [r for r in rows if r[col("Frontal/Lateral")] == "Frontal"]
        patients = {r[col("Path")].split("/")[2] for r in rows}
        positives = sum(r[col("Pneumothorax")] == "1.0" for r in rows)
        return len(rows), len(patients), "pneumothorax", positives
    if dataset == "padchest":
        rows = [r for r in rows if r[col("Projection")] in ("PA", "AP", "AP_horizontal")]
        patients = {r[col("PatientID")] for r in rows}
        positives = sum("'kyphosis'" in r[col("Labels")].replace("' ", "'") for r in rows)
        return len(rows), len(patients), "kyphosis", positives
    votes: dict[str, set[str]] = {}
    for r in rows:
        votes.setdefault(r[col("image_id")], set())
        if r[col("class_name")] == "Cardiomegaly":
            votes[r[col("image_id")]].add(r[col("rad_id")])
    positives = sum(len(v) >= 2 for v in votes.values())
    return len(votes), len(votes), "cardiomegaly", positives


@pytest.mark.skipif(not METADATA.is_dir(), reason="shared metadata absent")
@pytest.mark.parametrize("dataset", ["chestxray14", "chexpert", "padchest", "vindr"])
def test_real_metadata_dry_run(tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("CXRJAX_SALT", SALT)
    out = tmp_path / "out"
    argv = ["--dataset", dataset, "--raw", str(METADATA), "--out", str(out), "--dry-run"]
    assert _tool().main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())["splits"]
    images, patients, label, positives = _independent_counts(dataset)
    assert sum(s["images"] for s in summary.values()) == images
    # Patients add up across splits only because no patient is in two of them.
    assert sum(s["patients"] for s in summary.values()) == patients
    assert sum(s["positives"][label] for s in summary.values()) == positives
    assert all(summary[s]["images"] > 0 for s in ("train", "val", "test"))
