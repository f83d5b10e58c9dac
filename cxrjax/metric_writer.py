"""Scalars to TensorBoard event files (the console shows progress and validation lines instead).

clu's `metric_writers` import TensorFlow at module import; cxrjax writes the same event files with
tensorboardX instead, so a CPU/GPU install stays free of TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
    """Writes on process 0 only; every process may call it."""

    def __init__(self, directory: str | Path):
        primary = jax.process_index() == 0
        self._writer = SummaryWriter(str(directory)) if primary else None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
