"""Exports cxrjax weights as a timm-compatible safetensors file, so PyTorch users can load them.

  python tools/export_checkpoint.py WEIGHTS_DIR --out model.safetensors

Writes ``model.safetensors`` in timm's ``VisionTransformer`` naming and ``model.json`` beside it
with the timm architecture name and constructor arguments (``timm.create_model(name,
pretrained=False, **kwargs)`` then ``load_state_dict``), the label names and the input
normalisation. The conversion itself is :func:`cxrjax.models.convert.export_timm`.
"""

from __future__ import annotations

import sys

from absl import flags

from cxrjax import console
from cxrjax.errors import ConfigError
from cxrjax.models.convert import export_timm


def _flag_values() -> flags.FlagValues:
    # A private FlagValues: importing this module never clashes with another tool's flags.
    fv = flags.FlagValues()
    flags.DEFINE_string("out", None, "Output .safetensors file.", flag_values=fv)
    return fv


def _main(fv: flags.FlagValues, positional: list[str]) -> int:
    if len(positional) != 1 or not fv.out:
        raise ConfigError(
            "export_checkpoint.py needs one WEIGHTS_DIR and --out",
            "python tools/export_checkpoint.py WEIGHTS_DIR --out model.safetensors",
        )
    path = export_timm(positional[0], fv.out)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return console.run_cli(__doc__, _flag_values(), argv, _main)


if __name__ == "__main__":
    sys.exit(main())
