"""Multi-crop batches: shapes, masks, determinism across process counts, exact resume; and
`tools/prepare_data.py --dataset folder` on a folder of unlabeled PNGs."""

import json

import jax
import numpy as np
from PIL import Image

from cxrjax.data import shards
from cxrjax.ssl import multicrop

OPTIONS = multicrop.CropOptions(global_size=32, local_size=16, num_local=3, patch_size=8)


def _loader(tiny_shards, **kw):
    loader, steps_per_epoch = multicrop.multicrop_loader(
        [shards.load_info(tiny_shards)], batch_size=8, seed=3, options=OPTIONS, threads=1, **kw
    )
    return loader, steps_per_epoch


def test_batches_have_crops_and_bounded_masks(tiny_shards):
    loader, steps_per_epoch = _loader(tiny_shards)
    batch = next(iter(loader))
    assert batch["global"].shape == (8, 2, 32, 32) and batch["global"].dtype == np.uint8
    assert batch["local"].shape == (8, 3, 16, 16)
    assert batch["mask"].shape == (8, 2, 16)
    assert batch["mask"].sum(-1).max() <= OPTIONS.max_masked
    assert batch["mask"].any()  # mask_prob 0.5 over 16 crops
    assert not np.array_equal(batch["global"][:, 0], batch["global"][:, 1])
    assert steps_per_epoch == shards.load_info(tiny_shards).splits["train"]["num_examples"] // 8


def test_same_batches_on_one_and_two_processes(tiny_shards, monkeypatch):
    loader, _ = _loader(tiny_shards)
    it = iter(loader)
    whole = [next(it) for _ in range(3)]
    halves = []
    for process in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda p=process: p)
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        loader, _ = _loader(tiny_shards)
        it = iter(loader)
        halves.append([next(it) for _ in range(3)])
    for step in range(3):
        for key in ("global", "local", "mask", "index"):
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])


def test_resumes_exactly_from_iterator_state(tiny_shards):
    loader, _ = _loader(tiny_shards)
    it = iter(loader)
    straight = [next(it) for _ in range(7)]  # crosses an epoch boundary (6 steps per epoch)
    it = iter(_loader(tiny_shards)[0])
    for _ in range(4):
        next(it)
    state = it.get_state()
    assert json.loads(state)["step"] == 4
    resumed = iter(_loader(tiny_shards)[0])
    resumed.set_state(state)
    for step in range(4, 7):
        batch = next(resumed)
        for key in ("global", "local", "mask", "index"):
            np.testing.assert_array_equal(batch[key], straight[step][key])


def test_prepare_folder_of_unlabeled_pngs(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tools"))
    import prepare_data

    raw = tmp_path / "raw"
    (raw / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = raw / "nested" if i % 2 else raw
        Image.fromarray(rng.integers(0, 255, (40, 36)).astype(np.uint8)).save(folder / f"{i}.png")
    (raw / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    argv = ["--dataset", "folder", "--raw", str(raw), "--out", str(out), "--size", "32"]
    argv += ["--val-fraction", "0", "--test-fraction", "0", "--workers", "1"]
    assert prepare_data.main(argv) == 0
    info = shards.load_info(out)
    assert info.label_names == [] and info.splits["train"]["num_examples"] == 10
    loader, _ = multicrop.multicrop_loader([info], batch_size=4, seed=0, options=OPTIONS, threads=1)
    assert next(iter(loader))["global"].shape == (4, 2, 32, 32)
    # Identifiers are hashed: no file name reaches the shards.
    import grain

    record = shards.decode(grain.sources.ArrayRecordDataSource(info.files("train"))[0])
    assert ".png" not in record["id"] and ".png" not in record["patient"]
    # Labels do not apply to an unlabeled folder.
    assert prepare_data.main([*argv[:6], "--labels", "a", "--out", str(tmp_path / "x")]) == 2
