"""Converted checkpoints must compute what the originals compute.

Each test random-initialises a reference PyTorch model (timm, transformers, or the official
DINOv2 layout via timm's own converter), saves it in the source format, converts it with cxrjax
and compares CLS features and logits on the same random inputs (float32, atol 1e-4), at the
checkpoint's native resolution and at another one (position embeddings resampled).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cxrjax.models import VisionTransformer, create_model  # noqa: E402
from cxrjax.models.convert import (  # noqa: E402
    DINO_HEAD_FILE,
    convert_dino_head,
    convert_source,
    convert_timm,
    detect_format,
    match_variant,
)
from cxrjax.models.pretrained import load_pretrained  # noqa: E402
from cxrjax.models.weights import MASK_TOKEN, CheckpointError, flatten, read_weights  # noqa: E402

ATOL = 1e-4


def _randomize(module, seed: int = 0, scale: float = 0.2) -> None:
    """Random values everywhere (incl. LayerScale, norms, tokens) so no weight is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if (
                name.endswith(("norm1.weight", "norm2.weight", "norm.weight"))
                or "layernorm" in name
            ):
                p.copy_(1.0 + scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def _inputs(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _torch_in(x: np.ndarray):
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _flax(conv, num_classes: int, resample: str, **kw):
    arch = dict(conv.arch, posemb_resample=resample, **kw)
    model = VisionTransformer(num_classes=num_classes, head_zero_init=False, **arch)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, return_features=True))
    return lambda x: [np.asarray(a) for a in fn(conv.params, jnp.asarray(x))]


def _check(ours, ref, what: str) -> None:
    err = float(np.abs(ours - np.asarray(ref)).max())
    assert err <= ATOL, f"{what}: max abs difference {err:.2e} > {ATOL}"


# --------------------------------------------------------------------------- timm


def _timm_vit(scale: float = 0.2, **kw):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    model = timm_vit.VisionTransformer(**kw)
    _randomize(model, scale=scale)
    return model.eval()


def _timm_forward(model, x: np.ndarray):
    with torch.no_grad():
        tokens = model.forward_features(_torch_in(x))
        feats = model.forward_head(tokens, pre_logits=True)
        logits = model.forward_head(tokens)
    return feats.numpy(), logits.numpy()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_timm_augreg_vit_matches(tmp_path, suffix):
    model = _timm_vit(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=5,
        dynamic_img_size=True,
    )
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    assert detect_format(path) == "timm"
    conv = convert_source(path, num_heads=4)
    assert conv.arch["image_size"] == 32 and conv.arch["num_heads"] == 4
    for size in (32, 48):
        x = _inputs(size)
        logits, feats = _flax(conv, 5, "timm")(x)
        ref_feats, ref_logits = _timm_forward(model, x)
        _check(feats, ref_feats, f"features at {size}px")
        _check(logits, ref_logits, f"logits at {size}px")


@pytest.mark.parametrize("registers", [0, 4])
def test_timm_dinov2_matches(tmp_path, registers):
    extra = dict(reg_tokens=4, no_embed_class=True) if registers else {}
    model = _timm_vit(
        img_size=56,
        patch_size=14,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=3,
        init_values=1e-5,
        dynamic_img_size=True,
        **extra,
    )
    from safetensors.torch import save_file

    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    conv = convert_source(path, num_heads=4)
    assert conv.arch["num_registers"] == registers
    assert conv.arch["layerscale_init"] is not None
    for size in (56, 84):
        x = _inputs(size, seed=size)
        logits, feats = _flax(conv, 3, "timm")(x)
        ref_feats, ref_logits = _timm_forward(model, x)
        _check(feats, ref_feats, f"features at {size}px")
        _check(logits, ref_logits, f"logits at {size}px")


def test_bf16_compute_stays_within_2e_2_of_float32_torch(tmp_path):
    model = _timm_vit(
        scale=0.05,
        img_size=56,
        patch_size=14,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=3,
        init_values=1e-5,
    )
    conv = convert_timm({k: v.numpy() for k, v in model.state_dict().items()}, num_heads=4)
    x = _inputs(56, seed=2)
    logits, feats = _flax(conv, 3, "timm", dtype=jnp.bfloat16)(x)
    ref_feats, ref_logits = _timm_forward(model, x)
    for ours, ref in ((feats, ref_feats), (logits, ref_logits)):
        rel = np.abs(ours - ref).max() / np.abs(ref).max()
        assert rel <= 2e-2, rel


def _official_dinov2_state_dict(timm_model, registers: int) -> dict:
    """The official DINOv2 layout of a timm DINOv2 model (inverse of timm's _convert_dinov2)."""
    sd = {k: v.clone() for k, v in timm_model.state_dict().items() if not k.startswith("head")}
    sd["mask_token"] = torch.randn(1, sd["cls_token"].shape[-1])
    if registers:
        # timm folded the CLS position into cls_token; the official file keeps it in pos_embed.
        cls_pos = torch.randn(1, 1, sd["cls_token"].shape[-1])
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["register_tokens"] = sd.pop("reg_token")
    for k in list(sd):
        if ".mlp.fc1." in k and timm_model.blocks[0].mlp.__class__.__name__ == "SwiGLUPacked":
            sd[k.replace("fc1", "w12")] = sd.pop(k)
        elif ".mlp.fc2." in k and timm_model.blocks[0].mlp.__class__.__name__ == "SwiGLUPacked":
            sd[k.replace("fc2", "w3")] = sd.pop(k)
    return sd


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
def test_official_dinov2_pth_matches_timm_loading_it(tmp_path, registers, swiglu):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from timm.layers import SwiGLUPacked

    extra = dict(reg_tokens=4, no_embed_class=True) if registers else {}
    if swiglu:
        extra.update(mlp_ratio=4, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    model = _timm_vit(
        img_size=56,
        patch_size=14,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=0,
        init_values=1e-5,
        dynamic_img_size=True,
        **extra,
    )
    official = _official_dinov2_state_dict(model, registers)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    # The reference: timm's own converter reading the official layout.
    ref = timm_vit.VisionTransformer(
        img_size=56,
        patch_size=14,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=0,
        init_values=1e-5,
        dynamic_img_size=True,
        **extra,
    ).eval()
    ref.load_state_dict(timm_vit.checkpoint_filter_fn(dict(official), ref))
    assert detect_format(path) == "dinov2"
    conv = convert_source(path, num_heads=4)
    assert conv.source_format == "dinov2" and conv.unused == []
    # The trained mask token is kept, as the (width,) vector the SSL student holds.
    np.testing.assert_array_equal(conv.params[MASK_TOKEN], official["mask_token"].numpy()[0])
    assert conv.arch["mlp_kind"] == ("swiglu" if swiglu else "gelu")
    x = _inputs(56, seed=3)
    _, feats = _flax(conv, 0, "timm")(x)
    ref_feats, _ = _timm_forward(ref, x)
    _check(feats, ref_feats, "features")


def _write_augreg_npz(path: Path, timm_model, heads: int) -> None:
    """A vit_jax-named .npz filled from a random timm model's weights."""
    sd = {k: v.numpy() for k, v in timm_model.state_dict().items()}
    d = sd["cls_token"].shape[-1]
    hd = d // heads
    t = "Transformer/"
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        t + "posembed_input/pos_embedding": sd["pos_embed"],
        t + "encoder_norm/scale": sd["norm.weight"],
        t + "encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, o = f"blocks.{i}.", f"{t}encoderblock_{i}/"
        w[o + "LayerNorm_0/scale"], w[o + "LayerNorm_0/bias"] = (
            sd[b + "norm1.weight"],
            sd[b + "norm1.bias"],
        )
        w[o + "LayerNorm_2/scale"], w[o + "LayerNorm_2/bias"] = (
            sd[b + "norm2.weight"],
            sd[b + "norm2.bias"],
        )
        qkv_w = np.split(sd[b + "attn.qkv.weight"], 3)
        qkv_b = np.split(sd[b + "attn.qkv.bias"], 3)
        m = o + "MultiHeadDotProductAttention_1/"
        for name, wt, bs in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            w[m + name + "/kernel"] = wt.T.reshape(d, heads, hd)
            w[m + name + "/bias"] = bs.reshape(heads, hd)
        w[m + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, hd, d)
        w[m + "out/bias"] = sd[b + "attn.proj.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            w[f"{o}MlpBlock_3/Dense_{j}/kernel"] = sd[f"{b}mlp.{fc}.weight"].T
            w[f"{o}MlpBlock_3/Dense_{j}/bias"] = sd[f"{b}mlp.{fc}.bias"]
        i += 1
    np.savez(path, **w)


def test_augreg_npz_matches_timm_loading_it(tmp_path):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    src = _timm_vit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=4)
    path = tmp_path / "Ti_16-i21k.npz"
    _write_augreg_npz(path, src, heads=4)
    # The reference: a fresh timm model filled by timm's own .npz loader.
    ref = timm_vit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=4
    ).eval()
    timm_vit._load_weights(ref, str(path))
    assert detect_format(path) == "augreg_npz"
    conv = convert_source(path)
    assert conv.arch["num_heads"] == 4
    x = _inputs(32, seed=7)
    logits, feats = _flax(conv, 4, "timm")(x)
    ref_feats, ref_logits = _timm_forward(ref, x)
    _check(feats, ref_feats, "features")
    _check(logits, ref_logits, "logits")


# --------------------------------------------------------------------------- transformers


def _hf_model(kind: str, scale: float = 0.2, **cfg):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {
        "vit": ("ViTConfig", "ViTModel"),
        "vit_cls": ("ViTConfig", "ViTForImageClassification"),
        "dinov2": ("Dinov2Config", "Dinov2Model"),
        "dinov2_reg": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
    }[kind]
    config = getattr(transformers, config_cls)(**cfg)
    model = getattr(transformers, model_cls)(config)
    _randomize(model, seed=1, scale=scale)
    return model.eval()


_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("dinov2", dict(image_size=56, patch_size=14, mlp_ratio=2, layerscale_value=1e-5)),
        ("dinov2", dict(image_size=56, patch_size=14, mlp_ratio=4, use_swiglu_ffn=True)),
        ("dinov2_reg", dict(image_size=56, patch_size=14, mlp_ratio=2, num_register_tokens=4)),
        ("vit", dict(image_size=32, patch_size=8)),
    ],
)
def test_hf_models_match(tmp_path, kind, extra):
    cfg = dict(_SMALL, **extra)
    if kind != "vit":
        cfg.pop("intermediate_size")
    model = _hf_model(kind, **cfg)
    model.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf"
    conv = convert_source(tmp_path / "hf")
    # ViTModel's tanh pooler is not part of cxrjax's model (the head reads the normed CLS token).
    assert conv.unused == (["pooler.dense.bias", "pooler.dense.weight"] if kind == "vit" else [])
    if kind != "vit":
        token = model.embeddings.mask_token.detach().numpy()
        assert np.abs(token).min() > 0  # randomised, so a dropped token (zeros) cannot pass
        np.testing.assert_array_equal(conv.params[MASK_TOKEN], token[0])
    native = extra["image_size"]
    # transformers 5 resamples position embeddings with antialiasing only for the register model.
    resample = "timm" if kind == "dinov2_reg" else "hf"
    for size in (native, native + 2 * extra["patch_size"]):
        x = _inputs(size, seed=size)
        with torch.no_grad():
            kw = {"interpolate_pos_encoding": True} if kind == "vit" else {}
            out = model(pixel_values=_torch_in(x), **kw)
        _, feats = _flax(conv, 0, resample)(x)
        _check(feats, out.last_hidden_state[:, 0].numpy(), f"{kind} CLS features at {size}px")


def test_hf_vit_classifier_head_and_labels(tmp_path):
    labels = {0: "cardiomegaly", 1: "effusion", 2: "pneumonia"}
    model = _hf_model("vit_cls", image_size=32, patch_size=8, id2label=labels, **_SMALL)
    model.save_pretrained(tmp_path / "hf")
    conv = convert_source(tmp_path / "hf")
    assert conv.label_names == ["cardiomegaly", "effusion", "pneumonia"]
    assert conv.unused == []
    x = _inputs(32, seed=11)
    logits, _ = _flax(conv, 3, "hf")(x)
    with torch.no_grad():
        ref = model(pixel_values=_torch_in(x)).logits.numpy()
    _check(logits, ref, "logits")


def test_vit_base_dinov2_end_to_end_through_load_pretrained(tmp_path):
    """ViT-B/14 (the study's DINOv2 backbone) at full size: HF folder -> CLI -> trainer loader."""
    import tools.convert_checkpoint as cli  # noqa: PLC0415

    # Dinov2Config defaults are ViT-B; weights at a realistic scale keep 12 blocks from exploding.
    model = _hf_model("dinov2", scale=0.03, image_size=224, patch_size=14)
    model.save_pretrained(tmp_path / "hf")
    out = cli.convert(str(tmp_path / "hf"), str(tmp_path / "w"), variant="vit_b14_dinov2")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["variant"] == "vit_b14_dinov2" and meta["image_size"] == 224
    assert meta["source_format"] == "hf"
    flax_model = create_model("vit_b14_dinov2", 0, image_size=224, layernorm_eps=1e-6)
    params = jax.eval_shape(
        lambda: flax_model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3)))
    )["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    loaded, report = load_pretrained(str(out), params, variant="vit_b14_dinov2", image_size=224)
    assert not report.reinitialised and not report.resampled
    x = _inputs(224, n=1, seed=5)
    feats = jax.jit(lambda p, x: flax_model.apply({"params": p}, x))(loaded, x)
    with torch.no_grad():
        ref = model(pixel_values=_torch_in(x)).last_hidden_state[:, 0].numpy()
    _check(np.asarray(feats), ref, "ViT-B/14 CLS features")


# --------------------------------------------------------------------------- bad input


def test_bad_files_give_clear_errors(tmp_path):
    model = _timm_vit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=2)
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        convert_source(truncated, "timm", num_heads=4)

    from safetensors.torch import save_file

    st = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        convert_source(cut, "timm", num_heads=4)

    class Evil:
        def __reduce__(self):
            return (print, ("this code must never run",))

    evil = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="weights-only"):
        convert_source(evil, "timm", num_heads=4)

    sd = model.state_dict()
    del sd["blocks.1.attn.proj.weight"]
    missing = tmp_path / "missing.pth"
    torch.save(sd, missing)
    with pytest.raises(CheckpointError, match=r"missing.pth.*blocks\.1\.attn\.proj\.weight"):
        convert_source(missing, "timm", num_heads=4)

    with pytest.raises(CheckpointError, match="not a vit_b16_in21k"):
        match_variant(convert_source(good, "timm", num_heads=4).arch, "vit_b16_in21k")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.npz"):
        convert_source(junk)


def test_rad_dino_tag_from_518_to_224_px(tmp_path):
    """RAD-DINO (an HF Dinov2Model at 518 px) converted under its tag, then fine-tuned at 224."""
    import tools.convert_checkpoint as cli  # noqa: PLC0415

    model = _hf_model("dinov2", scale=0.03, image_size=518, patch_size=14, layer_norm_eps=1e-6)
    model.save_pretrained(tmp_path / "hf")
    variant = "vit_base_patch14_dinov2.rad_dino"
    out = cli.convert(str(tmp_path / "hf"), str(tmp_path / "w"), variant=variant)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["variant"] == variant and meta["image_size"] == 518
    flax_model = create_model(variant, 0, image_size=224)
    params = jax.eval_shape(
        lambda: flax_model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3)))
    )["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    loaded, report = load_pretrained(str(out), params, variant=variant, image_size=224)
    assert "hf bicubic" in report.resampled["pos_embedding"]
    x = _inputs(224, n=1, seed=6)
    feats = jax.jit(lambda p, x: flax_model.apply({"params": p}, x))(loaded, x)
    with torch.no_grad():
        ref = model(pixel_values=_torch_in(x)).pooler_output.numpy()
    _check(np.asarray(feats), ref, "RAD-DINO CLS features at 224 px from 518 px weights")


# --------------------------------------------------------------------------- SSL pieces


class _TorchDINOHead(torch.nn.Module):
    """DINOv2's DINOHead (dinov2/layers/dino_head.py, use_bn=False) transcribed; ``norm`` picks
    how its last layer stores the weight norm (or, "none", a plain Linear)."""

    def __init__(self, in_dim: int, out_dim: int, nlayers: int, hidden: int, bottleneck: int, norm):
        super().__init__()
        if nlayers == 1:
            self.mlp = torch.nn.Linear(in_dim, bottleneck)
        else:
            layers = [torch.nn.Linear(in_dim, hidden), torch.nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [torch.nn.Linear(hidden, hidden), torch.nn.GELU()]
            self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(hidden, bottleneck))
        last = torch.nn.Linear(bottleneck, out_dim, bias=False)
        wn = torch.nn.utils
        self.last_layer = {
            "weight_norm": lambda m: wn.weight_norm(m),
            "parametrizations": lambda m: wn.parametrizations.weight_norm(m),
            "none": lambda m: m,
        }[norm](last)

    def forward(self, x):
        x = torch.nn.functional.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)
        return self.last_layer(x)


def _dino_head_sd(norm: str, nlayers: int, width: int, prefix: str = "") -> tuple:
    """(torch head with random weights and gains, its state dict as numpy, prefixed)."""
    head = _TorchDINOHead(width, 40, nlayers, 32, 16, norm)
    _randomize(head, seed=9)  # gains too: a converter that drops them cannot pass
    sd = {prefix + k: v.detach().numpy() for k, v in head.state_dict().items()}
    return head.eval(), sd


@pytest.mark.parametrize(
    "norm,nlayers,prefix",
    [("weight_norm", 3, ""), ("parametrizations", 2, "dino_head."), ("none", 1, "")],
)
def test_dino_head_matches_the_dinov2_head(norm, nlayers, prefix):
    from cxrjax.ssl.heads import DINOHead

    head, sd = _dino_head_sd(norm, nlayers, 24, prefix)
    params, unused = convert_dino_head(sd, width=24)
    assert unused == []
    assert params["prototypes"].shape == (16, 40) and params["gain"].shape == (40,)
    ours = DINOHead(num_prototypes=40, hidden_dim=32, bottleneck_dim=16, nlayers=nlayers)
    x = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32)
    scores = ours.apply({"params": params}, x)
    with torch.no_grad():
        ref = head(torch.from_numpy(x)).numpy()
    # The random gains differ from 1, so a head or converter that drops them cannot pass.
    np.testing.assert_allclose(np.asarray(scores), ref, atol=1e-5)
    with pytest.raises(CheckpointError, match="width 48"):
        convert_dino_head(sd, width=48)


_SMALL96 = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4)


def test_tiny_dinov2_folder_through_the_cli_keeps_mask_token_and_dino_head(tmp_path, capsys):
    """A random HF Dinov2Model (vit_tiny14_dinov2's shape) with a DINO head beside it, as
    RAD-DINO releases them, converted by tools/convert_checkpoint.py."""
    from safetensors.numpy import save_file

    import tools.convert_checkpoint as cli  # noqa: PLC0415

    model = _hf_model(
        "dinov2", image_size=28, patch_size=14, mlp_ratio=4, layerscale_value=1e-5, **_SMALL96
    )
    model.save_pretrained(tmp_path / "hf")
    _, head_sd = _dino_head_sd("weight_norm", 3, 96)
    save_file(head_sd, str(tmp_path / "hf" / DINO_HEAD_FILE))
    out = tmp_path / "w"
    assert cli.main(["convert_checkpoint.py", str(tmp_path / "hf"), "--out", str(out)]) == 0
    assert "not converted" not in capsys.readouterr().out
    flat, meta = read_weights(out)
    assert meta["variant"] == "vit_tiny14_dinov2"
    token = model.embeddings.mask_token.detach().numpy()
    assert flat[MASK_TOKEN].shape == (96,) and np.abs(token).min() > 0
    np.testing.assert_array_equal(flat[MASK_TOKEN], token[0])
    head, _ = convert_dino_head(head_sd, width=96)
    for key, value in flatten(head).items():
        np.testing.assert_array_equal(flat[f"dino_head/{key}"], value, err_msg=key)


# --------------------------------------------------------------------------- CLI and structure


def test_cli_mistakes_print_error_and_exit_2(tmp_path, capsys):
    import tools.convert_checkpoint as convert_cli  # noqa: PLC0415
    import tools.export_checkpoint as export_cli  # noqa: PLC0415

    argv = ["convert_checkpoint.py", "X", "--variant", "vit_nosuch", "--out", str(tmp_path / "y")]
    assert convert_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown model variant 'vit_nosuch'") and "vit_tiny_demo" in err
    assert "Traceback" not in err
    missing = tmp_path / "missing"
    assert export_cli.main(["export_checkpoint.py", str(missing), "--out", "f"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no converted weights at {missing}")


def test_list_hides_backend_probing():
    """A fresh process (jax probes its backends once), as a user runs it."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", "--list"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "vit_tiny14_dinov2" in done.stdout
    assert "Unable to initialize backend" not in done.stderr, done.stderr


def test_no_import_cycle_inside_cxrjax():
    """Module imports (function-level ones too) among cxrjax's modules form no cycle."""
    import ast  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    files = {}
    for f in (root / "cxrjax").rglob("*.py"):
        parts = f.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def module_of(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                # "from pkg import module" depends on the module, "from pkg import name" on pkg.
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in files]
                targets += [node.module] if len(targets) < len(subs) else []
            else:
                continue
            graph[m] |= {t for t in map(module_of, targets) if t and t != m}

    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, m, n])}"
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
