"""Language-supervised initialisations: SigLIP, SigLIP 2 and MedSigLIP image towers.

python -m cxrjax.main --config configs/siglip.py:init=medsiglip,dataset=vindr[,fraction=0.1,seed=1]

init: ``medsiglip`` (So400m/14 at 448 px, medical images; the default), ``siglip2`` or
``siglip`` (So400m/14 at 384 px, WebLI). The features the head reads are the MAP head's output,
as SiglipVisionModel's pooler_output. Missing weights: the error names the conversion command.
"""

from cxrjax.config_base import base_config, parse_arg, weights_root
from cxrjax.models.pretrained import conversion_command

VARIANTS = {
    "medsiglip": "vit_so400m_patch14_siglip.medsiglip",
    "siglip2": "vit_so400m_patch14_siglip.v2_webli",
    "siglip": "vit_so400m_patch14_siglip.webli",
}


def get_config(arg=None):
    args = parse_arg(arg, init="medsiglip", dataset="vindr", fraction="1.0", seed="0")
    if args["init"] not in VARIANTS:
        raise ValueError(f"init={args['init']!r}: use one of {sorted(VARIANTS)}")
    c = base_config(args["init"], args["dataset"])
    c.model.variant = VARIANTS[args["init"]]
    c.model.init_from = f"{weights_root()}/{args['init']}"
    c.model.init_hint = conversion_command(c.model.init_from, c.model.variant)
    c.data.train_fraction = float(args["fraction"])
    c.seed = int(args["seed"])
    return c
