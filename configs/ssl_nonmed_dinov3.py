"""Self-supervised, non-medical initialisation, 2025 edition: DINOv3 ViT-B/16 (LVD-1689M).

python -m cxrjax.main --config configs/ssl_nonmed_dinov3.py:dataset=vindr[,fraction=0.1,seed=1]

The study's DINOv2 arm (configs/ssl_nonmed.py) with DINOv3's backbone: 2-D RoPE, so the prepared
dataset's resolution (any multiple of 16) is used as is. Missing weights: the error names the
conversion command (the Hugging Face repository is gated: accept its licence and log in first).
"""

from cxrjax.config_base import base_config, parse_arg, weights_root
from cxrjax.models.pretrained import conversion_command


def get_config(arg=None):
    args = parse_arg(arg, dataset="vindr", fraction="1.0", seed="0")
    c = base_config("ssl_nonmed_dinov3", args["dataset"])
    c.model.variant = "vit_base_patch16_dinov3.lvd1689m"
    c.model.init_from = f"{weights_root()}/vit_base_patch16_dinov3"
    c.model.init_hint = conversion_command(c.model.init_from, c.model.variant)
    c.data.train_fraction = float(args["fraction"])
    c.seed = int(args["seed"])
    return c
