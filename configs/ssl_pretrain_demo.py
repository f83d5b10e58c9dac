"""The offline SSL demo: DINOv2-style pretraining of the demo's tiny ViT on phantoms, no labels.

python -m cxrjax.main --config configs/ssl_pretrain_demo.py --workdir /tmp/cxrjax-ssl

Generates the demo phantoms in <workdir>/data as configs/demo.py does (labels unused for
training; the validation split's labels feed the kNN monitor), then pretrains vit_tiny_demo
(patch 8) from random weights on 64 px global and 32 px local crops with 256 prototypes. Then
a linear probe from the teacher backbone:

python -m cxrjax.main --config configs/demo.py --workdir /tmp/cxrjax-probe \
    --config.data.dir=/tmp/cxrjax-ssl/data --config.model.init_from=/tmp/cxrjax-ssl \
    --config.freeze_backbone=True --config.epochs=8

Why the recipe differs from DINOv2's (measured: the old one ran the DINO loss to log K, the
teacher's entropy to 0.99 of log K, a uniform collapse, and a probe no better than random):
- a run of ~160 steps, so an "epoch" is `epoch_length` = 20 iterations and the warmups (lr,
  frozen prototypes) last 20 steps each, not a fraction of one pass;
- teacher momentum 0.9 (cosine to 1): at 0.99 the teacher of a 160-step run is still ~40%
  its random initialisation, and the probe reads the teacher;
- teacher temperature fixed at 0.04: from random weights the images' scores hardly differ, and
  Sinkhorn-Knopp over near-equal rows returns near-uniform targets unless they are sharp;
- 256 prototypes for a batch of 32 (64 teacher rows): each prototype still gets samples;
- KoLeo 0.5: it spreads the backbone's CLS features directly, which the few steps need.
"""

from cxrjax.config_base import parse_arg
from cxrjax.ssl.config import ssl_base_config


def get_config(arg=None):
    args = parse_arg(arg, patients="1000", size="64", epochs="8")
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
    s = c.ssl
    s.epoch_length = 20
    s.prototypes = 256
    s.head_hidden_dim = 256
    s.head_bottleneck_dim = 64
    s.lr = 1e-3
    s.warmup_epochs = 1.0
    s.freeze_prototypes_epochs = 1.0
    s.warmup_teacher_temp = s.teacher_temp = 0.04
    s.teacher_temp_warmup_epochs = 0.0
    s.momentum = 0.9
    s.koleo_weight = 0.5
    s.layer_decay = 1.0
    s.patch_embed_lr_mult = 1.0
    s.knn_every_steps = 80
    c.batch_size = 32
    c.epochs = int(args["epochs"])
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    return c
