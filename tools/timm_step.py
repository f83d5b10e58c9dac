"""The PyTorch side of tools/bench_train.py: timm's same ViT training step, timed in rounds.

A module of its own so the comparison's reference (torch, timm, their devices and compile modes)
stays apart from cxrjax's side; `tools/bench_train.py --framework torch` alternates the two.
"""

from __future__ import annotations

import argparse
import time

from cxrjax.errors import ConfigError
from cxrjax.models import get_spec


class TorchStep:
    """timm's same architecture, same batch and dtype: float32 runs plain, bfloat16 under
    autocast. `--torch-mode auto` compiles on CUDA only: on CPU torch.compile of a ViT step takes
    many minutes (Inductor's C++ codegen) for no gain over eager at these sizes. Built and warmed
    up (two steps) on construction; `time(steps)` runs `steps` more and returns their seconds."""

    def __init__(self, args: argparse.Namespace) -> None:
        import timm
        import torch

        spec = get_spec(args.model)
        size = args.image_size or spec.image_size
        name = spec.sources.get("timm", "").split(".")[0]
        if not name:
            raise ConfigError(
                f"{args.model} has no timm counterpart to compare with",
                "Pick a --model whose registry entry names a timm source, e.g. vit_s16_in21k.",
            )
        self.torch = torch
        self.device = device = "cuda" if torch.cuda.is_available() else "cpu"
        self.mode = (
            args.torch_mode
            if args.torch_mode != "auto"
            else ("compile" if device == "cuda" else "eager")
        )
        torch.manual_seed(0)
        model = timm.create_model(
            name, pretrained=False, num_classes=args.num_labels, img_size=size
        )
        model = model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
        forward = torch.compile(model) if self.mode == "compile" else model
        self.autocast = autocast = args.dtype != "float32"
        images = torch.randint(0, 256, (args.batch, size, size), dtype=torch.uint8, device=device)
        labels = torch.randint(0, 2, (args.batch, args.num_labels), device=device).float()
        mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        loss_fn = torch.nn.BCEWithLogitsLoss()

        def step():
            # As cxrjax's step: uint8 in, [0, 1], three channels, the weights' mean and std.
            x = (images.float().div(255).unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(forward(x).float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        self.step = step
        self.versions = {"torch": torch.__version__, "timm": timm.__version__}
        self.time(2)

    def time(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter() - start

    def figures(self, args: argparse.Namespace, seconds: float) -> dict:
        return {
            "images_per_s": args.steps * args.batch / seconds,
            "step_ms": 1000 * seconds / args.steps,
            "mode": self.mode,
            "dtype": "bfloat16 autocast" if self.autocast else "float32",
            "threads": self.torch.get_num_threads(),
            **self.versions,
        }
