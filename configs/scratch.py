"""Random initialisation: ViT-B/16 trained from scratch (the lower bound of the comparison).

python -m cxrjax.main --config configs/scratch.py:dataset=vindr[,fraction=0.1,seed=1]
"""

from cxrjax.config_base import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, dataset="vindr", fraction="1.0", seed="0")
    c = base_config("scratch", args["dataset"])
    c.model.variant = "vit_b16_in21k"
    c.data.train_fraction = float(args["fraction"])
    c.seed = int(args["seed"])
    return c
