"""Dataset readers on fixtures in each published layout and on the real label files."""

from __future__ import annotations

import csv
import gzip
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrjax.data.datasets import READERS, MetadataError
from cxrjax.data.datasets.chestxray14 import read_chestxray14
from cxrjax.data.datasets.chexpert import read_chexpert
from cxrjax.data.datasets.generic_csv import read_csv
from cxrjax.data.datasets.mimic import read_mimic
from cxrjax.data.datasets.padchest import CSV_NAME, read_padchest
from cxrjax.data.datasets.vindr import read_vindr

METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "metadata"
REALCXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "realcxr"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _row(table, image_id: str) -> pd.Series:
    frame = table.frame.set_index("image_id")
    return frame.loc[image_id]


def test_registry_names_every_dataset():
    expected = {"vindr", "chestxray14", "chexpert", "mimic", "padchest", "csv", "folder"}
    assert set(READERS) == expected


# --- generic csv -------------------------------------------------------------------------------


def test_csv_folder_with_graded_labels_and_splits(tmp_path):
    _write(
        tmp_path / "labels.csv",
        "path,patient_id,split,cardiomegaly,congestion\n"
        "img/a.png,p1,train,4,0\n"
        "img/b.png,p1,Validate,2,\n"
        f"{tmp_path}/abs/c.png,p2,test,3,1\n"
        "img/d.png,p3,,0,5\n",
    )
    table = read_csv(tmp_path, threshold=3)
    assert table.name == tmp_path.name and table.label_names == ["cardiomegaly", "congestion"]
    f = table.frame
    assert f["split"].tolist() == ["train", "val", "test", ""]
    assert f["path"].tolist()[:3] == [
        str(tmp_path / "img/a.png"),
        str(tmp_path / "img/b.png"),
        str(tmp_path / "abs/c.png"),
    ]
    np.testing.assert_array_equal(f["cardiomegaly"], [1, 0, 1, 0])
    np.testing.assert_array_equal(f["congestion"], [0, np.nan, 0, 1])
    assert f["patient_id"].tolist() == ["p1", "p1", "p2", "p3"]


def test_csv_file_argument_explicit_labels_and_image_root(tmp_path):
    csv_path = _write(
        tmp_path / "meta" / "my.csv",
        "image_id,path,patient_id,age,effusion,healthy\n"
        "i1,x/1.dcm,007,63,1,0\n"
        "i2,x/2.dcm,008,70,0,1\n",
    )
    table = read_csv(csv_path, labels=["effusion"])
    assert table.label_names == ["pleural_effusion"]  # the column's finding, canonically named
    np.testing.assert_array_equal(table.frame["pleural_effusion"], [1, 0])
    assert table.frame["path"].tolist() == [
        str(tmp_path / "meta/x/1.dcm"),
        str(tmp_path / "meta/x/2.dcm"),
    ]
    assert table.frame["patient_id"].tolist() == ["007", "008"]  # leading zeros kept
    assert set(table.frame["split"]) == {""}
    # A CSV elsewhere with images under --raw: paths resolve against the image root.
    images = tmp_path / "images"
    images.mkdir()
    table = read_csv(images, csv=csv_path, labels=["effusion", "healthy"])
    assert table.frame["path"].iloc[0] == str(images / "x/1.dcm")
    # Auto detection sees `age` as a label and refuses: it is not 0/1.
    with pytest.raises(MetadataError, match=r"'age'.*--threshold.*--labels"):
        read_csv(csv_path)


def test_csv_known_findings_get_canonical_names(tmp_path):
    _write(
        tmp_path / "labels.csv",
        "path,patient_id,Effusion,Pleural Thickening,Healthy\na.png,p1,1,0,0\nb.png,p2,0,1,1\n",
    )
    table = read_csv(tmp_path)
    # Known findings in any spelling get the canonical name; others keep the column's name.
    assert table.label_names == ["pleural_effusion", "pleural_thickening", "Healthy"]
    np.testing.assert_array_equal(table.frame["pleural_effusion"], [1, 0])
    np.testing.assert_array_equal(table.frame["Healthy"], [0, 1])
    # --labels may name the column or the canonical name.
    table = read_csv(tmp_path, labels=["pleural_thickening", "Effusion"])
    assert table.label_names == ["pleural_thickening", "pleural_effusion"]
    np.testing.assert_array_equal(table.frame["pleural_thickening"], [0, 1])
    with pytest.raises(MetadataError, match=r"no column for label\(s\) \['fracture'\]"):
        read_csv(tmp_path, labels=["fracture"])
    _write(tmp_path / "labels.csv", "path,patient_id,effusion,Pleural Effusion\na.png,p1,1,0\n")
    with pytest.raises(MetadataError, match=r"'effusion' and 'Pleural Effusion' both name"):
        read_csv(tmp_path)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("path,cardiomegaly\na.png,1\n", r"missing column.*patient_id"),
        ("path,patient_id,cardiomegaly\na.png,p,yes\n", r"'cardiomegaly'.*non-numeric"),
        ("path,patient_id,split,cardiomegaly\na.png,p,holdout,1\n", r"'split'.*holdout"),
        ("path,patient_id,cardiomegaly\na.png,,1\n", r"line 2.*empty patient_id"),
        ("path,patient_id,cardiomegaly\na.png,p,1\na.png,q,0\n", r"listed twice"),
    ],
)
def test_csv_bad_metadata_names_file_and_column(tmp_path, body, match):
    path = _write(tmp_path / "labels.csv", body)
    with pytest.raises(MetadataError, match=match) as info:
        read_csv(tmp_path, labels=["cardiomegaly"])
    assert str(path) in str(info.value)


@pytest.mark.skipif(not (REALCXR / "labels.csv").is_file(), reason="shared realcxr absent")
def test_csv_real_labels_file():
    table = read_csv(REALCXR, labels=["pneumonia", "covid19", "no_finding"])
    reference = pd.read_csv(REALCXR / "labels.csv")
    assert len(table.frame) == len(reference) == 51
    np.testing.assert_array_equal(table.frame["covid19"], reference["covid19"])
    assert all(Path(p).is_file() for p in table.frame["path"])


# --- ChestX-ray14 ------------------------------------------------------------------------------

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
)


def test_chestxray14_fixture(tmp_path):
    _write(
        tmp_path / "Data_Entry_2017_v2020.csv",
        NIH_HEADER + "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143\n"
        "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143\n"
        "00000002_000.png,No Finding,0,2,80,M,PA,2500,2048,0.171,0.171\n"
        "00000003_000.png,Infiltration|Pleural_Thickening,0,3,74,F,AP,2500,2048,0.168,0.168\n",
    )
    _write(
        tmp_path / "train_val_list.txt", "00000001_000.png\n00000001_001.png\n00000003_000.png\n"
    )
    _write(tmp_path / "test_list.txt", "00000002_000.png\n")
    (tmp_path / "images_002" / "images").mkdir(parents=True)
    (tmp_path / "images_002" / "images" / "00000003_000.png").write_bytes(b"")
    table = read_chestxray14(tmp_path)
    assert len(table.label_names) == 14 and "infiltration" not in table.label_names
    f = table.frame.set_index("image_id")
    assert f["split"].tolist() == ["train", "train", "test", "train"]
    assert f["patient_id"].tolist() == ["1", "1", "2", "3"]
    assert f.loc["00000001_001.png", ["cardiomegaly", "emphysema", "no_finding"]].tolist() == [
        1,
        1,
        0,
    ]
    assert f.loc["00000002_000.png", "no_finding"] == 1
    assert f.loc["00000003_000.png", "pleural_thickening"] == 1
    assert f.loc["00000003_000.png", table.label_names].sum() == 1  # infiltration dropped
    assert f.loc["00000003_000.png", "path"] == str(tmp_path / "images_002/images/00000003_000.png")
    assert f.loc["00000002_000.png", "path"] == str(tmp_path / "images/00000002_000.png")
    shared = read_chestxray14(tmp_path, labels="mimic_shared")
    assert shared.label_names[:2] == ["cardiomegaly", "pleural_effusion"]
    assert len(shared.label_names) == 7
    # --labels in the dataset's own spelling resolves to the canonical name.
    own = read_chestxray14(tmp_path, labels=["Effusion", "Pleural_Thickening"])
    assert own.label_names == ["pleural_effusion", "pleural_thickening"]
    assert own.frame["pleural_thickening"].tolist() == [0, 0, 0, 1]


def test_chestxray14_unknown_code_and_missing_column(tmp_path):
    path = _write(
        tmp_path / "Data_Entry_2017.csv",
        NIH_HEADER + "00000001_000.png,Cardiomegaly|Tumour,0,1,57,M,PA,1,1,0.1,0.1\n",
    )
    with pytest.raises(MetadataError, match=r"'Finding Labels'.*Tumour"):
        read_chestxray14(tmp_path)
    _write(path, "Image Index,Finding Labels\n00000001_000.png,Cardiomegaly\n")
    with pytest.raises(MetadataError, match=r"Data_Entry_2017.csv.*'Patient ID'"):
        read_chestxray14(tmp_path)


# --- CheXpert ----------------------------------------------------------------------------------

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices\n"
)


def _chexpert_fixture(root: Path, folder: str = "CheXpert-v1.0-small") -> Path:
    return _write(
        root / folder / "train.csv",
        CHEXPERT_HEADER
        + f"{folder}/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,"
        "1.0,,,,,,,,,0.0,,,,1.0\n"
        f"{folder}/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,"
        ",,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,\n"
        f"{folder}/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,"
        ",,,1.0,,,-1.0,,,,,,1.0,\n"
        f"{folder}/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,PA,"
        ",,1.0,,,,0.0,,,1.0,,,,\n",
    )


@pytest.mark.parametrize("uncertain", ["zeros", "ones", "mask"])
def test_chexpert_fixture_uncertain_policies(tmp_path, uncertain):
    _chexpert_fixture(tmp_path)
    table = read_chexpert(tmp_path, uncertain=uncertain)
    f = table.frame.set_index("image_id")
    assert len(f) == 3  # the lateral view is dropped
    assert f["patient_id"].tolist() == ["patient00001", "patient00002", "patient00003"]
    p2 = "train/patient00002/study2/view1_frontal.jpg"
    assert f.loc[p2, "path"] == str(tmp_path / "CheXpert-v1.0-small" / p2)
    expected = {"zeros": 0.0, "ones": 1.0, "mask": np.nan}[uncertain]
    for name in ("cardiomegaly", "consolidation", "atelectasis", "pleural_effusion"):
        np.testing.assert_array_equal(f.loc[p2, name], expected)
    assert f.loc[p2, "lung_opacity"] == 1 and f.loc[p2, "fracture"] == 1
    assert f.loc[p2, "pneumonia"] == 0  # blank = not mentioned = negative
    p3 = "train/patient00003/study1/view1_frontal.jpg"
    assert f.loc[p3, "pneumothorax"] == 1 and f.loc[p3, "consolidation"] == 0


def test_chexpert_full_layout_from_its_own_folder_gives_same_ids(tmp_path):
    _chexpert_fixture(tmp_path / "a", "CheXpert-v1.0")
    _chexpert_fixture(tmp_path / "b", "CheXpert-v1.0-small")
    full = read_chexpert(tmp_path / "a" / "CheXpert-v1.0")
    small = read_chexpert(tmp_path / "b")
    assert full.frame["image_id"].tolist() == small.frame["image_id"].tolist()
    assert full.frame["path"].iloc[0].startswith(str(tmp_path / "a" / "CheXpert-v1.0" / "train"))


def test_chexpert_bad_code_fails_naming_column(tmp_path):
    path = _write(
        tmp_path / "train.csv",
        CHEXPERT_HEADER + "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg,F,1,Frontal,"
        "AP,1.0,,2.0,,,,,,,,,,,\n",
    )
    with pytest.raises(MetadataError, match=r"'Cardiomegaly'.*2\.0") as info:
        read_chexpert(tmp_path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="uncertain"):
        read_chexpert(tmp_path, uncertain="maybe")


# --- MIMIC-CXR-JPG -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mimic_fixture(tmp_path, suffix):
    _write(
        tmp_path / f"mimic-cxr-2.0.0-chexpert.csv{suffix}",
        "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,"
        "Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,"
        "Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices\n"
        "10000032,50414267,,,,,,,,,1.0,,,,,\n"
        "10000764,57375967,,-1.0,1.0,,,,,,,,,-1.0,,\n",
    )
    _write(
        tmp_path / f"mimic-cxr-2.0.0-metadata.csv{suffix}",
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns\n"
        "02aa804e,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544\n"
        "174413ec,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544\n"
        "096052b7,10000764,57375967,CHEST (PORTABLE AP),AP,3056,2544\n"
        "deadbeef,10000999,59999999,CHEST (PA AND LAT),PA,3056,2544\n",
    )
    _write(
        tmp_path / f"mimic-cxr-2.0.0-split.csv{suffix}",
        "dicom_id,study_id,subject_id,split\n"
        "02aa804e,50414267,10000032,train\n174413ec,50414267,10000032,train\n"
        "096052b7,57375967,10000764,validate\ndeadbeef,59999999,10000999,test\n",
    )
    table = read_mimic(tmp_path, uncertain="mask")
    assert table.label_names == [
        "cardiomegaly",
        "pleural_effusion",
        "pneumonia",
        "atelectasis",
        "no_finding",
        "consolidation",
        "pneumothorax",
    ]
    f = table.frame.set_index("image_id")
    assert sorted(f.index) == ["02aa804e", "096052b7", "deadbeef"]
    assert f.loc["096052b7", "split"] == "val" and f.loc["deadbeef", "split"] == "test"
    assert f.loc["02aa804e", "path"] == str(tmp_path / "files/p10/p10000032/s50414267/02aa804e.jpg")
    assert f.loc["02aa804e", "patient_id"] == "10000032"
    assert f.loc["02aa804e", "no_finding"] == 1
    assert np.isnan(f.loc["096052b7", "cardiomegaly"]) and f.loc["096052b7", "consolidation"] == 1
    assert f.loc["deadbeef", table.label_names].isna().all()  # study without labels: masked
    assert set(read_mimic(tmp_path, official_split=False).frame["split"]) == {""}


# --- PadChest ----------------------------------------------------------------------------------


def test_padchest_fixture(tmp_path):
    header = ",ImageID,ImageDir,StudyDate_DICOM,PatientID,PatientBirth,Projection,Labels,Other\n"
    rows = [
        "0,a.png,0,20140915,P1,1930.0,PA,\"['normal']\",x",
        "1,b.png,0,20150914,P2,1929.0,L,\"['kyphosis']\",x",
        "2,c.png,5,20150914,P2,1929.0,AP_horizontal,"
        "\"['pleural effusion', ' nodule', 'hiatal hernia', ' COPD signs']\",x",
        "3,d.png,5,20150101,P3,1950.0,AP,,x",
        "4,e.png,12,20150101,P3,1950.0,PA,\"['']\",x",
        "5,f.png,12,20150101,P4,1950.0,COSTAL,\"['normal']\",x",
    ]
    _write(tmp_path / f"{CSV_NAME}.gz", header + "\n".join(rows) + "\n")
    table = read_padchest(tmp_path)
    assert len(table.label_names) == 17
    f = table.frame.set_index("image_id")
    assert sorted(f.index) == ["a.png", "c.png", "d.png", "e.png"]
    assert f.loc["c.png", "path"] == str(tmp_path / "5" / "c.png")
    assert f.loc["a.png", "no_finding"] == 1 and f.loc["a.png", table.label_names].sum() == 1
    positives = {n for n in table.label_names if f.loc["c.png", n] == 1}
    assert positives == {"pleural_effusion", "nodule_mass", "hernia", "copd_signs"}
    assert f.loc["d.png", table.label_names].isna().all()  # blank Labels: masked
    assert f.loc["e.png", table.label_names].sum() == 0  # [''] : labelled, nothing found
    assert f.loc["c.png", "patient_id"] == "P2"


def test_padchest_malformed_labels_cell(tmp_path):
    header = ",ImageID,ImageDir,PatientID,Projection,Labels\n"
    _write(tmp_path / CSV_NAME, header + "0,a.png,0,P1,PA,['normal'\n")
    with pytest.raises(MetadataError, match=r"'Labels' row 0"):
        read_padchest(tmp_path)


# --- VinDr-CXR ---------------------------------------------------------------------------------

VINDR_COLUMNS = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
    "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
    "COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding",
]  # fmt: skip


def _vindr_row(image_id: str, rad: str | None, positives: set[str]) -> str:
    values = ["1" if c in positives else "0" for c in VINDR_COLUMNS]
    return ",".join([image_id, *([rad] if rad else []), *values])


@pytest.mark.parametrize(("aggregation", "cardio", "effusion"), [("majority", 1, 0), ("any", 1, 1)])
def test_vindr_physionet_fixture(tmp_path, aggregation, cardio, effusion):
    train = [
        _vindr_row("img1", "R1", {"Cardiomegaly", "Pleural effusion"}),
        _vindr_row("img1", "R2", {"Cardiomegaly"}),
        _vindr_row("img1", "R3", {"No finding"}),
        _vindr_row("img2", "R4", {"No finding"}),
        _vindr_row("img2", "R5", {"No finding"}),
        _vindr_row("img2", "R6", {"Pneumonia"}),
    ]
    # Both spellings of the reader column occur in the wild.
    rad = "rad_ID" if aggregation == "any" else "rad_id"
    header = ",".join(["image_id", rad, *VINDR_COLUMNS])
    _write(tmp_path / "annotations/image_labels_train.csv", header + "\n" + "\n".join(train) + "\n")
    test_header = ",".join(["image_id", *VINDR_COLUMNS])
    test_row = _vindr_row("img3", None, {"Nodule/Mass", "Pneumonia"})
    _write(tmp_path / "annotations/image_labels_test.csv", f"{test_header}\n{test_row}\n")
    table = read_vindr(tmp_path, aggregation=aggregation)
    assert len(table.label_names) == 11
    f = table.frame.set_index("image_id")
    assert f.loc["img1", "cardiomegaly"] == cardio and f.loc["img1", "pleural_effusion"] == effusion
    assert f.loc["img1", "no_finding"] == (1 if aggregation == "any" else 0)
    assert f.loc["img2", "no_finding"] == 1
    assert f.loc["img2", "pneumonia"] == (1 if aggregation == "any" else 0)
    assert f.loc["img3", "split"] == "test" and f.loc["img1", "split"] == "train"
    assert f.loc["img3", ["nodule_mass", "pneumonia"]].tolist() == [1, 1]
    assert f.loc["img3", "path"] == str(tmp_path / "test/img3.dicom")
    assert f.loc["img1", "patient_id"] == "img1"


def test_vindr_kaggle_fixture_counts_one_vote_per_reader(tmp_path):
    rows = [
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max",
        "a,Cardiomegaly,3,R1,1,1,5,5",
        "a,Nodule/Mass,8,R1,1,1,5,5",
        "a,Nodule/Mass,8,R1,6,6,9,9",  # two boxes, one reader: one vote
        "a,Cardiomegaly,3,R2,1,1,5,5",
        "a,No finding,14,R3,,,,",
        "b,No finding,14,R1,,,,",
        "b,No finding,14,R2,,,,",
        "b,No finding,14,R3,,,,",
    ]
    _write(tmp_path / "train.csv", "\n".join(rows) + "\n")
    table = read_vindr(tmp_path)
    assert "pneumonia" not in table.label_names and len(table.label_names) == 10
    f = table.frame.set_index("image_id")
    assert f.loc["a", ["cardiomegaly", "nodule_mass", "no_finding"]].tolist() == [1, 0, 0]
    assert f.loc["b", "no_finding"] == 1 and set(f["split"]) == {""}
    assert f.loc["a", "path"] == str(tmp_path / "train/a.dicom")
    with pytest.raises(ValueError, match="pneumonia"):
        read_vindr(tmp_path, labels=["pneumonia"])
    _write(tmp_path / "train.csv", "\n".join([*rows, "c,Tumour,99,R1,,,,"]) + "\n")
    with pytest.raises(MetadataError, match=r"'class_name'.*Tumour"):
        read_vindr(tmp_path)


def test_label_set_choices(tmp_path):
    _chexpert_fixture(tmp_path)
    assert read_chexpert(tmp_path, labels="mimic_shared").label_names[0] == "cardiomegaly"
    assert read_chexpert(tmp_path, labels=["edema"]).label_names == ["edema"]
    assert len(read_chexpert(tmp_path, labels="all").label_names) == 14
    with pytest.raises(ValueError, match="unknown label set"):
        read_chexpert(tmp_path, labels="nih")
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['tumour'\]\navailable: .*'edema'"):
        read_chexpert(tmp_path, labels=["tumour"])
    assert read_chexpert(tmp_path, labels=["Pleural Effusion"]).label_names == ["pleural_effusion"]
    with pytest.raises(ValueError, match="repeats a name"):
        read_chexpert(tmp_path, labels=["Pleural Effusion", "pleural_effusion"])


# --- the real, published label files ----------------------------------------------------------

needs_metadata = pytest.mark.skipif(not METADATA.is_dir(), reason="shared metadata absent")


def _gz_rows(name: str, columns: list[str]) -> list[dict[str, str]]:
    """The named columns of a real label file, parsed with the csv module (not pandas)."""
    with gzip.open(METADATA / name, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        index = [header.index(c) for c in columns]
        return [{c: row[i] for c, i in zip(columns, index, strict=True)} for row in reader]


@needs_metadata
def test_real_chestxray14():
    table = read_chestxray14(METADATA)
    assert len(table.frame) == 112_120
    assert table.frame["patient_id"].nunique() == 30_805
    # Independent count: csv module, raw column by position (the header names two columns twice).
    counts: Counter[str] = Counter()
    with gzip.open(METADATA / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            counts.update(row[1].split("|"))
    assert table.frame["cardiomegaly"].sum() == counts["Cardiomegaly"] == 2_776
    assert table.frame["hernia"].sum() == counts["Hernia"] == 227
    assert table.frame["pleural_effusion"].sum() == counts["Effusion"]
    assert table.frame["pleural_thickening"].sum() == counts["Pleural_Thickening"]
    assert table.frame["no_finding"].sum() == counts["No Finding"] == 60_361
    row = _row(table, "00000001_001.png")
    positives = {n for n in table.label_names if row[n] == 1}
    assert positives == {"cardiomegaly", "emphysema"} and row["patient_id"] == "1"


@needs_metadata
def test_real_chexpert_frontal():
    table = read_chexpert(METADATA, uncertain="mask")
    columns = ["Path", "Frontal/Lateral", "Cardiomegaly", "Pleural Effusion"]
    rows = _gz_rows("chexpert_train.csv.gz", columns)
    rows = [r for r in rows if r["Frontal/Lateral"] == "Frontal"]
    assert len(table.frame) == len(rows) == 191_027
    patients = {re.search(r"patient\d+", r["Path"]).group(0) for r in rows}
    assert table.frame["patient_id"].nunique() == len(patients)
    for name, column in [
        ("cardiomegaly", "Cardiomegaly"),
        ("pleural_effusion", "Pleural Effusion"),
    ]:
        assert table.frame[name].sum() == sum(r[column] == "1.0" for r in rows)
        assert table.frame[name].isna().sum() == sum(r[column] == "-1.0" for r in rows)
    row = _row(table, "train/patient00002/study2/view1_frontal.jpg")
    assert row["lung_opacity"] == 1 and np.isnan(row["cardiomegaly"]) and row["fracture"] == 1


@needs_metadata
def test_real_padchest_frontal():
    table = read_padchest(METADATA)
    rows = [
        r
        for r in _gz_rows(f"{CSV_NAME}.gz", ["PatientID", "Projection", "Labels"])
        if r["Projection"] in ("PA", "AP", "AP_horizontal")
    ]
    assert len(table.frame) == len(rows) == 110_633
    assert table.frame["patient_id"].nunique() == len({r["PatientID"] for r in rows})
    # Independent count by regex on the raw cell text.
    for name, term in [("cardiomegaly", "cardiomegaly"), ("no_finding", "normal")]:
        pattern = re.compile(rf"'\s*{term}'")
        assert table.frame[name].sum() == sum(bool(pattern.search(r["Labels"])) for r in rows)
    # pandas reads the 'nan' cells of unlabelled reports as missing: those rows are masked.
    unlabelled = sum(r["Labels"] == "nan" for r in rows)
    assert table.frame["cardiomegaly"].isna().sum() == unlabelled == 79
    row = _row(table, "20536686640136348236148679891455886468_k6ga29.png")
    assert row["no_finding"] == 1 and row["path"].endswith("/0/" + row.name)


@needs_metadata
@pytest.mark.parametrize("aggregation", ["majority", "any"])
def test_real_vindr_kaggle(aggregation):
    table = read_vindr(METADATA, aggregation=aggregation)
    assert len(table.frame) == 15_000
    votes: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    readers: dict[str, set[str]] = defaultdict(set)
    for r in _gz_rows("vinbigdata-train.csv.gz", ["image_id", "class_name", "rad_id"]):
        votes[r["image_id"]][r["class_name"]].add(r["rad_id"])
        readers[r["image_id"]].add(r["rad_id"])
    assert all(len(v) == 3 for v in readers.values())
    need = 2 if aggregation == "majority" else 1
    for name, cls in [("cardiomegaly", "Cardiomegaly"), ("nodule_mass", "Nodule/Mass")]:
        expected = sum(len(v[cls]) >= need for v in votes.values())
        assert table.frame[name].sum() == expected
    if aggregation == "majority":
        assert table.frame["no_finding"].sum() == 10_606
