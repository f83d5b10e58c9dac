import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path, shards, *extra):
    return subprocess.run(
        [
            sys.executable,
            "tools/run_study.py",
            "--datasets",
            "csv",
            "--inits",
            "scratch",
            "--runs-dir",
            str(tmp_path / "runs"),
            *extra,
            f"--config.data.dir={shards}",
            "--config.model.variant=vit_tiny_demo",
            "--config.model.dtype=float32",
            "--config.epochs=1",
            "--config.batch_size=8",
            "--config.eval_batch_size=8",
            "--config.log_every_steps=2",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )


def test_study_lists_runs_then_skips_finished_ones(tiny_shards, tmp_path):
    listed = _study(tmp_path, tiny_shards)
    assert listed.returncode == 0, listed.stderr
    assert "pending  scratch csv fraction=1 seed=0" in listed.stdout

    ran = _study(tmp_path, tiny_shards, "--run")
    assert ran.returncode == 0, ran.stderr[-3000:]
    workdir = tmp_path / "runs" / "csv" / "scratch" / "fraction1" / "seed0"
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["test"]["auroc"]) == {"square", "stripe"}

    again = _study(tmp_path, tiny_shards, "--run")
    assert "done     scratch csv" in again.stdout
    assert "==> scratch" not in again.stdout


def test_study_plans_the_sup_med_chain(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import run_study

    jobs = run_study.plan(
        run_study.argparse.Namespace(
            runs_dir=str(tmp_path),
            inits=["sup_med"],
            datasets=["vindr"],
            fractions=[0.1],
            seeds=[0],
            overrides=[],
            cross_dataset=False,
        )  # fmt: skip
    )
    names = [j.name for j in jobs]
    assert names[0].startswith("sup_med pretrain") and names[1] == "sup_med convert"
    assert "configs/sup_med.py:stage=finetune,dataset=vindr,fraction=0.1,seed=0" in " ".join(
        jobs[2].command
    )


def test_cross_dataset_grid_tests_every_run_on_every_other_dataset(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import run_study

    jobs = run_study.plan(
        run_study.argparse.Namespace(
            runs_dir=str(tmp_path),
            inits=["scratch"],
            datasets=["chexpert", "vindr", "chestxray14"],
            fractions=[1.0],
            seeds=[0],
            overrides=[],
            cross_dataset=True,
        )
    )
    external = [j for j in jobs if " -> tested on " in j.name]
    assert len(external) == 3 * 2
    first = external[0]
    assert first.name == "scratch chexpert fraction=1 seed=0 -> tested on vindr"
    command = " ".join(first.command)
    assert "-m cxrjax.evaluate" in command and "--data=data/vindr" in command
    assert first.done_marker == (
        tmp_path / "chexpert/scratch/fraction1/seed0/external/vindr/predictions_test.npz"
    )
    assert first.status == "pending"
