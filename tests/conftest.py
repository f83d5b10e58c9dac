"""Test-wide setup: 4 fake CPU devices, so sharded code runs as it would on 4 GPUs.

One persistent compilation cache per pytest run: most tests train the same tiny model on the
same shapes, in this process and in the subprocesses they start (which inherit the variables),
so each distinct program is compiled once per run instead of once per test. It starts empty,
so a run never depends on what an earlier one compiled.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="cxrjax-tests-jit-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

from absl import flags  # noqa: E402

# grain reads absl flags in worker processes; outside absl.app.run they must be marked parsed.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def write_tiny_raw_dataset(directory, n_images=90, size=40, seed=0):
    """PNG files whose label is visible (a bright square), as a RawTable with 2 labels + a mask."""
    from cxrjax.data.table import RawTable

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        square, stripe = rng.random() < 0.4, rng.random() < 0.5
        pixels = rng.integers(0, 60, (size, size + 4)).astype(np.uint8)
        if square:
            pixels[5:20, 5:20] = 230
        if stripe:
            pixels[:, -8:-4] = 200
        path = directory / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        rows.append(
            {
                "image_id": f"img{i:03d}",
                "path": str(path),
                "patient_id": f"patient{i // 2}",
                "split": "",
                "square": float(square),
                "stripe": np.nan if i % 10 == 0 else float(stripe),
            }
        )
    return RawTable("tiny", ["square", "stripe"], pd.DataFrame(rows))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Prepared shards of a 90-image dataset at 32 px (train/val/test, nested 0.5 subset)."""
    from cxrjax.data.images import PreprocessOptions
    from cxrjax.data.prepare import prepare_dataset

    raw = tmp_path_factory.mktemp("raw")
    out = tmp_path_factory.mktemp("shards")
    table = write_tiny_raw_dataset(raw)
    prepare_dataset(
        table,
        out,
        options=PreprocessOptions(size=32),
        val_fraction=0.2,
        test_fraction=0.2,
        train_fractions=(0.5,),
        seed=0,
        salt="test",
        workers=1,
    )
    return out


def assert_same_training(params_a, params_b, lr: float) -> None:
    """Two runs that saw the same batches and keys, up to all-reduce rounding.

    Adam turns rounding on near-zero gradients into steps of up to ~lr for a handful of
    elements; a real difference (other batches, other keys, a sharding bug) moves most of them.
    """
    import jax

    leaves = zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True)
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in leaves])
    assert (diffs > 1e-6).mean() < 0.01, f"{(diffs > 1e-6).mean():.2%} of elements differ"
    assert diffs.max() < lr, f"max difference {diffs.max()} exceeds one step ({lr})"
