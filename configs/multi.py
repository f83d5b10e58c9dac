"""Several datasets at once: the study's initialisations trained on a mixture of prepared folders.

python -m cxrjax.main --config configs/multi.py:init=ssl_nonmed,sources=chexpert+mimic+chestxray14

`sources` names folders under $CXRJAX_DATA (default data/), joined by "+", each optionally with
a sampling weight ("chexpert:0.5+mimic:0.5"; default: proportional to size). The run's labels are
the sources' union; each source is validated and tested on its own and pooled, and the model is
selected on the mean over sources of each source's validation mean AUROC.
"""

import importlib.util
from pathlib import Path

from cxrjax.config_base import data_root, parse_arg

INITS = (
    "ssl_nonmed",
    "sup_nonmed",
    "sup_med",
    "scratch",
    "ssl_nonmed_dinov3",
    "ssl_med_raddino",
    "siglip",
)


def get_config(arg=None):
    args = parse_arg(arg, init="ssl_nonmed", sources="chexpert+mimic", seed="0")
    if args["init"] not in INITS:
        raise ValueError(f"init={args['init']!r}: use one of {INITS}")
    # By path, beside this file: config files are loaded from wherever the command names them.
    spec = importlib.util.spec_from_file_location(
        args["init"], Path(__file__).with_name(f"{args['init']}.py")
    )
    init_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(init_config)
    extra = "stage=finetune," if args["init"] == "sup_med" else ""
    c = init_config.get_config(f"{extra}dataset=csv,seed={args['seed']}")
    c.experiment = f"{c.experiment}_multi"
    c.data.dataset = "multi"
    c.data.dir = ""
    c.data.sources = tuple(f"{data_root()}/{s}" for s in args["sources"].split("+"))
    return c
