"""Self-supervised, medical initialisation: RAD-DINO (DINOv2 ViT-B/14 on chest radiographs).

python -m cxrjax.main --config configs/ssl_med_raddino.py:dataset=vindr[,fraction=0.1,seed=1]
python -m cxrjax.main --config configs/ssl_med_raddino.py:weights=rad_dino_maira2,dataset=vindr

The DINOv2 arm's architecture with weights trained on radiographs (Microsoft's RAD-DINO, or the
RAD-DINO of MAIRA-2). The weights are stored at 518 px; a dataset prepared at 224 px gets the
position embeddings resampled the way transformers does it. With
``--config.input.normalization=pretrained`` inputs take RAD-DINO's own mean/std.
"""

from cxrjax.config_base import base_config, parse_arg, weights_root
from cxrjax.models.pretrained import conversion_command

TAGS = ("rad_dino", "rad_dino_maira2")


def get_config(arg=None):
    args = parse_arg(arg, weights="rad_dino", dataset="vindr", fraction="1.0", seed="0")
    if args["weights"] not in TAGS:
        raise ValueError(f"weights={args['weights']!r}: use one of {TAGS}")
    c = base_config(f"ssl_med_{args['weights'].replace('_', '')}", args["dataset"])
    c.model.variant = f"vit_base_patch14_dinov2.{args['weights']}"
    c.model.init_from = f"{weights_root()}/{args['weights']}"
    c.model.init_hint = conversion_command(c.model.init_from, c.model.variant)
    c.data.train_fraction = float(args["fraction"])
    c.seed = int(args["seed"])
    return c
