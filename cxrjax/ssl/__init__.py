"""Continued self-supervised pretraining with the DINOv2 objective (DINO + iBOT + KoLeo).

`heads` (projection head), `objective` (losses and Sinkhorn-Knopp centring), `multicrop` (the
grain multi-crop pipeline), `schedules`, `step` (state and the jitted step) and `trainer` (the
loop, run directory and checkpoints). The run directory it writes is a weights folder too: the
teacher backbone initialises fine-tuning (`--config.model.init_from=RUN`).
"""
