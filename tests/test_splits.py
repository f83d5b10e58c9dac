import numpy as np
import pandas as pd
import pytest

from cxrjax.data import splits


def _frame(n_patients=200, per_patient=3, split=""):
    patients = np.repeat([f"P{i}" for i in range(n_patients)], per_patient)
    return pd.DataFrame({"patient_id": patients, "split": split})


def test_splits_are_patient_level_deterministic_and_sized():
    frame = _frame()
    a = splits.assign_splits(frame, seed=3, val_fraction=0.1, test_fraction=0.2)
    b = splits.assign_splits(frame, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert (a == b).all()
    per_patient = pd.DataFrame({"p": frame["patient_id"], "s": a}).groupby("p")["s"].nunique()
    assert (per_patient == 1).all()
    shares = a.value_counts(normalize=True)
    assert abs(shares["test"] - 0.2) < 0.07
    assert abs(shares["val"] - 0.08) < 0.05  # 10% of the remaining 80%
    c = splits.assign_splits(frame, seed=4, val_fraction=0.1, test_fraction=0.2)
    assert (a != c).any()


def test_official_splits_are_kept_and_val_is_carved_from_train():
    frame = _frame(split="train")
    frame.loc[frame.index[:30], "split"] = "test"
    out = splits.assign_splits(frame, seed=0, val_fraction=0.25, test_fraction=0.2)
    assert (out[:30] == "test").all()
    assert set(out[30:]) == {"train", "val"}


def test_train_subsets_are_nested_by_patient():
    patients = pd.Series(np.repeat([f"P{i}" for i in range(500)], 2))
    small = splits.train_subset_mask(patients, 0.1, seed=0)
    large = splits.train_subset_mask(patients, 0.5, seed=0)
    assert (large[small]).all()
    assert 0.05 < small.mean() < 0.15 and 0.4 < large.mean() < 0.6
    assert (small[0::2] == small[1::2]).all()  # both images of a patient together


def test_leakage_check_fails_loudly():
    hashes = pd.Series(["a", "a", "b"])
    splits.check_leakage(hashes, pd.Series(["train", "train", "test"]))
    with pytest.raises(splits.LeakageError, match="1 patients appear in more than one split"):
        splits.check_leakage(hashes, pd.Series(["train", "test", "test"]))


def test_salted_hash_hides_the_identifier():
    h = splits.salted_hash("patient-123", "salt")
    assert len(h) == 16 and "123" not in h
    assert h != splits.salted_hash("patient-123", "other salt")
