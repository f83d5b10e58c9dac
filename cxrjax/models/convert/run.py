"""cxrjax's own sources: a converted-weights folder and a run directory (its best or latest
checkpoint, read through :class:`cxrjax.checkpoint.Checkpointer`)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax import checkpoint
from cxrjax.models.convert.common import Converted
from cxrjax.models.lora import merge_lora
from cxrjax.models.registry import create_model, get_spec
from cxrjax.models.weights import read_weights, unflatten
from cxrjax.run_dir import RunDir


def convert_cxrjax_weights(path: str | Path) -> Converted:
    """A cxrjax weights folder (``params.safetensors`` + ``meta.json``), every key kept."""
    flat, meta = read_weights(path)
    spec = get_spec(meta["variant"])
    return Converted(
        unflatten(flat),
        dict(spec.kwargs, image_size=meta["image_size"]),
        "cxrjax",
        [],
        label_names=meta.get("label_names"),
        variant=meta["variant"],
    )


def convert_cxrjax_run(run_dir: str | Path, which: str = "best") -> Converted:
    """A run directory -> the parameters of its best checkpoint (``which="best"``; the latest
    train state when it saved no best) or of its latest one, and its labels. LoRA adapters are
    folded into the kernels with the alpha the run trained with."""
    run = RunDir(run_dir)
    facts = run.read_recorded_facts()
    labels = list(facts.get("label_names") or [])
    size = int(facts["image_size"])
    options = dict(facts.get("model_options") or {})
    if "lora_targets" in options:
        options["lora_targets"] = tuple(options["lora_targets"])
    # The model rebuilt from the run's facts gives the tree to restore onto (host, one device).
    model = create_model(facts["variant"], len(labels), image_size=size, **options)
    dummy = jnp.zeros((1, size, size, 3))
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, dummy)["params"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = checkpoint.Checkpointer(run)
    try:
        params = ckpt.restore_params(
            which, checkpoint.abstract(shapes, jax.tree.map(lambda _: device, shapes))
        )
    finally:
        ckpt.close()
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    if "lora_rank" in options:
        params = merge_lora(params, options.get("lora_alpha"))
    spec = get_spec(facts["variant"])
    return Converted(
        params,
        dict(spec.kwargs, image_size=size),
        "cxrjax_run",
        [],
        label_names=labels or None,
        variant=facts["variant"],
    )
