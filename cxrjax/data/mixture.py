"""Several prepared datasets as one training stream: harmonised labels, a seeded mixture.

Labels: the run's labels are the union of the sources' canonical labels (first source's order,
then each new one as it appears), or `config.data.labels`. A label a source lacks is masked for
its images (mask False): it never counts as a negative, in the loss or in `pos_weight`.

Mixture: every row of global batch `step` picks its source by the sampling weights and a record
of that source uniformly, both from a counter-based hash of (seed, step, row). Sampling is with
replacement (torch's `WeightedRandomSampler` habit), so any weighting is possible, a batch is
computed from its step alone (random access for grain's threads, exact resume, no stored
cursor), and process p of N reads rows [pB/N, (p+1)B/N) of the same global batch: 1 and N
processes see identical batches. An epoch is defined as sum(source sizes) // batch_size steps:
as many images as one pass over every source, whatever the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from cxrjax.data import shards
from cxrjax.data.datasets.labels import canonical
from cxrjax.data.pipeline import (
    STUDY_AUGMENT,
    Augment,
    TrainLoader,
    _decode,
    _mix,
    _open,
    augment_images,
    example_uniforms,
    local_batch_size,
)
from cxrjax.data.prepare import SUMMARY_FILE
from cxrjax.errors import ConfigError, MissingInputError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclasses.dataclass(frozen=True)
class Source:
    """One prepared dataset of a mixture: its folder, description and sampling weight."""

    info: shards.DatasetInfo
    weight: float

    @property
    def name(self) -> str:
        return self.info.directory.name


def parse_sources(specs: Sequence[str]) -> list[tuple[str, float | None]]:
    """("DIR", "DIR:0.3") -> [(DIR, None), (DIR, 0.3)]; None means proportional to size."""
    out = []
    for spec in specs:
        directory, sep, weight = spec.rpartition(":") if ":" in spec else (spec, "", "")
        if not sep:
            out.append((spec, None))
            continue
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if value <= 0:
            raise ConfigError(
                f"config.data.sources entry {spec!r}: weight {weight!r} is not a positive number",
                'Write "DIR" or "DIR:0.3".',
            )
        out.append((directory, value))
    return out


def open_sources(
    infos: Sequence[shards.DatasetInfo], weights: Sequence[float | None]
) -> list[Source]:
    """Sources with normalised weights (given ones as is, missing ones by training size)."""
    sizes = [info.splits["train"]["num_examples"] for info in infos]
    if any(w is not None for w in weights) and any(w is None for w in weights):
        raise ConfigError(
            "config.data.sources mixes weighted and unweighted entries",
            "Give every source a weight, or none (then they are sampled by size).",
        )
    raw = [float(s) for s in sizes] if weights[0] is None else [float(w) for w in weights]
    total = sum(raw)
    names = [info.directory.name for info in infos]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"config.data.sources has two folders with one name: {names}",
            "Results are reported per folder name; rename one of the folders.",
        )
    sizes_seen = {info.image_size for info in infos}
    if len(sizes_seen) != 1:
        raise ConfigError(
            f"the sources hold images of different sizes: {sorted(sizes_seen)}",
            "Prepare every source with the same tools/prepare_data.py --size.",
        )
    return [Source(info, w / total) for info, w in zip(infos, raw, strict=True)]


def union_labels(infos: Sequence[shards.DatasetInfo], wanted: Sequence[str] = ()) -> list[str]:
    """The run's labels: `wanted` (any spelling, canonicalised) or the sources' union."""
    if wanted:
        return [canonical(n) or n for n in wanted]
    labels: list[str] = []
    for info in infos:
        labels += [n for n in info.label_names if n not in labels]
    return labels


def source_columns(info: shards.DatasetInfo, labels: Sequence[str]) -> list[int]:
    """For each run label, its column in `info`'s labels, or -1 where the source lacks it."""
    return [info.label_names.index(n) if n in info.label_names else -1 for n in labels]


def pos_weight(sources: Sequence[Source], labels: Sequence[str]) -> np.ndarray:
    """negatives / positives per label over the training images that know the label.

    Counts come from each source's `summary.json` (positives and masked per label).
    """
    positives, known = np.zeros(len(labels)), np.zeros(len(labels))
    for source in sources:
        summary_path = source.info.directory / SUMMARY_FILE
        try:
            train = json.loads(summary_path.read_text())["splits"]["train"]
        except FileNotFoundError:
            raise MissingInputError(
                f"{summary_path}: no such file; it holds the label counts of the training split",
                "Re-run tools/prepare_data.py for this source (it resumes and writes it).",
            ) from None
        for j, name in enumerate(labels):
            if name in source.info.label_names:
                # Summaries hold the names as prepared; the info, canonical ones.
                stored = train["positives"]
                key = name if name in stored else _stored_name(stored, name)
                positives[j] += stored[key]
                known[j] += train["images"] - train["masked"][key]
    return shards.pos_weight(positives, known)


def _stored_name(stored: dict, name: str) -> str:
    for key in stored:
        if (canonical(key) or key) == name:
            return key
    raise KeyError(name)


def steps_per_epoch(sources: Sequence[Source], batch_size: int) -> int:
    return sum(s.info.splits["train"]["num_examples"] for s in sources) // batch_size


class _MixtureBatch:
    """Global step -> this process's rows of that global batch of the mixture."""

    def __init__(
        self,
        sources: Sequence[Source],
        labels: Sequence[str],
        *,
        batch_size: int,
        seed: int,
        augment: Augment,
    ):
        self._opened = [_open(s.info, "train") for s in sources]
        self._files = [s.info.files("train") for s in sources]
        self._sizes = np.array([len(src) for src, _ in self._opened], np.uint64)
        # Per-source offsets give every (source, record) its own augmentation key.
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)[:-1]]).astype(np.int64)
        self._cumulative = np.cumsum([s.weight for s in sources])
        self._columns = [np.asarray(source_columns(s.info, labels)) for s in sources]
        self._num_labels = len(labels)
        self._batch_size = batch_size
        self._local = local_batch_size(batch_size)
        self._first_row = jax.process_index() * self._local
        self._steps_per_epoch = max(1, steps_per_epoch(sources, batch_size))
        self._seed = seed
        self._augment = augment
        self.fingerprint = {
            "seed": seed,
            "batch_size": batch_size,
            "num_examples": int(self._sizes.sum()),
            "sources": len(sources),
        }

    def draws(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, record) of every row of global batch `step` (all rows, all processes)."""
        with np.errstate(over="ignore"):
            key = _mix(_mix(np.uint64(self._seed) + _GOLDEN) ^ _mix(np.uint64(step) + _GOLDEN))
            rows = np.arange(self._batch_size, dtype=np.uint64)
            bits_source = _mix(key ^ (rows * _GOLDEN))
            bits_record = _mix(bits_source + _GOLDEN)
        u = (bits_source >> np.uint64(11)).astype(np.float64) * 2.0**-53
        source = np.minimum(
            np.searchsorted(self._cumulative, u, side="right"), len(self._sizes) - 1
        )
        record = (bits_record % self._sizes[source]).astype(np.int64)
        return source, record

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        source, record = self.draws(step)
        rows = slice(self._first_row, self._first_row + self._local)
        source, record = source[rows], record[rows]
        labels = np.full((self._local, self._num_labels), np.nan, np.float32)
        images = []
        for row, (s, r) in enumerate(zip(source.tolist(), record.tolist(), strict=True)):
            src, indices = self._opened[s]
            index = r if indices is None else int(indices[r])
            example = _decode([src[index]], self._files[s])[0]
            images.append(example["image"])
            columns = self._columns[s]
            present = columns >= 0
            labels[row, present] = example["labels"][columns[present]]
        mask = ~np.isnan(labels)
        global_records = self._offsets[source] + record
        if self._augment.active:
            epoch = step // self._steps_per_epoch
            images = augment_images(
                images, example_uniforms(self._seed, epoch, global_records), self._augment
            )
        else:
            images = np.stack(images)
        return {
            "image": images,
            "labels": np.where(mask, labels, 0).astype(np.float32),
            "mask": mask,
            "index": global_records.astype(np.int32),
            "source": source.astype(np.int32),
        }


def mixture_loader(
    sources: Sequence[Source],
    labels: Sequence[str],
    *,
    batch_size: int,
    seed: int,
    augment: Augment = STUDY_AUGMENT,
    worker_count: int = 0,
    threads: int | None = None,
) -> TrainLoader:
    """An endless, seeded, resumable mixture of the sources' training splits (see module doc)."""
    batches = _MixtureBatch(sources, labels, batch_size=batch_size, seed=seed, augment=augment)
    if threads is None:
        threads = min(8, len(os.sched_getaffinity(0)))
    return TrainLoader(batches, threads=threads, worker_count=worker_count)
