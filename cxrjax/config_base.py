"""Defaults every experiment config starts from (the study's settings), and config-argument parsing.

Config files in `configs/` are plain `get_config(arg)` functions; `arg` is the text after the colon
in `--config configs/x.py:dataset=vindr,fraction=0.1`.
"""

from __future__ import annotations

import os

import ml_collections

from cxrjax.errors import ConfigError

DATASETS = ("vindr", "chestxray14", "chexpert", "mimic", "padchest", "csv")


def parse_arg(arg: str | None, **defaults: str) -> dict[str, str]:
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} over `defaults`; unknown keys are an error."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(
                f"config argument {item!r}: expected key=value with key in {sorted(defaults)}"
            )
        out[key] = value
    return out


def data_root() -> str:
    return os.environ.get("CXRJAX_DATA", "data")


def weights_root() -> str:
    return os.environ.get("CXRJAX_WEIGHTS", "weights")


def base_config(experiment: str, dataset: str) -> ml_collections.ConfigDict:
    if dataset not in DATASETS:
        raise ConfigError(f"dataset {dataset!r}: use one of {DATASETS}")
    c = ml_collections.ConfigDict()
    c.experiment = experiment
    c.init = experiment
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.dataset = dataset
    c.data.dir = f"{data_root()}/{dataset}"
    c.data.labels = ()  # empty: every label in the shards (several sources: their union)
    # Several prepared folders ("DIR" or "DIR:weight") trained as one mixture; replaces `dir`.
    c.data.sources = ()
    # > 0: flip this seeded fraction of training labels, symmetric per label (noise studies).
    c.data.label_noise = 0.0
    c.data.train_fraction = 1.0
    c.data.worker_count = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = "vit_b16_in21k"
    c.model.init_from = ""  # converted weights (tools/convert_checkpoint.py); "" = random init
    c.model.init_hint = ""  # the command that creates init_from, shown when it is missing
    c.model.dtype = "bfloat16"
    c.model.dropout = 0.0
    c.model.drop_path = 0.0
    c.model.remat = False
    c.model.head_zero_init = False
    c.model.pool = ""  # "": the architecture's own (cls; map for SigLIP); mean, cls_mean
    c.model.lora_rank = 0  # > 0: LoRA adapters on `lora_targets`; only they and the head train
    c.model.lora_alpha = 0.0  # 0: alpha = rank (scale 1)
    c.model.lora_targets = ("query", "value")

    c.input = ml_collections.ConfigDict()
    c.input.normalization = "unit"  # study: [0, 1]; "zscore"; "pretrained": the source's
    c.input.flip_prob = 0.5
    c.input.max_rotation = 7.0
    c.input.augment_on_device = False  # True: augment inside the jitted step, not on the host

    c.loss = ml_collections.ConfigDict()
    c.loss.pos_weight = True

    c.batch_size = 32
    c.eval_batch_size = 128
    c.epochs = 100
    c.lr = 1e-5
    c.wd = 0.0
    c.schedule = "constant"
    c.warmup_steps = 0
    c.grad_clip = 0.0
    c.grad_accum_steps = 1
    c.layer_decay = 1.0  # < 1: layer-wise learning-rate decay
    c.freeze_backbone = False  # linear probe: train the head only
    c.ema_decay = 0.0  # > 0: evaluate and keep the best of an EMA of the weights
    c.nonfinite = "stop"  # or "skip": what a non-finite loss does (the update is never applied)
    c.fsdp = False

    c.log_every_steps = 50
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    return c
