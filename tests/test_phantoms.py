"""Tests of the synthetic phantom dataset: files, labels, visible findings, learnability."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000Lossless
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

from cxrjax.data import phantoms
from cxrjax.data.phantoms import (
    FORMATS,
    LABELS,
    NO_FINDINGS,
    Exposure,
    Findings,
    phantom_regions,
    render_density,
    render_phantom,
    sample_anatomy,
    sample_exposure,
    sample_findings,
    save_radiograph,
    write_phantom_dataset,
)


def decode(path: Path) -> np.ndarray:
    """Independent decoder: pydicom's modality LUT, then MONOCHROME1 inversion over its range."""
    if path.suffix == ".dcm":
        ds = pydicom.dcmread(path)
        stored_max = 2 ** int(ds.BitsStored) - 1
        values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        ends = apply_modality_lut(np.array([0, stored_max]), ds).astype(np.float64)
        lo, hi = ends.min(), ends.max()
        if ds.PhotometricInterpretation == "MONOCHROME1":
            values = lo + hi - values
        return (values - lo) / (hi - lo)
    with Image.open(path) as im:
        return np.asarray(im).astype(np.float64)


def upright(seed: int) -> phantoms.Anatomy:
    """An anatomy without rotation or shift, so rows and columns line up with the body."""
    anatomy = sample_anatomy(np.random.default_rng(seed))
    return dataclasses.replace(anatomy, rotation=0.0, shift=(0.0, 0.0), aspect=1.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(out, n_patients=12, image_size=48, seed=3, workers=1)


def test_csv_columns_paths_and_patients(dataset: Path) -> None:
    frame = pd.read_csv(dataset)
    assert list(frame.columns) == ["path", "patient_id", *LABELS]
    assert frame["patient_id"].nunique() == 12
    assert frame["patient_id"].str.fullmatch(r"PHANTOM-\d{5}").all()
    assert frame.groupby("patient_id").size().between(1, 3).all()
    for path, pid in zip(frame["path"], frame["patient_id"], strict=True):
        assert not Path(path).is_absolute()
        assert (dataset.parent / path).is_file()
        assert Path(path).parts[:2] == ("images", pid)
    findings = frame[list(LABELS[:3])].to_numpy()
    assert set(np.unique(frame[list(LABELS)].to_numpy())) <= {0, 1}
    np.testing.assert_array_equal(frame["no_finding"], (findings.sum(1) == 0).astype(int))


def test_deterministic_and_order_independent(tmp_path: Path, dataset: Path) -> None:
    again = write_phantom_dataset(tmp_path / "a", n_patients=12, image_size=48, seed=3, workers=2)
    first, second = pd.read_csv(dataset), pd.read_csv(again)
    pd.testing.assert_frame_equal(first, second)
    for path in first["path"]:
        np.testing.assert_array_equal(decode(dataset.parent / path), decode(again.parent / path))
    other = write_phantom_dataset(tmp_path / "b", n_patients=12, image_size=48, seed=4, workers=1)
    a = decode(dataset.parent / first["path"][0])
    b = decode(other.parent / pd.read_csv(other)["path"][0])
    assert a.shape != b.shape or np.abs(a - b).mean() > 0.01


def test_every_format_present_and_decodable(tmp_path: Path) -> None:
    # 1 image per patient and 12 patients: exactly two files of each format.
    csv = write_phantom_dataset(tmp_path, 12, images_per_patient=(1, 1), image_size=40, workers=1)
    frame = pd.read_csv(csv)
    kinds = []
    for path, pid in zip(frame["path"], frame["patient_id"], strict=True):
        path = csv.parent / path
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
            assert ds.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1")
            assert ds.PatientID == pid
            assert 12 <= ds.BitsStored <= 16 and ds.HighBit == ds.BitsStored - 1
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns) == (40, ds.Columns)
            assert ds.pixel_array.max() < 2**ds.BitsStored
            if ds.file_meta.TransferSyntaxUID == JPEG2000Lossless:
                kinds.append("dcm_j2k")
            else:
                kinds.append(ds.PhotometricInterpretation.replace("MONOCHROME", "dcm_mono"))
        else:
            with Image.open(path) as im:
                mode = im.mode
            kinds.append({"I;16": "png16", "L": "png8" if path.suffix == ".png" else "jpg"}[mode])
    assert sorted(kinds) == sorted(FORMATS * 2)


@pytest.mark.parametrize("fmt", ["dcm_mono2", "dcm_mono1", "dcm_j2k"])
def test_dicom_decodes_to_the_rendering(tmp_path: Path, fmt: str) -> None:
    anatomy = upright(0)
    img = render_phantom(
        anatomy, NO_FINDINGS, Exposure(noise=0.01), (64, 56), np.random.default_rng(0)
    )
    rescaled, photometric = set(), set()
    for seed in range(8):
        path = save_radiograph(tmp_path / f"{seed}", img, fmt, np.random.default_rng(seed))
        ds = pydicom.dcmread(path)
        rescaled.add(float(getattr(ds, "RescaleSlope", 1.0)) != 1.0)
        photometric.add(ds.PhotometricInterpretation)
        tolerance = 0.5 / (2**ds.BitsStored - 1) + 1e-6
        np.testing.assert_allclose(decode(path), img, atol=tolerance, rtol=0)
    # The seeds exercise both photometric interpretations (J2K) and the modality LUT.
    assert rescaled == {True, False}
    assert photometric == (
        {"MONOCHROME1", "MONOCHROME2"} if fmt == "dcm_j2k" else {f"MONOCHROME{fmt[-1]}"}
    )


def test_monochrome1_and_monochrome2_agree(tmp_path: Path) -> None:
    img = render_phantom(upright(1), NO_FINDINGS, Exposure(), (48, 48), np.random.default_rng(0))
    rng = np.random.default_rng(0)
    mono1 = save_radiograph(tmp_path / "m1", img, "dcm_mono1", rng)
    mono2 = save_radiograph(tmp_path / "m2", img, "dcm_mono2", rng)
    raw1, raw2 = pydicom.dcmread(mono1).pixel_array, pydicom.dcmread(mono2).pixel_array
    # Stored values run the other way: bright bone is a low MONOCHROME1 value.
    assert np.corrcoef(raw1.ravel(), raw2.ravel())[0, 1] < -0.99
    np.testing.assert_allclose(decode(mono1), decode(mono2), atol=2**-11)


def test_png_and_jpeg_hold_the_rendering(tmp_path: Path) -> None:
    img = render_phantom(upright(2), NO_FINDINGS, Exposure(), (48, 40), np.random.default_rng(0))
    png8 = decode(save_radiograph(tmp_path / "a", img, "png8", np.random.default_rng(0)))
    np.testing.assert_array_equal(png8, np.round(img * 255))
    jpg = decode(save_radiograph(tmp_path / "b", img, "jpg", np.random.default_rng(0)))
    assert np.abs(jpg / 255 - img).mean() < 0.01
    png16 = decode(save_radiograph(tmp_path / "c", img, "png16", np.random.default_rng(0)))
    # Some bit depth of 12..16 reproduces the stored values exactly.
    assert any(np.abs(png16 - img * (2**b - 1)).max() <= 0.5 for b in range(12, 17))


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_patients"):
        write_phantom_dataset(tmp_path, n_patients=0)
    with pytest.raises(ValueError, match="images_per_patient"):
        write_phantom_dataset(tmp_path, images_per_patient=(3, 1))
    with pytest.raises(ValueError, match="unknown phantom format 'tiff'"):
        save_radiograph(tmp_path / "x", np.zeros((8, 8)), "tiff", np.random.default_rng(0))


def test_prevalence_and_independence() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([list(sample_findings(rng).labels().values()) for _ in range(4000)])
    prevalence = labels.mean(0)
    assert np.all((prevalence > 0.25) & (prevalence < 0.38)), prevalence
    corr = np.corrcoef(labels[:, :3].T)
    assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.06


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, 128)
    centres = (edges[1:] + edges[:-1]) / 2
    weight, mass = np.cumsum(hist), np.cumsum(hist * centres)
    between = (mass[-1] * weight / weight[-1] - mass) ** 2 / (weight * (weight[-1] - weight) + 1e-9)
    return float(centres[np.argmax(between)])


def _ctr_from_pixels(density: np.ndarray, row: int) -> float:
    """Cardiothoracic ratio read off the pixels: the opaque run across the midline at `row`
    over the widest extent of the two lung fields (the largest lucent areas)."""
    smooth = ndimage.median_filter(density, 3)
    inside = smooth > 0.05
    lucent = inside & (smooth < _otsu(smooth[inside]))
    # Opening drops the thin lucent strip of thin soft tissue at the body edge.
    lungs = ndimage.binary_opening(lucent, np.ones((7, 7)))
    labels, n = ndimage.label(lungs)
    sizes = ndimage.sum(lungs, labels, range(1, n + 1))
    lungs = np.isin(labels, np.argsort(sizes)[-2:] + 1)
    cols = np.flatnonzero(lungs.any(0))
    lo, hi = cols.min(), cols.max()
    mid = (lo + hi) // 2
    left = np.flatnonzero(lucent[row, lo:mid]) + lo
    right = np.flatnonzero(lucent[row, mid : hi + 1]) + mid
    return (right.min() - left.max() - 1) / (hi - lo + 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cardiomegaly_widens_the_heart_shadow(seed: int) -> None:
    anatomy = upright(seed)
    ratios = []
    for findings in (NO_FINDINGS, dataclasses.replace(NO_FINDINGS, cardiomegaly=True)):
        density = render_density(anatomy, findings, (192, 192))
        # Measure at the level of the heart's widest diameter, as a reader would.
        row = int(np.argmax((phantom_regions(anatomy, findings, (192, 192))["heart"] > 0.5).sum(1)))
        ratios.append(_ctr_from_pixels(density, row))
    assert abs(ratios[0] - anatomy.ctr_normal) < 0.03
    assert abs(ratios[1] - anatomy.ctr_enlarged) < 0.03
    assert ratios[0] < 0.5 < ratios[1]


def test_cardiothoracic_ratios_are_separated() -> None:
    rng = np.random.default_rng(0)
    anatomies = [sample_anatomy(rng) for _ in range(500)]
    normal = np.array([a.ctr_normal for a in anatomies])
    enlarged = np.array([a.ctr_enlarged for a in anatomies])
    assert 0.41 < normal.mean() < 0.45 and normal.max() < 0.5
    assert enlarged.min() > 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_effusion_is_a_basal_opacity(seed: int) -> None:
    anatomy = upright(seed)
    shape = (160, 160)
    effusion = Findings(cardiomegaly=False, effusion=(0.35, 0.0), pneumothorax=(0.0, 0.0))
    clear, wet = (
        render_density(anatomy, NO_FINDINGS, shape),
        render_density(anatomy, effusion, shape),
    )
    regions = phantom_regions(anatomy, NO_FINDINGS, shape)
    lung = regions["lung_right"] > 0.5
    rows = np.flatnonzero(lung.any(1))
    basal = lung & (np.arange(shape[0])[:, None] > rows.min() + 0.8 * (rows.max() - rows.min()))
    upper = lung & (np.arange(shape[0])[:, None] < rows.min() + 0.4 * (rows.max() - rows.min()))
    assert wet[basal].mean() > clear[basal].mean() + 0.15
    np.testing.assert_allclose(wet[upper], clear[upper], atol=1e-6)
    # The costophrenic angle (lowest lateral corner of the lung) is filled in first.
    wet_regions = phantom_regions(anatomy, effusion, shape)
    angle_row = rows.max() - 2
    angle_col = np.flatnonzero(lung[angle_row]).min()
    assert wet_regions["effusion"][angle_row, angle_col + 1] > 0.9
    assert wet_regions["effusion"][regions["lung_left"] > 0.5].max() == 0


@pytest.mark.parametrize("side", [0, 1])
def test_pneumothorax_rim_is_dark_without_vessels(side: int) -> None:
    anatomy = upright(4)
    shape = (192, 192)
    size = [0.0, 0.0]
    size[side] = 0.3
    ptx = Findings(cardiomegaly=False, effusion=(0.0, 0.0), pneumothorax=tuple(size))
    rim = phantom_regions(anatomy, ptx, shape)["pneumothorax"] > 0.95
    # Away from the pleural line and the chest wall, whose edges the high-pass filter sees.
    rim = ndimage.binary_erosion(rim, iterations=4)
    assert rim.sum() > 100
    clear, collapsed = (
        render_density(anatomy, NO_FINDINGS, shape),
        render_density(anatomy, ptx, shape),
    )

    def texture(img: np.ndarray) -> float:
        return float(np.var((img - ndimage.gaussian_filter(img, 2.0))[rim]))

    assert texture(collapsed) < 0.5 * texture(clear)
    assert collapsed[rim].mean() < clear[rim].mean() - 0.05
    line = phantom_regions(anatomy, ptx, shape)["pleural_line"] > 0.5
    assert collapsed[line].mean() > collapsed[rim].mean() + 0.05


def test_follow_ups_share_anatomy() -> None:
    anatomy = sample_anatomy(np.random.default_rng(5))
    rng = np.random.default_rng(0)
    shape = phantoms.image_shape(anatomy, 64)
    a = render_phantom(anatomy, NO_FINDINGS, sample_exposure(rng), shape, rng)
    b = render_phantom(anatomy, NO_FINDINGS, sample_exposure(rng), shape, rng)
    other = sample_anatomy(np.random.default_rng(6))
    c = render_phantom(other, NO_FINDINGS, sample_exposure(rng), shape, rng)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > np.corrcoef(a.ravel(), c.ravel())[0, 1]


def test_logistic_regression_learns_but_not_trivially(tmp_path: Path) -> None:
    csv = write_phantom_dataset(
        tmp_path, n_patients=300, images_per_patient=(1, 1), image_size=64, workers=1
    )
    frame = pd.read_csv(csv)

    def features(path: str) -> np.ndarray:
        img = decode(csv.parent / path)
        small = ndimage.zoom(img, (16 / img.shape[0], 16 / img.shape[1]), order=1)
        # Rank transform: the histogram equalisation of the real pipeline.
        return np.argsort(np.argsort(small.ravel())) / small.size

    x = np.stack([features(p) for p in frame["path"]])
    folds = GroupKFold(5)
    aurocs = {}
    for name in LABELS:
        y = frame[name].to_numpy()
        # liblinear: single-threaded, ~15x faster than lbfgs on a problem this small.
        model = LogisticRegression(C=0.1, solver="liblinear")
        scores = cross_val_predict(
            model, x, y, groups=frame["patient_id"], cv=folds, method="decision_function"
        )
        aurocs[name] = roc_auc_score(y, scores)
    print("logistic regression 16x16 AUROC:", {k: round(v, 3) for k, v in aurocs.items()})
    # The heart's size and the basal fluid change many pixels at once; the pneumothorax is a
    # thin rim whose place moves with the pose, so a linear model barely finds it at 16x16.
    assert min(aurocs["cardiomegaly"], aurocs["pleural_effusion"], aurocs["no_finding"]) > 0.75
    assert 0.55 < aurocs["pneumothorax"] < 0.8, aurocs
    assert not all(v > 0.99 for v in aurocs.values()), aurocs


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    phantoms.main(
        ["--out", str(tmp_path), "--patients", "3", "--image_size", "48", "--workers", "1"]
    )
    assert "of 3 patients" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "labels.csv")) >= 3
