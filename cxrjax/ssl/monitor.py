"""Watching a pretraining run: collapse warnings from the step's metrics, and a kNN AUROC of the
teacher's features on a labelled split.

The loss of DINOv2 says little about whether the features improve (it rises while the teacher
temperature warms up), so the trainer logs what does: the teacher's entropy and prototype usage
every logging step (`objective.collapse_stats`), and every `ssl.knn_every_steps` a weighted kNN
classifier (DINO's evaluation: cosine similarity, the k nearest neighbours voting with weight
exp(sim / T)) over the teacher's normed CLS features of a labelled split. Each image is scored by
its neighbours from other patients only (leave-one-patient-out), so one labelled split is enough
and a patient's other radiographs do not inflate the score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import jax
import numpy as np
from jax.experimental import multihost_utils

from cxrjax import sharding
from cxrjax.data import pipeline, shards
from cxrjax.engine import step as steps
from cxrjax.evaluation.metrics import auroc_per_label

# Teacher entropy (as a fraction of log K) above which its outputs are nearly uniform, and
# prototype usage below which nearly every image picks the same prototype.
ENTROPY_COLLAPSE = 0.98
USAGE_COLLAPSE = 0.05


def collapse_warning(scalars: dict[str, float]) -> str | None:
    """A warning line when the logged teacher statistics show a collapse, else None."""
    entropy, usage = scalars.get("teacher_entropy"), scalars.get("prototype_usage")
    if entropy is not None and entropy > ENTROPY_COLLAPSE:
        return (
            f"warning: the teacher's outputs are nearly uniform (entropy {entropy:.3f} of log K): "
            "collapse; lower ssl.lr or raise ssl.teacher_temp_warmup_epochs"
        )
    if usage is not None and usage < USAGE_COLLAPSE:
        return (
            f"warning: the teacher uses {usage:.1%} of the prototypes over the batch: collapse "
            "onto a few prototypes; lower ssl.lr or check the centring (ssl.sinkhorn_iterations)"
        )
    return None


def knn_scores(
    features: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """(N, L) kNN scores: per image the exp(sim / T)-weighted label mean of its k most similar
    images of other patients (features L2-normalised, similarity the cosine)."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    sim[patients[:, None] == patients[None, :]] = -np.inf
    k = min(k, len(x) - 1)
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
    weights = np.where(np.isfinite(weights), weights, 0.0)
    votes = np.einsum("nk,nkl->nl", weights, labels[nearest])
    return votes / np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)


class KnnEvaluator:
    """teacher backbone params -> {"knn_mean_auroc", "knn_auroc/<label>"} on one labelled split.

    The split's images are read once and kept on the host (a validation split); each call embeds
    them with the current teacher through one jitted forward.
    """

    def __init__(
        self,
        model: Any,
        info: shards.DatasetInfo,
        split: str,
        *,
        image_size: int,
        mean: jax.Array,
        std: jax.Array,
        mesh: jax.sharding.Mesh,
        batch_size: int = 256,
        k: int = 20,
        temperature: float = 0.07,
    ):
        self.label_names = list(info.label_names)
        self._k, self._temperature = k, temperature
        self._sharding = sharding.data_sharding(mesh)
        batch_size = max(batch_size // jax.device_count(), 1) * jax.device_count()
        self._batches, labels, masks, patients = [], [], [], []
        for batch in pipeline.eval_batches(
            info, split, batch_size=batch_size, label_indices=range(len(self.label_names))
        ):
            if info.image_size != image_size:
                # The crops' resolution; INTER_AREA antialiases when shrinking.
                batch["image"] = np.stack(
                    [
                        cv2.resize(im, (image_size, image_size), interpolation=cv2.INTER_AREA)
                        for im in batch["image"]
                    ]
                )
            self._batches.append({"image": batch["image"], "valid": batch["valid"]})
            labels.append(batch["labels"])
            masks.append(batch["mask"])
            patients.append(batch["patient"])
        valid = np.concatenate([b["valid"] for b in self._batches])
        self._labels = np.concatenate(labels)[valid]
        self._mask = np.concatenate(masks)[valid]
        self._patients = np.concatenate(patients)[valid]
        self.size = int(valid.sum())
        predict = steps.make_predict_step(model, mean, std)
        self._forward = jax.jit(lambda p, im: predict(p, im)["features"])

    def features(self, params: Any) -> np.ndarray:
        out, valid = [], []
        for batch in self._batches:
            images = pipeline.to_device({"image": batch["image"]}, self._sharding)["image"]
            out.append(multihost_utils.process_allgather(self._forward(params, images), True))
            valid.append(multihost_utils.process_allgather(batch["valid"], tiled=True))
        return np.concatenate(out)[np.concatenate(valid)]

    def __call__(self, params: Any) -> dict[str, float]:
        # Every process embeds its share; the kNN itself is small and runs on each host alike.
        features = self.features(params)
        scores = knn_scores(
            features,
            self._labels * self._mask,
            self._patients,
            k=self._k,
            temperature=self._temperature,
        )
        aurocs = auroc_per_label(self._labels, scores, self._mask, self.label_names)
        out = {"knn_mean_auroc": float(np.nanmean(aurocs))}
        out.update(
            {f"knn_auroc/{n}": float(a) for n, a in zip(self.label_names, aurocs, strict=True)}
        )
        return out


def evaluator_for(
    config: Any,
    model: Any,
    infos: list[shards.DatasetInfo],
    mean: jax.Array,
    std: jax.Array,
    mesh: jax.sharding.Mesh,
) -> Callable[[Any], dict[str, float]] | None:
    """The kNN evaluator of `config.ssl.knn_*`, or None when off or no source has that split
    with labels (then a console line says so)."""
    s = config.ssl
    if not s.knn_every_steps:
        return None
    for info in infos:
        if info.label_names and info.splits.get(s.knn_split, {}).get("num_examples"):
            return KnnEvaluator(
                model,
                info,
                s.knn_split,
                image_size=config.crops.global_size,
                mean=mean,
                std=std,
                mesh=mesh,
                k=s.knn_k,
                temperature=s.knn_temperature,
            )
    return None
