"""Frozen-feature probe: embed a prepared dataset once, then train a small head in seconds.

  python tools/probe.py --checkpoint weights/vit_base_patch16_dinov3 --data data/vindr \
      --out results/vindr_dinov3_probe [--head linear|mlp] [--normalization pretrained]
      [--steps 2000] [--lr 1e-3] [--wd 1e-4] [--labels a b ...] [--bootstrap 1000]
      [--by-image] [--min-per-class 10]

The backbone (converted weights or a run directory) embeds the train/val/test splits through the
one inference path (`Predictor`, pooled features as `cxrjax.embed` writes them); the features are
cached in OUT/features_<split>.npz and reused when the same backbone and data ask again. A linear
(or one-hidden-layer MLP) head is trained full-batch with AdamW on the masked, `pos_weight`-ed BCE
of the trainer, the step with the best validation mean AUROC is kept, and the test split is
written as OUT/predictions_test.npz with the same bootstrap metrics JSON as `cxrjax.evaluate`
(patient-level resampling and the small-sample rule included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrjax import console
from cxrjax.data import shards
from cxrjax.engine.inference import Predictor
from cxrjax.engine.step import NORMALIZATIONS, bce_loss
from cxrjax.errors import MissingInputError, cli
from cxrjax.evaluation import pipeline
from cxrjax.evaluation.evaluators import summarize
from cxrjax.evaluation.predictions import Predictions, save_predictions
from cxrjax.evaluation.sample_rule import DEFAULT_MIN_PER_CLASS, SampleRule
from cxrjax.run_dir import RunDir

SPLITS = ("train", "val", "test")


def cached_features(
    predictor: Predictor, info: shards.DatasetInfo, out: Path, columns: list[int], batch: int
) -> dict[str, dict[str, np.ndarray]]:
    """{split: features, labels, mask, ids, patients}, from OUT's cache when it matches."""
    key = {"backbone": predictor.source, "data": str(info.directory.resolve()), "labels": columns}
    meta = out / "features.json"
    fresh = not meta.is_file() or json.loads(meta.read_text()) != key
    splits = {}
    for split in SPLITS:
        path = out / f"features_{split}.npz"
        if fresh or not path.is_file():
            rows = predictor.split_outputs(info, split, "features", batch, columns)
            np.savez(path, **rows)
        with np.load(path, allow_pickle=False) as f:
            splits[split] = {k: f[k] for k in f.files}
    meta.write_text(json.dumps(key))
    return splits


def init_head(kind: str, width: int, num_labels: int, hidden: int, seed: int) -> dict:
    keys = jax.random.split(jax.random.key(seed), 2)
    glorot = jax.nn.initializers.glorot_uniform()
    if kind == "linear":
        return {"w": jnp.zeros((width, num_labels)), "b": jnp.zeros(num_labels)}
    return {
        "w1": glorot(keys[0], (width, hidden)),
        "b1": jnp.zeros(hidden),
        "w": glorot(keys[1], (hidden, num_labels)) * 0.1,
        "b": jnp.zeros(num_labels),
    }


def apply_head(params: dict, x: jax.Array) -> jax.Array:
    if "w1" in params:
        x = jax.nn.gelu(x @ params["w1"] + params["b1"])
    return x @ params["w"] + params["b"]


def train_head(
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    label_names: list[str],
    *,
    kind: str = "linear",
    steps: int = 2000,
    lr: float = 1e-3,
    wd: float = 1e-4,
    hidden: int = 512,
    eval_every: int = 50,
    seed: int = 0,
) -> tuple[dict, int, float]:
    """(best head params, its step, its validation mean AUROC)."""
    x = jnp.asarray(train["features"])
    mean, std = x.mean(0), x.std(0) + 1e-6  # standardised features: one lr fits every backbone
    known = train["mask"].sum(0)
    positives = (train["labels"] * train["mask"]).sum(0)
    pos_weight = jnp.asarray(shards.pos_weight(positives, known))
    labels, mask = jnp.asarray(train["labels"]), jnp.asarray(train["mask"], jnp.float32)
    params = init_head(kind, x.shape[1], len(label_names), hidden, seed)
    params["mean"], params["std"] = mean, std
    tx = optax.masked(
        optax.adamw(lr, weight_decay=wd), {k: k not in ("mean", "std") for k in params}
    )
    opt_state = tx.init(params)

    def logits_of(p, features):
        return apply_head(p, (features - p["mean"]) / p["std"])

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(
            lambda q: bce_loss(logits_of(q, x), labels, mask, pos_weight)
        )(p)
        grads = {k: (jnp.zeros_like(v) if k in ("mean", "std") else v) for k, v in grads.items()}
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    predict = jax.jit(lambda p, f: jax.nn.sigmoid(logits_of(p, f)))
    best, best_step, best_score = params, 0, -np.inf
    for i in console.progress(range(1, steps + 1), desc="probe", unit="step"):
        params, opt_state, _ = step(params, opt_state)
        if i % eval_every == 0 or i == steps:
            probs = np.asarray(predict(params, val["features"]))
            score = summarize(_predictions(val, probs, label_names))["mean_auroc"]
            if score > best_score:
                best, best_step, best_score = params, i, score
    return best, best_step, float(best_score)


def _predictions(rows: dict[str, np.ndarray], probs: np.ndarray, names: list[str]) -> Predictions:
    return Predictions(
        labels=rows["labels"],
        probs=probs,
        label_names=names,
        ids=rows["ids"],
        mask=rows["mask"],
        patients=rows["patients"],
    )


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="converted weights or a run directory")
    parser.add_argument("--data", required=True, help="a prepared dataset folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--head", choices=("linear", "mlp"), default="linear")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default=None)
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=1e-4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64, help="images per embedding pass")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--by-image", action="store_true", help="resample images, not patients (the study's)"
    )
    parser.add_argument(
        "--min-per-class",
        type=int,
        default=DEFAULT_MIN_PER_CLASS,
        help="fewest positives and negatives a label needs for an AUROC (default 10)",
    )
    args = parser.parse_args(argv)
    console.configure(verbose=False)
    rule = SampleRule.per_class(args.min_per_class)

    try:
        info = shards.load_info(args.data)
    except FileNotFoundError:
        raise MissingInputError(
            f"no prepared dataset at {args.data}", "Prepare it with tools/prepare_data.py."
        ) from None
    columns = info.label_indices(args.labels)
    names = [info.label_names[i] for i in columns]
    predictor = Predictor.load(args.checkpoint, normalization=args.normalization)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = cached_features(predictor, info, out, columns, args.batch_size)
    head, best_step, val_score = train_head(
        splits["train"], splits["val"], names, kind=args.head, steps=args.steps, lr=args.lr,
        wd=args.wd, hidden=args.hidden, seed=args.seed,
    )  # fmt: skip
    test = splits["test"]
    probs = np.asarray(
        jax.nn.sigmoid(apply_head(head, (test["features"] - head["mean"]) / head["std"]))
    )
    preds = _predictions(test, probs, names)
    pred_path = out / "predictions_test.npz"
    save_predictions(pred_path, preds)
    metrics = {
        "source": str(pred_path),
        "probe": {"backbone": predictor.source, "head": args.head, "best_step": best_step,
                  "val_mean_auroc": val_score, "steps": args.steps, "lr": args.lr, "wd": args.wd},
        **pipeline.evaluate_predictions(
            preds, args.bootstrap, args.seed, by_image=args.by_image, rule=rule
        ),
    }  # fmt: skip
    path = RunDir.metrics_for(pred_path)
    pipeline.write_json(path, metrics)
    for line in pipeline.exclusion_lines(metrics):
        console.say(line)
    print(pipeline.format_summary(metrics))
    console.say(f"best validation mean AUROC {val_score:.4f} at step {best_step}; metrics: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
