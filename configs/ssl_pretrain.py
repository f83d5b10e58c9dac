"""Continued self-supervised pretraining on unlabeled radiographs with the DINOv2 objective.

python -m cxrjax.main --config configs/ssl_pretrain.py:init=dinov2,dataset=vindr+chexpert
python -m cxrjax.main --config configs/ssl_pretrain.py:init=raddino,dataset=folder_images

`init`: dinov2 (ViT-B/14, LVD-142M), dinov3 (ViT-B/16, LVD-1689M), raddino (ViT-B/14 on chest
radiographs) or scratch (the DINOv2 ViT-B/14 at random). `dataset`: prepared folders under
$CXRJAX_DATA (default data/), several joined by "+" and pooled (labels ignored; unlabeled images
are prepared with `tools/prepare_data.py --dataset folder`). The run directory then initialises
any fine-tuning config: `--config.model.init_from=runs/ssl_pretrain_dinov2` (with the same
`--config.model.variant`).
"""

from cxrjax.config_base import data_root, parse_arg, weights_root
from cxrjax.errors import ConfigError
from cxrjax.models.pretrained import conversion_command
from cxrjax.ssl.config import ssl_base_config

INITS = {
    # init: (variant, weights folder under $CXRJAX_WEIGHTS or "" for random, local crop size)
    "dinov2": ("vit_base_patch14_dinov2.lvd142m", "vit_b14_dinov2", 98),
    "dinov3": ("vit_base_patch16_dinov3.lvd1689m", "vit_base_patch16_dinov3", 96),
    "raddino": ("vit_base_patch14_dinov2.rad_dino", "rad_dino", 98),
    "scratch": ("vit_base_patch14_dinov2", "", 98),
}


def get_config(arg=None):
    args = parse_arg(arg, init="dinov2", dataset="vindr", batch="1024", epochs="100", seed="0")
    if args["init"] not in INITS:
        raise ConfigError(
            f"configs/ssl_pretrain.py:init={args['init']!r} is not an option",
            f"Use one of {sorted(INITS)}.",
        )
    variant, weights, local_size = INITS[args["init"]]
    c = ssl_base_config(f"ssl_pretrain_{args['init']}")
    c.model.variant = variant
    if weights:
        c.model.init_from = f"{weights_root()}/{weights}"
        c.model.init_hint = conversion_command(c.model.init_from, variant)
    else:
        # From scratch, zero-mean inputs; pretrained weights expect their own statistics.
        c.input.normalization = "zscore"
    names = args["dataset"].split("+")
    c.data.dataset = names[0]
    if len(names) == 1:
        c.data.dir = f"{data_root()}/{names[0]}"
    else:
        c.data.dir = ""
        c.data.sources = tuple(f"{data_root()}/{n}" for n in names)
    c.crops.local_size = local_size
    c.batch_size = int(args["batch"])
    # lr = base * sqrt(batch / 1024) (DINOv2's rule). From scratch: DINOv2's default base 4e-3.
    # Continued from weights: base 2e-4, the base lr of DINOv2's LVD-142M recipes
    # (train/vitl14.yaml, vitg14.yaml): random heads on trained features at 20x that rate
    # rewrite the features the run exists to keep.
    base = 2e-4 if weights else 4e-3
    c.ssl.lr = base * (c.batch_size / 1024) ** 0.5
    # Stochastic depth: DINOv2's student default drop_path_rate 0.3 (0.4 for ViT-g); the
    # linear 0 -> rate rule of cxrjax's ViT averages half of it over the blocks.
    c.model.drop_path = 0.3
    # DINOv2's OFFICIAL_EPOCH_LENGTH: warmups (10 epochs of lr, 30 of teacher temperature, 1
    # of frozen prototypes) in iterations that do not depend on the dataset's size.
    c.ssl.epoch_length = 1250
    c.epochs = int(args["epochs"])
    c.seed = int(args["seed"])
    return c
