"""SigLIP / SigLIP 2 / MedSigLIP image towers: converted checkpoints match the references.

The reference is a random-init transformers ``SiglipVisionModel`` (also saved inside a whole
``SiglipModel``, and as a big_vision ``.npz`` written from the same weights) or
``Siglip2VisionModel``; the compared output is the MAP head's, ``pooler_output``, to 1e-4 in
float32 at the native size and, with the position embedding resampled, at 224 px.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cxrjax.models import VisionTransformer, count_params, get_spec  # noqa: E402
from cxrjax.models.convert import convert_source, detect_format  # noqa: E402
from cxrjax.models.weights import CheckpointError  # noqa: E402
from tests.test_convert import _check, _inputs, _randomize, _torch_in  # noqa: E402

_SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    patch_size=16,
    image_size=64,
)


def _siglip(**cfg):
    config = transformers.SiglipVisionConfig(**{**_SMALL, **cfg})
    model = transformers.SiglipVisionModel(config)
    _randomize(model, seed=5)
    return model.eval()


def _pooled(model, x: np.ndarray, interpolate: bool) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=_torch_in(x), interpolate_pos_encoding=interpolate)
    return out.pooler_output.numpy()


def _flax(conv):
    model = VisionTransformer(num_classes=0, **conv.arch)
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


def _check_sizes(conv, ref) -> None:
    fn = _flax(conv)
    for size in (64, 224):
        x = _inputs(size, seed=size)
        ours = np.asarray(fn(conv.params, jnp.asarray(x)))
        _check(ours, _pooled(ref, x, interpolate=size != 64), f"MAP features at {size}px")


def test_hf_siglip_vision_model_matches(tmp_path):
    ref = _siglip()
    ref.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf"
    conv = convert_source(tmp_path / "hf")
    assert conv.unused == []
    assert conv.arch["pool"] == "map" and not conv.arch["class_token"]
    assert conv.params["pos_embedding"].shape == (1, 16, 64)  # patches only
    _check_sizes(conv, ref)


def test_whole_siglip_model_folder_takes_the_image_tower(tmp_path):
    vision = dict(_SMALL)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = transformers.SiglipConfig(text_config=text, vision_config=vision)
    model = transformers.SiglipModel(config)
    _randomize(model, seed=6)
    model.eval()
    model.save_pretrained(tmp_path / "hf")
    conv = convert_source(tmp_path / "hf")
    assert conv.unused == []  # the text tower is not reported
    x = _inputs(64, seed=1)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=_torch_in(x)).pooler_output.numpy()
    _check(np.asarray(_flax(conv)(conv.params, jnp.asarray(x))), ref, "SiglipModel image tower")


def test_hf_siglip2_vision_model_matches(tmp_path):
    config = transformers.Siglip2VisionConfig(
        **{k: v for k, v in _SMALL.items() if k != "image_size"}, num_patches=16
    )
    ref = transformers.Siglip2VisionModel(config)
    _randomize(ref, seed=7)
    ref.eval()
    ref.save_pretrained(tmp_path / "hf")
    conv = convert_source(tmp_path / "hf")
    assert conv.arch["image_size"] == 64 and conv.arch["posemb_resample"] == "siglip2"
    fn = _flax(conv)
    # Native 4 x 4 grid, and 224 px (14 x 14: the position embedding is resampled).
    for size in (64, 224):
        x = _inputs(size, seed=size + 1)
        g = size // 16
        # Siglip2's processor flattens each patch as (row, column, channel).
        patches = x.reshape(2, g, 16, g, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, g * g, -1)
        with torch.no_grad():
            out = ref(
                pixel_values=torch.from_numpy(patches.copy()),
                pixel_attention_mask=torch.ones(2, g * g, dtype=torch.long),
                spatial_shapes=torch.tensor([[g, g]] * 2),
            )
        ours = np.asarray(fn(conv.params, jnp.asarray(x)))
        _check(ours, out.pooler_output.numpy(), f"Siglip2 MAP features at {size}px")


def _big_vision_npz(model, scanned: bool) -> dict[str, np.ndarray]:
    """The HF model's weights as big_vision's SigLIP ``params/img/...`` tree."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    heads, width = model.config.num_attention_heads, model.config.hidden_size
    hd = width // heads

    def dense(prefix: str, w: np.ndarray, b: np.ndarray, kind: str = "dense") -> dict:
        if kind == "qkv":
            return {
                f"{prefix}/kernel": w.T.reshape(width, heads, hd),
                f"{prefix}/bias": b.reshape(heads, hd),
            }
        if kind == "out":
            return {f"{prefix}/kernel": w.T.reshape(heads, hd, width), f"{prefix}/bias": b}
        return {f"{prefix}/kernel": w.T, f"{prefix}/bias": b}

    def ln(prefix: str, name: str) -> dict:
        return {f"{prefix}/scale": sd[name + ".weight"], f"{prefix}/bias": sd[name + ".bias"]}

    out = {
        "embedding/kernel": sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["embeddings.patch_embedding.bias"],
        "pos_embedding": sd["embeddings.position_embedding.weight"][None],
        **ln("Transformer/encoder_norm", "post_layernorm"),
        "MAPHead_0/probe": sd["head.probe"],
        **ln("MAPHead_0/LayerNorm_0", "head.layernorm"),
    }
    m = "MAPHead_0/MultiHeadDotProductAttention_0/"
    for name, w, b in zip(
        ("query", "key", "value"),
        np.split(sd["head.attention.in_proj_weight"], 3),
        np.split(sd["head.attention.in_proj_bias"], 3),
        strict=True,
    ):
        out.update(dense(m + name, w, b, "qkv"))
    out.update(
        dense(
            m + "out",
            sd["head.attention.out_proj.weight"],
            sd["head.attention.out_proj.bias"],
            "out",
        )
    )
    for i, fc in enumerate(("fc1", "fc2")):
        out.update(
            dense(
                f"MAPHead_0/MlpBlock_0/Dense_{i}",
                sd[f"head.mlp.{fc}.weight"],
                sd[f"head.mlp.{fc}.bias"],
            )
        )
    blocks = []
    for i in range(model.config.num_hidden_layers):
        h = f"encoder.layers.{i}."
        blk = {**ln("LayerNorm_0", h + "layer_norm1"), **ln("LayerNorm_1", h + "layer_norm2")}
        a = "MultiHeadDotProductAttention_0/"
        for name in ("query", "key", "value"):
            t = h + f"self_attn.{name[0]}_proj"
            blk.update(dense(a + name, sd[t + ".weight"], sd[t + ".bias"], "qkv"))
        t = h + "self_attn.out_proj"
        blk.update(dense(a + "out", sd[t + ".weight"], sd[t + ".bias"], "out"))
        for j, fc in enumerate(("fc1", "fc2")):
            blk.update(
                dense(f"MlpBlock_0/Dense_{j}", sd[f"{h}mlp.{fc}.weight"], sd[f"{h}mlp.{fc}.bias"])
            )
        blocks.append(blk)
    if scanned:
        for key in blocks[0]:
            out[f"Transformer/encoderblock/{key}"] = np.stack([b[key] for b in blocks])
    else:
        for i, blk in enumerate(blocks):
            out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
    tree = {f"params/img/{k}": v for k, v in out.items()}
    tree["params/txt/Embed_0/embedding"] = np.zeros((8, 4), np.float32)  # a text tower, ignored
    return tree


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_big_vision_npz_matches(tmp_path, scanned):
    ref = _siglip()
    path = tmp_path / "siglip.npz"
    np.savez(path, **_big_vision_npz(ref, scanned))
    assert detect_format(path) == "augreg_npz"
    conv = convert_source(path)
    assert conv.source_format == "big_vision_npz" and conv.unused == []
    _check_sizes(conv, ref)


def test_no_map_head_is_refused(tmp_path):
    _siglip(vision_use_head=False).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="no MAP head"):
        convert_source(tmp_path / "hf")


def test_registry_siglip_tags():
    med = get_spec("vit_so400m_patch14_siglip.medsiglip")
    assert (
        med.image_size == 448
        and med.patch_size == 14
        and med.sources["hf"] == "google/medsiglip-448"
    )
    assert med.mean == (0.5, 0.5, 0.5) and med.std == (0.5, 0.5, 0.5)
    assert med.kwargs["pool"] == "map" and not med.kwargs["class_token"]
    assert get_spec("vit_so400m_patch14_siglip.webli").image_size == 378
    # HF's SigLIP vision towers: B/16 92.9M, So400m/14 428M parameters (MAP head included).
    assert count_params("vit_base_patch16_siglip") == pytest.approx(92.88e6, rel=1e-3)
    assert count_params("vit_so400m_patch14_siglip") == pytest.approx(428.2e6, rel=1e-3)
