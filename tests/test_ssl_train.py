"""End to end: an SSL run checkpoints, resumes bitwise, keeps the teacher the student's EMA, and
its run directory initialises fine-tuning and exports; the recipe config fails clearly."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cxrjax.engine import run as engine_run
from cxrjax.errors import Preempted
from cxrjax.ssl import trainer as ssl_trainer
from cxrjax.ssl.config import ssl_base_config

ROOT = Path(__file__).parents[1]


def _config(shards):
    c = ssl_base_config("ssl_test")
    c.data.dir = str(shards)
    c.model.variant, c.model.dtype, c.model.drop_path = "vit_tiny_demo", "float32", 0.1
    c.input.normalization = "zscore"
    c.crops.global_size, c.crops.local_size, c.crops.num_local = 32, 16, 2
    c.ssl.prototypes, c.ssl.head_hidden_dim, c.ssl.head_bottleneck_dim = 64, 32, 16
    c.ssl.warmup_epochs = c.ssl.teacher_temp_warmup_epochs = c.ssl.freeze_prototypes_epochs = 0.5
    c.ssl.epoch_length = 0  # one pass over the 54 training images per epoch
    c.batch_size, c.epochs = 8, 1
    c.log_every_steps = 1
    # Checkpoints at 3 and at the end, 6 and 7: two consecutive states for the EMA check.
    c.checkpoint_every_steps = 3
    return c


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """The straight, interrupted and resumed runs compile one program: compile it once."""
    from jax._src import compilation_cache

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    previous = {n: getattr(jax.config, n) for n in names}
    for name, value in zip(names, (str(tmp_path_factory.mktemp("xla")), 0, 0), strict=True):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def straight_run(tiny_shards, tmp_path_factory, compile_cache):
    workdir = tmp_path_factory.mktemp("ssl_straight")
    results = ssl_trainer.pretrain(_config(tiny_shards), workdir)
    return workdir, results


def _states(workdir):
    manager = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints")
    out = {}
    for step in manager.all_steps():
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        out[step] = restored["state"]
    return out


def test_resume_after_preemption_is_bitwise(tiny_shards, straight_run, tmp_path, monkeypatch):
    straight, results = straight_run
    assert results["steps"] == 7 and np.isfinite(results["final"]["loss"])

    class StopAtStep3(engine_run.Preemption):
        def should_stop(self, step):
            return step == 3

    monkeypatch.setattr(engine_run, "Preemption", StopAtStep3)
    with pytest.raises(Preempted):
        ssl_trainer.pretrain(_config(tiny_shards), tmp_path)
    monkeypatch.undo()
    ssl_trainer.pretrain(_config(tiny_shards), tmp_path)
    a, b = _states(straight)[7], _states(tmp_path)[7]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_teacher_is_the_ema_of_the_student(tiny_shards, straight_run):
    from cxrjax.ssl.schedules import make_schedules

    states = _states(straight_run[0])
    before, after = states[6], states[7]
    m = float(make_schedules(_config(tiny_shards).ssl, 7, 7).momentum(6))
    assert 0.99 < m < 1  # the last step still moves the teacher
    for name, teacher in after["teacher"].items():
        want = jax.tree.map(
            lambda t, s: m * t + (1 - m) * s, before["teacher"][name], after["student"][name]
        )
        for got, ref in zip(jax.tree.leaves(teacher), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)
    moved = [
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    ]
    assert any(moved)


def test_run_initialises_fine_tuning_and_exports(tiny_shards, straight_run, tmp_path, capsys):
    from configs.demo import get_config
    from cxrjax.engine import trainer
    from cxrjax.models.convert import convert_cxrjax_run, export_timm
    from cxrjax.models.weights import flatten

    workdir = straight_run[0]
    # tools/convert_checkpoint.py's path: best/ holds the teacher backbone.
    converted = convert_cxrjax_run(workdir)
    assert converted.variant == "vit_tiny_demo" and not converted.label_names
    teacher = _states(workdir)[7]["teacher"]["backbone"]
    for key, value in flatten(teacher).items():
        np.testing.assert_array_equal(flatten(converted.params)[key], value)

    out = export_timm(workdir, tmp_path / "model.safetensors")
    assert out.is_file() and out.with_suffix(".json").is_file()

    config = get_config()
    config.data.dir = str(tiny_shards)
    config.model.init_from = str(workdir)
    config.epochs, config.batch_size, config.eval_batch_size = 1, 8, 16
    config.warmup_steps = 1
    capsys.readouterr()
    results = trainer.train_and_evaluate(config, tmp_path / "finetune")
    printed = capsys.readouterr().out
    assert f"pretrained weights from {workdir}" in printed
    n_backbone = len(flatten(teacher))
    assert f"loaded: {n_backbone} arrays" in printed
    assert (
        "re-initialised head/kernel" in printed and "unused from checkpoint: dino_head/" in printed
    )
    assert np.isfinite(results["val"]["mean_auroc"])


def test_recipe_config_stops_clearly_without_data(tmp_path):
    env = dict(os.environ, CXRJAX_DATA=str(tmp_path), CXRJAX_WEIGHTS=str(tmp_path))
    command = [sys.executable, "-m", "cxrjax.main", "--workdir", str(tmp_path / "run")]
    command += ["--config", "configs/ssl_pretrain.py:init=dinov2,dataset=a+b"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "no prepared dataset" in proc.stderr and "prepare_data.py" in proc.stderr
