"""tools/prepare_data.py interrupted, damaged, re-pointed and out of disk: resume or refuse."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrjax.data import phantoms, prepare, shards

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "prepare_data.py"
SALT = "resume-test-salt"
# Runs the tool with decoding slowed to 20 ms an image, so the test can kill it between shards.
_SLOW_TOOL = """
import runpy, sys, time
from cxrjax.data import prepare
load = prepare.load_radiograph
def slow(*args, **kwargs):
    time.sleep(0.02)
    return load(*args, **kwargs)
prepare.load_radiograph = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def raw_csv(tmp_path_factory) -> Path:
    """125 phantom images (DICOM, PNG, JPEG) of 60 patients: ~17 shards of 8 at 32 px."""
    raw = tmp_path_factory.mktemp("raw")
    return phantoms.write_phantom_dataset(raw, n_patients=60, image_size=40, seed=0, workers=1)


def _argv(raw_csv: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--dataset", "csv", "--raw", str(raw_csv), "--out", str(out), "--size", "32"),
        *("--workers", "1", "--records-per-shard", "8", "--train-fraction", "0.5", *extra),
    ]


@pytest.fixture(scope="module")
def reference(raw_csv, tmp_path_factory) -> Path:
    """An uninterrupted preparation with salt SALT."""
    out = tmp_path_factory.mktemp("reference") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXRJAX_SALT", SALT)
        assert _tool().main(_argv(raw_csv, out)) == 0
    return out


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_same_files(out: Path, reference: Path) -> None:
    got, want = _files(out), _files(reference)
    assert sorted(got) == sorted(want)  # no progress.salt, no .partial left behind
    assert [n for n in want if got[n] != want[n]] == []


def _progress(out: Path) -> dict | None:
    try:
        return json.loads((out / prepare.PROGRESS_FILE).read_text())
    except FileNotFoundError:
        return None


def _env_without_salt() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CXRJAX_SALT"}


def test_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(raw_csv, reference, tmp_path):
    out = tmp_path / "out"
    argv = _argv(raw_csv, out)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SLOW_TOOL, str(TOOL), *argv],
            env=_env_without_salt(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not (_progress(out) or {}).get("shards"):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no shard committed in 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = _progress(out)["shards"]
    total = len(_progress(reference)["shards"])
    assert 1 <= len(finished) < total
    assert not (out / shards.INFO_FILE).exists()
    salt = (out / prepare.SALT_FILE).read_text()
    assert len(salt) == 32  # random: CXRJAX_SALT was unset
    inodes = {name: (out / name).stat().st_ino for name in finished}

    # The same command, CXRJAX_SALT still unset: the stored salt is used, finished shards kept.
    resumed = subprocess.run(
        [sys.executable, str(TOOL), *argv],
        env=_env_without_salt(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(finished)} of {total} shards kept" in resumed.stdout
    assert {name: (out / name).stat().st_ino for name in finished} == inodes

    # Uninterrupted, with the salt the interrupted run chose.
    uninterrupted = tmp_path / "uninterrupted"
    env = {**_env_without_salt(), "CXRJAX_SALT": salt}
    subprocess.run(
        [sys.executable, str(TOOL), *_argv(raw_csv, uninterrupted)],
        env=env,
        check=True,
        capture_output=True,
    )
    _assert_same_files(out, uninterrupted)


class _Interrupt(KeyboardInterrupt):
    """Ctrl-C in the middle of a preparation."""


def test_damaged_finished_shard_is_detected_and_written_again(
    raw_csv, reference, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CXRJAX_SALT", SALT)
    out = tmp_path / "out"
    commit = shards.ShardWriter.commit
    commits = []

    def interrupting_commit(self):
        if len(commits) == 4:
            raise _Interrupt
        commits.append(self.path.name)
        return commit(self)

    monkeypatch.setattr(shards.ShardWriter, "commit", interrupting_commit)
    with pytest.raises(_Interrupt):
        _tool().main(_argv(raw_csv, out))
    monkeypatch.setattr(shards.ShardWriter, "commit", commit)
    assert sorted(_progress(out)["shards"]) == sorted(commits)
    assert not list(out.glob("*.partial"))
    damaged = out / commits[1]
    damaged.write_bytes(damaged.read_bytes()[:5000])
    capsys.readouterr()

    assert _tool().main(_argv(raw_csv, out)) == 0
    captured = capsys.readouterr()
    assert f"{commits[1]}: missing or damaged" in captured.err
    assert "3 of 17 shards kept" in captured.out
    _assert_same_files(out, reference)


def test_damaged_shard_of_a_complete_dataset_needs_the_salt(
    raw_csv, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    name = "val-00001-of-00002.array_record"
    (out / name).unlink()
    monkeypatch.delenv("CXRJAX_SALT", raising=False)
    # The salt is deleted on completion: without it the shard cannot match the others.
    assert _tool().main(_argv(raw_csv, out)) == 2
    err = capsys.readouterr().err
    assert name in err and "CXRJAX_SALT" in err and "Traceback" not in err
    assert (out / shards.INFO_FILE).exists()  # still the (damaged) complete dataset
    monkeypatch.setenv("CXRJAX_SALT", SALT)
    assert _tool().main(_argv(raw_csv, out)) == 0
    _assert_same_files(out, reference)


def test_other_options_on_the_same_folder_are_refused(
    raw_csv, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    monkeypatch.delenv("CXRJAX_SALT", raising=False)
    assert _tool().main(_argv(raw_csv, out, "--size", "48")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "--size: existing 32, now 48" in err and "another --out" in err
    _assert_same_files(out, reference)

    monkeypatch.setenv("CXRJAX_SALT", "another salt")
    assert _tool().main(_argv(raw_csv, out)) == 2
    assert "CXRJAX_SALT" in capsys.readouterr().err

    # The same command on the finished folder: verified, nothing rewritten.
    monkeypatch.setenv("CXRJAX_SALT", SALT)
    mtime = (out / shards.INFO_FILE).stat().st_mtime_ns
    assert _tool().main(_argv(raw_csv, out)) == 0
    assert "is complete (17 shards verified)" in capsys.readouterr().out
    assert (out / shards.INFO_FILE).stat().st_mtime_ns == mtime
    _assert_same_files(out, reference)


@pytest.mark.parametrize("where", ["under_a_file", "read_only_parent"])
def test_unwritable_output_is_refused_before_decoding(
    raw_csv, tmp_path, monkeypatch, capsys, where
):
    if where == "under_a_file":
        (tmp_path / "file.txt").write_text("not a folder")
        out = tmp_path / "file.txt" / "sub"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a chmod 500 folder; 'under_a_file' covers this case")
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
        out = parent / "out"
    monkeypatch.setattr(prepare, "_decoded", lambda *a: pytest.fail("decoding started"))
    assert _tool().main(_argv(raw_csv, out)) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the output folder {out}" in err

    # As a command: the message and status 2, no traceback.
    result = subprocess.run(
        [sys.executable, str(TOOL), *_argv(raw_csv, out)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert str(out) in result.stderr and "Traceback" not in result.stderr


def _full_device_writer(open_writer, shard_number):
    """ArrayRecordWriter whose `shard_number`-th file is /dev/full, as on a filled disk."""
    calls = []

    def writer(path, options):
        calls.append(path)
        return open_writer("/dev/full" if len(calls) == shard_number else path, options)

    return writer


@pytest.mark.parametrize("failure", ["write_raises", "device_full"])
def test_disk_full_leaves_only_complete_shards_and_resumes(
    raw_csv, reference, tmp_path, monkeypatch, capsys, failure
):
    monkeypatch.setenv("CXRJAX_SALT", SALT)
    out = tmp_path / "out"
    if failure == "write_raises":
        write, calls = shards.ShardWriter.write, []

        def failing_write(self, record):
            calls.append(1)
            if len(calls) == 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            write(self, record)

        monkeypatch.setattr(shards.ShardWriter, "write", failing_write)
    else:
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full")
        # The real writer: it reports ENOSPC only when the shard is closed.
        monkeypatch.setattr(
            shards.ar, "ArrayRecordWriter", _full_device_writer(shards.ar.ArrayRecordWriter, 3)
        )
    assert _tool().main(_argv(raw_csv, out)) == 2
    err = capsys.readouterr().err
    assert f"cannot write the dataset to {out}" in err and "No space left on device" in err
    assert "rerun the same command" in err
    monkeypatch.undo()

    finished = _progress(out)["shards"]
    assert len(finished) == 2
    assert not list(out.glob("*.partial")) and not (out / shards.INFO_FILE).exists()
    # Every shard under its own name is a listed, intact one: nothing half-written counts.
    for path in out.glob("*.array_record"):
        entry = finished[path.name]
        digest = shards.ShardDigest(entry["records"], entry["size"], entry["sha256"])
        assert shards.shard_intact(path, digest)

    monkeypatch.setenv("CXRJAX_SALT", SALT)
    assert _tool().main(_argv(raw_csv, out)) == 0
    _assert_same_files(out, reference)
