import numpy as np
import pytest

from cxrjax.data import shards


def test_record_round_trip_keeps_nan_masks():
    image = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    labels = np.array([1, 0, np.nan], np.float32)
    out = shards.decode(shards.encode(shards.Example(image, labels, "abc", "def")))
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["labels"], labels)
    assert (out["id"], out["patient"]) == ("abc", "def")


def test_decode_rejects_foreign_records():
    with pytest.raises(shards.ShardError, match="prepare_data"):
        shards.decode(b"JUNK" + bytes(40))


def test_split_writer_fills_shards_in_order(tmp_path):
    from array_record.python import array_record_data_source as ards

    writer = shards.SplitWriter(tmp_path, "train", expected=25, records_per_shard=10)
    for i in range(23):  # two fewer than expected, as when images are skipped
        writer.write(bytes([i]))
    files = writer.close()
    assert len(files) == 3
    source = ards.ArrayRecordDataSource([str(tmp_path / f) for f in files])
    assert [source[i] for i in range(len(source))] == [bytes([i]) for i in range(23)]


def test_shard_sizes_are_even_and_never_empty():
    assert shards.shard_sizes(25, 10) == [9, 9, 7]
    assert shards.shard_sizes(20, 10) == [10, 10]
    assert shards.shard_sizes(0, 10) == [0]
    for n in range(1, 60):
        for per in range(1, 12):
            sizes = shards.shard_sizes(n, per)
            assert sum(sizes) == n and min(sizes) > 0 and max(sizes) <= per


def test_shard_writer_uses_the_shard_name_only_once_complete(tmp_path):
    path = tmp_path / "train-00000-of-00001.array_record"
    with shards.ShardWriter(path) as writer:
        writer.write(b"a")
        writer.write(b"b")
        assert not path.exists() and (tmp_path / f"{path.name}{shards.PARTIAL_SUFFIX}").exists()
        digest = writer.commit()
    assert digest.records == 2 and shards.shard_intact(path, digest)
    assert list(tmp_path.iterdir()) == [path]
    path.write_bytes(path.read_bytes()[:-1])
    assert not shards.shard_intact(path, digest)
    assert not shards.shard_intact(tmp_path / "absent.array_record", digest)

    # A failure while writing leaves neither the shard nor its partial file.
    with pytest.raises(OSError), shards.ShardWriter(tmp_path / "x.array_record") as writer:
        writer.write(b"c")
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == [path]
