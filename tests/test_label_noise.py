"""Symmetric label noise on the training stream only."""

import numpy as np
import pytest

from cxrjax.data import pipeline, shards


def test_flipped_fraction_is_p_and_masked_entries_stay_masked():
    rng = np.random.default_rng(0)
    n, num_labels, p = 40_000, 5, 0.1
    labels = (rng.random((n, num_labels)) < 0.3).astype(np.float32)
    labels[rng.random(labels.shape) < 0.2] = np.nan
    records = np.arange(n)
    noisy = pipeline.flip_labels(labels, records, seed=3, p=p)
    known = ~np.isnan(labels)
    np.testing.assert_array_equal(np.isnan(noisy), ~known)
    flipped = noisy[known] != labels[known]
    assert set(np.unique(noisy[known])) <= {0.0, 1.0}
    # Binomial sampling error of the fraction: 4 standard deviations.
    assert abs(flipped.mean() - p) < 4 * np.sqrt(p * (1 - p) / flipped.size)
    # Symmetric: both classes flip at the same rate, every label column alike.
    for value in (0.0, 1.0):
        rate = (noisy[known & (labels == value)] != value).mean()
        assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / (known & (labels == value)).sum())
    per_label = [(noisy[known[:, j], j] != labels[known[:, j], j]).mean() for j in range(5)]
    assert max(abs(np.array(per_label) - p)) < 0.02
    assert pipeline.flip_labels(labels, records, seed=3, p=0.0) is labels


def test_decision_depends_on_seed_record_and_label_only():
    rng = np.random.default_rng(1)
    labels = (rng.random((1000, 3)) < 0.5).astype(np.float32)
    records = rng.permutation(50_000)[:1000]
    whole = pipeline.flip_labels(labels, records, seed=7, p=0.3)
    # Any split of the records over processes or batches, in any order, flips the same entries.
    order = rng.permutation(1000)
    parts = [order[k::4] for k in range(4)]
    for part in parts:
        np.testing.assert_array_equal(
            pipeline.flip_labels(labels[part], records[part], seed=7, p=0.3), whole[part]
        )
    assert not np.array_equal(pipeline.flip_labels(labels, records, seed=8, p=0.3), whole)


def test_train_loader_flips_training_labels_but_never_evaluation(tiny_shards):
    info = shards.load_info(tiny_shards)
    kwargs = dict(batch_size=8, label_indices=[0, 1], seed=1, augment=pipeline.Augment())
    clean = iter(pipeline.train_loader(info, **kwargs))
    noisy = iter(pipeline.train_loader(info, label_noise=0.4, **kwargs))
    changed = 0
    for _ in range(6):
        a, b = next(clean), next(noisy)
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_array_equal(a["image"], b["image"])
        changed += int((a["labels"] != b["labels"]).sum())
        assert not np.any((a["labels"] != b["labels"]) & ~a["mask"])
    assert changed > 0
    # The same record flips the same way in a later epoch (epoch-independent decision).
    steps = info.splits["train"]["num_examples"] // 8
    loader = iter(pipeline.train_loader(info, label_noise=0.4, **kwargs))
    seen: dict[int, np.ndarray] = {}
    repeats = 0
    for _ in range(3 * steps):
        batch = next(loader)
        for r, row in zip(batch["index"].tolist(), batch["labels"], strict=True):
            repeats += r in seen
            np.testing.assert_array_equal(seen.setdefault(r, row.copy()), row)
    assert repeats > 0
    # Evaluation batches carry the labels stored in the shards, untouched.
    from array_record.python import array_record_data_source as ards

    for split in ("val", "test"):
        source = ards.ArrayRecordDataSource(info.files(split))
        stored = np.stack([shards.decode(source[i])["labels"] for i in range(len(source))])
        batches = list(pipeline.eval_batches(info, split, batch_size=8, label_indices=[0, 1]))
        got = np.concatenate([b["labels"][b["valid"]] for b in batches])
        mask = np.concatenate([b["mask"][b["valid"]] for b in batches])
        np.testing.assert_array_equal(mask, ~np.isnan(stored))
        np.testing.assert_array_equal(got[mask], stored[mask])
    with pytest.raises(ValueError, match="label_noise"):
        pipeline.train_loader(info, label_noise=1.0, **kwargs)
