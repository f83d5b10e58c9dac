"""Two real JAX processes (jax.distributed on localhost, 2 CPU devices each) share the input."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from cxrjax.data import pipeline, shards

BATCH = 8
STEPS = 9  # crosses the first epoch boundary (58 // 8 = 7 steps per epoch)

_WORKER = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np

    process_id, port, shards_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    batch_size, steps = int(sys.argv[5]), int(sys.argv[6])
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    from cxrjax import sharding
    from cxrjax.data import pipeline, shards

    info = shards.load_info(shards_dir)
    mesh = sharding.make_mesh()
    data = sharding.data_sharding(mesh)
    count = jax.jit(lambda v: jnp.sum(v.astype(jnp.int32)), out_shardings=sharding.replicated(mesh))
    result = {"devices": jax.device_count(), "eval_ids": [], "eval_counts": []}
    for batch in pipeline.eval_batches(info, "test", batch_size=batch_size, label_indices=[0, 1]):
        result["eval_ids"] += batch["id"][batch["valid"]].tolist()
        result["eval_counts"].append(int(count(pipeline.to_device(batch, data)["valid"])))
    loader = pipeline.train_loader(info, batch_size=batch_size, label_indices=[0, 1], seed=7)
    result["train"], result["rows"] = [], []

    def local_rows(x):
        parts = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
        return np.concatenate([np.asarray(s.data) for s in parts]).astype(np.int64)

    for (batch, _), _ in zip(pipeline.prefetch_to_device(iter(loader), data), range(steps)):
        assert batch["image"].shape[0] == batch_size  # a global array over both processes
        result["train"].append(local_rows(batch["image"]).sum(axis=(1, 2)).tolist())
        result["rows"].append(local_rows(batch["index"]).tolist())
    with open(out, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_count_every_eval_example_once_and_share_global_batches(
    tiny_shards, tmp_path
):
    info = shards.load_info(tiny_shards)
    n_test = info.splits["test"]["num_examples"]
    assert n_test % BATCH  # the last batch must need padding

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    port = str(_free_port())
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    args = [str(BATCH), str(STEPS)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, str(tiny_shards), str(outs[i]), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=240)[0] for w in workers]
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log[-3000:]
    results = [json.loads(out.read_text()) for out in outs]

    assert [r["devices"] for r in results] == [4, 4]
    # Evaluation: the same number of batches on both, each example counted exactly once.
    assert len(results[0]["eval_counts"]) == len(results[1]["eval_counts"])
    ids = results[0]["eval_ids"] + results[1]["eval_ids"]
    assert len(ids) == len(set(ids)) == n_test
    assert sum(results[0]["eval_counts"]) == n_test  # counted on the global device arrays
    assert results[0]["eval_counts"] == results[1]["eval_counts"]

    # Training: process 0 holds the first half of every global batch, process 1 the second,
    # and together they are exactly the one-process global batch, augmentation included.
    single = pipeline.train_loader(info, batch_size=BATCH, label_indices=[0, 1], seed=7)
    iterator = iter(single)
    for step in range(STEPS):
        expected = next(iterator)
        np.testing.assert_array_equal(
            results[0]["rows"][step] + results[1]["rows"][step], expected["index"]
        )
        sums = expected["image"].astype(np.int64).sum(axis=(1, 2)).tolist()
        assert results[0]["train"][step] + results[1]["train"][step] == sums
