"""An ssl_nonmed-shaped run end to end: random DINOv2-style timm weights -> convert -> fine-tune ->
resume -> evaluate, with position embeddings resampled from the source resolution."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxrjax.data.images import PreprocessOptions
from cxrjax.data.prepare import prepare_dataset
from cxrjax.engine import trainer
from tests.conftest import write_tiny_raw_dataset

ROOT = Path(__file__).resolve().parents[1]


def _timm_weights(path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=56, patch_size=14, embed_dim=96, depth=2, num_heads=4, mlp_ratio=4,
        init_values=1e-5, num_classes=0,
    )  # fmt: skip
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_ssl_nonmed_config_trains_from_converted_weights_and_resumes(tmp_path):
    _timm_weights(tmp_path / "dinov2_tiny.safetensors")
    weights = tmp_path / "weights" / "vit_tiny14_dinov2"
    source = str(tmp_path / "dinov2_tiny.safetensors")
    converted = subprocess.run(
        [
            sys.executable,
            "tools/convert_checkpoint.py",
            source,
            "--variant",
            "vit_tiny14_dinov2",
            "--out",
            str(weights),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert converted.returncode == 0, converted.stderr[-2000:]

    shards = tmp_path / "shards"
    table = write_tiny_raw_dataset(tmp_path, n_images=60)
    prepare_dataset(table, shards, options=PreprocessOptions(size=28), seed=0, workers=1)

    from configs import ssl_nonmed

    config = ssl_nonmed.get_config("dataset=csv")
    config.data.dir = str(shards)
    config.model.variant = "vit_tiny14_dinov2"
    config.model.init_from = str(weights)
    config.model.dtype = "float32"
    config.input.normalization = "pretrained"
    config.batch_size = config.eval_batch_size = 8
    config.epochs = 1
    config.log_every_steps = 2
    workdir = tmp_path / "run"
    first = trainer.train_and_evaluate(config, workdir)
    assert first["steps"] > 0

    config.epochs = 2
    second = trainer.train_and_evaluate(config, workdir)
    assert second["steps"] == 2 * first["steps"]

    evaluated = subprocess.run(
        [sys.executable, "-m", "cxrjax.evaluate", "--workdir", str(workdir), "--bootstrap", "50"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads(next(workdir.glob("metrics_test*.json")).read_text())
    assert "square" in json.dumps(metrics)


def test_missing_weights_stop_fast_with_the_command_that_makes_them(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxrjax.main",
            "--config",
            "configs/ssl_nonmed.py:dataset=vindr",
            f"--config.data.dir={tmp_path / 'nodata'}",
            f"--workdir={tmp_path / 'run'}",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "tools/prepare_data.py --dataset vindr" in result.stderr
