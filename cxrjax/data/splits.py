"""Patient-level splits, nested label-efficiency subsets, identifier hashing and the leakage check.

Every split decision is a pure function of (seed, raw patient id), so a re-run of the preparation
gives the same splits whatever the salt, and subsets for smaller training fractions are nested:
a patient in the 1% subset is in the 10% subset because both keep patients with a draw below the
fraction.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from cxrjax.errors import ConfigError, CxrjaxError


class LeakageError(CxrjaxError, RuntimeError):
    """A patient appears in more than one split."""


def salted_hash(value: str, salt: str) -> str:
    """The only form in which an identifier leaves the raw data: 16 hex chars of sha256."""
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]


def _uniform(values: pd.Series, seed: int, purpose: str) -> np.ndarray:
    """A deterministic draw in [0, 1) per value, independent between purposes."""
    out = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        digest = hashlib.sha256(f"{purpose}:{seed}:{value}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "little") / 2.0**64
    return out


def assign_splits(
    frame: pd.DataFrame, *, seed: int, val_fraction: float, test_fraction: float
) -> pd.Series:
    """Returns the split of every row: official splits kept, the rest assigned per patient.

    Rows whose `split` is "" are divided into train/val/test by patient; rows marked "train"
    without an official validation split give `val_fraction` of their patients to "val".
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1:
        raise ConfigError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must lie in [0, 1)"
        )
    split = frame["split"].astype(str).copy()
    patients = pd.Series(frame["patient_id"].astype(str).unique())
    draw = dict(zip(patients, _uniform(patients, seed, "split"), strict=True))
    u = frame["patient_id"].astype(str).map(draw).to_numpy()

    unassigned = (split == "").to_numpy()
    split[unassigned & (u < test_fraction)] = "test"
    # Rescale the remaining draw so the validation share is a fraction of the training pool.
    rest = unassigned & (u >= test_fraction)
    split[rest] = "train"
    u_train = np.where(unassigned, (u - test_fraction) / max(1 - test_fraction, 1e-12), u)
    has_official_val = (frame["split"] == "val").any()
    if not has_official_val:
        split[((split == "train").to_numpy()) & (u_train < val_fraction)] = "val"
    return split


def train_subset_mask(patient_ids: pd.Series, fraction: float, *, seed: int) -> np.ndarray:
    """Rows of the training split kept at `fraction`, nested across fractions, by patient."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"train fraction {fraction} must lie in (0, 1]")
    patients = pd.Series(patient_ids.astype(str).unique())
    draw = dict(zip(patients, _uniform(patients, seed, "fraction"), strict=True))
    return patient_ids.astype(str).map(draw).to_numpy() < fraction


def check_leakage(patient_hashes: pd.Series, split: pd.Series) -> None:
    """Fails loudly if any patient has images in two splits."""
    per_patient = pd.DataFrame({"p": patient_hashes.to_numpy(), "s": split.to_numpy()})
    counts = per_patient.groupby("p")["s"].nunique()
    leaked = counts[counts > 1]
    if len(leaked):
        example = leaked.index[0]
        splits = sorted(per_patient.loc[per_patient["p"] == example, "s"].unique())
        raise LeakageError(
            f"{len(leaked)} patients appear in more than one split (e.g. hashed patient "
            f"{example} in {splits}). The official split puts one patient in two splits or the "
            "patient ids are wrong: fix the label file, or prepare without the official split "
            "(tools/prepare_data.py --no-official-split)."
        )
