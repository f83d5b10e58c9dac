"""Prepared shards -> batches: the grain pipelines for training and evaluation.

(Over ~400 lines on purpose: the training stream, its counter-based augmentation and label-noise
draws and the evaluation stream share the record decoding and the per-process row rule.)

Images stay uint8 on the host (normalisation happens on the device inside the jitted step).

Training: epoch e is one seeded permutation of the training examples, cut into global batches of
`batch_size` (the last partial batch of an epoch is dropped); process p of N takes rows
[p * B / N, (p + 1) * B / N) of every global batch. Global batch k therefore holds the same
examples whatever the number of processes, and an example's augmentation is drawn from
(seed, epoch, record index) alone. The iterator's state is the next global step: resuming from it
replays exactly the batches an uninterrupted run would see, mid-epoch included.

Evaluation: every example exactly once across all processes, the last batch padded and masked.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import struct
import sys
from collections.abc import Iterator, Sequence

import cv2
import grain
import jax
import numpy as np

from cxrjax.data import shards
from cxrjax.data.device_augment import NUM_UNIFORMS, Augment, geometry, intensity_curve
from cxrjax.errors import ConfigError

# The study's flip p=0.5 and rotation +-7 degrees.
STUDY_AUGMENT = Augment()

__all__ = [
    "STUDY_AUGMENT",
    "Augment",
    "TrainIterator",
    "TrainLoader",
    "augment_images",
    "example_uniforms",
    "eval_batches",
    "flip_labels",
    "local_batch_size",
    "num_train_examples",
    "prefetch_to_device",
    "to_device",
    "train_loader",
]


class _SelectLabels:
    """(..., all labels) with NaN = masked -> the configured labels (NaN -> 0) and their mask."""

    def __init__(self, label_indices: Sequence[int]):
        self._labels = np.asarray(label_indices)

    def __call__(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = labels[..., self._labels]
        known = ~np.isnan(labels)
        return np.where(known, labels, 0).astype(np.float32), known


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def example_uniforms(seed: int, epoch: int, records: np.ndarray) -> np.ndarray:
    """The augmentation draws (len(records), NUM_UNIFORMS) in [0, 1) of examples in an epoch.

    A counter-based hash of (seed, epoch, record, column) alone: no generator state, so an
    example's draws do not depend on which process, thread or batch position handles it, and a
    whole batch is drawn in a few vectorised operations.
    """
    with np.errstate(over="ignore"):
        key = _mix(_mix(np.uint64(seed) + _GOLDEN) ^ np.uint64(epoch))
        rows = _mix(key ^ (np.asarray(records, np.uint64) * _GOLDEN))
        columns = np.arange(1, NUM_UNIFORMS + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix(rows[:, None] + columns)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


# Separates the label-noise hash stream from the augmentation draws of the same seed.
_NOISE_DOMAIN = np.uint64(0x6C6162656C6E6F69)


def flip_labels(labels: np.ndarray, records: np.ndarray, seed: int, p: float) -> np.ndarray:
    """Symmetric label noise: each known entry of (b, L) `labels` flips 0 <-> 1 with probability p.

    Whether entry (record, label) flips is a hash of (seed, record index, label column) alone, so
    it is the same in every epoch, on every process count and at every batch position; NaN
    (masked) entries stay NaN. `labels` holds every label column of the shards, so choosing a
    subset of labels to train on does not change which entries of a label flip.
    """
    if p <= 0:
        return labels
    with np.errstate(over="ignore"):
        key = _mix(_mix(np.uint64(seed) + _GOLDEN) ^ _NOISE_DOMAIN)
        rows = _mix(key ^ (np.asarray(records, np.uint64) * _GOLDEN))
        columns = np.arange(1, labels.shape[1] + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix(rows[:, None] + columns)
    flip = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53 < p
    return np.where(flip & ~np.isnan(labels), 1 - labels, labels).astype(labels.dtype)


def augment_images(images: Sequence[np.ndarray], u: np.ndarray, augment: Augment) -> np.ndarray:
    """Host augmentation of uint8 (H, W) images with draws `u` (B, NUM_UNIFORMS) -> (B, H, W).

    The twin of `device_augment.apply`: same maps and curves, rounded to uint8.
    """
    height, width = images[0].shape
    out = np.empty((len(images), height, width), np.uint8)
    matrices = geometry(u, augment, height, width, np) if augment.warps else None
    luts = None
    if augment.changes_intensity:
        curves = intensity_curve(np.arange(256) / 255.0, u[:, None, :], augment, np)
        luts = np.rint(255.0 * curves).astype(np.uint8)
    for row, image in enumerate(images):
        if matrices is not None:
            # cv2, not PIL: several times faster bilinear warps of uint8, and it releases the GIL.
            image = cv2.warpAffine(
                image,
                matrices[row],
                (width, height),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
        elif u[row, 0] < augment.flip_prob:
            image = image[:, ::-1]
        if luts is not None:
            image = cv2.LUT(np.ascontiguousarray(image), luts[row])
        out[row] = image
    return out


def _decode(raw: Sequence[bytes], files: Sequence[str]) -> list[dict]:
    try:
        return [shards.decode(r) for r in raw]
    except (shards.ShardError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise shards.ShardError(
            f"a corrupt record in {list(files)} ({type(e).__name__}: {e}); "
            "re-run tools/prepare_data.py"
        ) from e


def _open(info: shards.DatasetInfo, split: str, fraction: float = 1.0):
    """(source, record indices of the split's subset or None for all of it)."""
    files = info.files(split)
    try:
        source = grain.sources.ArrayRecordDataSource(files)
    except Exception as e:
        raise shards.ShardError(
            f"cannot read the '{split}' shards {files} ({type(e).__name__}: {e}); "
            "they are truncated or not ArrayRecord files: re-run tools/prepare_data.py"
        ) from e
    indices = info.train_indices(fraction) if split == "train" else None
    return source, indices


def local_batch_size(global_batch_size: int) -> int:
    if global_batch_size % jax.process_count():
        raise ConfigError(
            f"batch size {global_batch_size} must divide over {jax.process_count()} processes"
        )
    return global_batch_size // jax.process_count()


def num_train_examples(info: shards.DatasetInfo, fraction: float) -> int:
    source, indices = _open(info, "train", fraction)
    return len(source) if indices is None else len(indices)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    order = np.random.default_rng((seed, epoch, n)).permutation(n)
    order.flags.writeable = False
    return order


class _LocalBatch:
    """Global step -> this process's rows of that global batch, decoded and augmented.

    One grain element per batch (not per example) so that grain's thread pool and worker
    processes split the stream by whole batches, which keeps every batch's content independent of
    the thread and worker counts.
    """

    def __init__(
        self,
        source,
        indices: np.ndarray | None,
        *,
        files: Sequence[str],
        batch_size: int,
        label_indices: Sequence[int],
        seed: int,
        augment: Augment,
        label_noise: float = 0.0,
    ):
        self._source = source
        self._files = files
        self._indices = indices
        self._num_examples = len(source) if indices is None else len(indices)
        self._batch_size = batch_size
        self._local = local_batch_size(batch_size)
        self._first_row = jax.process_index() * self._local
        self._steps_per_epoch = self._num_examples // batch_size
        self._select = _SelectLabels(label_indices)
        self._seed = seed
        self._augment = augment
        self._label_noise = label_noise

    @property
    def fingerprint(self) -> dict[str, float]:
        """What a saved position is only valid for."""
        out = {
            "seed": self._seed,
            "batch_size": self._batch_size,
            "num_examples": self._num_examples,
        }
        # Only when set: states saved before label noise existed stay valid for noise-free runs.
        if self._label_noise:
            out["label_noise"] = self._label_noise
        return out

    def records(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, record indices of this process's rows of global batch `step`)."""
        epoch, k = divmod(step, self._steps_per_epoch)
        start = k * self._batch_size + self._first_row
        positions = _permutation(self._seed, epoch, self._num_examples)[start : start + self._local]
        return epoch, positions if self._indices is None else self._indices[positions]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, records = self.records(step)
        # Record by record: grain's threads already overlap reads, and array_record's batched
        # read (a thread pool per call) measured 2x slower per record on a pinned CPU.
        raw = [self._source[r] for r in records.tolist()]
        examples = _decode(raw, self._files)
        labels = np.stack([e["labels"] for e in examples])
        labels, mask = self._select(flip_labels(labels, records, self._seed, self._label_noise))
        images = [e["image"] for e in examples]
        if self._augment.active:
            u = example_uniforms(self._seed, epoch, records)
            images = augment_images(images, u, self._augment)
        else:
            images = np.stack(images)
        return {"image": images, "labels": labels, "mask": mask, "index": records.astype(np.int32)}


class TrainIterator:
    """Endless iterator over this process's batches, checkpointable as the next global step.

    `get_state` / `set_state` speak bytes (what grain's orbax CheckpointHandler stores for
    non-dataset iterators); `start_prefetch` is what that handler calls after a restore.
    """

    def __init__(self, loader: TrainLoader):
        self._loader = loader
        self._step = 0
        self._iterator = None

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.start_prefetch()
        batch = next(self._iterator)
        self._step += 1
        return batch

    def start_prefetch(self) -> None:
        """Starts building batches from the current step (the first `next` would, too)."""
        if self._iterator is None:
            self._iterator = iter(self._loader.dataset(self._step))
            self._iterator.start_prefetch()

    def get_state(self) -> bytes:
        return json.dumps({"step": self._step, **self._loader.fingerprint}).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        expected = self._loader.fingerprint
        mismatch = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        if mismatch:
            raise ConfigError(
                "the saved data-iterator state belongs to a different input pipeline "
                f"(saved, now): {mismatch}; resume with the original seed, batch size and data"
            )
        self._step = int(saved["step"])
        if self._iterator is not None:
            self._iterator.close()  # its threads were building batches for the old position
            self._iterator = None


class TrainLoader:
    """An endless, shuffled stream of this process's share of each global batch."""

    def __init__(self, batches: _LocalBatch, *, threads: int, worker_count: int):
        self._batches = batches
        self._threads = threads
        self._worker_count = worker_count
        self.fingerprint = batches.fingerprint

    def dataset(self, start_step: int) -> grain.IterDataset:
        ds = grain.MapDataset.range(start_step, sys.maxsize).map(self._batches)
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=2 * self._threads)
        )
        if self._worker_count:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        return ds

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self)


def train_loader(
    info: shards.DatasetInfo,
    *,
    batch_size: int,
    label_indices: Sequence[int],
    seed: int,
    fraction: float = 1.0,
    augment: Augment = STUDY_AUGMENT,
    worker_count: int = 0,
    threads: int | None = None,
    label_noise: float = 0.0,
) -> TrainLoader:
    """An endless, shuffled, augmented stream of this process's rows of each global batch.

    Batches: image uint8 (b, H, W), labels float32 and mask bool (b, L), index int32 (b,) (the
    records' positions in the training split), with b = batch_size / process count.

    `label_noise` p in [0, 1): every known training label entry is flipped with probability p,
    fixed per (seed, record, label) by `flip_labels` (the study authors' symmetric noise).
    Evaluation batches (`eval_batches`) never carry noise.

    `threads` (default: the CPUs this process may use, at most 8) build batches in parallel;
    `worker_count` > 0 adds that many grain worker processes, each with its own threads.
    """
    if not 0 <= label_noise < 1:
        raise ConfigError(f"label_noise {label_noise} must lie in [0, 1)")
    source, indices = _open(info, "train", fraction)
    n = len(source) if indices is None else len(indices)
    if n < batch_size:
        raise ConfigError(f"batch size {batch_size} exceeds the {n} training examples")
    batches = _LocalBatch(
        source,
        indices,
        files=info.files("train"),
        batch_size=batch_size,
        label_indices=label_indices,
        seed=seed,
        augment=augment,
        label_noise=label_noise,
    )
    if threads is None:
        threads = min(8, len(os.sched_getaffinity(0)))
    return TrainLoader(batches, threads=threads, worker_count=worker_count)


def eval_batches(
    info: shards.DatasetInfo,
    split: str,
    *,
    batch_size: int,
    label_indices: Sequence[int],
    threads: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's padded batches of `split`; `valid` marks real examples.

    Every process yields the same number of batches (a collective step needs all of them), and the
    union of valid examples over processes is the split, each example once. `threads` read the
    next batches while the device works on the current one.
    """
    source, _ = _open(info, split)
    select = _SelectLabels(label_indices)
    files = info.files(split)
    local = local_batch_size(batch_size)
    per_process = -(-len(source) // jax.process_count())
    start = min(jax.process_index() * per_process, len(source))
    stop = min(start + per_process, len(source))

    def batch(lo: int) -> dict[str, np.ndarray]:
        indices = list(range(start + lo, min(start + lo + local, stop)))
        # One batched read (array_record reads in parallel); a process past the end reads none.
        examples = _decode(source.__getitems__(indices) if indices else [], files)
        count = len(examples)
        out = {
            "image": np.zeros((local, info.image_size, info.image_size), np.uint8),
            "labels": np.zeros((local, len(label_indices)), np.float32),
            "mask": np.zeros((local, len(label_indices)), bool),
            "valid": np.arange(local) < count,
            "id": np.array([e["id"] for e in examples] + [""] * (local - count)),
            "patient": np.array([e["patient"] for e in examples] + [""] * (local - count)),
        }
        if count:
            out["image"][:count] = np.stack([e["image"] for e in examples])
            out["labels"][:count], out["mask"][:count] = select(
                np.stack([e["labels"] for e in examples])
            )
        return out

    batches = grain.MapDataset.range(0, per_process, local).map(batch)
    return iter(
        batches.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        )
    )


def to_device(
    batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
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
