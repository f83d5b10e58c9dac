"""Training throughput: the jitted, sharded train step alone, the full loop, and timm on one card.

  python tools/bench_train.py --model vit_b16_in21k --batch 256 --steps 50 [--rounds 3]
      [--framework torch]

Measures, on every local device:
- step: cxrjax's train step (the one `cxrjax.engine.trainer` runs: bf16 compute, float32 AdamW
  state, donated state) on device-resident synthetic uint8 batches: images/s, ms/step, MFU (model
  FLOPs with the 3x-forward convention over the device's peak dense bf16 rate), peak device memory;
- loop: the same step fed by the grain pipeline from ArrayRecord shards (written first, random
  pixels at the model's resolution), as a fraction of the step alone;
- with --framework torch: timm's same architecture in the same dtype (bf16 autocast for
  --dtype bfloat16, plain float32 otherwise), torch.compile on CUDA and eager on CPU
  (--torch-mode), AdamW (fused on CUDA), in the same process, and the ratio cxrjax / PyTorch.
Steps are timed in --rounds rounds of --steps, cxrjax and timm alternating round by round; the
figures are each side's median round and the JSON keeps every round (on the 2-core CPU machine
back-to-back runs of the old one-round form gave ratios of 0.97 and 0.76 for the same code).
On an accelerator each measurement is appended to benchmarks/results/ as a new JSON file (device,
driver, library versions, commit, command, figures). On CPU it is a smoke test of the same code.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from timm_step import TorchStep

from cxrjax import sharding
from cxrjax.config_base import base_config
from cxrjax.data import pipeline, shards
from cxrjax.engine import state as train_state
from cxrjax.engine import step as steps
from cxrjax.errors import ConfigError, run_main
from cxrjax.models import flops_per_image, get_spec
from cxrjax.models.attention import IMPLEMENTATIONS

# Dense bf16 peak FLOP/s per device kind (vendor datasheets, no sparsity).
PEAK_BF16 = {
    "H100 80GB HBM3": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def peak_flops(device: jax.Device) -> float | None:
    kind = device.device_kind
    matches = [v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()]
    return max(matches) if matches else None


def _config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    c = base_config("bench", "csv")
    c.model.variant = args.model
    c.model.dtype = args.dtype
    c.model.remat = args.remat
    c.model.attention_impl = args.attention
    c.batch_size = args.batch
    c.input.normalization = "pretrained"
    return c


def _warmed_up(run_step, state, batches) -> object:
    """The state after one compile+warm-up step."""
    state, metrics = run_step(state, next(batches))
    jax.block_until_ready(metrics)
    return state


def _seconds(run_step, state, batches, steps: int) -> tuple[float, object]:
    """Seconds for `steps` steps; the state is threaded through."""
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = run_step(state, next(batches))
    jax.block_until_ready(metrics)
    return time.perf_counter() - start, state


def sharded_step(
    config: ml_collections.ConfigDict,
    num_labels: int,
    size: int,
    total_steps: int,
    *,
    gather: bool = True,
) -> tuple:
    """(jitted train step, its state, mesh, batch sharding) as `cxrjax.engine.trainer` builds
    them: state shardings (FSDP when `config.fsdp`), donated state, and under FSDP the
    parameter gather of `make_train_step(compute_sharding=...)` unless `gather` is off."""
    mesh = sharding.make_mesh()
    model = train_state.build_model(config, num_labels, size)
    rng = jax.random.key(0)
    tx, state, shardings, _ = train_state.init_state(config, model, size, mesh, rng, total_steps)
    stats = steps.input_stats(config.input.normalization, config.model.variant)
    mean, std = (jnp.asarray(v) for v in stats)
    data = sharding.data_sharding(mesh)
    step = jax.jit(
        steps.make_train_step(
            model,
            tx,
            mean,
            std,
            jnp.ones(num_labels),
            rng,
            compute_sharding=sharding.replicated(mesh) if config.fsdp and gather else None,
        ),
        in_shardings=(shardings, data),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return step, state, mesh, data


class JaxStep:
    """cxrjax's train step on one device-resident synthetic batch, compiled and warmed up;
    `time(steps)` runs `steps` more and returns their seconds."""

    def __init__(self, args: argparse.Namespace) -> None:
        config = _config(args)
        self.size = args.image_size or get_spec(args.model).image_size
        total_steps = (args.rounds + 1) * args.steps + 2
        self.step, state, _, self.data = sharded_step(
            config, args.num_labels, self.size, total_steps
        )
        host = np.random.default_rng(0)
        batch = pipeline.to_device(
            {
                "image": host.integers(0, 256, (args.batch, self.size, self.size), np.uint8),
                "labels": host.integers(0, 2, (args.batch, args.num_labels)).astype(np.float32),
                "mask": np.ones((args.batch, args.num_labels), bool),
            },
            self.data,
        )
        self.batches = itertools.repeat(batch)
        self.state = _warmed_up(self.step, state, self.batches)

    def time(self, steps: int) -> float:
        seconds, self.state = _seconds(self.step, self.state, self.batches, steps)
        return seconds

    def figures(self, args: argparse.Namespace, seconds: float) -> dict:
        rate = args.steps * args.batch / seconds
        flops = 3 * flops_per_image(args.model, self.size, args.num_labels) * 1e9
        device = jax.devices()[0]
        peak = peak_flops(device)
        stats = device.memory_stats() or {}
        return {
            "images_per_s": rate,
            "step_ms": 1000 * seconds / args.steps,
            "train_gflops_per_image": flops / 1e9,
            "mfu": rate * flops / (peak * jax.device_count()) if peak else None,
            "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
        }

    def loop(self, args: argparse.Namespace) -> dict:
        """The same step fed by the grain pipeline from freshly written shards."""
        with tempfile.TemporaryDirectory() as tmp:
            info = _write_shards(Path(tmp), self.size, args.num_labels, n=max(4 * args.batch, 512))
            loader = pipeline.train_loader(
                info,
                batch_size=args.batch,
                label_indices=list(range(args.num_labels)),
                seed=0,
                worker_count=args.workers,
            )
            batches = (b for b, _ in pipeline.prefetch_to_device(iter(loader), self.data))
            self.state = _warmed_up(self.step, self.state, batches)
            seconds, self.state = _seconds(self.step, self.state, batches, args.steps)
        return {"loop_images_per_s": args.steps * args.batch / seconds}


def _write_shards(directory: Path, size: int, num_labels: int, n: int) -> shards.DatasetInfo:
    rng = np.random.default_rng(0)
    writer = shards.SplitWriter(directory, "train", n, records_per_shard=max(1, n // 4))
    for i in range(n):
        example = shards.Example(
            rng.integers(0, 256, (size, size), np.uint8),
            rng.integers(0, 2, num_labels).astype(np.float32),
            f"{i:016x}",
            f"{i:016x}",
        )
        writer.write(shards.encode(example))
    info = {
        "name": "bench",
        "label_names": [f"label{j}" for j in range(num_labels)],
        "image_size": size,
        "splits": {"train": {"files": writer.close(), "num_examples": n}},
        "pos_weight": [1.0] * num_labels,
    }
    (directory / shards.INFO_FILE).write_text(json.dumps(info))
    return shards.load_info(directory)


def timed_rounds(args: argparse.Namespace, runners: dict) -> dict[str, list[float]]:
    """Seconds of `args.steps` steps per runner, `args.rounds` times, the runners alternating
    round by round: a slow spell of a shared or throttled machine then falls on both sides
    instead of on whichever ran during it, and the median drops the outlying round."""
    seconds = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            seconds[name].append(runner.time(args.steps))
    return seconds


def _environment() -> dict:
    import flax
    import optax

    device = jax.devices()[0]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parents[1]
    ).stdout.strip()
    driver = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.strip() if device.platform == "gpu" else None  # fmt: skip
    return {
        "device": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "driver": driver,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b16_in21k")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed rounds, alternating cxrjax and timm; figures are the median round's",
    )
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--num-labels", type=int, default=14)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument(
        "--attention",
        choices=IMPLEMENTATIONS,
        default="auto",
        help="attention kernel: auto = cuDNN flash for bf16 on GPU, XLA otherwise",
    )
    parser.add_argument("--no-loop", dest="loop", action="store_false")
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
    parser.add_argument("--framework", choices=["jax", "torch"], default="jax")
    parser.add_argument(
        "--torch-mode",
        choices=["auto", "eager", "compile"],
        default="auto",
        help="timm side: torch.compile on CUDA, eager on CPU (auto)",
    )
    parser.add_argument("--save", action="store_true", help="append results on CPU as well")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSONs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        raise ConfigError(
            f"--steps {args.steps} --rounds {args.rounds}: both must be at least 1",
            "Pass e.g. --steps 8 --rounds 3.",
        )
    runners = {"cxrjax": JaxStep(args)}
    if args.framework == "torch":
        runners["torch"] = TorchStep(args)
    seconds = timed_rounds(args, runners)

    result = {"model": args.model, "batch": args.batch, "steps": args.steps,
              "rounds": args.rounds, "dtype": args.dtype, "remat": args.remat,
              "attention": args.attention, **_environment()}  # fmt: skip
    for name, runner in runners.items():
        result[name] = runner.figures(args, statistics.median(seconds[name]))
        result[name]["images_per_s_by_round"] = [args.steps * args.batch / t for t in seconds[name]]
    if args.loop:
        j = result["cxrjax"]
        j.update(runners["cxrjax"].loop(args))
        j["loop_fraction_of_step"] = j["loop_images_per_s"] / j["images_per_s"]
    if "torch" in result:
        result["ratio_vs_torch"] = (
            result["cxrjax"]["images_per_s"] / result["torch"]["images_per_s"]
        )
        result["ratio_vs_torch_by_round"] = [t / j for j, t in zip(*seconds.values(), strict=True)]
    print(json.dumps(result, indent=2))
    if result["platform"] != "cpu" or args.save:
        args.results.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
        name = f"{stamp}-{args.model}-b{args.batch}-{result['device'].replace(' ', '_')}"
        path = args.results / f"{name}-{time.time_ns() % 10**6:06d}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"appended {path}")
    j = result["cxrjax"]
    mfu = f"{100 * j['mfu']:.1f}%" if j["mfu"] else "n/a"
    line = f"cxrjax: {j['images_per_s']:.1f} img/s, {j['step_ms']:.1f} ms/step, MFU {mfu}"
    if "loop_fraction_of_step" in j:
        line += f"; full loop {100 * j['loop_fraction_of_step']:.1f}% of step"
    if "torch" in result:
        line += f"; timm: {result['torch']['images_per_s']:.1f} img/s; "
        line += f"ratio {result['ratio_vs_torch']:.2f} (median of {args.rounds} rounds)"
    print(line)
    return result


if __name__ == "__main__":
    run_main(main)
