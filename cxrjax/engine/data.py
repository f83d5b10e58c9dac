"""The trainer's data phase: one prepared dataset (`config.data.dir`) or several
(`config.data.sources`), their labels, the training stream and the evaluation splits.

Both are a `TrainingData` (`SingleDataset`, `Mixture`): the trainer never asks which.

With several sources the run's labels are the union of their canonical labels, the stream is
the seeded mixture of `cxrjax.data.mixture`, and every source is validated and tested on its
own (plus pooled). Model selection then uses the mean over sources of each source's mean AUROC
over the labels it knows, so a large source cannot drown a small one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import ml_collections
import numpy as np

from cxrjax.data import mixture, pipeline, shards
from cxrjax.errors import ConfigError, MissingInputError
from cxrjax.evaluation.evaluators import ClassificationEvaluator

SELECTION_RULE = "mean over sources of each source's validation mean AUROC over the labels it knows"


def open_prepared(directory: str | Path, dataset: str = "DATASET") -> shards.DatasetInfo:
    directory = Path(directory)
    try:
        return shards.load_info(directory)
    except FileNotFoundError:
        raise MissingInputError(
            f"no prepared dataset at {directory} (missing {directory / shards.INFO_FILE})",
            f"Create it with:\n  python tools/prepare_data.py --dataset {dataset} "
            f"--raw /path/to/raw/{dataset} --out {directory}\n"
            "or point the config at prepared shards with --config.data.dir=DIR",
        ) from None


class TrainingData(Protocol):
    """What the trainer asks of its data, whether one dataset or a mixture of several.

    `columns[s][j]` is source s's column of run label j, or -1 where it lacks that label.
    """

    infos: list[shards.DatasetInfo]
    label_names: list[str]
    columns: list[list[int]]
    selection_rule: str

    @property
    def name(self) -> str: ...

    def steps_per_epoch(self, config: ml_collections.ConfigDict) -> int: ...

    def pos_weight(self) -> np.ndarray: ...

    def loader(
        self, config: ml_collections.ConfigDict, augment: pipeline.Augment
    ) -> pipeline.TrainLoader: ...

    def evaluators(self, split: str, batch_size: int) -> dict[str, ClassificationEvaluator]: ...


@dataclasses.dataclass
class _Sources:
    """What both implementations share: the sources' infos and the run's label columns."""

    infos: list[shards.DatasetInfo]
    label_names: list[str]
    columns: list[list[int]]

    @property
    def name(self) -> str:
        return "+".join(info.name for info in self.infos)

    @property
    def image_size(self) -> int:
        return self.infos[0].image_size

    @property
    def preprocessing(self) -> dict:
        return self.infos[0].preprocessing

    def evaluators(self, split: str, batch_size: int) -> dict[str, ClassificationEvaluator]:
        """One evaluator per source that has `split`, keyed by the source's folder name."""
        return {
            info.directory.name: ClassificationEvaluator(info, split, batch_size, columns)
            for info, columns in zip(self.infos, self.columns, strict=True)
            if info.splits.get(split, {}).get("num_examples")
        }


@dataclasses.dataclass
class SingleDataset(_Sources):
    """`config.data.dir`: the study's path (label-efficiency subsets, label noise)."""

    selection_rule: str = "validation mean AUROC"

    def steps_per_epoch(self, config: ml_collections.ConfigDict) -> int:
        return pipeline.num_train_examples(self.infos[0], config.data.train_fraction) // (
            config.batch_size
        )

    def pos_weight(self) -> np.ndarray:
        return np.asarray(self.infos[0].pos_weight, np.float32)[self.columns[0]]

    def loader(
        self, config: ml_collections.ConfigDict, augment: pipeline.Augment
    ) -> pipeline.TrainLoader:
        return pipeline.train_loader(
            self.infos[0],
            batch_size=config.batch_size,
            label_indices=self.columns[0],
            seed=config.seed,
            fraction=config.data.train_fraction,
            augment=augment,
            worker_count=config.data.worker_count,
            label_noise=config.data.get("label_noise", 0.0),
        )


@dataclasses.dataclass
class Mixture(_Sources):
    """`config.data.sources`: the seeded mixture of `cxrjax.data.mixture`."""

    sources: list[mixture.Source] = dataclasses.field(default_factory=list)
    selection_rule: str = SELECTION_RULE

    def steps_per_epoch(self, config: ml_collections.ConfigDict) -> int:
        return mixture.steps_per_epoch(self.sources, config.batch_size)

    def pos_weight(self) -> np.ndarray:
        return mixture.pos_weight(self.sources, self.label_names)

    def loader(
        self, config: ml_collections.ConfigDict, augment: pipeline.Augment
    ) -> pipeline.TrainLoader:
        return mixture.mixture_loader(
            self.sources,
            self.label_names,
            batch_size=config.batch_size,
            seed=config.seed,
            augment=augment,
            worker_count=config.data.worker_count,
        )


def open_training_data(config: ml_collections.ConfigDict) -> TrainingData:
    """The run's sources: `config.data.sources` when set, else `config.data.dir`."""
    specs = tuple(config.data.get("sources") or ())
    if not specs:
        info = open_prepared(config.data.dir, config.data.dataset)
        indices = info.label_indices(config.data.labels)
        return SingleDataset([info], [info.label_names[i] for i in indices], [indices])
    if config.data.train_fraction < 1:
        raise ConfigError(
            "config.data.train_fraction < 1 with config.data.sources",
            "Label-efficiency subsets apply to one dataset; set data.dir instead of sources, "
            "or train_fraction=1.0.",
        )
    if config.data.get("label_noise", 0.0):
        raise ConfigError(
            "config.data.label_noise with config.data.sources",
            "Label-noise experiments use one dataset; set data.dir instead of sources.",
        )
    parsed = mixture.parse_sources(specs)
    infos = [open_prepared(directory) for directory, _ in parsed]
    labels = mixture.union_labels(infos, config.data.labels)
    columns = [mixture.source_columns(info, labels) for info in infos]
    unknown = [n for j, n in enumerate(labels) if all(c[j] < 0 for c in columns)]
    if unknown:
        raise ConfigError(
            f"config.data.labels {unknown} are in none of the sources",
            f"Labels present: {sorted({n for info in infos for n in info.label_names})}.",
        )
    sources = mixture.open_sources(infos, [w for _, w in parsed])
    return Mixture(infos, labels, columns, sources)
