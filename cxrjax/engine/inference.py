"""The one inference path: a `Predictor` from a run directory or a converted-weights directory.

`predict`, `evaluate`, `embed` and the trainer's own evaluators all go through it, so a radiograph
meets the model in exactly one way: uint8 (B, H, W) on the host, normalised on the device by
`engine.step`. Nothing here imports the trainer, and nothing needs the training data: a run
directory carries its architecture, labels, preprocessing and normalisation in `run.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cxrjax import checkpoint, console, sharding
from cxrjax.data import pipeline, shards
from cxrjax.data.images import ImageReadError, PreprocessOptions, load_radiograph
from cxrjax.engine import step as steps
from cxrjax.errors import ConfigError, MissingInputError
from cxrjax.evaluation.predictions import Predictions
from cxrjax.models import create_model
from cxrjax.models.weights import read_weights, unflatten
from cxrjax.run_dir import RunDir


@dataclasses.dataclass
class Predictor:
    """A model, its parameters and everything needed to feed it a radiograph.

    `preprocessing` turns a raw file into the uint8 image the model was trained on;
    `mean`/`std` normalise it on the device. `params` may be swapped (`with_params`) without
    recompiling: the trainer evaluates its current weights this way.
    """

    model: Any
    params: Any
    label_names: list[str]
    preprocessing: PreprocessOptions
    mean: np.ndarray
    std: np.ndarray
    mesh: jax.sharding.Mesh
    source: str
    _forward: Callable = dataclasses.field(repr=False, default=None)
    _heatmap: Callable = dataclasses.field(repr=False, default=None)
    _forward_normalised: Callable = dataclasses.field(repr=False, default=None)

    def __post_init__(self) -> None:
        mean, std = jnp.asarray(self.mean), jnp.asarray(self.std)
        if self._forward is None:
            self._forward = jax.jit(
                steps.make_predict_step(self.model, mean, std),
                out_shardings=sharding.data_sharding(self.mesh),
            )
        if self._forward_normalised is None:
            self._forward_normalised = jax.jit(functools.partial(steps.forward, self.model))

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        model: Any,
        params: Any,
        *,
        label_names: Sequence[str],
        preprocessing: PreprocessOptions,
        normalization: tuple[np.ndarray, np.ndarray],
        mesh: jax.sharding.Mesh,
        source: str = "",
    ) -> Predictor:
        return cls(
            model=model,
            params=params,
            label_names=list(label_names),
            preprocessing=preprocessing,
            mean=np.asarray(normalization[0], np.float32),
            std=np.asarray(normalization[1], np.float32),
            mesh=mesh,
            source=source,
        )

    @classmethod
    def from_run(cls, path: str | Path | RunDir, which: str = "best") -> Predictor:
        """The best (by validation) or latest checkpoint of a run directory, as trained."""
        run = path if isinstance(path, RunDir) else RunDir(path)
        facts = run.read_facts()
        options = dict(facts.model_options)
        if "lora_targets" in options:
            options["lora_targets"] = tuple(options["lora_targets"])
        model = create_model(
            facts.variant,
            len(facts.label_names),
            image_size=facts.image_size,
            dtype=facts.dtype,
            **options,
        )
        mesh = sharding.make_mesh()
        dummy = jnp.zeros((1, facts.image_size, facts.image_size, 3))
        shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, dummy)["params"])
        replicated = jax.tree.map(lambda _: sharding.replicated(mesh), shapes)
        ckpt = checkpoint.Checkpointer(run)
        try:
            params = ckpt.restore_params(which, checkpoint.abstract(shapes, replicated))
        finally:
            ckpt.close()
        return cls.build(
            model,
            params,
            label_names=facts.label_names,
            preprocessing=PreprocessOptions(**facts.preprocessing),
            normalization=(np.asarray(facts.mean), np.asarray(facts.std)),
            mesh=mesh,
            source=f"{run.path} ({which})",
        )

    @classmethod
    def from_weights(cls, path: str | Path, normalization: str = "unit") -> Predictor:
        """A converted-weights directory at its stored resolution, with the default preparation.

        Without a head, `label_names` is empty and only features are meaningful.
        """
        flat, meta = read_weights(path)
        num_classes = int(meta.get("num_classes") or 0)
        model = create_model(meta["variant"], num_classes, image_size=meta["image_size"])
        mesh = sharding.make_mesh()
        params = jax.device_put(unflatten(flat), sharding.replicated(mesh))
        names = meta.get("label_names") or [f"output_{i}" for i in range(num_classes)]
        return cls.build(
            model,
            params,
            label_names=names,
            preprocessing=PreprocessOptions(size=int(meta["image_size"])),
            normalization=steps.input_stats(normalization, meta["variant"]),
            mesh=mesh,
            source=str(path),
        )

    @classmethod
    def load(
        cls, path: str | Path, which: str = "best", normalization: str | None = None
    ) -> Predictor:
        """A run directory (its own normalisation) or a weights directory (`normalization`)."""
        p = Path(path)
        if RunDir(p).is_run():
            if normalization is not None:
                raise ConfigError(
                    f"{p} is a run directory: it was trained with its own input normalisation",
                    "Drop --normalization; it applies to converted weights only.",
                )
            return cls.from_run(p, which)
        if not p.exists():
            raise MissingInputError(
                f"{p}: no such run or weights directory",
                "Pass a training --workdir or a folder written by tools/convert_checkpoint.py.",
            )
        return cls.from_weights(p, normalization or "unit")

    def with_params(self, params: Any) -> Predictor:
        """The same compiled forward pass over other parameters (e.g. the trainer's current)."""
        return dataclasses.replace(self, params=params)

    @property
    def image_size(self) -> int:
        return self.preprocessing.size

    # ------------------------------------------------------------------ forward passes
    def _padded(self, images: np.ndarray) -> tuple[jax.Array, int]:
        # Pad to a fixed multiple of the device count so each batch size compiles once.
        devices = self.mesh.size
        n = len(images)
        size = max(devices, -(-n // devices) * devices)
        stacked = np.zeros((size, *images.shape[1:]), np.uint8)
        stacked[:n] = images
        return jax.device_put(stacked, sharding.data_sharding(self.mesh)), n

    def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (N, H, W) images on this host -> probs, logits and features, float32 numpy."""
        batch, n = self._padded(np.asarray(images, np.uint8))
        out = self._forward(self.params, batch)
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def outputs_of_normalised(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The same forward pass on float (N, H, W, 3) inputs that are already normalised.

        For comparing features with another implementation fed identical tensors.
        """
        inputs = np.asarray(inputs, np.float32)
        if inputs.ndim != 4 or inputs.shape[-1] != 3:
            raise ConfigError(
                f"expected a normalised (N, H, W, 3) float32 batch, got shape {inputs.shape}",
                "Save the batch channels-last, or pass image files instead.",
            )
        out = self._forward_normalised(self.params, jnp.asarray(inputs))
        return {k: np.asarray(v) for k, v in out.items()}

    def heatmaps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, attention-rollout patch maps) of uint8 (N, H, W) images."""
        if self._heatmap is None:  # built on first use: not every model has a CLS to follow
            mean, std = jnp.asarray(self.mean), jnp.asarray(self.std)
            self._heatmap = jax.jit(steps.make_heatmap_step(self.model, mean, std))
        batch, n = self._padded(np.asarray(images, np.uint8))
        out = self._heatmap(self.params, batch)
        return np.asarray(out["probs"])[:n], np.asarray(out["heatmap"])[:n]

    def predict_split(
        self,
        info: shards.DatasetInfo,
        split: str,
        *,
        batch_size: int,
        label_indices: Sequence[int] | None = None,
        output_indices: Sequence[int] | None = None,
    ) -> Predictions:
        """Probabilities for every example of a prepared split, each exactly once.

        `label_indices` pick the dataset's label columns, `output_indices` the model outputs
        they are compared with (default: all, in order; external validation passes the labels
        both share). A label index of -1 marks a label the dataset lacks: it comes back masked
        (multi-source runs). Multi-host: every process reads its share; all receive the whole
        split.
        """
        if label_indices is None:
            label_indices = list(range(len(self.label_names)))
        outputs = list(range(len(self.label_names)) if output_indices is None else output_indices)
        rows = self.split_outputs(info, split, "probs", batch_size, label_indices)
        return Predictions(
            labels=rows["labels"],
            probs=rows["probs"][:, outputs],
            label_names=[self.label_names[i] for i in outputs],
            ids=rows["ids"],
            mask=rows["mask"],
            patients=rows["patients"],
        )

    def split_outputs(
        self,
        info: shards.DatasetInfo,
        split: str,
        output: str,
        batch_size: int,
        label_indices: Sequence[int],
    ) -> dict[str, np.ndarray]:
        """One forward output ("probs", "logits" or "features") of every example of a split,
        with its labels, mask, ids and patients (see `predict_split` for `label_indices`)."""
        if info.image_size != self.image_size:
            raise ConfigError(
                f"{info.directory} holds {info.image_size} px images; {self.source} takes "
                f"{self.image_size} px",
                f"Prepare the dataset with --size {self.image_size} (tools/prepare_data.py).",
            )
        present = [j for j, column in enumerate(label_indices) if column >= 0]
        rows: dict[str, list] = {
            k: [] for k in (output, "labels", "mask", "valid", "id", "patient")
        }
        data = sharding.data_sharding(self.mesh)
        batches = pipeline.eval_batches(
            info, split, batch_size=batch_size, label_indices=[label_indices[j] for j in present]
        )
        total = -(-info.splits[split]["num_examples"] // batch_size)
        for batch in console.progress(batches, total=total, desc=split, unit="batch", leave=False):
            image = jax.make_array_from_process_local_data(data, batch["image"])
            rows[output].append(_gather(self._forward(self.params, image)[output]))
            for key in ("labels", "mask", "valid"):
                rows[key].append(_gather(batch[key]))
            for key in ("id", "patient"):
                rows[key].append(_gather_strings(batch[key]))
        out = {k: np.concatenate(v) for k, v in rows.items()}
        valid = out["valid"]
        labels = np.zeros((int(valid.sum()), len(label_indices)), np.float32)
        mask = np.zeros(labels.shape, bool)
        labels[:, present], mask[:, present] = out["labels"][valid], out["mask"][valid]
        return {
            output: out[output][valid],
            "labels": labels,
            "mask": mask,
            "ids": out["id"][valid],
            "patients": out["patient"][valid],
        }


def read_radiographs(
    files: Sequence[str], options: PreprocessOptions, chunk: int
) -> Iterator[list[tuple[str, np.ndarray | ImageReadError]]]:
    """Raw files -> the uint8 images a predictor takes, `chunk` at a time, in input order.

    The same decoding and preprocessing as the data preparation (`load_radiograph` with the
    run's `PreprocessOptions`); an unreadable file comes back as its `ImageReadError`.
    """

    def read(path: str) -> np.ndarray | ImageReadError:
        try:
            return load_radiograph(path, options)
        except ImageReadError as e:
            return e

    # Decoding releases the GIL, so threads overlap it; reading one chunk at a time bounds
    # memory when a folder holds thousands of images.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), chunk):
            names = files[start : start + chunk]
            yield list(zip(names, pool.map(read, names), strict=True))


def _gather(x: np.ndarray | jax.Array) -> np.ndarray:
    """A process-local (or globally sharded) array, concatenated over processes."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _gather_strings(values: np.ndarray) -> np.ndarray:
    # Fixed-width bytes gather across processes; salted hashes are 16 ASCII characters.
    codes = np.frombuffer(values.astype("S16").tobytes(), np.uint8).reshape(-1, 16)
    return _gather(codes).view("S16")[:, 0].astype(str)
