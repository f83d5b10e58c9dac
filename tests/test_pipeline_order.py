"""The training stream's order: global batches, process shares, resume, thread/worker invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax import checkpoint, sharding
from cxrjax.data import pipeline, shards
from cxrjax.run_dir import RunDir

BATCH = 8


def _loader(info, **kwargs):
    return pipeline.train_loader(
        info, batch_size=BATCH, label_indices=[0, 1], seed=3, **{"threads": 2, **kwargs}
    )


def _take(iterator, steps):
    return [next(iterator) for _ in range(steps)]


def _as_processes(monkeypatch, index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def test_each_epoch_is_a_fresh_permutation_cut_into_global_batches(tiny_shards):
    info = shards.load_info(tiny_shards)
    n = info.splits["train"]["num_examples"]
    steps_per_epoch = n // BATCH
    batches = _take(iter(_loader(info)), 2 * steps_per_epoch)
    epochs = [
        np.concatenate(
            [b["index"] for b in batches[e * steps_per_epoch : (e + 1) * steps_per_epoch]]
        )
        for e in range(2)
    ]
    for records in epochs:
        assert len(set(records)) == steps_per_epoch * BATCH  # no repeats within an epoch
        assert records.min() >= 0 and records.max() < n
    assert not np.array_equal(epochs[0], epochs[1])
    # Rows hold the records they claim: labels match the shards' own labels for those records.
    source = pipeline._open(info, "train")[0]
    for row, record in enumerate(batches[0]["index"]):
        labels = shards.decode(source[int(record)])["labels"]
        np.testing.assert_array_equal(batches[0]["labels"][row], np.nan_to_num(labels, nan=0))
        np.testing.assert_array_equal(batches[0]["mask"][row], ~np.isnan(labels))


@pytest.mark.parametrize("count", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(tiny_shards, monkeypatch, count):
    info = shards.load_info(tiny_shards)
    steps = 10  # crosses an epoch boundary (7 steps per epoch)
    single = _take(iter(_loader(info)), steps)
    shares = []
    for index in range(count):
        _as_processes(monkeypatch, index, count)
        shares.append(_take(iter(_loader(info)), steps))
    for step in range(steps):
        for key in ("index", "image", "labels", "mask"):
            joined = np.concatenate([share[step][key] for share in shares])
            np.testing.assert_array_equal(joined, single[step][key], err_msg=f"{key} @ {step}")


def test_batches_do_not_depend_on_threads(tiny_shards):
    info = shards.load_info(tiny_shards)
    one = _take(iter(_loader(info, threads=1)), 9)
    many = _take(iter(_loader(info, threads=4)), 9)
    for a, b in zip(one, many, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batches_do_not_depend_on_worker_processes(tiny_shards):
    info = shards.load_info(tiny_shards)
    inline = _take(iter(_loader(info)), 5)
    workers = _take(iter(_loader(info, worker_count=2)), 5)
    for a, b in zip(inline, workers, strict=True):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_augmentation_is_a_function_of_seed_epoch_and_record(tiny_shards):
    info = shards.load_info(tiny_shards)
    plain = _take(iter(_loader(info, augment=pipeline.Augment(0.0, 0.0))), 14)
    augmented = _take(iter(_loader(info)), 14)
    source = pipeline._open(info, "train")[0]
    for step in (2, 9):  # one step in each of two epochs
        records = augmented[step]["index"]
        np.testing.assert_array_equal(records, plain[step]["index"])
        epoch = step // 7
        images = [shards.decode(source[int(r)])["image"] for r in records]
        u = pipeline.example_uniforms(3, epoch, records)
        expected = pipeline.augment_images(images, u, pipeline.Augment())
        np.testing.assert_array_equal(augmented[step]["image"], expected)
        assert not np.array_equal(augmented[step]["image"], plain[step]["image"])
    # The same record in another epoch draws differently.
    assert not np.array_equal(
        pipeline.example_uniforms(3, 0, np.arange(4)), pipeline.example_uniforms(3, 1, np.arange(4))
    )


@pytest.mark.parametrize("stop_at", [3, 8])  # mid-epoch, and mid-way through the second epoch
def test_resume_from_an_orbax_checkpoint_replays_the_uninterrupted_batches(
    tiny_shards, tmp_path, stop_at
):
    info = shards.load_info(tiny_shards)
    mesh = sharding.make_mesh()
    data = sharding.data_sharding(mesh)
    uninterrupted = [
        b for b, _ in _take(pipeline.prefetch_to_device(iter(_loader(info)), data), 12)
    ]

    state = {"x": jnp.zeros(4)}
    ckpt = checkpoint.Checkpointer(RunDir(tmp_path), async_save=False)
    batches = pipeline.prefetch_to_device(iter(_loader(info)), data, size=3)
    for _ in range(stop_at):
        _, iterator_state = next(batches)
    ckpt.save(stop_at, state, iterator_state)
    ckpt.close()

    ckpt = checkpoint.Checkpointer(RunDir(tmp_path), async_save=False)
    resumed_iterator = iter(_loader(info))
    abstract = checkpoint.abstract(state, {"x": sharding.replicated(mesh)})
    _, iterator_state = ckpt.restore_latest(abstract)
    resumed_iterator.set_state(iterator_state)
    ckpt.close()
    resumed = pipeline.prefetch_to_device(resumed_iterator, data)
    for expected in uninterrupted[stop_at:]:
        got, _ = next(resumed)
        for key in ("index", "image", "labels", "mask"):
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))


def test_state_of_another_pipeline_is_refused(tiny_shards):
    info = shards.load_info(tiny_shards)
    iterator = iter(_loader(info))
    next(iterator)
    state = iterator.get_state()
    other = iter(pipeline.train_loader(info, batch_size=BATCH, label_indices=[0], seed=4))
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_fraction_reads_only_its_subset(tiny_shards):
    info = shards.load_info(tiny_shards)
    subset = set(info.train_indices(0.5).tolist())
    loader = _loader(info, fraction=0.5)
    steps_per_epoch = len(subset) // BATCH
    records = np.concatenate([b["index"] for b in _take(iter(loader), steps_per_epoch)])
    assert set(records.tolist()) <= subset and len(set(records.tolist())) == len(records)
