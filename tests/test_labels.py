"""The shared label vocabulary: canonical names, each dataset's aliases, subsets, relabelling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrjax.data import shards
from cxrjax.data.datasets import _common, chestxray14, chexpert, padchest, vindr
from cxrjax.data.datasets import labels as vocab
from cxrjax.data.datasets.labels import (
    ALIASES,
    CANONICAL,
    MIMIC_LABELS,
    SUBSETS,
    canonical,
    relabel,
    subsets_for,
)
from cxrjax.errors import ConfigError
from tests.test_datasets import VINDR_COLUMNS

# --- canonical() -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("Pleural Effusion", "pleural_effusion"),
        ("pleural-effusion", "pleural_effusion"),
        ("PLEURAL_EFFUSION", "pleural_effusion"),
        (" effusion ", "pleural_effusion"),
        ("Effusion", "pleural_effusion"),
        ("Nodule/Mass", "nodule_mass"),
        ("nodule mass", "nodule_mass"),
        ("normal", "no_finding"),
        ("No Finding", "no_finding"),
        ("COPD signs", "copd_signs"),
        ("COPD_signs", "copd_signs"),
        ("Pulmonary fibrosis", "pulmonary_fibrosis"),
        ("Fibrosis", "fibrosis"),
        ("infiltrates", "infiltration"),
        ("hiatal hernia", "hernia"),
        ("Other disease", "other_diseases"),
    ],
)
def test_canonical_ignores_case_and_separators(spelling, expected):
    assert canonical(spelling) == expected


@pytest.mark.parametrize("name", ["tumour", "", "effusions", "pleural", "covid19"])
def test_canonical_is_none_for_unknown_names(name):
    assert canonical(name) is None


def test_vocabulary_is_consistent():
    assert len(set(CANONICAL)) == len(CANONICAL)
    # Canonical names are their own lookup key, so they are stored exactly as listed.
    assert all(vocab.normalise(n) == n and canonical(n) == n for n in CANONICAL)
    assert set(ALIASES.values()) <= set(CANONICAL)
    # No two spellings that differ only in case or separators name different findings.
    assert {k: canonical(k) for k in ALIASES} == dict(ALIASES)


def test_overlapping_findings_stay_apart():
    assert len({canonical(n) for n in ("nodule", "mass", "Nodule/Mass")}) == 3
    assert canonical("Fibrosis") != canonical("Pulmonary fibrosis")
    assert canonical("COPD") != canonical("COPD signs")


# --- each dataset's spellings ------------------------------------------------------------------


def test_chestxray14_codes_are_aliases():
    for name, code in chestxray14.CODES.items():
        assert ALIASES[code] == name == canonical(code)
    assert ALIASES["Effusion"] == "pleural_effusion"
    assert ALIASES["Pleural_Thickening"] == "pleural_thickening"


def test_chexpert_columns_are_aliases():
    for name, column in chexpert.COLUMNS.items():
        assert ALIASES[column] == name == canonical(column)
    assert ALIASES["Pleural Effusion"] == "pleural_effusion"
    assert ALIASES["No Finding"] == "no_finding"


def test_padchest_terms_are_aliases():
    for name, terms in padchest.TERMS.items():
        assert canonical(name) == name
        # A label read from one term is that term's finding; nodule_mass reads two findings.
        if len(terms) == 1:
            assert ALIASES[terms[0]] == name
    assert ALIASES["normal"] == "no_finding" and ALIASES["COPD signs"] == "copd_signs"


@pytest.mark.parametrize("columns", [vindr.KAGGLE_CLASSES, VINDR_COLUMNS])
def test_vindr_classes_are_aliases(columns):
    names = [canonical(c) for c in columns]
    assert None not in names and len(set(names)) == len(names)
    assert ALIASES["Nodule/Mass"] == "nodule_mass"
    assert ALIASES["Pulmonary fibrosis"] == "pulmonary_fibrosis"


@pytest.mark.parametrize(
    "names",
    [
        chestxray14.STUDY_LABELS,
        chexpert.STUDY_LABELS,
        padchest.STUDY_LABELS,
        vindr.STUDY_LABELS,
        tuple(chestxray14.CODES),
        tuple(chexpert.COLUMNS),
    ],
)
def test_every_reader_label_is_canonical(names):
    assert set(names) <= set(CANONICAL)


# --- subsets -----------------------------------------------------------------------------------


def test_mimic_shared_is_defined_once():
    assert SUBSETS["mimic_shared"] == MIMIC_LABELS
    assert MIMIC_LABELS == (
        "cardiomegaly",
        "pleural_effusion",
        "pneumonia",
        "atelectasis",
        "no_finding",
        "consolidation",
        "pneumothorax",
    )
    assert not hasattr(_common, "MIMIC_LABELS")
    for reader in (chestxray14, chexpert, padchest):
        assert reader.SUBSETS == {"mimic_shared": MIMIC_LABELS}, reader.__name__


def test_subsets_keep_what_a_dataset_has_in_subset_order():
    kaggle = [canonical(c) for c in vindr.KAGGLE_CLASSES]
    assert subsets_for(kaggle)["mimic_shared"] == tuple(n for n in MIMIC_LABELS if n != "pneumonia")
    assert subsets_for(reversed(MIMIC_LABELS))["mimic_shared"] == MIMIC_LABELS
    assert subsets_for([])["mimic_shared"] == ()


def test_select_labels_resolves_spellings_and_lists_available():
    kwargs = dict(default=("cardiomegaly",), subsets={}, dataset="nih")
    available = chestxray14.STUDY_LABELS
    chosen = _common.select_labels(["Effusion", "cardiomegaly"], available=available, **kwargs)
    assert chosen == ["pleural_effusion", "cardiomegaly"]
    with pytest.raises(ConfigError, match=r"\['Tumour'\]\navailable: \[.*'pleural_effusion'"):
        _common.select_labels(["Tumour"], available=available, **kwargs)
    # A known finding the dataset lacks is reported as the user spelt it.
    with pytest.raises(ConfigError, match=r"\['Fracture'\]"):
        _common.select_labels(["Fracture"], available=available, **kwargs)
    with pytest.raises(ConfigError, match="repeats"):
        _common.select_labels(["effusion", "pleural_effusion"], available=available, **kwargs)


# --- relabel() ---------------------------------------------------------------------------------

NIH = ["cardiomegaly", "effusion", "hernia", "fibrosis"]
VINDR = ["Pleural effusion", "Pulmonary fibrosis", "Cardiomegaly", "Rib fracture"]


def test_relabel_matches_by_finding_across_spellings():
    r = relabel(NIH, VINDR)
    assert r.indices == (1, None, 0, None)
    assert r.matched == (("effusion", "Pleural effusion"), ("cardiomegaly", "Cardiomegaly"))
    assert r.unmatched_source == ("hernia", "fibrosis")
    assert r.unmatched_target == ("Pulmonary fibrosis", "Rib fracture")
    assert r.source == tuple(NIH) and r.target == tuple(VINDR)


def test_relabel_take_reorders_and_masks_unmatched():
    r = relabel(NIH, VINDR)
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    values, mask = r.take(probs)
    np.testing.assert_array_equal(values, [[0.2, np.nan, 0.1, np.nan], [0.6, np.nan, 0.5, np.nan]])
    np.testing.assert_array_equal(mask, [[True, False, True, False]] * 2)
    labels = np.array([[1, np.nan, 0, 1]], np.float32)
    known = np.array([[True, False, False, True]])
    values, mask = r.take(labels, known)
    np.testing.assert_array_equal(values, [[np.nan, np.nan, 1, np.nan]])
    np.testing.assert_array_equal(mask, [[False, False, True, False]])
    # No mask: NaN is unknown. Integer labels come back as float so NaN fits.
    values, mask = r.take(np.array([1, 0, 1, 1]))
    assert values.dtype.kind == "f" and mask.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="4 source labels"):
        r.take(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="mask has shape"):
        r.take(probs, known)


def test_relabel_label_map_pairs_findings_kept_apart():
    r = relabel(NIH, VINDR, label_map={"Fibrosis": "pulmonary-fibrosis"})
    assert r.indices == (1, 3, 0, None)
    assert ("fibrosis", "Pulmonary fibrosis") in r.matched
    assert r.unmatched_source == ("hernia",) and r.unmatched_target == ("Rib fracture",)
    values, mask = r.take(np.array([[0.1, 0.2, 0.3, 0.4]]))
    np.testing.assert_allclose(values[:, :3], [[0.2, 0.4, 0.1]])


def test_relabel_unknown_names_match_up_to_case():
    r = relabel(["Healthy", "covid-19"], ["covid_19", "healthy", "tb"])
    assert r.indices == (1, 0, None)


@pytest.mark.parametrize(
    ("source", "target", "label_map", "match"),
    [
        (NIH, VINDR, {"tumour": "Rib fracture"}, r"label_map key 'tumour' is not a source label"),
        (NIH, VINDR, {"hernia": "kyphosis"}, r"'kyphosis', which is not a target label"),
        (NIH, VINDR, {"hernia": "cardiomegaly"}, r"'cardiomegaly' and 'hernia' both match"),
        (["effusion", "Pleural Effusion"], VINDR, None, r"source labels .* both name"),
        (NIH, ["nodule", "Nodule", "mass"], None, r"target labels 'nodule' and 'Nodule'"),
    ],
)
def test_relabel_refuses_what_cannot_be_matched(source, target, label_map, match):
    with pytest.raises(ConfigError, match=match) as info:
        relabel(source, target, label_map)
    assert isinstance(info.value, ValueError) and info.value.fix


# --- old shards --------------------------------------------------------------------------------


def _info_file(directory, label_names):
    directory.mkdir()
    info = {
        "name": "chestxray14",
        "label_names": label_names,
        "image_size": 32,
        "splits": {"train": {"files": ["train-00000-of-00001.array_record"], "num_examples": 4}},
        "pos_weight": [float(i + 1) for i in range(len(label_names))],
        "train_fractions": {},
        "preprocessing": {"size": 32},
    }
    (directory / shards.INFO_FILE).write_text(json.dumps(info))
    return directory


def test_old_shard_names_load_canonical_in_stored_order(tmp_path):
    stored = ["cardiomegaly", "effusion", "COPD_signs", "infiltrates", "Healthy"]
    info = shards.load_info(_info_file(tmp_path / "old", stored))
    assert info.label_names == [
        "cardiomegaly",
        "pleural_effusion",
        "copd_signs",
        "infiltration",
        "Healthy",
    ]
    assert info.pos_weight == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert info.label_indices(["pleural_effusion", "cardiomegaly"]) == [1, 0]


def test_old_shard_names_that_would_collide_stay_as_stored(tmp_path):
    stored = ["effusion", "pleural_effusion"]
    assert shards.load_info(_info_file(tmp_path / "both", stored)).label_names == stored
