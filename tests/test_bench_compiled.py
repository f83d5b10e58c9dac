"""tools/bench_compiled.py on the suite's 4 CPU devices: the collectives it reads are the ones
the trainer's steps compile to, and FSDP's parameter gather keeps them at the minimum."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_compiled  # noqa: E402

_ARGS = ["--model", "vit_tiny_demo", "--batch", "8", "--remat", "off", "--skip", "ssl", "loop"]


def test_collectives_are_the_minimum_for_dp_and_fsdp(capsys):
    report = bench_compiled.main(_ARGS)
    dp = report["dp"]["remat_off"]
    # Data parallel: the gradients' one all-reduce (and the loss's few bytes), nothing else.
    assert set(dp["collectives"]) == {"all-reduce"}
    np.testing.assert_allclose(
        dp["collectives"]["all-reduce"]["bytes"], dp["minimum_bytes"]["all-reduce"], rtol=0.01
    )
    fsdp = report["fsdp"]["remat_off"]
    gathered = fsdp["collectives"]["all-gather"]["bytes"]
    np.testing.assert_allclose(gathered, fsdp["minimum_bytes"]["all-gather"], rtol=0.01)
    assert "all-to-all" not in fsdp["collectives"]
    assert fsdp["memory"]["peak_estimate_gib"] > 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("fsdp remat_off: ")


def test_without_the_gather_fsdp_moves_activations():
    report = bench_compiled.main([*_ARGS, "--skip", "dp", "ssl", "loop", "--no-gather"])
    fsdp = report["fsdp"]["remat_off"]
    gathered = sum(v["bytes"] for v in fsdp["collectives"].values())
    assert gathered > 1.5 * fsdp["minimum_bytes"]["all-gather"]


def test_the_loop_compiles_each_step_once():
    report = bench_compiled.main(["--skip", "dp", "fsdp", "ssl", "--loop-steps", "10"])
    loop = report["loop"]
    assert loop["steps"] >= 8 and loop["validations"] == 2
    assert loop["step_compilations"] == {"jit(train_step)": 1, "jit(predict_step)": 1}


def test_gpu_check_lists_the_whole_matrix_with_valid_flags():
    """tools/gpu_check.sh --list: what a GPU run measures, each command accepted by its tool
    (the full CPU dry run, `tools/gpu_check.sh --dry-run DIR`, takes about 5 minutes)."""
    import shlex
    import subprocess

    import bench_train

    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(
        ["bash", str(root / "tools" / "gpu_check.sh"), "--list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    train = [shlex.split(line)[2:] for line in listed if "bench_train.py" in line]
    compiled = [shlex.split(line)[2:] for line in listed if "bench_compiled.py" in line]
    assert len(train) == 2 * 3 * 2 + 2 and len(compiled) == 1
    parsed = [bench_train.parse_args(argv) for argv in train]
    assert {(a.model, a.batch, a.remat) for a in parsed} == {
        (m, b, r) for m in ("vit_b16_in21k", "vit_b14_dinov2") for b in (128, 256, 512)
        for r in (False, True)
    }  # fmt: skip
    assert all(a.dtype == "bfloat16" for a in parsed)
    assert {a.attention for a in parsed} == {"auto", "cudnn", "xla"}
    assert sum(a.framework == "torch" for a in parsed) == 6
    assert bench_compiled.parse_args(compiled[0]).ssl_config == "configs/ssl_pretrain.py"
