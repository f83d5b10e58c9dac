import jax
import numpy as np
import pytest

from cxrjax import sharding
from cxrjax.data import pipeline, shards


def test_train_loader_batches_are_uint8_and_resume_exactly(tiny_shards):
    info = shards.load_info(tiny_shards)
    make = lambda: pipeline.train_loader(  # noqa: E731
        info, batch_size=8, label_indices=[0, 1], seed=1, augment=pipeline.Augment()
    )
    it = iter(make())
    first = [next(it) for _ in range(12)]  # more than an epoch: epochs repeat
    assert first[0]["image"].dtype == np.uint8 and first[0]["image"].shape == (8, 32, 32)
    assert first[0]["mask"].dtype == bool
    resumed = iter(make())
    replay = iter(make())
    for _ in range(5):
        next(replay)
    resumed.set_state(replay.get_state())
    for expected in first[5:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["labels"], expected["labels"])


def test_fraction_subset_and_missing_label(tiny_shards):
    info = shards.load_info(tiny_shards)
    assert pipeline.num_train_examples(info, 0.5) == len(info.train_indices(0.5))
    with pytest.raises(shards.ShardError, match=r"labels present: \['square', 'stripe'\]"):
        info.label_indices(["cardiomegaly"])


def test_eval_batches_cover_the_split_once_with_padding(tiny_shards):
    info = shards.load_info(tiny_shards)
    n = info.splits["test"]["num_examples"]
    batches = list(pipeline.eval_batches(info, "test", batch_size=8, label_indices=[0, 1]))
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == n and len(valid) == -(-n // 8) * 8
    ids = np.concatenate([b["id"] for b in batches])[valid]
    assert len(set(ids)) == n


def test_prefetch_builds_global_arrays_on_the_mesh(tiny_shards):
    info = shards.load_info(tiny_shards)
    mesh = sharding.make_mesh()
    it = iter(pipeline.train_loader(info, batch_size=8, label_indices=[0], seed=0))
    batch, state = next(pipeline.prefetch_to_device(it, sharding.data_sharding(mesh)))
    assert batch["image"].shape == (8, 32, 32) and batch["image"].dtype == jax.numpy.uint8
    assert len(batch["image"].sharding.device_set) == jax.device_count() == 4
    assert isinstance(state, bytes)


def test_truncated_shard_names_the_file(tiny_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    info = shards.load_info(copy)
    victim = info.files("val")[0]
    with open(victim, "r+b") as f:
        f.truncate(20)
    with pytest.raises(shards.ShardError, match="val"):
        list(pipeline.eval_batches(info, "val", batch_size=4, label_indices=[0]))


def test_truncated_training_shard_names_the_file(tiny_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    info = shards.load_info(copy)
    victim = info.files("train")[0]
    with open(victim, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(shards.ShardError, match=victim):
        next(iter(pipeline.train_loader(info, batch_size=8, label_indices=[0], seed=0)))


def test_corrupt_records_name_the_files(tiny_shards, tmp_path):
    import shutil

    from array_record.python import array_record_module as ar

    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    info = shards.load_info(copy)
    for split in ("train", "test"):
        victim = info.files(split)[0]
        count = info.splits[split]["num_examples"]
        writer = ar.ArrayRecordWriter(victim, "group_size:1")
        for _ in range(count):  # well-formed ArrayRecord, but not cxrjax records
            writer.write(b"not a radiograph record")
        writer.close()
    with pytest.raises(shards.ShardError, match=info.files("train")[0]):
        next(iter(pipeline.train_loader(info, batch_size=8, label_indices=[0], seed=0)))
    with pytest.raises(shards.ShardError, match=info.files("test")[0]):
        next(pipeline.eval_batches(info, "test", batch_size=8, label_indices=[0]))
