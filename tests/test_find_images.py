"""find_images and looks_like_dicom: the one image-file discovery and DICOM sniff."""

from pathlib import Path

import pytest

from cxrjax.data.images import find_images, looks_like_dicom
from cxrjax.errors import CxrjaxError, MissingInputError

DICM = b"\0" * 128 + b"DICM"


def _touch(root: Path, *names: str, data: bytes = b"") -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_folders_expand_recursively_sorted_and_files_stay_as_given(tmp_path):
    _touch(tmp_path, "d/b.PNG", "d/a.dcm", "d/e/c.jpg", "d/f.TIFF", "d/notes.txt", "d/g.csv")
    _touch(tmp_path, "d/bare", data=DICM)
    _touch(tmp_path, "d/README", data=b"text")
    _touch(tmp_path, "x.weird", data=b"not checked")
    given = [str(tmp_path / "x.weird"), tmp_path / "d"]
    expected = ["x.weird", "d/a.dcm", "d/b.PNG", "d/bare", "d/e/c.jpg", "d/f.TIFF"]
    assert find_images(given) == [str(tmp_path / f) for f in expected]


def test_hidden_files_and_folders_are_skipped(tmp_path):
    _touch(tmp_path, "d/.hidden.png", "d/.thumbs/t.png", "d/.git/objects/x.dcm", "d/ok.png")
    _touch(tmp_path, "d/.bare", data=DICM)
    assert find_images([tmp_path / "d"]) == [str(tmp_path / "d/ok.png")]
    # A hidden folder named on purpose is searched; only what lies below it is judged.
    _touch(tmp_path, ".cache/in.png")
    assert find_images([tmp_path / ".cache"]) == [str(tmp_path / ".cache/in.png")]


def test_missing_path_and_no_images_raise_missing_input_error(tmp_path):
    with pytest.raises(MissingInputError, match="nowhere: no such file or folder") as e:
        find_images([tmp_path / "nowhere"])
    assert isinstance(e.value, CxrjaxError) and e.value.fix
    _touch(tmp_path, "d/notes.txt", "d/.hidden.png")
    _touch(tmp_path, "d/README", data=b"text")
    with pytest.raises(MissingInputError, match="no images in") as e:
        find_images([tmp_path / "d"])
    assert ".dcm" in e.value.fix
    with pytest.raises(MissingInputError, match="no images"):
        find_images([])


def test_looks_like_dicom_by_suffix_then_preamble(tmp_path):
    _touch(tmp_path, "a.DCM", "b.png")
    _touch(tmp_path, "bare", "1.2.840.10008", "c.jpg", data=DICM)
    _touch(tmp_path, "short", data=b"DICM")
    assert looks_like_dicom(tmp_path / "a.DCM")  # suffix trusted, content not read
    assert not looks_like_dicom(tmp_path / "b.png")
    assert not looks_like_dicom(tmp_path / "c.jpg")  # an image suffix wins over the bytes
    assert looks_like_dicom(tmp_path / "bare")
    assert looks_like_dicom(str(tmp_path / "1.2.840.10008"))  # UID-style name: sniffed
    assert not looks_like_dicom(tmp_path / "short")
