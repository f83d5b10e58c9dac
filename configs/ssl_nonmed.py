"""Self-supervised, non-medical initialisation: DINOv2 ViT-B/14 (LVD-142M) fine-tuned at 224 px.

python -m cxrjax.main --config configs/ssl_nonmed.py:dataset=vindr[,fraction=0.1,seed=1]
"""

from cxrjax.config_base import base_config, parse_arg, weights_root


def get_config(arg=None):
    args = parse_arg(arg, dataset="vindr", fraction="1.0", seed="0")
    c = base_config("ssl_nonmed", args["dataset"])
    c.model.variant = "vit_b14_dinov2"
    c.model.init_from = f"{weights_root()}/vit_b14_dinov2"
    c.data.train_fraction = float(args["fraction"])
    c.seed = int(args["seed"])
    return c
