"""The predictions file: one `.npz` per evaluated split, written by the trainer or any other tool.

Keys: `labels` (N, L float, 0/1; any value where masked), `probs` (N, L float), optional `mask`
(N, L bool, True = label known), `label_names` (L str), `ids` (N str, salted hashes of image ids),
optional `patients` (N str, salted hashes of patient ids, for the patient-level bootstrap),
optional `model_label_names` (L str: the model output that scored each column, written by
external validation, where the columns carry the evaluated dataset's label names).
Strings are stored as fixed-width unicode arrays so the file loads with `allow_pickle=False`.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np

from cxrjax.errors import CxrjaxError

_REQUIRED = ("labels", "probs", "label_names", "ids")
_OPTIONAL = ("mask", "patients", "model_label_names")


class PredictionsError(CxrjaxError, ValueError):
    """A predictions file whose fields disagree or hold bad values; names the file."""


@dataclasses.dataclass
class Predictions:
    """Labels and predicted probabilities of one split, aligned by row.

    `mask=None` means every label is known, unless `labels` holds NaN: then NaN marks unknown.
    """

    labels: np.ndarray
    probs: np.ndarray
    label_names: list[str]
    ids: np.ndarray
    mask: np.ndarray | None = None
    patients: np.ndarray | None = None
    model_label_names: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.float64)
        self.probs = np.asarray(self.probs, dtype=np.float64)
        self.label_names = [str(n) for n in self.label_names]
        self.ids = np.asarray(self.ids).astype(str)
        if self.mask is None and np.isnan(self.labels).any():
            self.mask = ~np.isnan(self.labels)
        if self.mask is not None:
            self.mask = np.asarray(self.mask, dtype=bool)
        if self.patients is not None:
            self.patients = np.asarray(self.patients).astype(str)
        if self.model_label_names is not None:
            self.model_label_names = [str(n) for n in self.model_label_names]
        self.validate()

    @property
    def known(self) -> np.ndarray:
        """(N, L) bool, True where the label is known."""
        return np.ones(self.labels.shape, bool) if self.mask is None else self.mask

    def validate(self, source: str = "predictions") -> None:
        """Raise PredictionsError (a ValueError) naming `source` when fields disagree or are bad."""
        if self.labels.ndim != 2:
            raise PredictionsError(
                f"{source}: labels must be (N, L), got shape {self.labels.shape}"
            )
        n, num_labels = self.labels.shape
        if self.probs.shape != (n, num_labels):
            raise PredictionsError(
                f"{source}: probs shape {self.probs.shape} != labels shape {(n, num_labels)}"
            )
        if len(self.label_names) != num_labels:
            raise PredictionsError(
                f"{source}: {len(self.label_names)} label_names for {num_labels} label columns"
            )
        if len(set(self.label_names)) != num_labels:
            raise PredictionsError(f"{source}: label_names repeat a name: {self.label_names}")
        if self.ids.shape != (n,):
            raise PredictionsError(f"{source}: ids shape {self.ids.shape}, expected ({n},)")
        if len(np.unique(self.ids)) != n:
            raise PredictionsError(f"{source}: ids are not unique; each row must be one image")
        if self.mask is not None and self.mask.shape != (n, num_labels):
            raise PredictionsError(f"{source}: mask shape {self.mask.shape} != labels shape")
        if self.patients is not None and self.patients.shape != (n,):
            raise PredictionsError(
                f"{source}: patients shape {self.patients.shape}, expected ({n},)"
            )
        if self.model_label_names is not None and len(self.model_label_names) != num_labels:
            raise PredictionsError(
                f"{source}: {len(self.model_label_names)} model_label_names for {num_labels} "
                "label columns"
            )
        known = self.known
        if not np.all(np.isin(self.labels[known], (0.0, 1.0))):
            bad = np.unique(self.labels[known][~np.isin(self.labels[known], (0.0, 1.0))])[:5]
            raise PredictionsError(
                f"{source}: known labels must be 0 or 1, found {bad.tolist()}; binarise them or "
                "set mask False for unknown entries"
            )
        if not np.all(np.isfinite(self.probs[known])):
            raise PredictionsError(f"{source}: probs are NaN or inf where the label is known")


def save_predictions(path: str | os.PathLike, preds: Predictions) -> None:
    """Write `preds` to `path` (.npz, uncompressed) after validating it."""
    preds.validate(str(path))
    arrays = {
        "labels": preds.labels,
        "probs": preds.probs,
        "label_names": np.asarray(preds.label_names, dtype=str),
        "ids": preds.ids.astype(str),
    }
    if preds.mask is not None:
        arrays["mask"] = preds.mask
    if preds.patients is not None:
        arrays["patients"] = preds.patients.astype(str)
    if preds.model_label_names is not None:
        arrays["model_label_names"] = np.asarray(preds.model_label_names, dtype=str)
    # np.savez appends .npz to names lacking it; open the file ourselves so `path` is exact.
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_predictions(path: str | os.PathLike) -> Predictions:
    """Read and validate a predictions file; never unpickles.

    A file that is not a readable .npz (empty, truncated by an interrupted copy, another format)
    raises PredictionsError naming it, as a file with bad contents does.
    """
    unreadable = (
        f"{path}: not a readable predictions file (empty, truncated or not an .npz)",
        "Write it again (cxrjax.predict, or evaluate --workdir), or copy it again in full.",
    )
    with open(path, "rb") as f:
        # np.load reads a .npy or a pickle as readily as an .npz: insist on a zip archive.
        if not zipfile.is_zipfile(f):
            raise PredictionsError(*unreadable)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise PredictionsError(*unreadable) from e
    except ValueError as e:
        if "pickle" not in str(e):
            raise PredictionsError(*unreadable) from e
        raise PredictionsError(
            f"{path}: holds object arrays ({e}); store strings as str arrays, not objects"
        ) from e
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise PredictionsError(
            f"{path}: missing keys {missing}; a predictions file needs {list(_REQUIRED)} "
            f"and may hold {list(_OPTIONAL)}"
        )
    try:
        return Predictions(
            labels=arrays["labels"],
            probs=arrays["probs"],
            label_names=arrays["label_names"].tolist(),
            ids=arrays["ids"],
            mask=arrays.get("mask"),
            patients=arrays.get("patients"),
            model_label_names=(
                arrays["model_label_names"].tolist() if "model_label_names" in arrays else None
            ),
        )
    except ValueError as e:
        raise PredictionsError(f"{path}: {e}") from e


def concatenate(parts: list[Predictions]) -> Predictions:
    """Rows of several predictions sets with the same labels (e.g. every source's test split)."""
    names = parts[0].label_names
    if any(p.label_names != names for p in parts):
        raise PredictionsError(
            f"cannot pool predictions with different labels: {[p.label_names for p in parts]}"
        )
    patients = None
    if all(p.patients is not None for p in parts):
        patients = np.concatenate([p.patients for p in parts])
    return Predictions(
        labels=np.concatenate([p.labels for p in parts]),
        probs=np.concatenate([p.probs for p in parts]),
        label_names=names,
        ids=np.concatenate([p.ids for p in parts]),
        mask=np.concatenate([p.known for p in parts]),
        patients=patients,
    )
