"""The model and the train state from a config: a plain dict pytree on explicit shardings.

State: `step`, `params`, `opt_state` (and `ema` with `config.ema_decay`). The trainer and
`tools/bench_train.py` build it here, so both measure and train the same thing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cxrjax import optim, sharding
from cxrjax.models import create_model
from cxrjax.models.pretrained import load_pretrained


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The architecture options a run fixes beyond its variant (recorded in run.json, so that
    inference rebuilds the same module): pooling, LoRA adapters, a forced attention kernel."""
    m = config.model
    options: dict[str, Any] = {}
    if m.get("pool"):
        options["pool"] = m.pool
    if m.get("attention_impl", "auto") != "auto":
        # "xla" or "cudnn" (flash): the kernel cxrjax.models.attention uses.
        options["attention_impl"] = m.attention_impl
    if m.get("lora_rank", 0):
        options["lora_rank"] = int(m.lora_rank)
        options["lora_alpha"] = float(m.lora_alpha) or None
        options["lora_targets"] = tuple(m.lora_targets)
    return options


def build_model(config: ml_collections.ConfigDict, num_labels: int, image_size: int):
    m = config.model
    return create_model(
        m.variant,
        num_labels,
        image_size=image_size,
        dtype=m.dtype,
        dropout=m.dropout,
        drop_path=m.drop_path,
        remat=m.remat,
        # A linear probe starts its head at zero, as big_vision's and MAE's probes do: a random
        # (Xavier) head's logits on LayerNorm features (std ~1.4 for width 96) are noise that a
        # short probe spends its steps unlearning instead of reading the frozen features.
        head_zero_init=m.head_zero_init or config.freeze_backbone,
        **model_options(config),
    )


def init_state(
    config: ml_collections.ConfigDict,
    model: Any,
    image_size: int,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    total_steps: int,
    label_names: list[str] | None = None,
) -> tuple[Any, dict, dict, str | None]:
    """(optimizer, sharded state, its shardings, the pretrained-weights report or None)."""
    dummy = jnp.zeros((1, image_size, image_size, 3))
    abstract_params = jax.eval_shape(lambda r: model.init({"params": r}, dummy)["params"], rng)
    tx = optim.make_optimizer(config, total_steps, abstract_params)

    def state_from(params):
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        if config.ema_decay:
            state["ema"] = params
        return state

    init = lambda r: state_from(model.init({"params": r}, dummy)["params"])  # noqa: E731
    shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh, fsdp=config.fsdp)
    state = jax.jit(init, out_shardings=shardings)(rng)
    report = None
    if config.model.init_from:
        params, load_report = load_pretrained(
            config.model.init_from,
            jax.device_get(state["params"]),
            variant=config.model.variant,
            image_size=image_size,
            label_names=label_names,
        )
        report = f"pretrained weights from {config.model.init_from}:\n{load_report}"
        params = jax.device_put(params, shardings["params"])
        state = jax.jit(state_from, out_shardings=shardings)(params)
    return tx, state, shardings, report
