"""The one small-sample rule: too few cases of a class, no AUROC.

A label (or a subgroup x label) with fewer than `min_positives` positives or `min_negatives`
negatives among its known cases gets no AUROC (nor AUPRC or the Youden-point metrics, which rank
the two classes against each other): it is reported with its counts, left out of the label mean
and of DeLong's total, and named on the console. With one positive an AUROC is the rank of one
case (0.12 or 0.98 by chance), its bootstrap interval is degenerate and DeLong's variance
undefined; one such label would move a label mean more than any real difference between models.
Calibration metrics (Brier, ECE) and the metrics at a fixed threshold stay per label, since
they are defined on either class alone, but do not enter the mean either.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cxrjax.errors import ConfigError

DEFAULT_MIN_PER_CLASS = 10


@dataclasses.dataclass(frozen=True)
class SampleRule:
    """Minimum positives and negatives a label needs for an AUROC."""

    min_positives: int = DEFAULT_MIN_PER_CLASS
    min_negatives: int = DEFAULT_MIN_PER_CLASS

    def __post_init__(self) -> None:
        # Two of each class is the least DeLong's variance (ddof 1 per class) can be computed on.
        if min(self.min_positives, self.min_negatives) < 2:
            raise ConfigError(
                f"the small-sample rule needs at least 2 cases of each class, got "
                f"{self.min_positives} positives / {self.min_negatives} negatives",
                "Pass --min-per-class 2 or more (default 10).",
            )

    @classmethod
    def per_class(cls, n: int) -> SampleRule:
        """The rule with the same minimum for both classes (the `--min-per-class` option)."""
        return cls(n, n)

    def class_counts(self, labels: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """((L,) positives, (L,) negatives) among the known cases of each label column."""
        positive = np.where(known, np.asarray(labels) == 1, False).sum(axis=0)
        return positive, np.asarray(known).sum(axis=0) - positive

    def passes(self, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        """(L,) bool: the labels with enough of both classes."""
        return (np.asarray(positives) >= self.min_positives) & (
            np.asarray(negatives) >= self.min_negatives
        )

    def reason(self, positives: int, negatives: int) -> str:
        """Why a label fails, e.g. 'only 1 positive (the rule needs 10 of each class)'."""
        positives, negatives = int(positives), int(negatives)
        parts = []
        if positives < self.min_positives:
            parts.append(f"{positives} positive{'s' * (positives != 1)}")
        if negatives < self.min_negatives:
            parts.append(f"{negatives} negative{'s' * (negatives != 1)}")
        need = (
            f"{self.min_positives} of each class"
            if self.min_positives == self.min_negatives
            else f"{self.min_positives} positives and {self.min_negatives} negatives"
        )
        return f"only {' and '.join(parts)} (the rule needs {need})"

    def to_json(self) -> dict[str, Any]:
        return {
            "min_positives": self.min_positives,
            "min_negatives": self.min_negatives,
            "statement": (
                f"a label (or subgroup x label) with fewer than {self.min_positives} positives or "
                f"{self.min_negatives} negatives gets no AUROC, AUPRC or Youden-point metrics and "
                "is left out of the label mean and of DeLong's total"
            ),
        }

    def excluded_json(
        self, names: list[str], positives: np.ndarray, negatives: np.ndarray
    ) -> dict[str, dict[str, Any]]:
        """{name: {"positive", "negative", "reason"}} of the labels that fail."""
        ok = self.passes(positives, negatives)
        return {
            name: {
                "positive": int(p),
                "negative": int(n),
                "reason": self.reason(int(p), int(n)),
            }
            for name, p, n, keep in zip(names, positives, negatives, ok, strict=True)
            if not keep
        }
