"""Real jax.distributed processes: 2 hosts train like 1, and a run resumes on another topology."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import assert_same_training
from tests.test_train import latest_params

ROOT = Path(__file__).resolve().parents[1]

_WORKER = textwrap.dedent(
    """
    import sys
    import jax
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    sys.path.insert(0, {root!r})
    process_id, num_processes, port, workdir, epochs, fsdp = (
        int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]),
        sys.argv[6] == "fsdp",
    )
    if num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{{port}}", num_processes=num_processes,
            process_id=process_id,
        )
    from cxrjax.engine import trainer
    from tests.test_train import _config
    config = _config({shards!r}, epochs=epochs)
    config.model.dropout = 0.1  # the per-step dropout randomness must agree across hosts too
    config.lr = 1e-4
    # Constant: a run stopped after epoch 1 of 1 and resumed for 2 then sees the schedule of
    # an uninterrupted 2-epoch run (warmup-cosine depends on the total step count).
    config.schedule = "constant"
    config.fsdp = fsdp
    trainer.train_and_evaluate(config, workdir)
    """
)


_SAVER = textwrap.dedent(
    """
    import sys
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, {root!r})
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"localhost:{{port}}", num_processes=2, process_id=process_id
    )
    from cxrjax.checkpoint import Checkpointer
    from cxrjax.run_dir import RunDir
    replicated = jax.sharding.NamedSharding(
        jax.make_mesh((jax.device_count(),), ("data",)), jax.sharding.PartitionSpec()
    )
    state = {{"w": jax.device_put(jnp.ones((64, 64)), replicated)}}
    checkpointer = Checkpointer(RunDir(workdir))
    for step in range(1, 9):
        checkpointer.save(step, state, b'{{"step": 0}}')
        checkpointer.save_best(step, state, float(step))
    checkpointer.wait()
    checkpointer.close()
    """
)


def test_latest_and_best_saves_of_one_step_do_not_share_a_barrier(tmp_path):
    """Both managers commit step N at once; one shared barrier name failed or hung at step 2."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER.format(root=str(ROOT)))
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, str(tmp_path / "run")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert sorted(int(d.name) for d in (tmp_path / "run" / "checkpoints").iterdir()) == [6, 7, 8]
    assert [d.name for d in (tmp_path / "run" / "best").iterdir()] == ["8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(script, workdir, processes, devices_per_process, epochs=2, fsdp=False):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "JAX_PLATFORMS": "cpu",
    }
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(i),
                str(processes),
                port,
                str(workdir),
                str(epochs),
                "fsdp" if fsdp else "dp",
            ],
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
    return outputs[0]


def test_two_hosts_match_one_host_and_resume_on_another_topology(tiny_shards, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=str(ROOT), shards=str(tiny_shards)))
    _run(script, tmp_path / "one", processes=1, devices_per_process=4)
    _run(script, tmp_path / "two", processes=2, devices_per_process=2)
    step_one, one = latest_params(tmp_path / "one")
    step_two, two = latest_params(tmp_path / "two")
    assert step_one == step_two > 0
    assert_same_training(one, two, lr=1e-4)

    # Epoch 1 on 2 processes x 2 devices (data parallel), epoch 2 resumed on 1 process x 2
    # devices with FSDP: the shared iterator state and topology-free restore continue the run
    # at the same global step with the same batches as the uninterrupted 1-process run.
    resized = tmp_path / "resized"
    _run(script, resized, processes=2, devices_per_process=2, epochs=1)
    first_step, _ = latest_params(resized)
    out = _run(script, resized, processes=1, devices_per_process=2, epochs=2, fsdp=True)
    assert f"resumed from step {first_step}" in out
    step_resized, params = latest_params(resized)
    assert step_resized == step_one
    assert_same_training(one, params, lr=1e-4)
