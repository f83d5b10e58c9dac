"""Runs survive SIGTERM and kill -9, and mismatched or concurrent runs are refused."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cxrjax.engine import trainer
from cxrjax.errors import NonFiniteError, RunDirError
from tests.test_train import _config

RUNNER = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    sys.path.insert(0, {root!r})
    from cxrjax import metric_writer
    from cxrjax.engine import trainer
    from cxrjax.errors import Preempted
    from tests.test_train import _config

    # Announce every logged step, so the test can interrupt at a known point.
    _scalars = metric_writer.MetricWriter.scalars
    def scalars(self, step, values):
        _scalars(self, step, values)
        print(f"[{{step}}]", flush=True)
    metric_writer.MetricWriter.scalars = scalars

    config = _config({shards!r}, epochs=4)
    config.checkpoint_every_steps = int(sys.argv[2])
    config.log_every_steps = 1
    try:
        trainer.train_and_evaluate(config, sys.argv[1])
    except Preempted as e:
        print(e, flush=True)
    """
)


def _final_params(workdir):
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(state=ocp.args.StandardRestore()),
    )
    return manager.latest_step(), restored["state"]["params"]


def test_sigterm_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tiny_shards, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "run.py"
    script.write_text(RUNNER.format(root=root, shards=str(tiny_shards)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    straight = tmp_path / "straight"
    subprocess.run(
        [sys.executable, str(script), str(straight), "1000"],
        check=True,
        env=env,
        capture_output=True,
    )

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(interrupted), "1000"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("[3]"):  # mid-epoch 1 (7 steps per epoch)
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=300) == 0
    assert "stopped at step" in out
    stopped_at = int(out.split("stopped at step ")[1].split(";")[0])
    resumed = subprocess.run(
        [sys.executable, str(script), str(interrupted), "1000"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert f"resumed from step {stopped_at}" in resumed.stdout

    step_a, params_a = _final_params(straight)
    step_b, params_b = _final_params(interrupted)
    assert step_a == step_b > stopped_at
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)


def test_repeated_kill_9_at_random_moments_still_completes(tiny_shards, tmp_path):
    """kill -9 mid-step, mid-save, mid-validation or mid-final-evaluation loses at most the
    steps since the last committed checkpoint: the same command resumes and finishes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "run.py"
    script.write_text(RUNNER.format(root=root, shards=str(tiny_shards)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workdir = tmp_path / "killed"
    rng = random.Random(0)
    command = [sys.executable, str(script), str(workdir), "3"]
    for _ in range(3):
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        kill_after = rng.randint(1, 6)  # logged steps into this attempt
        seen = 0
        for line in proc.stdout:
            seen += line.startswith("[")
            if seen >= kill_after:
                break
        # A random moment after that step: the next steps, a save, a validation, or the end.
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait(timeout=60)
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 4 * 7
    assert (workdir / "predictions_test.npz").is_file()
    assert not (workdir / "RUNNING").exists()


def test_interrupted_save_leaves_previous_checkpoint_usable(tiny_shards, tmp_path):
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(_config(tiny_shards, epochs=1), workdir)
    # What a kill -9 in the middle of an orbax save leaves behind: an uncommitted temp step.
    partial = workdir / "checkpoints" / "99.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "junk").write_text("half written")
    results = trainer.train_and_evaluate(_config(tiny_shards, epochs=2), workdir)
    assert results["steps"] > 0 and (workdir / "results.json").is_file()


def test_mismatched_checkpoint_and_concurrent_run_are_refused(tiny_shards, tmp_path):
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(_config(tiny_shards, epochs=1), workdir)
    other = _config(tiny_shards, epochs=2)
    other.data.labels = ("square",)
    with pytest.raises(RunDirError, match="label_names"):
        trainer.train_and_evaluate(other, workdir)

    (workdir / "RUNNING").write_text(f"{os.uname().nodename}:{os.getpid()}")
    with pytest.raises(RunDirError, match="in use by process"):
        trainer.train_and_evaluate(_config(tiny_shards, epochs=2), workdir)


def test_non_finite_loss_stops_naming_the_step(tiny_shards, tmp_path):
    config = _config(tiny_shards, epochs=1)
    config.lr = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient at step 2"):
        trainer.train_and_evaluate(config, tmp_path / "run")
