"""Coarse attributes (sex, age band, view): readers, preparation, subgroup AUROC."""

import csv
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from cxrjax import evaluate
from cxrjax.data import shards
from cxrjax.data.datasets import read_chestxray14, read_chexpert
from cxrjax.data.images import PreprocessOptions
from cxrjax.data.prepare import prepare_dataset
from cxrjax.data.table import ATTRIBUTES_FILE, RawTable, age_band, read_attributes
from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation import subgroups
from cxrjax.evaluation.predictions import Predictions, save_predictions
from tests.conftest import write_tiny_raw_dataset

METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "metadata"
needs_metadata = pytest.mark.skipif(not METADATA.is_dir(), reason="shared metadata absent")


def _band(text: str) -> str:
    """The age band by hand: decade of the integer age, 90 and over together."""
    try:
        age = int(float(text))
    except ValueError:
        return ""
    if age < 0 or age > 120:
        return ""
    return "90+" if age >= 90 else f"{age // 10 * 10}-{age // 10 * 10 + 9}"


def _rows(name: str, columns: list[str]) -> list[dict[str, str]]:
    with gzip.open(METADATA / name, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        index = [header.index(c) for c in columns]
        return [{c: row[i] for c, i in zip(columns, index, strict=True)} for row in reader]


def _counts(table: RawTable, name: str) -> Counter:
    return Counter(table.frame[name].tolist())


def test_age_band_edges():
    assert [age_band(a) for a in (0, 9.9, 10, 89, 90, 95, 120)] == [
        "0-9",
        "0-9",
        "10-19",
        "80-89",
        "90+",
        "90+",
        "90+",
    ]
    assert age_band(float("nan")) == "" and age_band(-1) == "" and age_band(414) == ""


@needs_metadata
def test_real_chestxray14_attribute_counts_equal_the_metadata():
    table = read_chestxray14(METADATA)
    assert table.attribute_names == ["sex", "age_band", "view"]
    rows = _rows("Data_Entry_2017_v2020.csv.gz", ["Patient Age", "Patient Gender", "View Position"])
    sexes = Counter({"M": "male", "F": "female"}.get(r["Patient Gender"], "") for r in rows)
    assert _counts(table, "sex") == sexes
    assert sexes["male"] == 63_340 and sexes["female"] == 48_780
    assert _counts(table, "age_band") == Counter(_band(r["Patient Age"]) for r in rows)
    views = Counter(r["View Position"] for r in rows)
    assert _counts(table, "view") == Counter({"PA": views["PA"], "AP": views["AP"]})
    assert views["PA"] == 67_310 and views["AP"] == 44_810


@needs_metadata
def test_real_chexpert_attribute_counts_equal_the_metadata():
    table = read_chexpert(METADATA, uncertain="mask")
    rows = [
        r
        for r in _rows("chexpert_train.csv.gz", ["Frontal/Lateral", "Sex", "Age", "AP/PA"])
        if r["Frontal/Lateral"] == "Frontal"
    ]
    sex = {"Male": "male", "Female": "female"}
    assert _counts(table, "sex") == Counter(sex.get(r["Sex"], "") for r in rows)
    assert _counts(table, "age_band") == Counter(_band(r["Age"]) for r in rows)
    view = {"AP": "AP", "PA": "PA", "LL": "lateral", "RL": "lateral"}
    assert _counts(table, "view") == Counter(view.get(r["AP/PA"], "") for r in rows)
    assert _counts(table, "view")["AP"] == 161_590 and _counts(table, "view")["lateral"] == 17


def _with_attributes(table: RawTable) -> RawTable:
    frame = table.frame.copy()
    n = len(frame)
    frame["sex"] = [("female", "male", "")[i % 3] for i in range(n)]
    frame["age_band"] = [("60-69", "90+")[i % 2] for i in range(n)]
    frame["view"] = ["PA" if i % 4 else "AP" for i in range(n)]
    return RawTable(table.name, table.label_names, frame)


def test_prepare_writes_attributes_by_hashed_id_and_nothing_without_them(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    table = _with_attributes(write_tiny_raw_dataset(raw, n_images=30))
    out = tmp_path / "with"
    options = PreprocessOptions(size=16)
    summary = prepare_dataset(table, out, options=options, seed=0, workers=1, salt="s")
    stored = json.loads((out / ATTRIBUTES_FILE).read_text())
    info = shards.load_info(out)
    from array_record.python import array_record_data_source as ards

    by_id = table.frame.set_index("image_id")
    from cxrjax.data.splits import salted_hash

    hash_to_image = {salted_hash(i, "s"): i for i in by_id.index}
    for split in ("train", "val", "test"):
        source = ards.ArrayRecordDataSource(info.files(split))
        ids = [shards.decode(source[i])["id"] for i in range(len(source))]
        assert list(stored["splits"][split]) == ids  # every image of the split, in shard order
        for h in ids:
            row = by_id.loc[hash_to_image[h]]
            want = {k: row[k] for k in ("sex", "age_band", "view") if row[k]}
            assert stored["splits"][split][h] == want
        assert summary["splits"][split]["attributes"]["view"] == dict(
            sorted(Counter(stored["splits"][split][h]["view"] for h in ids).items())
        )
    text = (out / ATTRIBUTES_FILE).read_text()
    assert "img0" not in text and "patient" not in text  # hashes only, no identifiers
    plain = tmp_path / "without"
    prepare_dataset(write_tiny_raw_dataset(raw, n_images=30), plain, options=options, workers=1)
    assert not (plain / ATTRIBUTES_FILE).exists() and read_attributes(plain) is None
    with pytest.raises(ValueError, match="column 'sex'"):
        frame = table.frame.assign(sex="F")
        RawTable("x", table.label_names, frame)


def _preds_and_attributes(n: int = 400):
    rng = np.random.default_rng(5)
    y = (rng.random((n, 2)) < 0.3).astype(float)
    sex = np.array([("female", "male")[i % 2] for i in range(n)])
    # The model is better on women: a subgroup gap to find.
    strength = np.where(sex == "female", 2.5, 0.8)[:, None]
    s = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + strength * y)))
    ids = [f"h{i:04x}" for i in range(n)]
    attributes = {h: {"sex": sx} for h, sx in zip(ids, sex, strict=True)}
    del attributes[ids[0]]["sex"]  # one image of unknown sex: in no subgroup
    preds = Predictions(y, s, ["a", "b"], ids, rng.random(y.shape) > 0.1)
    return preds, attributes, sex


def test_subgroup_auroc_equals_sklearn_on_the_subgroup_and_gap_is_max_minus_min():
    preds, attributes, sex = _preds_and_attributes()
    columns = subgroups.attribute_columns(preds, attributes)
    assert list(columns) == ["sex"] and columns["sex"][0] == ""
    counts = bs.resample_counts(len(preds.ids), 40, seed=2)
    got = subgroups.subgroup_report(preds, columns, counts)["sex"]
    point = {}
    for value in ("female", "male"):
        group = got["groups"][value]
        in_group = (sex == value) & (np.arange(len(sex)) > 0)
        assert group["n_cases"] == in_group.sum()
        for j, name in enumerate(preds.label_names):
            k = in_group & preds.mask[:, j]
            ref = skm.roc_auc_score(preds.labels[k, j], preds.probs[k, j])
            assert group["per_label"][name]["auroc"]["point"] == pytest.approx(ref, abs=1e-12)
            assert group["per_label"][name]["n_positive"] == preds.labels[k, j].sum()
            # Each resample scores the subgroup's cases with their counts in the shared resample.
            boot = []
            for r in range(40):
                idx = np.repeat(np.flatnonzero(k), counts[r, k])
                boot.append(skm.roc_auc_score(preds.labels[idx, j], preds.probs[idx, j]))
            stats = group["per_label"][name]["auroc"]
            assert stats["mean"] == pytest.approx(np.mean(boot), abs=1e-12)
            assert stats["sd"] == pytest.approx(np.std(boot, ddof=1), abs=1e-12)
            point[(value, name)] = ref
    for name in preds.label_names:
        gap = got["gap"][name]
        assert gap["point"] == pytest.approx(
            abs(point[("female", name)] - point[("male", name)]), abs=1e-12
        )
        assert gap["highest"] == "female" and gap["n_valid"] == 40
        assert gap["ci_low"] <= gap["point"] <= gap["ci_high"]


def test_cli_subgroups_reads_the_prepared_attributes(tmp_path, capsys):
    preds, attributes, _ = _preds_and_attributes()
    data = tmp_path / "data"
    data.mkdir()
    (data / ATTRIBUTES_FILE).write_text(json.dumps({"format": 1, "splits": {"test": attributes}}))
    path = tmp_path / "predictions_test.npz"
    save_predictions(path, preds)
    argv = ["evaluate", f"--predictions={path}", "--bootstrap=20", "--no-plots", "--subgroups"]
    assert evaluate.main([*argv, f"--data={data}"]) == 0
    js = json.loads((tmp_path / "metrics_test.json").read_text())
    assert set(js["subgroups"]["sex"]["groups"]) == {"female", "male"}
    assert js["subgroups"]["sex"]["gap"]["mean"]["point"] > 0
    assert evaluate.main(argv) == 2
    assert "needs --data" in capsys.readouterr().err
    assert evaluate.main([*argv, f"--data={tmp_path}"]) == 2
    assert "has no attributes.json" in capsys.readouterr().err
