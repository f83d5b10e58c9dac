"""Study-style tables and figures from bootstrap results.

Tables are pandas frames written as CSV (numbers) and Markdown (formatted cells). Figures use
matplotlib's Agg backend so they render on machines without a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxrjax.evaluation import calibration  # noqa: E402
from cxrjax.evaluation.predictions import Predictions  # noqa: E402

# False-positive-rate grid on which bootstrap ROC curves are averaged into bands.
FPR_GRID = np.linspace(0.0, 1.0, 101)


def format_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    """'0.912 ± 0.004'; 'n/a' for an undefined metric."""
    if mean is None or sd is None or np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def format_p(p: float | None, n_resamples: int) -> str:
    """p-value with bootstrap resolution: 0 of R resamples reads '< 1/R' (e.g. '< 0.001')."""
    if p is None or np.isnan(p):
        return "n/a"
    if p == 0:
        return f"< {1 / n_resamples:.3g}"
    return f"{p:.3f}"


def to_markdown(frame: pd.DataFrame) -> str:
    """Pipe table of a frame's string cells (no tabulate dependency)."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def roc_curves_on_grid(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R, len(FPR_GRID)) TPR of the ROC curve of each weight vector (weights (n, R))."""
    y = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s_desc = np.asarray(scores, dtype=np.float64)[order]
    w = np.asarray(weights, dtype=np.float64)[order]
    # Points of the ROC curve sit after each group of tied scores.
    ends = np.r_[np.flatnonzero(s_desc[1:] != s_desc[:-1]), s_desc.size - 1]
    tp = np.cumsum(w * y[order, None], axis=0)[ends]
    fp = np.cumsum(w * ~y[order, None], axis=0)[ends]
    out = np.full((w.shape[1], FPR_GRID.size), np.nan)
    for r in range(w.shape[1]):
        if tp[-1, r] == 0 or fp[-1, r] == 0:
            continue
        fpr = np.r_[0.0, fp[:, r] / fp[-1, r]]
        tpr = np.r_[0.0, tp[:, r] / tp[-1, r]]
        # A vertical step reads as its top: keep the last (highest) point of each FPR value.
        last = np.r_[fpr[1:] != fpr[:-1], True]
        out[r] = np.interp(FPR_GRID, fpr[last], tpr[last])
    return out


def plot_roc_bands(
    runs: dict[str, Predictions], counts: np.ndarray, path: str, title: str = ""
) -> None:
    """One panel per label: each run's ROC curve with its pointwise 95% bootstrap band.

    `counts` (R, n) are the shared bootstrap resamples; every run must hold the same cases.
    """
    first = next(iter(runs.values()))
    names = first.label_names
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    ones = np.ones((len(first.ids), 1))
    for j, name in enumerate(names):
        ax = axes.flat[j]
        known = first.known[:, j]
        for run_name, preds in runs.items():
            y, s = preds.labels[known, j], preds.probs[known, j]
            if y.min() == y.max():
                continue
            point = roc_curves_on_grid(y, s, ones[known])[0]
            band = roc_curves_on_grid(y, s, counts[:, known].T)
            lo, hi = np.nanpercentile(band, [2.5, 97.5], axis=0)
            (line,) = ax.plot(FPR_GRID, point, lw=1.2, label=run_name)
            ax.fill_between(FPR_GRID, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.set_aspect("equal")
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slug(text: str) -> str:
    """A file-name-safe version of a label or dataset name."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text) or "x"


def plot_reliability(runs: dict[str, Predictions], folder: Path) -> list[Path]:
    """One reliability diagram per label, `<folder>/<label>.png`: each run's observed frequency
    against mean probability in the 15 equal-width ECE bins (marker area ~ cases in the bin),
    with the label's ECE in the legend. Every run must hold the same cases."""
    folder.mkdir(parents=True, exist_ok=True)
    first = next(iter(runs.values()))
    written = []
    for j, name in enumerate(first.label_names):
        known = first.known[:, j]
        fig, ax = plt.subplots(figsize=(3.6, 3.6))
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        for run_name, preds in runs.items():
            y, p = preds.labels[known, j], preds.probs[known, j]
            if y.size == 0 or np.any((p < 0) | (p > 1)):
                continue
            mean_p, freq, count = calibration.reliability_curve(y, p)
            ones = np.ones((y.size, 1))
            ece = calibration.weighted_calibration_stats(y, p, ones)["ece"][0]
            (line,) = ax.plot(mean_p, freq, lw=1.2, label=f"{run_name} (ECE {ece:.3f})")
            ax.scatter(mean_p, freq, s=8 + 60 * count / count.max(), color=line.get_color())
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
        if ax.get_legend_handles_labels()[0]:  # none when no run has probabilities in [0, 1]
            ax.legend(fontsize=7, loc="upper left")
        ax.set_aspect("equal")
        fig.tight_layout()
        path = folder / f"{slug(name)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def pr_curves_on_grid(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R, len(FPR_GRID)) precision of each weight vector's PR curve at recall = FPR_GRID.

    Precision at recall r is the highest precision at any recall >= r (the interpolated curve),
    so curves of different resamples average into a band.
    """
    y = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s_desc = np.asarray(scores, dtype=np.float64)[order]
    w = np.asarray(weights, dtype=np.float64)[order]
    ends = np.r_[np.flatnonzero(s_desc[1:] != s_desc[:-1]), s_desc.size - 1]
    tp = np.cumsum(w * y[order, None], axis=0)[ends]
    fp = np.cumsum(w * ~y[order, None], axis=0)[ends]
    out = np.full((w.shape[1], FPR_GRID.size), np.nan)
    for r in range(w.shape[1]):
        if tp[-1, r] == 0 or fp[-1, r] == 0:
            continue
        called = tp[:, r] + fp[:, r] > 0
        recall = tp[called, r] / tp[-1, r]
        precision = tp[called, r] / (tp[called, r] + fp[called, r])
        best_from = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(recall, FPR_GRID, side="left")
        out[r] = best_from[np.minimum(idx, recall.size - 1)]
    return out


def plot_pr_bands(
    runs: dict[str, Predictions], counts: np.ndarray, path: str, title: str = ""
) -> None:
    """One panel per label: each run's precision-recall curve with its 95% bootstrap band.

    `counts` (R, n) are the shared bootstrap resamples; every run must hold the same cases.
    """
    first = next(iter(runs.values()))
    names = first.label_names
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    ones = np.ones((len(first.ids), 1))
    for j, name in enumerate(names):
        ax = axes.flat[j]
        known = first.known[:, j]
        for run_name, preds in runs.items():
            y, s = preds.labels[known, j], preds.probs[known, j]
            if y.min() == y.max():
                continue
            point = pr_curves_on_grid(y, s, ones[known])[0]
            band = pr_curves_on_grid(y, s, counts[:, known].T)
            lo, hi = np.nanpercentile(band, [2.5, 97.5], axis=0)
            (line,) = ax.plot(FPR_GRID, point, lw=1.2, label=run_name)
            ax.fill_between(FPR_GRID, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        ax.axhline(first.labels[known, j].mean(), ls=":", color="grey", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("recall (sensitivity)", fontsize=8)
        ax.set_ylabel("precision (PPV)", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mean_auroc(summary: pd.DataFrame, path: str) -> None:
    """Label-mean AUROC (mean ± SD over resamples) per initialisation, grouped by dataset.

    `summary` has columns dataset, init, auroc_mean, auroc_sd.
    """
    datasets = list(dict.fromkeys(summary["dataset"]))
    inits = list(dict.fromkeys(summary["init"]))
    width = 0.8 / max(1, len(inits))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(datasets) * max(1, len(inits)) / 2), 3.6))
    for k, init in enumerate(inits):
        sub = summary[summary["init"] == init].set_index("dataset").reindex(datasets)
        x = np.arange(len(datasets)) + (k - (len(inits) - 1) / 2) * width
        ax.errorbar(x, sub["auroc_mean"], yerr=sub["auroc_sd"], fmt="o", capsize=3, label=init)
    ax.set_xticks(np.arange(len(datasets)), datasets)
    ax.set_ylabel("mean AUROC over labels")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_label_efficiency(summary: pd.DataFrame, path: str) -> None:
    """Label-mean AUROC against training fraction, one line per (dataset, initialisation).

    `summary` has columns dataset, init, train_fraction, auroc_mean, auroc_sd.
    """
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    # Datasets trained at a single fraction would be lone points: leave them out.
    varied = summary.groupby("dataset")["train_fraction"].transform("nunique") > 1
    summary = summary[varied]
    for (dataset, init), sub in summary.groupby(["dataset", "init"], sort=False):
        sub = sub.sort_values("train_fraction")
        ax.errorbar(
            sub["train_fraction"] * 100,
            sub["auroc_mean"],
            yerr=sub["auroc_sd"],
            marker="o",
            capsize=3,
            label=f"{dataset}: {init}",
        )
    ax.set_xscale("log")
    ticks = sorted(summary["train_fraction"].unique() * 100)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("training data used (%)")
    ax.set_ylabel("mean AUROC over labels")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_rows(
    entries: Sequence[dict],
    columns: Sequence[str],
    baseline: str,
    n_resamples: int,
    metrics: Sequence[str] = ("auroc",),
    extra_p: Sequence[str] = (),
    shown: int = 2,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study table as (numbers for CSV, formatted cells for Markdown).

    Each entry is one table row: dataset, train_fraction, label, and per column name c the key
    `c` -> {metric: {"mean", "sd", "ci_low", "ci_high", "point"}} for every name in `metrics`
    and, for c != baseline, `p:c` and `p_bh:c` (the tabled test) and `<name>:c` for each name in
    `extra_p` (CSV only). The CSV has every metric (`c auroc_mean`, ...); the Markdown cells the
    first `shown` metrics.
    """
    numeric, pretty = [], []
    for e in entries:
        num = {"dataset": e["dataset"], "train_fraction": e["train_fraction"], "label": e["label"]}
        txt = dict(num)
        for c in columns:
            per_metric = e.get(c) or {}
            for m in metrics:
                st = per_metric.get(m)
                for k in ("mean", "sd", "ci_low", "ci_high"):
                    num[f"{c} {m}_{k}"] = np.nan if st is None else st[k]
            for m in metrics[:shown]:
                st = per_metric.get(m)
                txt[f"{c} {m.upper()}"] = (
                    "n/a" if st is None else format_mean_sd(st["mean"], st["sd"])
                )
        for c in columns:
            if c == baseline:
                continue
            num[f"p {c}>{baseline}"] = e.get(f"p:{c}", np.nan)
            num[f"p_bh {c}>{baseline}"] = e.get(f"p_bh:{c}", np.nan)
            for name in extra_p:
                num[f"{name} {c}>{baseline}"] = e.get(f"{name}:{c}", np.nan)
            txt[f"p {c} > {baseline} (BH)"] = (
                f"{format_p(e.get(f'p:{c}'), n_resamples)} "
                f"({format_p(e.get(f'p_bh:{c}'), n_resamples)})"
            )
        numeric.append(num)
        pretty.append(txt)
    return pd.DataFrame(numeric), pd.DataFrame(pretty)
