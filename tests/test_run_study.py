import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
            grid="single",
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
            grid="single",
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


def _namespace(tmp_path, **kw):
    sys.path.insert(0, str(ROOT / "tools"))
    import run_study

    base = dict(
        runs_dir=str(tmp_path), inits=["scratch"], datasets=["chexpert", "vindr", "mimic"],
        fractions=[1.0], seeds=[0], overrides=[], cross_dataset=False, grid="single",
    )  # fmt: skip
    return run_study, run_study.argparse.Namespace(**{**base, **kw})


def test_pooled_and_leave_one_out_grids(tmp_path):
    run_study, args = _namespace(tmp_path, grid="pooled")
    (pooled,) = run_study.plan(args)
    assert "configs/multi.py:init=scratch,sources=chexpert+vindr+mimic,seed=0" in pooled.command[3]
    run_study, args = _namespace(tmp_path, grid="lodo")
    jobs = run_study.plan(args)
    names = [j.name for j in jobs]
    assert names[:2] == [
        "scratch pooled vindr+mimic seed=0",
        "scratch pooled vindr+mimic seed=0 -> tested on chexpert",
    ]
    external = jobs[1]
    assert external.after == [jobs[0].name]
    assert "--data=data/chexpert" in " ".join(external.command)
    assert len(jobs) == 6


def test_sup_med_cells_wait_for_the_conversion(tmp_path):
    run_study, args = _namespace(tmp_path, inits=["sup_med"], datasets=["vindr"])
    jobs = run_study.plan(args)
    assert jobs[1].after == [jobs[0].name] and jobs[2].after == [jobs[1].name]


def test_submitit_local_executor_respects_dependencies(tmp_path):
    """Through submitit's local executor: B starts only after A finished, a failed
    prerequisite stops its dependents, and finished cells are not resubmitted."""
    run_study, args = _namespace(tmp_path, launcher="submitit-local", hours=0.2)
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    write_a = [sys.executable, "-c", f"import time; time.sleep(2); open({str(first)!r}, 'w')"]
    check_then_b = [
        sys.executable, "-c",
        f"import os; assert os.path.exists({str(first)!r}); open({str(second)!r}, 'w')",
    ]  # fmt: skip
    jobs = [
        run_study.Job("a", write_a, None, first),
        run_study.Job("b", check_then_b, None, second, ["a"]),
    ]
    submitted = run_study.submit(jobs, run_study.make_executor(args), False, str(ROOT))
    assert submitted["b"].result() == 0 and second.exists()
    assert run_study.submit(jobs, run_study.make_executor(args), False, str(ROOT)) == {}

    failing = run_study.Job("fail", [sys.executable, "-c", "raise SystemExit(3)"], None,
                            tmp_path / "never")  # fmt: skip
    after = run_study.Job("after", check_then_b, None, tmp_path / "c", ["fail"])
    with pytest.raises(Exception, match="exit status 3"):
        run_study.submit([failing, after], run_study.make_executor(args), False, str(ROOT))
    assert not (tmp_path / "c").exists()


def test_grid_runs_through_submitit_locally(tiny_shards, tmp_path):
    ran = _study(tmp_path, tiny_shards, "--run", "--launcher", "submitit-local", "--hours", "0.3")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "submitted" in ran.stdout
    workdir = tmp_path / "runs" / "csv" / "scratch" / "fraction1" / "seed0"
    assert (workdir / "results.json").is_file()


def test_label_noise_sweep_adds_cells_with_the_override(tmp_path):
    run_study, args = _namespace(tmp_path, datasets=["vindr"], label_noise=[0.0, 0.1])
    jobs = run_study.plan(args)
    assert [j.name for j in jobs] == [
        "scratch vindr fraction=1 seed=0",
        "scratch vindr fraction=1 seed=0 label_noise=0.1",
    ]
    assert "--config.data.label_noise=0.1" in jobs[1].command
    assert jobs[1].workdir.name == "seed0-noise0.1"
    assert not any(c.startswith("--config.data.label_noise") for c in jobs[0].command)


def test_the_new_backbone_arms_are_grid_cells(tmp_path):
    run_study, args = _namespace(
        tmp_path, inits=["ssl_nonmed_dinov3", "ssl_med_raddino", "siglip"], datasets=["vindr"]
    )
    commands = [" ".join(j.command) for j in run_study.plan(args)]
    for init in ("ssl_nonmed_dinov3", "ssl_med_raddino", "siglip"):
        assert any(f"configs/{init}.py:dataset=vindr,fraction=1,seed=0" in c for c in commands)
    from configs import multi

    assert multi.get_config("init=siglip,sources=a+b").data.sources[1].endswith("/b")
