"""The offline demo: a tiny ViT from scratch on generated phantom radiographs (~4 min, 2 CPUs).

python -m cxrjax.main --config configs/demo.py --workdir /tmp/cxrjax-demo
"""

from cxrjax.config_base import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, patients="1000", size="64", epochs="20")
    c = base_config("demo", "csv")
    c.data.dir = ""  # empty: <workdir>/data, generated on first run
    c.data.demo_patients = int(args["patients"])
    c.data.demo_image_size = int(args["size"])
    c.model.variant = "vit_tiny_demo"
    c.model.dtype = "float32"
    # From scratch, zero-mean inputs escape the initial plateau ~3x sooner than [0, 1] ones.
    c.input.normalization = "zscore"
    c.batch_size = 32
    c.eval_batch_size = 64
    c.epochs = int(args["epochs"])
    c.lr = 1e-3
    c.wd = 1e-4
    c.schedule = "warmup_cosine"
    c.warmup_steps = 50
    c.grad_clip = 1.0
    c.input.max_rotation = 7.0
    c.eval_every_epochs = 4
    c.log_every_steps = 25
    c.checkpoint_every_steps = 200
    return c
