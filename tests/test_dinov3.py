"""DINOv3 ViTs: converted checkpoints compute what the references compute.

A random-init transformers ``DINOv3ViTModel`` is the reference; the official torch-hub layout is
written from the same weights (fused qkv with a masked, non-zero key bias, ``rope_embed.periods``,
``storage_tokens``), and timm's Eva ``vit_*_patch16_dinov3`` is compared on its own. Pooled
features agree to 1e-4 (float32) at the native size, at 224 px and on a non-square input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cxrjax import embed  # noqa: E402
from cxrjax.models import VisionTransformer, count_params, flops_per_image, get_spec  # noqa: E402
from cxrjax.models.convert import convert_source, detect_format  # noqa: E402
from cxrjax.models.rope import periods  # noqa: E402
from cxrjax.models.weights import MASK_TOKEN, read_weights  # noqa: E402
from tests.test_convert import _check, _inputs, _randomize, _torch_in  # noqa: E402

_SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    num_register_tokens=4,
    patch_size=16,
    image_size=64,
)


def _hf(scale: float = 0.2, **cfg):
    config = transformers.DINOv3ViTConfig(**{**_SMALL, **cfg})
    model = transformers.DINOv3ViTModel(config)
    _randomize(model, seed=3, scale=scale)
    return model.eval()


def _hf_out(model, x: np.ndarray):
    with torch.no_grad():
        out = model(pixel_values=_torch_in(x))
    return out.pooler_output.numpy(), out.last_hidden_state.numpy()


def _flax(conv, **kw):
    model = VisionTransformer(num_classes=0, **dict(conv.arch, **kw))
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


# Native size, 224 px (another grid: RoPE has nothing to resample), and a non-square input.
_SIZES = [(64, 64), (224, 224), (48, 80)]


def _images(hw: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, *hw, 3)).astype(np.float32)


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_hf_dinov3_matches(tmp_path, gated):
    extra = dict(use_gated_mlp=True, hidden_act="silu") if gated else {}
    ref = _hf(**extra)
    ref.save_pretrained(tmp_path / "hf")
    conv = convert_source(tmp_path / "hf")
    assert conv.unused == []
    token = ref.embeddings.mask_token.detach().numpy()  # (1, 1, width), randomised
    np.testing.assert_array_equal(conv.params[MASK_TOKEN], token.reshape(-1))
    assert conv.arch["posemb"] == "rope" and not conv.arch["key_bias"]
    assert conv.arch["mlp_kind"] == ("swiglu" if gated else "gelu")
    cls_fn, mean_fn = _flax(conv), _flax(conv, pool="mean")
    for i, hw in enumerate(_SIZES):
        x = _images(hw, seed=i)
        pooled, tokens = _hf_out(ref, x)
        _check(np.asarray(cls_fn(conv.params, jnp.asarray(x))), pooled, f"CLS at {hw}")
        patches = tokens[:, 1 + 4 :].mean(axis=1)
        _check(np.asarray(mean_fn(conv.params, jnp.asarray(x))), patches, f"mean patch at {hw}")


def _official_state_dict(model, gated: bool) -> dict[str, torch.Tensor]:
    """The HF model's weights in the official DinoVisionTransformer layout."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "storage_tokens": sd["embeddings.register_tokens"],
        "mask_token": sd["embeddings.mask_token"][0],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
        "rope_embed.periods": torch.from_numpy(periods(64 // 4, 100.0)),
    }
    for i in range(model.config.num_hidden_layers):
        h, b = f"model.layer.{i}.", f"blocks.{i}."
        a = h + "attention."
        q, k, v = (sd[f"{a}{n}_proj.weight"] for n in "qkv")
        out[b + "attn.qkv.weight"] = torch.cat([q, k, v])
        # The official key bias is a stored parameter multiplied by a 0 mask: make it non-zero.
        k_bias = torch.full_like(sd[a + "q_proj.bias"], 7.0)
        out[b + "attn.qkv.bias"] = torch.cat([sd[a + "q_proj.bias"], k_bias, sd[a + "v_proj.bias"]])
        mask = torch.ones(3 * q.shape[0])
        mask[q.shape[0] : 2 * q.shape[0]] = 0
        out[b + "attn.qkv.bias_mask"] = mask
        out[b + "attn.proj.weight"] = sd[a + "o_proj.weight"]
        out[b + "attn.proj.bias"] = sd[a + "o_proj.bias"]
        for n in ("norm1", "norm2"):
            out[f"{b}{n}.weight"], out[f"{b}{n}.bias"] = sd[f"{h}{n}.weight"], sd[f"{h}{n}.bias"]
        out[b + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
        out[b + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
        names = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
        if not gated:
            names = {"fc1": "up_proj", "fc2": "down_proj"}
        for ours, theirs in names.items():
            for t in ("weight", "bias"):
                out[f"{b}mlp.{ours}.{t}"] = sd[f"{h}mlp.{theirs}.{t}"]
    return out


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_official_hub_layout_matches(tmp_path, gated):
    extra = dict(use_gated_mlp=True, hidden_act="silu") if gated else {}
    ref = _hf(**extra)
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    official = _official_state_dict(ref, gated)
    torch.save(official, path)
    assert detect_format(path) == "dinov3"
    conv = convert_source(path)
    assert conv.arch["num_heads"] == 4  # read from rope_embed.periods
    assert conv.unused == []
    np.testing.assert_array_equal(conv.params[MASK_TOKEN], official["mask_token"].numpy()[0])
    fn = _flax(conv)
    for i, hw in enumerate(_SIZES):
        x = _images(hw, seed=10 + i)
        _check(np.asarray(fn(conv.params, jnp.asarray(x))), _hf_out(ref, x)[0], f"CLS at {hw}")


@pytest.mark.parametrize("swiglu,qkv_bias", [(False, True), (True, False)])
def test_timm_dinov3_matches(tmp_path, swiglu, qkv_bias):
    eva = pytest.importorskip("timm.models.eva")
    from functools import partial

    from safetensors.torch import save_file
    from timm.layers import LayerNorm

    model = eva.Eva(
        img_size=64,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=4,
        qkv_bias=qkv_bias,
        init_values=1e-5,
        rope_type="dinov3",
        rope_temperature=100,
        rope_rotate_half=True,
        use_rot_pos_emb=True,
        use_abs_pos_emb=False,
        num_reg_tokens=4,
        use_fc_norm=False,
        norm_layer=partial(LayerNorm, eps=1e-5),
        dynamic_img_size=True,
        num_classes=0,
        global_pool="token",
        swiglu_mlp=swiglu,
        swiglu_align_to=8 if swiglu else 0,
        mlp_ratio=4,
    )
    _randomize(model, seed=4)
    model.eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert detect_format(path) == "timm"
    conv = convert_source(path, num_heads=4)
    assert conv.unused == []
    fn = _flax(conv)
    for i, hw in enumerate(_SIZES):
        x = _images(hw, seed=20 + i)
        with torch.no_grad():
            ref = model.forward_head(model.forward_features(_torch_in(x)), pre_logits=True)
        _check(np.asarray(fn(conv.params, jnp.asarray(x))), ref.numpy(), f"CLS at {hw}")


def test_registry_shapes_and_counts():
    spec = get_spec("vit_base_patch16_dinov3.lvd1689m")
    assert (
        spec.tag == "lvd1689m" and spec.sources["hf"] == "facebook/dinov3-vitb16-pretrain-lvd1689m"
    )
    assert spec.mean == (0.485, 0.456, 0.406)
    # ViT-B/16 without position embeddings: ~86M (the DINOv3 paper's 86M).
    assert count_params("vit_base_patch16_dinov3") == pytest.approx(85.66e6, rel=1e-3)
    assert count_params("vit_small_patch16_dinov3") == pytest.approx(21.6e6, rel=1e-3)
    # ViT-S+/16: SwiGLU with 1536 hidden units (HF intermediate_size), ~28.7M.
    assert count_params("vit_small_plus_patch16_dinov3") == pytest.approx(28.69e6, rel=1e-3)
    assert count_params("vit_large_patch16_dinov3") == pytest.approx(303.1e6, rel=1e-3)
    # 196 patches + CLS + 4 storage tokens at 224 px.
    assert flops_per_image("vit_base_patch16_dinov3", 224) == pytest.approx(35.9, rel=5e-3)


def test_vit_small_end_to_end_cli_and_embed(tmp_path):
    """ViT-S/16 at full size: HF folder -> tools/convert_checkpoint.py -> python -m cxrjax.embed."""
    import tools.convert_checkpoint as cli

    ref = _hf(
        scale=0.03,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=224,
        layerscale_value=1e-5,
    )
    ref.save_pretrained(tmp_path / "hf")
    out = cli.convert(str(tmp_path / "hf"), str(tmp_path / "w"))
    flat, meta = read_weights(out)
    assert meta["variant"] == "vit_small_patch16_dinov3"
    # The tool keeps the checkpoint's own mask token, as the SSL student's (width,) vector.
    np.testing.assert_array_equal(
        flat[MASK_TOKEN], ref.embeddings.mask_token.detach().numpy().reshape(384)
    )
    x = _inputs(64, n=3, seed=5)
    np.save(tmp_path / "x.npy", x)
    feats = np.load(embed.run(str(out), [str(tmp_path / "x.npy")], str(tmp_path / "f.npy")))
    _check(feats, _hf_out(ref, x)[0], "embed features of ViT-S/16")
