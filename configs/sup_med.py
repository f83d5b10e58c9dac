"""Supervised, medical initialisation: ViT-B/16 from ImageNet-21k, first trained on MIMIC-CXR.

Stage 1: python -m cxrjax.main --config configs/sup_med.py:stage=pretrain \
             --workdir runs/sup_med_pretrain
Stage 2: python -m cxrjax.main --config configs/sup_med.py:stage=finetune,dataset=vindr
         (starts from stage 1's best checkpoint, converted with tools/convert_checkpoint.py;
         the head is re-initialised when the label sets differ)
"""

from cxrjax.config_base import base_config, parse_arg, weights_root


def get_config(arg=None):
    args = parse_arg(arg, stage="finetune", dataset="vindr", fraction="1.0", seed="0")
    if args["stage"] == "pretrain":
        c = base_config("sup_med_pretrain", "mimic")
        c.model.init_from = f"{weights_root()}/vit_b16_in21k"
    elif args["stage"] == "finetune":
        c = base_config("sup_med", args["dataset"])
        c.model.init_from = f"{weights_root()}/vit_b16_mimic"
        c.model.init_hint = (
            "python -m cxrjax.main --config configs/sup_med.py:stage=pretrain "
            "--workdir runs/sup_med_pretrain && python tools/convert_checkpoint.py "
            f"runs/sup_med_pretrain --out {c.model.init_from}"
        )
        c.data.train_fraction = float(args["fraction"])
    else:
        raise ValueError(f"stage={args['stage']!r}: use 'pretrain' or 'finetune'")
    c.model.variant = "vit_b16_in21k"
    c.seed = int(args["seed"])
    return c
