"""What the compiled steps do on a mesh: collectives, memory, recompilation, host syncs.

  python tools/bench_compiled.py [--model vit_s16_in21k --batch 16 --devices 4] [--json FILE]

On CPU it fakes `--devices` host devices (XLA's --xla_force_host_platform_device_count), so the
data-parallel and FSDP programs an accelerator mesh would run are compiled and read here:
- collectives: every all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute
  in the compiled fine-tuning step, count and bytes, against the minimum (DP: one all-reduce of
  the float32 gradients, i.e. the parameter bytes; FSDP: the sharded parameters all-gathered
  and their gradients reduce-scattered, each of those bytes);
- memory: the compiled memory analysis (arguments, outputs, temporaries) against parameters +
  optimizer state, with and without `--config.model.remat`;
- the SSL step of configs/ssl_pretrain_demo.py: the same, with its FLOPs per image beside the
  fine-tuning step's, and its images/s alone on synthetic crops (what the device does) against
  the multi-crop loop's (what the host pipeline feeds);
- recompiles: configs/demo.py trained for about `--loop-steps` steps with validation every
  epoch under `jax_log_compiles`: each jitted function's compilations (a cache miss logs one),
  so a step or evaluator that recompiles shows up more than once. Host syncs are not counted
  here: on CPU device memory is host memory and JAX's transfer guard sees no transfer; the loop
  reads device values only in `StepLoop._log` (every `log_every_steps`) and at validation, and
  tools/bench_train.py's full-loop figure against the step alone shows what any sync costs.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and "jax" not in sys.modules:
    # Before jax is imported: the number of host devices is fixed when the backend starts (it
    # changes only the CPU backend; on an accelerator the mesh is its devices).
    _devices = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), None)
    if _devices is None and "--devices" in sys.argv:
        _devices = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_devices or 4}"
    )

import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_train import sharded_step  # noqa: E402  (tools/ is on the path beside this file)

from cxrjax import sharding  # noqa: E402
from cxrjax.config_base import base_config  # noqa: E402
from cxrjax.errors import run_main  # noqa: E402
from cxrjax.models import get_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "u8": 1, "s8": 1}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|u8|s8)\[([0-9,]*)\]")


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in compiled HLO text; bytes are each op's
    result (an all-gather's gathered array, a reduce-scatter's shard, an all-reduce's array)."""
    found = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for line in hlo.splitlines():
        match = re.search(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not match:
            continue
        op = match.group(2)
        found[op]["count"] += 1
        for dtype, dims in _SHAPE.findall(match.group(1)):
            size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            found[op]["bytes"] += size * _BYTES[dtype]
    return {op: v for op, v in found.items() if v["count"]}


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _memory(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    gib = lambda b: round(b / 2**30, 4)  # noqa: E731
    return {
        "arguments_gib": gib(m.argument_size_in_bytes),
        "outputs_gib": gib(m.output_size_in_bytes),
        "aliased_gib": gib(m.alias_size_in_bytes),
        "temporaries_gib": gib(m.temp_size_in_bytes),
        "peak_estimate_gib": gib(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        ),
    }


def fine_tuning_step(args, *, fsdp: bool, remat: bool) -> dict:
    """The trainer's step compiled on the mesh: collectives, memory, FLOPs."""
    c = base_config("bench", "csv")
    c.model.variant, c.model.dtype, c.model.remat, c.fsdp = args.model, args.dtype, remat, fsdp
    c.batch_size = args.batch
    c.input.normalization = "pretrained"
    size = get_spec(args.model).image_size
    step, state, _, data = sharded_step(c, args.num_labels, size, 100, gather=args.gather)
    batch = {
        "image": jax.ShapeDtypeStruct((args.batch, size, size), jnp.uint8, sharding=data),
        "labels": jax.ShapeDtypeStruct((args.batch, args.num_labels), jnp.float32, sharding=data),
        "mask": jax.ShapeDtypeStruct((args.batch, args.num_labels), jnp.bool_, sharding=data),
    }
    compiled = step.lower(state, batch).compile()
    params = _bytes(state["params"])
    sharded = sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(state["params"])
        if any(axis is not None for axis in x.sharding.spec)
    )
    found = collectives(compiled.as_text())
    if fsdp:
        minimum = {"all-gather": sharded, "reduce-scatter": sharded // jax.device_count()}
    else:
        minimum = {"all-reduce": params}
    cost = compiled.cost_analysis() or {}
    return {
        "parameters_gib": round(params / 2**30, 4),
        "optimizer_state_gib": round(_bytes(state["opt_state"]) / 2**30, 4),
        "collectives": found,
        "minimum_bytes": minimum,
        "memory": _memory(compiled),
        "gflops_per_image": (cost.get("flops") or 0) * jax.device_count() / args.batch / 1e9,
    }


def ssl_step(args) -> dict:
    """The SSL step of `--ssl-config` (the demo's by default; on a GPU
    `configs/ssl_pretrain.py --ssl-arg init=scratch,batch=64` is ViT-B/14 at 224): compiled
    facts, and its rate alone on synthetic crops."""
    import importlib.util

    from cxrjax.ssl.trainer import build_model, build_step, crop_options

    spec = importlib.util.spec_from_file_location("ssl_config", ROOT / args.ssl_config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(args.ssl_arg)
    mesh = sharding.make_mesh()
    model, heads = build_model(c)
    crops = crop_options(c, model.patch_size)
    setup = build_step(c, model, heads, crops, mesh, jax.random.key(0), 1000, 100)
    state, step = setup.state, setup.step
    b, g, size = c.batch_size, crops.global_size, crops.local_size
    host = np.random.default_rng(0)
    patches = (g // model.patch_size) ** 2
    batch = {
        "global": host.integers(0, 256, (b, 2, g, g), np.uint8),
        "local": host.integers(0, 256, (b, crops.num_local, size, size), np.uint8),
        "mask": host.random((b, 2, patches)) < 0.3,
    }
    batch = jax.device_put(batch, sharding.data_sharding(mesh))
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis() or {}
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.ssl_steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    return {
        "config": f"{args.ssl_config}:{args.ssl_arg or ''}",
        "variant": c.model.variant,
        "batch": b,
        "parameters_gib": round(_bytes(state["student"]) / 2**30, 6),
        "collectives": collectives(compiled.as_text()),
        "memory": _memory(compiled),
        "gflops_per_image": (cost.get("flops") or 0) * jax.device_count() / b / 1e9,
        "step_alone_images_per_s": round(args.ssl_steps * b / seconds, 1),
    }


def loop_compiles_and_syncs(args) -> dict:
    """configs/demo.py for about `--loop-steps` steps with validation every epoch: how often
    each jitted function was compiled (a recompiling step or evaluator shows up more than once;
    the small eager ops outside the steps compile once per shape they meet)."""
    from collections import Counter

    from configs.demo import get_config
    from cxrjax.data.demo import ensure_demo_dataset
    from cxrjax.engine import trainer

    compiles: Counter = Counter()

    class Collect(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling "):
                compiles[message.split()[1]] += 1

    handler = Collect()
    loggers = [logging.getLogger(n) for n in ("jax._src.interpreters.pxla", "jax._src.dispatch")]
    for logger in loggers:
        logger.addHandler(handler)
    patients = 120  # 5 training steps of 32 per epoch
    c = get_config(f"patients={patients},size=64")
    c.epochs = max(1, args.loop_steps // 5)
    c.eval_every_epochs = 1
    c.log_every_steps = 10
    with tempfile.TemporaryDirectory() as tmp:
        c.data.dir = str(Path(tmp) / "data")
        ensure_demo_dataset(c.data.dir, patients=patients, image_size=64)
        with jax.log_compiles(True):
            steps_run = trainer.train_and_evaluate(c, Path(tmp) / "run")["steps"]
    for logger in loggers:
        logger.removeHandler(handler)
    step_functions = ("jit(train_step)", "jit(predict_step)")
    return {
        "steps": steps_run,
        "validations": c.epochs,
        "step_compilations": {name: compiles[name] for name in step_functions},
        "other_compilations": {k: v for k, v in compiles.items() if k not in step_functions},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_s16_in21k")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-labels", type=int, default=14)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--devices", type=int, default=4, help="fake host devices on CPU")
    parser.add_argument("--remat", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument(
        "--no-gather",
        dest="gather",
        action="store_false",
        help="FSDP without the trainer's parameter gather (what XLA propagation alone does)",
    )
    parser.add_argument("--ssl-config", default="configs/ssl_pretrain_demo.py")
    parser.add_argument("--ssl-arg", default=None, help="the config's argument, e.g. batch=64")
    parser.add_argument("--ssl-steps", type=int, default=5)
    parser.add_argument("--loop-steps", type=int, default=100)
    parser.add_argument("--skip", nargs="*", default=[], choices=["dp", "fsdp", "ssl", "loop"])
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))

    report = {"devices": jax.device_count(), "device": jax.devices()[0].device_kind}
    for name, fsdp in (("dp", False), ("fsdp", True)):
        if name not in args.skip:
            report[name] = {
                f"remat_{mode}": fine_tuning_step(args, fsdp=fsdp, remat=mode == "on")
                for mode in args.remat
            }
    if "ssl" not in args.skip:
        report["ssl"] = ssl_step(args)
    if "loop" not in args.skip:
        report["loop"] = loop_compiles_and_syncs(args)
    print(json.dumps(report, indent=2))
    _print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def _print_summary(report: dict) -> None:
    for name in ("dp", "fsdp"):
        if name not in report:
            continue
        for remat, r in report[name].items():
            found = ", ".join(
                f"{op} x{v['count']} {v['bytes'] / 2**20:.1f} MiB"
                for op, v in r["collectives"].items()
            )
            minimum = ", ".join(f"{op} {b / 2**20:.1f} MiB" for op, b in r["minimum_bytes"].items())
            m = r["memory"]
            print(
                f"{name} {remat}: {found or 'no collectives'} (minimum {minimum}); memory: "
                f"temporaries {m['temporaries_gib']:.3f} GiB, peak {m['peak_estimate_gib']:.3f} "
                f"GiB per device for {r['parameters_gib'] + r['optimizer_state_gib']:.3f} GiB "
                "of parameters + optimizer state in all"
            )
    if "ssl" in report:
        s = report["ssl"]
        print(
            f"ssl demo step: {s['gflops_per_image']:.3f} GFLOPs/image, "
            f"{s['step_alone_images_per_s']} images/s alone on synthetic crops"
        )
    if "loop" in report:
        loop = report["loop"]
        print(
            f"loop: {loop['steps']} steps, {loop['validations']} validations; compilations of "
            + ", ".join(f"{k} {v}" for k, v in loop["step_compilations"].items())
            + f"; {sum(loop['other_compilations'].values())} of small eager ops outside them"
        )


if __name__ == "__main__":
    run_main(main)
