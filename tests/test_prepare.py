import json

import numpy as np
import pandas as pd
import pytest

from cxrjax.data import shards, splits
from cxrjax.data.images import PreprocessOptions
from cxrjax.data.prepare import prepare_dataset
from cxrjax.data.table import RawTable
from cxrjax.errors import ConfigError
from tests.conftest import write_tiny_raw_dataset


def _read_all(info, split):
    from array_record.python import array_record_data_source as ards

    source = ards.ArrayRecordDataSource(info.files(split))
    return [shards.decode(source[i]) for i in range(len(source))]


def test_prepared_shards_hold_every_image_once_with_hashed_ids(tiny_shards):
    info = shards.load_info(tiny_shards)
    assert info.label_names == ["square", "stripe"] and info.image_size == 32
    records = {s: _read_all(info, s) for s in ("train", "val", "test")}
    assert sum(map(len, records.values())) == 90
    patients = {s: {r["patient"] for r in recs} for s, recs in records.items()}
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["val"])
    everything = json.dumps(json.loads((tiny_shards / "summary.json").read_text()))
    assert "patient" not in "".join(patients["train"]) and "img0" not in everything
    assert records["train"][0]["image"].shape == (32, 32)
    assert records["train"][0]["image"].dtype == np.uint8
    # The masked label (every 10th image) survives as NaN.
    assert any(np.isnan(r["labels"][1]) for recs in records.values() for r in recs)


def test_pos_weight_and_nested_fraction(tiny_shards):
    info = shards.load_info(tiny_shards)
    train = np.stack([r["labels"] for r in _read_all(info, "train")])
    pos = np.nansum(train == 1, 0)
    neg = np.nansum(train == 0, 0)
    np.testing.assert_allclose(info.pos_weight, neg / pos, rtol=1e-6)
    half = info.train_indices(0.5)
    assert 0 < len(half) < len(train)
    with pytest.raises(shards.ShardError, match="--train-fraction 0.1"):
        info.train_indices(0.1)


def test_corrupt_image_is_reported_skipped_and_counted(tmp_path, capsys):
    table = write_tiny_raw_dataset(tmp_path, n_images=12)
    bad = table.frame.loc[3, "path"]
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    summary = prepare_dataset(
        table, tmp_path / "out", options=PreprocessOptions(size=16), seed=0, workers=1
    )
    assert summary["skipped"] == 1
    assert sum(s["images"] for s in summary["splits"].values()) == 11
    assert bad in capsys.readouterr().err
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert len(skipped) == 1 and bad not in json.dumps(skipped)


def test_dry_run_counts_without_images(tmp_path):
    frame = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(40)],
            "path": [f"/nonexistent/{k}.png" for k in range(40)],
            "patient_id": [f"p{k // 4}" for k in range(40)],
            "split": "",
            "a": [1.0, 0.0, np.nan, 0.0] * 10,
        }
    )
    summary = prepare_dataset(RawTable("x", ["a"], frame), tmp_path, seed=0, dry_run=True)
    counts = summary["splits"]
    assert sum(c["images"] for c in counts.values()) == 40
    assert sum(c["positives"]["a"] for c in counts.values()) == 10
    assert sum(c["masked"]["a"] for c in counts.values()) == 10
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_leaking_official_split_fails(tmp_path):
    frame = pd.DataFrame(
        {
            "image_id": ["a", "b"],
            "path": ["/x/a.png", "/x/b.png"],
            "patient_id": ["same", "same"],
            "split": ["train", "test"],
            "y": [1.0, 0.0],
        }
    )
    with pytest.raises(splits.LeakageError):
        prepare_dataset(RawTable("leak", ["y"], frame), tmp_path, seed=0, dry_run=True)


def test_resume_after_interrupt_keeps_skipped_images_accounted(tmp_path, monkeypatch):
    table = write_tiny_raw_dataset(tmp_path, n_images=24)
    first_train = splits.assign_splits(table.frame, seed=0, val_fraction=0.1, test_fraction=0.2)
    bad = table.frame.loc[(first_train == "train").idxmax(), "path"]
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    kwargs = dict(options=PreprocessOptions(size=16), seed=0, salt="s", workers=1)
    kwargs.update(train_fractions=(0.5,), records_per_shard=4)
    reference = prepare_dataset(table, tmp_path / "a", **kwargs)

    commit, commits = shards.ShardWriter.commit, []

    def interrupting_commit(self):
        if len(commits) == 2:
            raise KeyboardInterrupt
        commits.append(1)
        return commit(self)

    monkeypatch.setattr(shards.ShardWriter, "commit", interrupting_commit)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(table, tmp_path / "b", **kwargs)
    monkeypatch.undo()
    # The skipped image is in a finished shard: the resumed run must count it without decoding.
    finished = json.loads((tmp_path / "b" / "progress.json").read_text())["shards"]
    assert [e["skipped"] != [] for e in finished.values()] == [True, False]
    assert prepare_dataset(table, tmp_path / "b", **kwargs) == reference
    assert reference["skipped"] == 1
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    with pytest.raises(ConfigError, match="seed: existing 0, now 1"):
        prepare_dataset(table, tmp_path / "b", **{**kwargs, "seed": 1})


def test_one_pos_weight_rule_for_a_label_without_positives():
    from cxrjax.data import shards

    weights = shards.pos_weight(np.array([2, 0, 5]), np.array([10, 8, 5]))
    np.testing.assert_allclose(weights, [4.0, 1.0, 0.0])
