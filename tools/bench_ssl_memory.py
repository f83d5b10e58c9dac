"""The iBOT logits' memory at scale, analytic and compiled.

  python tools/bench_ssl_memory.py [--batch 1024] [--prototypes 65536] [--compile-batch 8]

Analytic: the (slots, K) float32 logit array iBOT's head makes, per-crop slots (the old layout:
every global crop 0.5 N padded slots) against DINOv2's bounded gather (`masked_slots`), for
ViT-B/14 at 224 px (N = 256 patches). Compiled: `jax.jit(loss).lower(ShapeDtypeStruct...)
.compile().memory_analysis()` of the SSL loss for vit_tiny_demo at `--compile-batch` (compiling
ViT-B/14 at batch 1024 on a 2-core CPU does not finish in reasonable time; on a GPU pass
--variant and --compile-batch to measure the real figure).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from cxrjax.models import create_model
from cxrjax.ssl.config import ssl_base_config
from cxrjax.ssl.multicrop import CropOptions
from cxrjax.ssl.step import build_heads, make_loss
from cxrjax.ssl.trainer import _student_shapes, crop_options


def analytic(batch: int, prototypes: int) -> None:
    crops = CropOptions(global_size=224, patch_size=14)
    per_crop = 2 * batch * crops.max_masked
    bounded = crops.masked_slots(2 * batch)
    for name, slots in (("per-crop slots (old)", per_crop), ("bounded (DINOv2)", bounded)):
        print(
            f"analytic {name}: {slots:,} slots x {prototypes:,} x 4 B = "
            f"{slots * prototypes * 4 / 1e9:.1f} GB per fp32 logit array"
        )
    print(f"ratio {per_crop / bounded:.1f}x")


def compiled(variant: str, batch: int, prototypes: int, size: int, local: int) -> None:
    c = ssl_base_config("bench")
    c.ssl.prototypes = prototypes
    c.crops.global_size, c.crops.local_size = size, local
    model = create_model(variant, 0, image_size=size, dtype="float32")
    heads = build_heads(c)
    crops = crop_options(c, model.patch_size)
    loss_fn = make_loss(model, heads, crops, c.ssl, jnp.zeros(3), jnp.ones(3))
    student = jax.eval_shape(lambda: _student_shapes(model, heads, size))
    teacher = {k: v for k, v in student.items() if k != "mask_token"}
    batch_shapes = {
        "global": jax.ShapeDtypeStruct((batch, 2, size, size), jnp.uint8),
        "local": jax.ShapeDtypeStruct((batch, crops.num_local, local, local), jnp.uint8),
        "mask": jax.ShapeDtypeStruct((batch, 2, crops.grid**2), jnp.bool_),
    }
    grad = jax.jit(jax.grad(lambda s, t, b: loss_fn(s, t, b, jax.random.key(0), 0.04)[0]))
    mem = grad.lower(student, teacher, batch_shapes).compile().memory_analysis()
    print(
        f"compiled {variant} batch {batch}, {prototypes:,} prototypes: temp "
        f"{mem.temp_size_in_bytes / 1e9:.3f} GB, "
        f"arguments {mem.argument_size_in_bytes / 1e9:.3f} GB"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--variant", default="vit_tiny_demo")
    p.add_argument("--compile-batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--local-size", type=int, default=32)
    a = p.parse_args()
    analytic(a.batch, a.prototypes)
    compiled(a.variant, a.compile_batch, a.prototypes, a.size, a.local_size)


if __name__ == "__main__":
    main()
