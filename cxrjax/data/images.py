"""Reading raw radiographs (DICOM, 8/16-bit PNG, JPEG) and the study's preprocessing.

`read_image` returns the radiograph as raw 2-D float32 values in display orientation (bright =
dense); `preprocess` turns it into the stored (size, size) uint8 image; `load_radiograph` does
both; `find_images` lists the radiographs under files and folders. The original study resized
with `scipy.ndimage.zoom(order=2)` on the full image, min-max scaled to uint8 and applied
`cv2.equalizeHist`; all three are reproduced here exactly, with one documented speed option
(`PreprocessOptions.resample`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.errors
import scipy.ndimage
from PIL import Image, ImageOps
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from cxrjax.errors import ConfigError, CxrjaxError, MissingInputError

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
RESIZE_MODES = ("squash", "pad")
RESAMPLE_MODES = ("reduce", "zoom")
# ITU-R BT.601 luma, the weights PIL and OpenCV use for RGB -> gray.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PLUGIN_FIX = "install the decoders: pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg"


class ImageReadError(CxrjaxError):
    """A radiograph that cannot be decoded; the message names the file, the problem and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}. Fix: {fix}")
        self.path = str(path)
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
    """How a raw radiograph becomes the stored uint8 image.

    size: side of the square output.
    resize: "squash" resizes to size x size ignoring the aspect ratio (the study); "pad" keeps the
      aspect ratio and pads the short side with black (0) after equalisation.
    equalize: global histogram equalisation of the uint8 image with cv2.equalizeHist (the study).
    voi_lut: DICOM only: apply the VOI LUT / window after the modality LUT (the study did not).
    resample: "zoom" is the study's exact `scipy.ndimage.zoom(order=2)` on the full-resolution
      image (~0.2 s for 3000 x 3000, dominated by the spline prefilter over every input pixel);
      "reduce" first box-averages by the largest integer factor that keeps at least 2 x size
      pixels per axis (PIL `Image.reduce`), then applies the same zoom. "reduce" is the default
      because it is ~20x faster on large images and its box average also removes the aliasing
      that plain order-2 sampling leaves; images already below 2 x size are resized identically.
    """

    size: int = 224
    resize: str = "squash"
    equalize: bool = True
    voi_lut: bool = False
    resample: str = "reduce"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize={self.resize!r}; use one of {RESIZE_MODES}")
        if self.resample not in RESAMPLE_MODES:
            raise ConfigError(f"resample={self.resample!r}; use one of {RESAMPLE_MODES}")
        if self.size < 8:
            raise ConfigError(
                f"size={self.size} is too small for a radiograph; use e.g. 224 or 512"
            )


def looks_like_dicom(path: str | Path) -> bool:
    """Whether `path` is read as DICOM: by its suffix, else by the DICM magic after the preamble.

    Files without a telling suffix (e.g. MIMIC's or UKA's bare DICOM names) are opened and their
    bytes 128..131 compared with b"DICM"; image suffixes are trusted without opening the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES:
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def find_images(paths: Sequence[str | Path], *, must_exist: bool = True) -> list[str]:
    """The radiograph files that `paths` name, in order: files as given, folders expanded.

    A file is kept whatever its name or content (unreadable ones are reported when read). A
    folder contributes, recursively and sorted, its files with an image or DICOM suffix and the
    suffix-less ones with the DICOM preamble; hidden files and files in hidden folders below it
    are skipped, and anything else is ignored rather than reported, since folders often hold
    notes and metadata. Raises MissingInputError when no image is found at all, and for a path
    that does not exist unless `must_exist` is False (then it is kept, to be reported as
    unreadable with the others: `predict` over many files skips what it cannot read).
    """
    known = DICOM_SUFFIXES + IMAGE_SUFFIXES
    files: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.exists() and must_exist:
            raise MissingInputError(
                f"{given}: no such file or folder",
                "check the path; give radiograph files (DICOM, PNG, JPEG) or folders holding them",
            )
        if not path.is_dir():
            files.append(str(given))
            continue
        for found in sorted(p for p in path.rglob("*") if p.is_file()):
            # Hidden entries are editor, OS or VCS leftovers (.DS_Store, .git, checkpoints).
            if any(part.startswith(".") for part in found.relative_to(path).parts):
                continue
            suffix = found.suffix.lower()
            if suffix in known or (not suffix and looks_like_dicom(found)):
                files.append(str(found))
    if not files:
        raise MissingInputError(
            f"no images in {', '.join(str(p) for p in paths) or 'the empty list of inputs'}",
            f"folders are searched recursively for {' '.join(known)} files and suffix-less DICOM "
            "files; name a file directly to read it whatever its suffix",
        )
    return files


def _stored_range(ds: pydicom.Dataset) -> np.ndarray:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    return np.array([0, 2**bits - 1], dtype=np.int64)


def _read_dicom(path: Path, voi_lut: bool) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as e:
        raise ImageReadError(path, f"not a DICOM file ({e})", "check the file is DICOM") from e
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise ImageReadError(
            path, f"DICOM header is corrupt or truncated ({e})", "re-download the file or skip it"
        ) from e
    tsyntax = getattr(ds, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    if tsyntax is None:
        raise ImageReadError(
            path,
            "DICOM file meta lacks the Transfer Syntax UID (0002,0010)",
            "skip the file, or set ds.file_meta.TransferSyntaxUID to the encoding actually used",
        )
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM has no Pixel Data (7FE0,0010)", "skip the file")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageReadError(
            path, f"DICOM holds {ds.NumberOfFrames} frames, not one radiograph", "skip the file"
        )
    try:
        stored = ds.pixel_array
    except (RuntimeError, NotImplementedError) as e:
        # pydicom raises RuntimeError both for a missing decoder and for a corrupt stream.
        raise ImageReadError(
            path,
            f"cannot decode {tsyntax.name} pixel data ({e})",
            f"{_PLUGIN_FIX}; if they are installed the file is corrupt: re-download or skip it",
        ) from e
    except (ValueError, OSError, AttributeError, TypeError, KeyError) as e:
        raise ImageReadError(
            path, f"pixel data is corrupt or truncated ({e})", "re-download the file or skip it"
        ) from e
    if stored.ndim == 3:
        # Colour DICOM (pydicom returns RGB): reduce to gray without any LUT, which is defined
        # for monochrome data only.
        return np.tensordot(stored.astype(np.float32), _LUMA, axes=([-1], [0]))
    values = apply_modality_lut(stored, ds)
    ends = apply_modality_lut(_stored_range(ds), ds)
    if voi_lut:
        values = apply_voi_lut(values, ds)
        ends = apply_voi_lut(np.asarray(ends, dtype=np.float64), ds)
    values = np.asarray(values, dtype=np.float32)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        # Invert over the output range the header declares, widened to the data because some
        # scanners store values beyond 2**BitsStored - 1; the result stays inside that range.
        lo = min(float(np.min(ends)), float(values.min()))
        hi = max(float(np.max(ends)), float(values.max()))
        values = np.float32(lo + hi) - values
    return values


def _read_pil(path: Path, min_size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if min_size is not None and im.format == "JPEG":
                # libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 scale several times faster;
                # PIL picks the smallest scale that keeps both sides >= min_size.
                im.draft(im.mode, (min_size, min_size))
            im.load()
            # cv2.imread (the study's reader) honours the EXIF orientation; so do we.
            ImageOps.exif_transpose(im, in_place=True)
            mode = im.mode
            if mode in ("RGB", "RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "1"):
                # PIL's C conversion: BT.601 luma rounded to 8 bits, as the study's
                # cv2.cvtColor(..., COLOR_BGR2GRAY) did; alpha is ignored.
                im = im.convert("L")
            # "L" (8-bit), "I;16*" (16-bit PNG, kept unchanged), "I" and "F".
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(
            path, f"image is corrupt, truncated or not an image ({e})", "re-download or skip it"
        ) from e
    if arr.ndim != 2:
        raise ImageReadError(path, f"unsupported image mode {mode!r}", "convert it to gray PNG")
    return arr.astype(np.float32)


def read_image(
    path: str | Path, *, voi_lut: bool = False, min_size: int | None = None
) -> np.ndarray:
    """Reads one radiograph as 2-D float32 raw values (bright = dense).

    DICOM: modality LUT, then the VOI LUT / window if `voi_lut`, then MONOCHROME1 inversion.
    PNG/JPEG: 8- and 16-bit gray values unchanged; colour reduced to gray with BT.601 luma.
    min_size: JPEG only: allow the decoder to downscale by a power of two while both sides stay
      >= min_size (None: full resolution).
    Raises ImageReadError (naming the file, the problem and the fix) for anything unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found", "check --raw points at the dataset root")
    if looks_like_dicom(path):
        image = _read_dicom(path, voi_lut)
    else:
        image = _read_pil(path, min_size)
    if image.size == 0 or min(image.shape) < 2:
        raise ImageReadError(path, f"image has shape {image.shape}", "skip the file")
    return image


def _resize(image: np.ndarray, shape: tuple[int, int], resample: str) -> np.ndarray:
    if resample == "reduce":
        fy = max(1, image.shape[0] // (2 * shape[0]))
        fx = max(1, image.shape[1] // (2 * shape[1]))
        if fy > 1 or fx > 1:
            image = np.asarray(Image.fromarray(image).reduce((fx, fy)))
    zoom = (shape[0] / image.shape[0], shape[1] / image.shape[1])
    out = scipy.ndimage.zoom(image, zoom, order=2)
    # zoom rounds the output shape; with these factors it is exactly `shape`, but guard anyway.
    if out.shape != shape:
        raise AssertionError(f"zoom produced {out.shape}, wanted {shape}")
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max scales to 0..255 and rounds half to even, as the study's `img_as_ubyte` did."""
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.uint8)
    scaled = (image.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def preprocess(image: np.ndarray, options: PreprocessOptions) -> np.ndarray:
    """Raw 2-D image -> (size, size) uint8: resize, min-max to uint8, optional equalisation."""
    if image.ndim != 2:
        raise ConfigError(f"preprocess needs a 2-D gray image, got shape {image.shape}")
    image = np.asarray(image, dtype=np.float32)
    size = options.size
    if options.resize == "squash":
        shape = (size, size)
    else:
        scale = size / max(image.shape)
        shape = tuple(max(1, min(size, round(n * scale))) for n in image.shape)
    out = to_uint8(_resize(image, shape, options.resample))
    if options.equalize:
        out = cv2.equalizeHist(out)
    if options.resize == "pad":
        top, left = (size - shape[0]) // 2, (size - shape[1]) // 2
        padded = np.zeros((size, size), dtype=np.uint8)
        padded[top : top + shape[0], left : left + shape[1]] = out
        out = padded
    return out


def load_radiograph(path: str | Path, options: PreprocessOptions) -> np.ndarray:
    """Reads and preprocesses one radiograph into a (size, size) uint8 array.

    With resample="reduce", JPEGs are decoded at reduced scale (>= 2 x size per side), which
    is the same box-style reduction done in the decoder instead of after it.
    """
    min_size = 2 * options.size if options.resample == "reduce" else None
    return preprocess(read_image(path, voi_lut=options.voi_lut, min_size=min_size), options)
