"""Prepared shards -> batches: the grain pipelines for training and evaluation.

Images stay uint8 on the host (normalisation happens on the device inside the jitted step).
Training: seeded global shuffle, repeated epochs, each process reading its own share, host
augmentation, checkpointable iterator state. Evaluation: every example exactly once across all
processes, the last batch padded and masked.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from cxrjax.data import shards


@dataclasses.dataclass(frozen=True)
class Augment:
    """The study's augmentation by default: horizontal flip p=0.5 and rotation within +-7 deg."""

    flip_prob: float = 0.5
    max_rotation: float = 7.0


class _Decode(grain.transforms.Map):
    def __init__(self, label_indices: Sequence[int]):
        self._labels = np.asarray(label_indices)

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        return self.select(shards.decode(record))

    def select(self, example: dict) -> dict[str, np.ndarray]:
        labels = example["labels"][self._labels]
        known = ~np.isnan(labels)
        return {
            "image": example["image"],
            "labels": np.where(known, labels, 0).astype(np.float32),
            "mask": known,
        }


class _Augment(grain.transforms.RandomMap):
    def __init__(self, augment: Augment):
        self._augment = augment

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        flip = rng.random() < self._augment.flip_prob
        angle = rng.uniform(-self._augment.max_rotation, self._augment.max_rotation)
        if self._augment.max_rotation:
            image = np.asarray(
                Image.fromarray(image).rotate(angle, resample=Image.Resampling.BILINEAR)
            )
        if flip:
            image = image[:, ::-1]
        return {**element, "image": np.ascontiguousarray(image)}


class _Subset(grain.sources.RandomAccessDataSource):
    """A fixed subset of a source's records (a nested label-efficiency subset)."""

    def __init__(self, source, indices: np.ndarray):
        self._source = source
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> bytes:
        return self._source[int(self._indices[index])]


def _open(info: shards.DatasetInfo, split: str, fraction: float = 1.0):
    files = info.files(split)
    try:
        source = grain.sources.ArrayRecordDataSource(files)
    except Exception as e:
        raise shards.ShardError(
            f"cannot read the '{split}' shards {files} ({type(e).__name__}: {e}); "
            "they are truncated or not ArrayRecord files: re-run tools/prepare_data.py"
        ) from e
    indices = info.train_indices(fraction) if split == "train" else None
    return source if indices is None else _Subset(source, indices)


def local_batch_size(global_batch_size: int) -> int:
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"batch size {global_batch_size} must divide over {jax.process_count()} processes"
        )
    return global_batch_size // jax.process_count()


def num_train_examples(info: shards.DatasetInfo, fraction: float) -> int:
    return len(_open(info, "train", fraction))


def train_loader(
    info: shards.DatasetInfo,
    *,
    batch_size: int,
    label_indices: Sequence[int],
    seed: int,
    fraction: float = 1.0,
    augment: Augment = Augment(),
    worker_count: int = 0,
) -> grain.DataLoader:
    """An endless, shuffled stream of this process's share of each global batch."""
    source = _open(info, "train", fraction)
    local = local_batch_size(batch_size)
    if len(source) < batch_size:
        raise ValueError(f"batch size {batch_size} exceeds the {len(source)} training examples")
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardOptions(
            jax.process_index(), jax.process_count(), drop_remainder=True
        ),
        shuffle=True,
        num_epochs=None,
        seed=seed,
    )
    operations = [_Decode(label_indices)]
    if augment.flip_prob or augment.max_rotation:
        operations.append(_Augment(augment))
    operations.append(grain.transforms.Batch(local, drop_remainder=True))
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
    )


def eval_batches(
    info: shards.DatasetInfo, split: str, *, batch_size: int, label_indices: Sequence[int]
) -> Iterator[dict[str, np.ndarray]]:
    """This process's padded batches of `split`; `valid` marks real examples.

    Every process yields the same number of batches (a collective step needs all of them), and the
    union of valid examples over processes is the split, each example once.
    """
    source = _open(info, split)
    decode = _Decode(label_indices)
    local = local_batch_size(batch_size)
    per_process = -(-len(source) // jax.process_count())
    start = min(jax.process_index() * per_process, len(source))
    stop = min(start + per_process, len(source))
    for lo in range(0, per_process, local):
        indices = range(start + lo, min(start + lo + local, stop))
        raw = [shards.decode(source[i]) for i in indices]
        yield _pad([decode.select(r) for r in raw], raw, local, info.image_size, len(label_indices))


def _pad(examples, raw, size: int, image_size: int, num_labels: int) -> dict[str, np.ndarray]:
    batch = {
        "image": np.zeros((size, image_size, image_size), np.uint8),
        "labels": np.zeros((size, num_labels), np.float32),
        "mask": np.zeros((size, num_labels), bool),
        "valid": np.zeros((size,), bool),
    }
    for i, example in enumerate(examples):
        for key in ("image", "labels", "mask"):
            batch[key][i] = example[key]
        batch["valid"][i] = True
    batch["id"] = np.array([r["id"] for r in raw] + [""] * (size - len(raw)))
    batch["patient"] = np.array([r["patient"] for r in raw] + [""] * (size - len(raw)))
    return batch


def to_device(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles global arrays from every process's local rows (numeric entries only)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v)
        for k, v in batch.items()
        if v.dtype.kind != "U"
    }


def prefetch_to_device(
    iterator: Iterator[dict[str, np.ndarray]], sharding: jax.sharding.Sharding, size: int = 2
) -> Iterator[tuple[dict[str, jax.Array], object]]:
    """Keeps `size` batches in flight so host-to-device copies overlap the running step.

    Yields (batch, state) where `state` is the host iterator's state right after that batch:
    checkpointing it (not the iterator's current, prefetched-ahead state) makes a resumed run
    see exactly the batches an uninterrupted one would.
    """
    queue = collections.deque()
    for batch in iterator:
        queue.append((to_device(batch, sharding), iterator.get_state()))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
