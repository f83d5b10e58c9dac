"""Radiograph decoding and preprocessing, checked against pydicom, PIL, OpenCV and scipy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import scipy.ndimage
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from cxrjax.data.images import (
    ImageReadError,
    PreprocessOptions,
    load_radiograph,
    preprocess,
    read_image,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLES = SHARED / "samples"
REALCXR = SHARED / "realcxr"


def _phantom(rows: int, cols: int, bits: int, seed: int = 0) -> np.ndarray:
    """A smooth chest-like gradient plus noise spanning most of the stored range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = np.exp(-(((yy - rows / 2) / (rows / 3)) ** 2 + ((xx - cols / 2) / (cols / 4)) ** 2))
    img = body * 0.8 * (2**bits - 1) + rng.uniform(0, 0.2 * (2**bits - 1), (rows, cols))
    return img.astype(np.uint16)


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    transfer_syntax=ExplicitVRLittleEndian,
    with_tsyntax: bool = True,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if pixels.dtype.itemsize == 2 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    if not with_tsyntax:
        # As in the broken VinDr files: preamble and file meta present, (0002,0010) absent.
        del ds.file_meta.TransferSyntaxUID
        ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=with_tsyntax, implicit_vr=False, little_endian=True)
    return path


@pytest.mark.parametrize("bits", [12, 14, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dicom_matches_pydicom_modality_lut(tmp_path, bits, photometric):
    pixels = _phantom(90, 70, bits, seed=bits)
    path = _write_dicom(
        tmp_path / "x.dcm",
        pixels,
        bits_stored=bits,
        photometric=photometric,
        slope=2.0,
        intercept=-1024.0,
    )
    ds = pydicom.dcmread(path)
    reference = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    got = read_image(path)
    assert got.dtype == np.float32 and got.shape == (90, 70)
    if photometric == "MONOCHROME2":
        np.testing.assert_array_equal(got, reference)
    else:
        # Inversion over the declared output range: stored 0..2**bits-1 through the rescale.
        lo, hi = -1024.0, (2**bits - 1) * 2.0 - 1024.0
        np.testing.assert_array_equal(got, lo + hi - reference)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_compressed_dicom_decodes_to_same_pixels(tmp_path, syntax):
    pixels = _phantom(64, 80, 12, seed=3)
    plain = _write_dicom(tmp_path / "plain.dcm", pixels, bits_stored=12)
    packed = _write_dicom(tmp_path / "packed.dcm", pixels, bits_stored=12, transfer_syntax=syntax)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_image(packed), read_image(plain))
    np.testing.assert_array_equal(read_image(plain), pixels.astype(np.float32))


def test_dicom_without_suffix_is_recognised(tmp_path):
    pixels = _phantom(30, 20, 12, seed=8)
    path = _write_dicom(tmp_path / "1.2.840.99", pixels, bits_stored=12)
    np.testing.assert_array_equal(read_image(path), pixels.astype(np.float32))


def test_voi_lut_window_matches_pydicom(tmp_path):
    pixels = _phantom(50, 40, 12, seed=5)
    path = _write_dicom(
        tmp_path / "w.dcm",
        pixels,
        bits_stored=12,
        photometric="MONOCHROME1",
        slope=1.0,
        intercept=0.0,
        window=(1500.0, 2000.0),
    )
    ds = pydicom.dcmread(path)
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    # pydicom's windowing output range for 12-bit unsigned data is 0..4095.
    np.testing.assert_allclose(read_image(path, voi_lut=True), 4095.0 - windowed, atol=1e-3)
    assert not np.allclose(read_image(path, voi_lut=True), read_image(path))


def test_pydicom_data_chest_cr_both_encodings():
    uncompressed = get_testdata_file("RG1_UNCR.dcm", download=False)
    j2k = get_testdata_file("RG1_J2KR.dcm", download=False)
    if uncompressed is None or j2k is None:
        pytest.skip("pydicom-data is not installed")
    a, b = read_image(uncompressed), read_image(j2k)
    np.testing.assert_array_equal(a, b)
    ds = pydicom.dcmread(uncompressed)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    np.testing.assert_array_equal(a, (2**15 - 1) - ds.pixel_array.astype(np.float32))
    # After inversion the lungs (either side of the midline) are darker than the mediastinum.
    rows, cols = a.shape
    band = a[rows // 3 : rows // 2]
    lungs = np.r_[band[:, cols // 5 : cols // 3].ravel(), band[:, -cols // 3 : -cols // 5].ravel()]
    mediastinum = band[:, cols // 2 - cols // 20 : cols // 2 + cols // 20]
    assert np.median(lungs) < np.median(mediastinum)


@pytest.mark.parametrize(
    "name",
    ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"],
)
def test_pydicom_testdata_lossless_syntaxes_match_uncompressed(name):
    plain = get_testdata_file("MR_small.dcm", download=False)
    packed = get_testdata_file(name, download=False)
    if plain is None or packed is None:
        pytest.skip("pydicom-data is not installed")
    np.testing.assert_array_equal(read_image(packed), read_image(plain))
    ds = pydicom.dcmread(plain)
    np.testing.assert_array_equal(read_image(plain), apply_modality_lut(ds.pixel_array, ds))


def test_pydicom_testdata_lossless_jpeg_process14():
    path = get_testdata_file("JPEG-LL.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data is not installed")
    ds = pydicom.dcmread(path)
    assert "Process 14" in ds.file_meta.TransferSyntaxUID.name
    got = read_image(path)
    np.testing.assert_array_equal(got, apply_modality_lut(ds.pixel_array, ds))
    assert got.shape == (ds.Rows, ds.Columns) and got.std() > 0


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared samples absent")
def test_real_samples_monochrome1_header_inverts():
    mono2 = SAMPLES / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    mono1 = SAMPLES / "Fake_MONOHR1.dcm"
    np.testing.assert_array_equal(
        pydicom.dcmread(mono1).pixel_array, pydicom.dcmread(mono2).pixel_array
    )
    np.testing.assert_array_equal(read_image(mono1), 255.0 - read_image(mono2))


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared samples absent")
def test_real_samples_png_and_rgb_jpeg():
    png = SAMPLES / "00000001_000.png"
    np.testing.assert_array_equal(read_image(png), np.asarray(Image.open(png).convert("L")))
    jpg = SAMPLES / "covid-19-pneumonia-58-prior.jpg"
    rgb = cv2.imread(str(jpg), cv2.IMREAD_COLOR_RGB)
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    # PIL and OpenCV both round a fixed-point BT.601 luma to 8 bits, in slightly different ways.
    assert np.abs(read_image(jpg) - expected).max() <= 1


def test_sixteen_bit_png_read_unchanged(tmp_path):
    pixels = _phantom(60, 50, 16, seed=7)
    assert pixels.max() > 255
    path = tmp_path / "p16.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(read_image(path), pixels.astype(np.float32))
    reference = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert reference.dtype == np.uint16
    np.testing.assert_array_equal(read_image(path), reference)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_colour_png_reduced_to_gray(tmp_path, mode):
    rng = np.random.default_rng(1)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (40, 30, channels), dtype=np.uint8)
    if mode == "L":
        arr = arr[..., 0]
    path = tmp_path / f"c_{mode}.png"
    Image.fromarray(arr, mode=mode).save(path)
    got = read_image(path)
    assert got.shape == (40, 30)
    if mode == "L":
        np.testing.assert_array_equal(got, arr)
    else:
        expected = cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2GRAY)
        assert np.abs(got - expected).max() <= 1


def _equalize_reference(img: np.ndarray) -> np.ndarray:
    """Line-by-line port of OpenCV's EqualizeHistLutBody (modules/imgproc/src/histogram.cpp)."""
    hist = [0] * 256
    for v in img.ravel().tolist():
        hist[v] += 1
    i = 0
    while hist[i] == 0:
        i += 1
    total = img.size
    if hist[i] == total:
        return np.full_like(img, i)
    scale = np.float32(255.0) / np.float32(total - hist[i])
    lut = [0] * 256
    acc = 0
    lut[i] = 0
    for j in range(i + 1, 256):
        acc += hist[j]
        lut[j] = min(255, max(0, int(np.rint(np.float32(acc) * scale))))
    return np.array(lut, dtype=np.uint8)[img]


@pytest.mark.parametrize("case", ["uniform", "skewed", "narrow", "two_values", "constant"])
def test_opencv_equalize_is_the_study_formula(case):
    # Pins the formula preprocess relies on, should an OpenCV release change it.
    rng = np.random.default_rng(0)
    shape = (97, 113)
    img = {
        "uniform": lambda: rng.integers(0, 256, shape),
        "skewed": lambda: np.minimum(rng.exponential(30, shape), 255),
        "narrow": lambda: rng.integers(100, 110, shape),
        "two_values": lambda: rng.choice([3, 200], shape),
        "constant": lambda: np.full(shape, 77),
    }[case]().astype(np.uint8)
    np.testing.assert_array_equal(cv2.equalizeHist(img), _equalize_reference(img))


@pytest.mark.parametrize("resize", ["squash", "pad"])
def test_preprocess_equalizes_the_uint8_image_before_padding(resize):
    image = _phantom(180, 120, 16, seed=5).astype(np.float32)
    opts = PreprocessOptions(size=48, resize=resize, resample="zoom")
    plain = preprocess(image, dataclasses.replace(opts, equalize=False))
    got = preprocess(image, opts)
    content = np.s_[:, 8:40] if resize == "pad" else np.s_[:, :]
    np.testing.assert_array_equal(got[content], _equalize_reference(plain[content]))
    if resize == "pad":
        # Padding stays black: it is added after equalisation, not equalised with the image.
        assert not got[:, :8].any() and not got[:, 40:].any()


def test_preprocess_zoom_is_the_study_pipeline():
    image = _phantom(300, 260, 12, seed=2).astype(np.float32)
    opts = PreprocessOptions(size=64, resample="zoom")
    resized = scipy.ndimage.zoom(image, (64 / 300, 64 / 260), order=2)
    # The study: min-max to [0, 1], then skimage's img_as_ubyte (multiply by 255, round).
    scaled = np.rint((resized - resized.min()) / (resized.max() - resized.min()) * 255)
    got = preprocess(image, opts)
    # float32 vs float64 rounding may move a value across an integer boundary.
    no_eq = preprocess(image, PreprocessOptions(size=64, resample="zoom", equalize=False))
    assert np.abs(no_eq.astype(int) - scaled).max() <= 1
    assert np.mean(no_eq != scaled) < 0.01
    np.testing.assert_array_equal(got, cv2.equalizeHist(no_eq))
    assert got.shape == (64, 64) and got.dtype == np.uint8


def test_reduce_path_equals_zoom_below_twice_size_and_is_close_above():
    small = _phantom(100, 120, 12, seed=4).astype(np.float32)
    for size in (50, 64):
        a = preprocess(small, PreprocessOptions(size=size, resample="reduce"))
        b = preprocess(small, PreprocessOptions(size=size, resample="zoom"))
        np.testing.assert_array_equal(a, b)
    # A large smooth image: box pre-reduction changes little.
    yy, xx = np.mgrid[0:1200, 0:1000].astype(np.float32)
    big = np.sin(yy / 90) + np.cos(xx / 70) + yy / 600
    a = preprocess(big, PreprocessOptions(size=64, resample="reduce", equalize=False))
    b = preprocess(big, PreprocessOptions(size=64, resample="zoom", equalize=False))
    assert np.abs(a.astype(int) - b).mean() < 2.0


def test_pad_keeps_aspect_and_pads_black():
    image = np.tile(np.linspace(0, 1, 200, dtype=np.float32), (100, 1))  # 100 x 200
    got = preprocess(image, PreprocessOptions(size=64, resize="pad"))
    assert got.shape == (64, 64)
    # Content is 32 x 64 centred vertically; rows above and below are padding.
    assert (got[:16] == 0).all() and (got[48:] == 0).all()
    content = got[16:48]
    assert content.max() == 255 and (np.diff(content.astype(int), axis=1) >= 0).all()


def test_load_radiograph_jpeg_draft_close_to_full_decode(tmp_path):
    image = _phantom(1400, 1200, 8, seed=9).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(image).save(path, quality=95)
    fast = load_radiograph(path, PreprocessOptions(size=64, equalize=False))
    full = preprocess(read_image(path), PreprocessOptions(size=64, equalize=False))
    assert fast.shape == (64, 64)
    assert np.abs(fast.astype(int) - full).mean() < 3.0


def _assert_read_error(path: Path, words: str) -> None:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and "Fix:" in message
    assert words.lower() in message.lower()


def test_broken_inputs_raise_image_read_error(tmp_path):
    _assert_read_error(tmp_path / "missing.png", "not found")

    png = tmp_path / "t.png"
    Image.fromarray(_phantom(80, 80, 8).astype(np.uint8)).save(png)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    _assert_read_error(truncated, "truncated")

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image" * 10)
    _assert_read_error(garbage, "not an image")

    not_dicom = tmp_path / "fake.dcm"
    not_dicom.write_bytes(b"\x00" * 50)
    _assert_read_error(not_dicom, "DICOM")

    pixels = _phantom(40, 40, 12)
    no_ts = _write_dicom(tmp_path / "nots.dcm", pixels, bits_stored=12, with_tsyntax=False)
    _assert_read_error(no_ts, "Transfer Syntax UID")

    full = _write_dicom(tmp_path / "full.dcm", pixels, bits_stored=12)
    ds = pydicom.dcmread(full)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    _assert_read_error(tmp_path / "nopix.dcm", "Pixel Data")

    j2k = _write_dicom(
        tmp_path / "j2k.dcm", pixels, bits_stored=12, transfer_syntax=JPEG2000Lossless
    )
    ds = pydicom.dcmread(j2k)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:40] + bytes(len(frame) - 40)])
    ds.save_as(tmp_path / "badj2k.dcm")
    _assert_read_error(tmp_path / "badj2k.dcm", "cannot decode")

    cut = tmp_path / "cut.dcm"
    cut.write_bytes(full.read_bytes()[:-1000])
    _assert_read_error(cut, "truncated")


def test_options_validate():
    with pytest.raises(ValueError, match="resize"):
        PreprocessOptions(resize="crop")
    with pytest.raises(ValueError, match="resample"):
        PreprocessOptions(resample="bicubic")


@pytest.mark.skipif(not (REALCXR / "labels.csv").is_file(), reason="shared realcxr absent")
def test_real_heterogeneous_radiographs_all_load():
    paths = sorted(p for p in (REALCXR / "images").rglob("*") if p.is_file())
    assert len(paths) >= 50
    for path in paths:
        out = load_radiograph(path, PreprocessOptions(size=64))
        assert out.shape == (64, 64) and out.dtype == np.uint8
        assert out.max() == 255 and out.min() == 0
