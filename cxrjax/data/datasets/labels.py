"""The one label vocabulary of every dataset reader (torchxrayvision's `default_pathologies`).

Each dataset spells its findings its own way (ChestX-ray14 `Effusion`, CheXpert `Pleural
Effusion`, VinDr `Pleural effusion`); every reader stores the name from `CANONICAL`, so a model
trained on one dataset is evaluated on another by label name, and `relabel` lines up two label
lists and says which labels have no counterpart (torchxrayvision's `relabel_dataset`).

Findings that overlap without being the same label keep separate names: `nodule_mass` (VinDr,
PadChest: either finding) is neither `nodule` nor `mass`, VinDr's `pulmonary_fibrosis` is not
ChestX-ray14's `fibrosis`, and VinDr's `copd` (the diagnosis) is not PadChest's `copd_signs` (the
radiological signs). Pass `label_map` to `relabel` to pair such labels for one comparison.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

import numpy as np

from cxrjax.errors import ConfigError

# The seven labels of the study's MIMIC-CXR pretraining, in the study's order.
MIMIC_LABELS = (
    "cardiomegaly",
    "pleural_effusion",
    "pneumonia",
    "atelectasis",
    "no_finding",
    "consolidation",
    "pneumothorax",
)
CANONICAL: tuple[str, ...] = (
    *MIMIC_LABELS,
    # ChestX-ray14 (and CheXpert's edema).
    "edema",
    "emphysema",
    "fibrosis",
    "hernia",
    "infiltration",
    "mass",
    "nodule",
    "pleural_thickening",
    # CheXpert and MIMIC-CXR (the CheXpert labeler).
    "enlarged_cardiomediastinum",
    "lung_opacity",
    "lung_lesion",
    "pleural_other",
    "fracture",
    "support_devices",
    # PadChest.
    "scoliosis",
    "congestion",
    "aortic_elongation",
    "kyphosis",
    "copd_signs",
    "nodule_mass",
    # VinDr-CXR (Kaggle classes and the PhysioNet image labels).
    "aortic_enlargement",
    "calcification",
    "clavicle_fracture",
    "enlarged_pa",
    "ild",
    "lung_cavity",
    "lung_cyst",
    "mediastinal_shift",
    "other_lesion",
    "pulmonary_fibrosis",
    "rib_fracture",
    "copd",
    "lung_tumor",
    "tuberculosis",
    "other_diseases",
)

_CHESTXRAY14 = {  # `Finding Labels` codes
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Effusion": "pleural_effusion",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Hernia": "hernia",
    "Infiltration": "infiltration",
    "Mass": "mass",
    "No Finding": "no_finding",
    "Nodule": "nodule",
    "Pleural_Thickening": "pleural_thickening",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
}
_CHEXPERT = {  # CheXpert-labeler columns, shared by MIMIC-CXR-JPG
    "No Finding": "no_finding",
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung_opacity",
    "Lung Lesion": "lung_lesion",
    "Edema": "edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural_effusion",
    "Pleural Other": "pleural_other",
    "Fracture": "fracture",
    "Support Devices": "support_devices",
}
_PADCHEST = {  # `Labels` terms; the study's hernia and congestion are the one term with the word
    "normal": "no_finding",
    "cardiomegaly": "cardiomegaly",
    "pleural effusion": "pleural_effusion",
    "pneumonia": "pneumonia",
    "atelectasis": "atelectasis",
    "consolidation": "consolidation",
    "pneumothorax": "pneumothorax",
    "emphysema": "emphysema",
    "hiatal hernia": "hernia",
    "scoliosis": "scoliosis",
    "hilar congestion": "congestion",
    "aortic elongation": "aortic_elongation",
    "kyphosis": "kyphosis",
    "COPD signs": "copd_signs",
    "pleural thickening": "pleural_thickening",
    "infiltrates": "infiltration",
    "nodule": "nodule",
    "mass": "mass",
}
_VINDR = {  # Kaggle `class_name` and PhysioNet label columns
    "Aortic enlargement": "aortic_enlargement",
    "Atelectasis": "atelectasis",
    "Calcification": "calcification",
    "Cardiomegaly": "cardiomegaly",
    "Clavicle fracture": "clavicle_fracture",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Emphysema": "emphysema",
    "Enlarged PA": "enlarged_pa",
    "ILD": "ild",
    "Infiltration": "infiltration",
    "Lung Opacity": "lung_opacity",
    "Lung cavity": "lung_cavity",
    "Lung cyst": "lung_cyst",
    "Mediastinal shift": "mediastinal_shift",
    "Nodule/Mass": "nodule_mass",
    "Pleural effusion": "pleural_effusion",
    "Pleural thickening": "pleural_thickening",
    "Pneumothorax": "pneumothorax",
    "Pulmonary fibrosis": "pulmonary_fibrosis",
    "Rib fracture": "rib_fracture",
    "Other lesion": "other_lesion",
    "COPD": "copd",
    "Lung tumor": "lung_tumor",
    "Pneumonia": "pneumonia",
    "Tuberculosis": "tuberculosis",
    "Other disease": "other_diseases",
    "Other diseases": "other_diseases",
    "No finding": "no_finding",
}
_CXRJAX = {  # names earlier cxrjax versions wrote into shards
    "effusion": "pleural_effusion",
    "COPD_signs": "copd_signs",
    "infiltrates": "infiltration",
}
# Each dataset's own spelling -> canonical name; a spelling two datasets share ("No Finding")
# names the same finding in both. `canonical` ignores case and separators on top of these.
ALIASES: Mapping[str, str] = MappingProxyType(
    {**_CHESTXRAY14, **_CHEXPERT, **_PADCHEST, **_VINDR, **_CXRJAX}
)
# Named label sets; a reader offers each as the labels of the set it has, in the set's order.
SUBSETS: Mapping[str, tuple[str, ...]] = MappingProxyType({"mimic_shared": MIMIC_LABELS})


def normalise(name: str) -> str:
    """The lookup key of a label name: lower case, each run of other characters one '_'."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


_LOOKUP = {**{normalise(k): v for k, v in ALIASES.items()}, **{n: n for n in CANONICAL}}


def canonical(name: str) -> str | None:
    """The canonical name of a label in any dataset's spelling, or None when unknown.

    Case, spaces, hyphens, slashes and underscores do not matter: "Pleural Effusion",
    "pleural-effusion" and ChestX-ray14's "Effusion" all give "pleural_effusion".
    """
    return _LOOKUP.get(normalise(name))


def subsets_for(available: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Each of `SUBSETS` restricted to the labels in `available`, in the subset's order."""
    have = set(available)
    return {key: tuple(n for n in names if n in have) for key, names in SUBSETS.items()}


def _key(name: str) -> str:
    # Unknown names (a hospital's own column) still match across case and separators.
    return canonical(name) or normalise(name)


def _index_by_key(names: Sequence[str], side: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        key = _key(name)
        if key in index:
            raise ConfigError(
                f"{side} labels {names[index[key]]!r} and {name!r} both name {key!r}",
                f"keep one of them in the {side} label list",
            )
        index[key] = i
    return index


@dataclasses.dataclass(frozen=True)
class Relabeling:
    """How the label columns of `source` line up with the labels of `target` (see `relabel`).

    `indices[j]` is the column of `source` that holds `target[j]`, or None when no source label
    names that finding.
    """

    source: tuple[str, ...]
    target: tuple[str, ...]
    indices: tuple[int | None, ...]

    @property
    def matched(self) -> tuple[tuple[str, str], ...]:
        """(source name, target name) of each matched label, in target order."""
        pairs = zip(self.indices, self.target, strict=True)
        return tuple((self.source[i], t) for i, t in pairs if i is not None)

    @property
    def unmatched_source(self) -> tuple[str, ...]:
        """Source labels no target label takes (a model output the dataset cannot score)."""
        used = set(self.indices)
        return tuple(n for i, n in enumerate(self.source) if i not in used)

    @property
    def unmatched_target(self) -> tuple[str, ...]:
        """Target labels without a source column: `take` returns them masked."""
        return tuple(t for i, t in zip(self.indices, self.target, strict=True) if i is None)

    def take(
        self, values: np.ndarray, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Source columns -> target columns: (..., len(source)) -> (..., len(target)).

        values: labels or probabilities in source order (float; NaN = unknown).
        mask: True where a value is known; None takes every non-NaN value as known.
        Returns (values, mask) in target order as float; a target label without a source column
        is NaN with mask False, so metrics and losses skip it.
        """
        values = np.asarray(values)
        if values.shape[-1:] != (len(self.source),):
            raise ValueError(
                f"values have shape {values.shape}; the last axis must hold the "
                f"{len(self.source)} source labels {list(self.source)}"
            )
        floats = values.astype(np.result_type(values.dtype, np.float32))
        known = ~np.isnan(floats) if mask is None else np.asarray(mask, dtype=bool)
        if known.shape != values.shape:
            raise ValueError(f"mask has shape {known.shape}; values have {values.shape}")
        shape = (*values.shape[:-1], len(self.target))
        out = np.full(shape, np.nan, dtype=floats.dtype)
        out_mask = np.zeros(shape, dtype=bool)
        columns = [j for j, i in enumerate(self.indices) if i is not None]
        sources = [self.indices[j] for j in columns]
        out[..., columns] = floats[..., sources]
        out_mask[..., columns] = known[..., sources]
        return out, out_mask


def relabel(
    source: Sequence[str], target: Sequence[str], label_map: Mapping[str, str] | None = None
) -> Relabeling:
    """Lines up the labels of `source` (e.g. a model's outputs) with `target` (a dataset's labels).

    Labels match when they name the same finding: equal canonical names (any dataset's spelling
    works), or for names outside the vocabulary equal up to case and separators. `label_map`
    ({source name: target name}) pairs labels the vocabulary keeps apart, e.g.
    {"fibrosis": "pulmonary_fibrosis"}: a mapped source label matches that target name instead
    of its own. Both sides of `label_map` may use any spelling.

    Raises ConfigError when a `label_map` entry names no source or no target label, or when two
    labels of one side would match the same label.
    """
    source, target = tuple(source), tuple(target)
    by_source = _index_by_key(source, "source")
    by_target = _index_by_key(target, "target")
    key_of = {i: key for key, i in by_source.items()}
    for source_name, target_name in (label_map or {}).items():
        if _key(source_name) not in by_source:
            raise ConfigError(
                f"label_map key {source_name!r} is not a source label",
                f"use one of {list(source)}",
            )
        if _key(target_name) not in by_target:
            raise ConfigError(
                f"label_map maps {source_name!r} to {target_name!r}, which is not a target label",
                f"use one of {list(target)}",
            )
        key_of[by_source[_key(source_name)]] = _key(target_name)
    position: dict[str, int] = {}
    for i, key in sorted(key_of.items()):
        if key in position:
            raise ConfigError(
                f"source labels {source[position[key]]!r} and {source[i]!r} both match "
                f"target {target[by_target[key]]!r}",
                "change label_map so each target label gets one source label",
            )
        position[key] = i
    indices = tuple(position.get(_key(name)) for name in target)
    return Relabeling(source, target, indices)
