"""2 processes x 2 devices through jax.distributed train exactly like 1 process x 4 devices."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp

from cxrjax import checkpoint, sharding, train
from tests.conftest import assert_same_training
from tests.test_train import _config

ROOT = Path(__file__).resolve().parents[1]

_WORKER = textwrap.dedent(
    """
    import sys
    import jax
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    sys.path.insert(0, {root!r})
    process_id, num_processes, port, workdir = (
        int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    )
    if num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{{port}}", num_processes=num_processes,
            process_id=process_id,
        )
    from cxrjax import train
    from tests.test_train import _config
    config = _config({shards!r}, epochs=2)
    config.model.dropout = 0.1  # the per-step dropout randomness must agree across hosts too
    config.lr = 1e-4
    train.train_and_evaluate(config, workdir)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(script, workdir, processes, devices_per_process):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "JAX_PLATFORMS": "cpu",
    }
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(processes), port, str(workdir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]


def _params(workdir, shards_dir):
    """The latest saved parameters, restored onto this process's devices (any saving topology)."""
    config = _config(shards_dir)
    model = train.build_model(config, 2, 32)
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))["params"]
    )
    mesh = sharding.make_mesh()
    target = checkpoint.abstract(shapes, sharding.state_shardings(shapes, mesh))
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        return ckpt.latest_step(), ckpt.restore_params("latest", target)
    finally:
        ckpt.close()


def test_two_hosts_match_one_host(tiny_shards, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=str(ROOT), shards=str(tiny_shards)))
    _run(script, tmp_path / "one", processes=1, devices_per_process=4)
    _run(script, tmp_path / "two", processes=2, devices_per_process=2)
    step_one, one = _params(tmp_path / "one", tiny_shards)
    step_two, two = _params(tmp_path / "two", tiny_shards)
    assert step_one == step_two > 0
    assert_same_training(one, two, lr=1e-4)
