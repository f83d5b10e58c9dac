"""CPU smoke test of tools/bench_train.py: the same code path the GPU measurement runs."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_train  # noqa: E402

from cxrjax.errors import ConfigError  # noqa: E402


def test_bench_train_runs_step_and_loop_on_cpu(capsys):
    result = bench_train.main(
        ["--model", "vit_tiny_demo", "--batch", "8", "--steps", "2", "--dtype", "float32"]
    )
    figures = result["cxrjax"]
    assert figures["images_per_s"] > 0 and figures["loop_images_per_s"] > 0
    assert figures["mfu"] is None  # no peak rate is known for a CPU
    assert result["device_count"] == 4 and result["commit"]
    assert capsys.readouterr().out.splitlines()[-1].startswith("cxrjax: ")


def test_peak_rates_are_looked_up_by_device_kind():
    class Device:
        device_kind = "NVIDIA H100 80GB HBM3"

    assert bench_train.peak_flops(Device()) == 989e12
    Device.device_kind = "cpu"
    assert bench_train.peak_flops(Device()) is None


def test_torch_side_runs_the_same_dtype_eager_on_cpu():
    result = bench_train.main(
        ["--model", "vit_s16_in21k", "--image-size", "32", "--batch", "4", "--steps", "1",
         "--dtype", "float32", "--no-loop", "--framework", "torch"]
    )  # fmt: skip
    assert result["torch"]["mode"] == "eager" and result["torch"]["dtype"] == "float32"
    assert result["ratio_vs_torch"] == pytest.approx(
        result["cxrjax"]["images_per_s"] / result["torch"]["images_per_s"]
    )
    # Alternating rounds: every round is kept, the headline is each side's median round.
    for side in ("cxrjax", "torch"):
        rounds = result[side]["images_per_s_by_round"]
        assert len(rounds) == 3 and result[side]["images_per_s"] == pytest.approx(sorted(rounds)[1])
    assert len(result["ratio_vs_torch_by_round"]) == 3


def test_zero_rounds_is_a_config_error():
    with pytest.raises(ConfigError, match="--rounds 0"):
        bench_train.main(["--model", "vit_tiny_demo", "--rounds", "0", "--no-loop"])
