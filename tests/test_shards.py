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
