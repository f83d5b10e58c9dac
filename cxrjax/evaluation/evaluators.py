"""Evaluators the trainer runs (big_vision's contract): `Evaluator(...).run(predictor)` yields
(name, value) pairs; a new metric is a new evaluator, not a change to the loop.

The one definition of a split's summary lives here: per-label AUROC over known labels, and the
mean AUROC over the labels that have both classes in the split (a label with one class has no
AUROC and is left out of the mean, as in `bootstrap.label_mean`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from cxrjax.data import shards
from cxrjax.engine.inference import Predictor
from cxrjax.evaluation.bootstrap import label_mean
from cxrjax.evaluation.metrics import auroc_per_label
from cxrjax.evaluation.predictions import Predictions


def summarize(preds: Predictions) -> dict[str, Any]:
    """{"mean_auroc", "auroc": {label: value}, "num_examples"} of one predictions set.

    Labels no example knows (a source of a multi-source run that lacks them) are left out.
    """
    known = preds.known.any(axis=0)
    if not known.all():
        preds = Predictions(
            labels=preds.labels[:, known],
            probs=preds.probs[:, known],
            label_names=[n for n, k in zip(preds.label_names, known, strict=True) if k],
            ids=preds.ids,
            mask=preds.known[:, known],
            patients=preds.patients,
        )
    aurocs = auroc_per_label(preds.labels, preds.probs, preds.mask, preds.label_names)
    defined = np.isfinite(aurocs)
    return {
        "mean_auroc": float(label_mean(aurocs, defined)) if defined.any() else float("nan"),
        "auroc": dict(zip(preds.label_names, map(float, aurocs), strict=True)),
        "num_examples": len(preds.ids),
    }


def format_line(split: str, summary: dict[str, Any]) -> str:
    """One console line: the mean and every label's AUROC."""
    labels = ", ".join(f"{k} {v:.3f}" for k, v in summary["auroc"].items())
    return f"{split} mean AUROC {summary['mean_auroc']:.4f} ({labels})"


@dataclasses.dataclass
class ClassificationEvaluator:
    """AUROC of a predictor on one split of a prepared dataset.

    `label_indices` are the dataset columns the predictor's outputs stand for. After `run`,
    `last_predictions` holds what was scored, for callers that save it.
    """

    info: shards.DatasetInfo
    split: str
    batch_size: int
    label_indices: Sequence[int]
    last_predictions: Predictions | None = None

    @property
    def name(self) -> str:
        return self.split

    def predictions(self, predictor: Predictor) -> Predictions:
        return predictor.predict_split(
            self.info, self.split, batch_size=self.batch_size, label_indices=self.label_indices
        )

    def run(self, predictor: Predictor) -> Iterator[tuple[str, float]]:
        self.last_predictions = self.predictions(predictor)
        summary = summarize(self.last_predictions)
        yield "mean_auroc", summary["mean_auroc"]
        for label, value in summary["auroc"].items():
            yield f"auroc/{label}", value
