"""The SSL fields every pretraining config starts from: DINOv2's recipe (ViT-L/14 defaults).

`configs/ssl_pretrain.py` and `configs/ssl_pretrain_demo.py` start from `ssl_base_config` and
change what their scale needs. Warmups are in epochs, as in DINOv2's configs.
"""

from __future__ import annotations

import ml_collections

from cxrjax.config_base import base_config


def ssl_base_config(experiment: str) -> ml_collections.ConfigDict:
    c = base_config(experiment, "csv")
    # cxrjax.main dispatches on this: "dino" runs cxrjax.ssl.trainer instead of fine-tuning.
    c.objective = "dino"
    c.data.dataset = "folder"
    c.data.splits = ("train",)  # the shard splits to pool; labels are ignored
    c.input.normalization = "pretrained"
    c.model.drop_path = 0.1

    c.crops = ml_collections.ConfigDict()
    c.crops.global_size = 224
    c.crops.local_size = 98  # 96 in DINOv2 (patch 16); a multiple of the patch size here
    c.crops.num_local = 8
    c.crops.global_scale = (0.32, 1.0)
    c.crops.local_scale = (0.05, 0.32)
    c.crops.flip_prob = 0.5
    c.crops.max_rotation = 10.0
    c.crops.jitter_prob = 0.8
    c.crops.brightness = 0.4
    c.crops.contrast = 0.4
    c.crops.blur_prob = (1.0, 0.1, 0.5)
    c.crops.blur_sigma = (0.1, 2.0)

    s = c.ssl = ml_collections.ConfigDict()
    s.prototypes = 65536
    s.ibot_separate_head = False
    s.ibot_prototypes = 0  # 0: as many as the DINO head (with a separate iBOT head)
    s.head_hidden_dim = 2048
    s.head_bottleneck_dim = 256
    s.head_layers = 3
    s.student_temp = 0.1
    s.teacher_temp = 0.07
    s.warmup_teacher_temp = 0.04
    s.teacher_temp_warmup_epochs = 30.0
    s.sinkhorn_iterations = 3
    # The teacher's targets: "sinkhorn_knopp" (DINOv2's ViT-L/g recipes) or "centering" (DINOv1's
    # softmax centring, DINOv2's default config) with the centre's EMA momentum (DINOv1's 0.9).
    s.centering = "sinkhorn_knopp"
    s.center_momentum = 0.9
    # Keep the prototypes' weight-norm gain at 1 (DINOv1's norm_last_layer=True); DINOv2 and
    # RAD-DINO train it.
    s.freeze_gain = False
    s.momentum = 0.992  # cosine to 1
    s.lr = 4e-3  # DINOv2's base lr at batch 1024 (scaled by sqrt(batch / 1024) in configs)
    s.min_lr = 1e-6
    s.warmup_epochs = 10.0
    s.wd = 0.04  # cosine to wd_end
    s.wd_end = 0.2
    s.layer_decay = 0.9
    s.patch_embed_lr_mult = 0.2
    s.grad_clip = 3.0
    # Gradient accumulation: the step averages the gradients of this many micro-batches (rows
    # j, j + k, ...), for a batch that does not fit at once; Sinkhorn-Knopp and KoLeo then see a
    # micro-batch, so keep micro-batches in the hundreds.
    s.accum_steps = 1
    s.freeze_prototypes_epochs = 1.0
    # Heads-only warmup: the backbone (and mask token) stay fixed for this many epochs while the
    # random heads learn to read it; 0 (DINOv2's and RAD-DINO's recipes have no such phase).
    s.heads_only_epochs = 0.0
    s.dino_weight = 1.0
    s.ibot_weight = 1.0
    s.koleo_weight = 0.1
    s.mask_prob = 0.5
    s.mask_ratio = (0.1, 0.5)
    # Iterations per schedule epoch (DINOv2's OFFICIAL_EPOCH_LENGTH); 0: one pass over the data.
    s.epoch_length = 1250
    # kNN AUROC of the teacher on a labelled split every N steps (0: off); see ssl/monitor.py.
    s.knn_every_steps = 0
    s.knn_split = "val"
    s.knn_k = 20
    s.knn_temperature = 0.07

    c.batch_size = 1024
    c.epochs = 100
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    return c
