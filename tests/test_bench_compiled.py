"""tools/bench_compiled.py on the suite's 4 CPU devices: the collectives it reads are the ones
the trainer's steps compile to, and FSDP's parameter gather keeps them at the minimum."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_compiled  # noqa: E402

_ARGS = ["--model", "vit_tiny_demo", "--batch", "8", "--skip", "ssl", "loop"]


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
    assert capsys.readouterr().out.splitlines()[-1].startswith("fsdp remat_on: ")


def test_without_the_gather_fsdp_moves_activations():
    report = bench_compiled.main([*_ARGS, "--skip", "dp", "ssl", "loop", "--no-gather"])
    fsdp = report["fsdp"]["remat_off"]
    gathered = sum(v["bytes"] for v in fsdp["collectives"].values())
    assert gathered > 1.5 * fsdp["minimum_bytes"]["all-gather"]


def test_the_loop_compiles_each_step_once():
    report = bench_compiled.main(["--skip", "dp", "fsdp", "ssl", "--loop-steps", "16"])
    loop = report["loop"]
    assert loop["steps"] >= 8 and loop["validations"] == 2
    assert loop["step_compilations"] == {"jit(train_step)": 1, "jit(predict_step)": 1}
