"""The offline SSL demo: DINOv2-style pretraining of the demo's tiny ViT on phantoms, no labels.

python -m cxrjax.main --config configs/ssl_pretrain_demo.py --workdir /tmp/cxrjax-ssl

Generates the demo phantoms in <workdir>/data as configs/demo.py does (labels unused), then
pretrains vit_tiny_demo (patch 8) on 64 px global and 32 px local crops with 1024 prototypes.
Then a linear probe from the teacher backbone:

python -m cxrjax.main --config configs/demo.py --workdir /tmp/cxrjax-probe \
    --config.data.dir=/tmp/cxrjax-ssl/data --config.model.init_from=/tmp/cxrjax-ssl \
    --config.freeze_backbone=True
"""

from cxrjax.config_base import parse_arg
from cxrjax.ssl.config import ssl_base_config


def get_config(arg=None):
    args = parse_arg(arg, patients="1000", size="64", epochs="10")
    c = ssl_base_config("ssl_pretrain_demo")
    c.data.dir = ""  # empty: <workdir>/data, generated on first run
    c.data.demo_patients = int(args["patients"])
    c.data.demo_image_size = int(args["size"])
    c.model.variant = "vit_tiny_demo"
    c.model.dtype = "float32"
    c.model.drop_path = 0.0
    c.input.normalization = "zscore"  # as configs/demo.py, so its probe sees the same inputs
    c.crops.global_size = int(args["size"])
    c.crops.local_size = int(args["size"]) // 2
    c.crops.num_local = 4
    c.ssl.prototypes = 1024
    c.ssl.head_hidden_dim = 256
    c.ssl.head_bottleneck_dim = 64
    c.ssl.lr = 1e-3
    c.ssl.warmup_epochs = 1.0
    c.ssl.teacher_temp_warmup_epochs = 3.0
    c.ssl.momentum = 0.99
    c.ssl.layer_decay = 1.0
    c.ssl.patch_embed_lr_mult = 1.0
    c.batch_size = 32
    c.epochs = int(args["epochs"])
    c.log_every_steps = 25
    c.checkpoint_every_steps = 200
    return c
