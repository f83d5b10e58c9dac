"""Export round trip: cxrjax weights -> timm safetensors -> the same outputs in PyTorch."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm_vit = pytest.importorskip("timm.models.vision_transformer")

from cxrjax.models import create_model  # noqa: E402
from cxrjax.models.convert import convert_timm, export_timm, to_timm_state_dict  # noqa: E402
from cxrjax.models.weights import flatten, save_weights  # noqa: E402
from tests.test_models_pretrained import random_params  # noqa: E402


def test_export_loads_into_timm_with_the_same_logits(tmp_path):
    params = random_params("vit_tiny_demo", 3, 64)
    params = jax.tree.map(lambda a: 0.2 * a, params)
    # SSL keys that timm's ViT has no place for are left out of the export.
    ssl = {"mask_token": np.ones(96, np.float32), "dino_head": {"gain": np.ones(8, np.float32)}}
    w = save_weights(
        tmp_path / "w",
        {**params, **ssl},
        variant="vit_tiny_demo",
        source="test",
        source_sha256="",
        source_format="cxrjax",
        image_size=64,
        label_names=["a", "b", "c"],
    )
    out = export_timm(w, tmp_path / "export" / "model.safetensors")
    cfg = json.loads(out.with_suffix(".json").read_text())
    assert cfg["label_names"] == ["a", "b", "c"] and cfg["kwargs"]["num_classes"] == 3
    model = timm_vit.VisionTransformer(**cfg["kwargs"]).eval()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(out)), strict=True)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    flax_model = create_model("vit_tiny_demo", 3)
    ours = np.asarray(jax.jit(lambda p, x: flax_model.apply({"params": p}, x))(params, x))
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("registers", [0, 4])
def test_timm_to_cxrjax_to_timm_is_exact(registers):
    extra = dict(reg_tokens=4, no_embed_class=True) if registers else {}
    model = timm_vit.VisionTransformer(
        img_size=56,
        patch_size=14,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=3,
        init_values=1e-5,
        **extra,
    )
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    conv = convert_timm(sd, num_heads=4)
    back = to_timm_state_dict(flatten(conv.params), num_heads=4)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_allclose(back[k], sd[k], atol=1e-7, err_msg=k)
