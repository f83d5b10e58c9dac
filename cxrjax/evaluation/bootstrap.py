"""Bootstrap confidence for every metric, paired tests between models, Benjamini-Hochberg.

A resample is a vector of multinomial counts over the cases (how often each case was drawn),
so all resamples of one label are evaluated at once by the weighted kernels
(`metrics.weighted_curve_stats`: AUROC, AUPRC, the study's Youden point;
`calibration.weighted_calibration_stats`: Brier, ECE; `operating_points.weighted_fixed_stats`:
thresholds fixed on validation) after a single sort; no per-resample Python loop.

Resampling is by patient whenever the predictions carry `patients`: patients are drawn with
replacement and each image takes its patient's count, so correlated images of one patient move
together. Several radiographs of one patient are not independent cases; resampling images as if
they were gives intervals too narrow and p-values too small (about half the patient-level SD on
four images per patient). `by_image=True` resamples images, the study's protocol, for comparison
with its numbers. Labels failing the small-sample rule (`sample_rule`) get no ranking metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import stats

from cxrjax import console
from cxrjax.errors import ConfigError
from cxrjax.evaluation import calibration, metrics, operating_points
from cxrjax.evaluation.predictions import Predictions
from cxrjax.evaluation.sample_rule import SampleRule

# Cap on resamples x cases evaluated at once: keeps the (R, n) work arrays in cache-friendly
# chunks and memory bounded for large test sets (ChestX-ray14: 25,596 images).
_CHUNK_ELEMENTS = 1 << 22


def resample_counts(
    n_cases: int, n_resamples: int = 1000, seed: int = 0, groups: np.ndarray | None = None
) -> np.ndarray:
    """(R, n_cases) int32 counts: row r says how often each case appears in resample r.

    With `groups` (one key per case, e.g. hashed patient ids) the groups are drawn with
    replacement and each case takes its group's count.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        draws, inverse = rng.integers(0, n_cases, (n_resamples, n_cases), dtype=np.int64), None
        n_units = n_cases
    else:
        groups = np.asarray(groups)
        if groups.shape != (n_cases,):
            raise ValueError(f"groups shape {groups.shape}, expected ({n_cases},)")
        _, inverse = np.unique(groups, return_inverse=True)
        n_units = int(inverse.max()) + 1 if n_cases else 0
        draws = rng.integers(0, n_units, (n_resamples, n_units))
    offsets = np.arange(n_resamples)[:, None] * n_units
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_units)
    counts = counts.reshape(n_resamples, n_units).astype(np.int32)
    return counts if inverse is None else counts[:, inverse]


def metric_names(fixed_thresholds: bool = False) -> tuple[str, ...]:
    """Names of the metrics `resampled_metrics` returns, in report order."""
    names = (*metrics.ALL_METRICS, *calibration.CALIBRATION_METRICS)
    return (*names, *operating_points.FIXED_METRICS) if fixed_thresholds else names


def resampled_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    counts: np.ndarray,
    mask: np.ndarray | None = None,
    thresholds: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every metric in `metric_names` as an (R, L) array, one row per row of `counts`.

    Masked entries (mask False) are left out per label; a resample with one class left in a
    label gives NaN there. `thresholds` (L,), fixed per label (chosen on validation), add the
    `operating_points.FIXED_METRICS` at them.
    """
    labels, scores, mask = metrics.check_2d(labels, scores, mask)
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != labels.shape[0]:
        raise ValueError(f"counts shape {counts.shape} does not match {labels.shape[0]} cases")
    n_res, num_labels = counts.shape[0], labels.shape[1]
    if thresholds is not None and np.shape(thresholds) != (num_labels,):
        raise ValueError(f"thresholds shape {np.shape(thresholds)}, expected ({num_labels},)")
    out = {k: np.empty((n_res, num_labels)) for k in metric_names(thresholds is not None)}
    step = max(1, _CHUNK_ELEMENTS // max(1, labels.shape[0]))
    starts = range(0, n_res, step)
    # A bar only when there is progress to show: a single chunk would print a bar stuck at 0/1.
    if len(starts) > 1:
        starts = console.progress(starts, desc="bootstrap", unit="chunk", leave=False)
    for lo in starts:
        # Case-major so that selecting a label's known cases copies contiguous rows.
        chunk = np.ascontiguousarray(counts[lo : lo + step].T)
        for j in range(num_labels):
            known = mask[:, j]
            w = chunk if known.all() else chunk[known]
            y, s = labels[known, j], scores[known, j]
            stats = metrics.weighted_curve_stats(y, s, w)
            stats.update(calibration.weighted_calibration_stats(y, s, w))
            if thresholds is not None:
                stats.update(operating_points.weighted_fixed_stats(y, s, w, thresholds[j]))
            for k, v in stats.items():
                out[k][lo : lo + step, j] = v
    return out


def summarize(samples: np.ndarray) -> dict[str, Any]:
    """Mean, SD (ddof=1), 95% percentile interval and count of the finite resamples (axis 0).

    Non-finite values are left out: NaN (a resample without both classes) and +inf (a Youden
    threshold above every score, when no threshold beats chance).
    """
    samples = np.asarray(samples, dtype=np.float64)
    valid = np.isfinite(samples)
    n_valid = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        filled = np.where(valid, samples, 0.0)
        mean = filled.sum(axis=0) / n_valid
        sq_dev = np.where(valid, samples - mean, 0.0) ** 2
        sd = np.sqrt(sq_dev.sum(axis=0) / (n_valid - 1))
    lo, hi = (np.full(samples.shape[1:], np.nan) for _ in range(2))
    ok = n_valid > 0
    if np.any(ok):
        finite = np.where(valid, samples, np.nan)[:, ok]
        lo[ok], hi[ok] = np.nanpercentile(finite, [2.5, 97.5], axis=0)
    return {"mean": mean, "sd": sd, "ci_low": lo, "ci_high": hi, "n_valid": n_valid}


def label_mean(per_label: np.ndarray, include: np.ndarray) -> np.ndarray:
    """Mean over the `include`d labels (last axis), ignoring labels that are NaN in one resample."""
    sub = np.asarray(per_label)[..., include]
    with np.errstate(invalid="ignore"):
        valid = ~np.isnan(sub)
        return np.where(valid, sub, 0.0).sum(axis=-1) / valid.sum(axis=-1)


# Metrics that are thresholds (on a label's own score scale), never averaged over labels.
THRESHOLD_METRICS = ("threshold", "fixed_threshold")


@dataclasses.dataclass
class BootstrapResult:
    """Point estimates and bootstrap samples of every metric for one predictions set.

    `point[m]` is (L,), `samples[m]` is (R, L). The label mean covers `included` labels (those
    passing the small-sample `rule` in the full split); `mean_point[m]` and `mean_samples[m]`
    hold it. `included` depends on the ground truth alone, so paired predictions share it.
    `unit` is what was resampled: "patient" or "image". `thresholds` (L,) are the fixed
    operating points (chosen on validation) behind the `fixed_*` metrics, or None.
    """

    label_names: list[str]
    point: dict[str, np.ndarray]
    samples: dict[str, np.ndarray]
    included: np.ndarray
    n_resamples: int
    seed: int
    unit: str
    rule: SampleRule
    n_positive: np.ndarray
    n_negative: np.ndarray
    thresholds: np.ndarray | None = None

    @property
    def mean_point(self) -> dict[str, float]:
        return {k: float(label_mean(v, self.included)) for k, v in self.point.items()}

    @property
    def mean_samples(self) -> dict[str, np.ndarray]:
        return {k: label_mean(v, self.included) for k, v in self.samples.items()}

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON summary: per label and label mean, point estimate and bootstrap stats."""

        per_label = {
            name: {m: summary_json(self.point[m][j], self.samples[m][:, j]) for m in self.point}
            for j, name in enumerate(self.label_names)
        }
        mean_point, mean_samples = self.mean_point, self.mean_samples
        return {
            "bootstrap": bootstrap_json(self.n_resamples, self.seed, self.unit),
            "sample_rule": self.rule.to_json(),
            "excluded_labels": self.rule.excluded_json(
                self.label_names, self.n_positive, self.n_negative
            ),
            "labels_in_mean": [
                n for n, inc in zip(self.label_names, self.included, strict=True) if inc
            ],
            # Thresholds live on each label's own score scale: their mean means nothing.
            "mean": {
                m: summary_json(mean_point[m], mean_samples[m])
                for m in mean_point
                if m not in THRESHOLD_METRICS
            },
            "per_label": per_label,
        }


def bootstrap_json(n_resamples: int, seed: int, unit: str) -> dict[str, Any]:
    """The "bootstrap" section of every JSON: resamples, seed and what was resampled."""
    return {
        "n_resamples": n_resamples,
        "seed": seed,
        "resampling": unit,
        "interval": "95% percentile",
        "sd_ddof": 1,
    }


def summary_json(point: float, samples: np.ndarray) -> dict[str, Any]:
    """{"point", "mean", "sd", "ci_low", "ci_high", "n_valid"} of one metric, JSON-ready."""
    s = summarize(np.asarray(samples)[:, None])
    return {"point": json_number(point), **{k: json_number(v[0]) for k, v in s.items()}}


def json_number(x: float) -> float | int | None:
    """JSON has no NaN or inf: write null (a null threshold with a point metrics row means
    +inf, nothing called positive)."""
    if isinstance(x, np.integer):
        return int(x)
    return float(x) if np.isfinite(x) else None


def resampling_unit(preds: Predictions, by_image: bool = False) -> str:
    """ "patient" when `preds` carry patient ids and `by_image` is False, else "image"."""
    return "image" if by_image or preds.patients is None else "patient"


def draw_counts(
    preds: Predictions, n_resamples: int, seed: int, by_image: bool = False
) -> np.ndarray:
    """The (R, N) resample counts of `preds`: by patient when it has `patients`, else by image."""
    by_patient = resampling_unit(preds, by_image) == "patient"
    groups = preds.patients if by_patient else None
    return resample_counts(len(preds.ids), n_resamples, seed, groups)


def bootstrap(
    preds: Predictions,
    n_resamples: int = 1000,
    seed: int = 0,
    *,
    by_image: bool = False,
    counts: np.ndarray | None = None,
    thresholds: np.ndarray | None = None,
    rule: SampleRule | None = None,
) -> BootstrapResult:
    """Point estimates and `n_resamples` seeded bootstrap resamples of every metric.

    Resamples patients when `preds` has `patients`, unless `by_image`. `counts` (R, N), when
    given, are the resamples to use instead of drawing them (so several models can share them);
    `n_resamples`, `seed` and `by_image` then only label the result. `thresholds` (L,): fixed
    operating points (see `operating_points`), adding `fixed_*` metrics. Labels failing `rule`
    (default `SampleRule()`) get NaN ranking metrics and stay out of the mean.
    """
    rule = rule or SampleRule()
    # The point estimate is the resample that draws every case once: one code path for both.
    ones = np.ones((1, len(preds.ids)), np.int32)
    point = resampled_metrics(preds.labels, preds.probs, ones, preds.mask, thresholds)
    point = {k: v[0] for k, v in point.items()}
    if counts is None:
        counts = draw_counts(preds, n_resamples, seed, by_image)
    elif counts.shape != (n_resamples, len(preds.ids)):
        raise ConfigError(
            f"counts shape {counts.shape}, expected ({n_resamples}, {len(preds.ids)})"
        )
    samples = resampled_metrics(preds.labels, preds.probs, counts, preds.mask, thresholds)
    n_positive, n_negative = rule.class_counts(preds.labels, preds.known)
    included = rule.passes(n_positive, n_negative)
    for m in metrics.ALL_METRICS:
        point[m][~included] = np.nan
        samples[m][:, ~included] = np.nan
    return BootstrapResult(
        label_names=preds.label_names,
        point=point,
        samples=samples,
        included=included,
        n_resamples=n_resamples,
        seed=seed,
        unit=resampling_unit(preds, by_image),
        rule=rule,
        n_positive=n_positive,
        n_negative=n_negative,
        thresholds=None if thresholds is None else np.asarray(thresholds, np.float64),
    )


def check_paired(
    a: Predictions, b: Predictions, names: tuple[str, str] = ("A", "B"), by_image: bool = False
) -> None:
    """Raise unless `a` and `b` hold the same cases in the same order with the same labels
    (and, unless `by_image`, the same patients)."""
    na, nb = names
    if a.label_names != b.label_names:
        raise ConfigError(
            f"{na} and {nb} have different label_names: {a.label_names} vs {b.label_names}"
        )
    if a.ids.shape != b.ids.shape or not np.array_equal(a.ids, b.ids):
        same_set = set(a.ids.tolist()) == set(b.ids.tolist())
        hint = "same ids in a different order" if same_set else "different ids"
        raise ConfigError(
            f"{na} and {nb} are not paired ({hint}); predict both models on the same split "
            "with the same ordering before comparing"
        )
    if not np.array_equal(a.known, b.known) or not np.array_equal(
        a.labels[a.known], b.labels[b.known]
    ):
        raise ConfigError(f"{na} and {nb} disagree on the ground-truth labels or mask")
    # Patient-level resampling draws one set of patients for both: they must agree on them.
    if by_image:
        return
    if (a.patients is None) != (b.patients is None) or (
        a.patients is not None and not np.array_equal(a.patients, b.patients)
    ):
        raise ConfigError(
            f"{na} and {nb} disagree on patients (one lacks them, or they differ)",
            "Predict both models on the same prepared split, or pass --by-image.",
        )


@dataclasses.dataclass
class PairedResult:
    """One-sided paired bootstrap test of H1 'A has the higher AUROC'; see `paired_p_values`."""

    a: BootstrapResult
    b: BootstrapResult
    p_label: np.ndarray
    p_mean: float


def p_value(auc_a: np.ndarray, auc_b: np.ndarray) -> np.ndarray:
    """Fraction of resamples (axis 0) with auc_a <= auc_b, over resamples where both are defined."""
    valid = ~(np.isnan(auc_a) | np.isnan(auc_b))
    with np.errstate(invalid="ignore"):
        return ((auc_a <= auc_b) & valid).sum(axis=0) / valid.sum(axis=0)


def paired_p_values(
    res_a: BootstrapResult, res_b: BootstrapResult, metric: str = "auroc"
) -> tuple[np.ndarray, float]:
    """(p_label (L,), p_mean) of H1 'A has the higher AUROC' on shared bootstrap resamples.

    `metric` names another higher-is-better metric to test the same way (e.g. "auprc").

    `res_a` and `res_b` must come from `bootstrap` of paired predictions (`check_paired`) with
    the same `counts`. p_label[j] is the fraction of resamples where A's AUROC <= B's, among
    resamples where both are defined; it is defined (not NaN) only when label j passes the
    small-sample rule in the shared test split. That is `included`, a property of the shared
    ground truth, hence the same for both runs. p_mean is the same fraction for the mean over
    the included labels.
    """
    if (res_a.n_resamples, res_a.seed, res_a.unit) != (
        res_b.n_resamples,
        res_b.seed,
        res_b.unit,
    ) or not np.array_equal(res_a.included, res_b.included):
        raise ConfigError(
            "paired p-values need both results bootstrapped on the same resamples of the same "
            "split; bootstrap paired predictions with shared counts"
        )
    p_label = p_value(res_a.samples[metric], res_b.samples[metric])
    p_label[~res_a.included] = np.nan
    p_mean = float(p_value(res_a.mean_samples[metric], res_b.mean_samples[metric]))
    return p_label, p_mean


def paired_bootstrap(
    a: Predictions,
    b: Predictions,
    n_resamples: int = 1000,
    seed: int = 0,
    *,
    by_image: bool = False,
    names: tuple[str, str] = ("A", "B"),
    rule: SampleRule | None = None,
) -> PairedResult:
    """Bootstrap both models on the same resamples and test whether A's AUROC exceeds B's.

    By patient when both carry the same `patients` (`check_paired`), unless `by_image`.
    """
    check_paired(a, b, names, by_image)
    counts = draw_counts(a, n_resamples, seed, by_image)
    res_a = bootstrap(a, n_resamples, seed, by_image=by_image, counts=counts, rule=rule)
    res_b = bootstrap(b, n_resamples, seed, by_image=by_image, counts=counts, rule=rule)
    p_label, p_mean = paired_p_values(res_a, res_b)
    return PairedResult(a=res_a, b=res_b, p_label=p_label, p_mean=p_mean)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (FDR); NaN entries stay NaN and are not counted."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    # scipy rejects NaN and empty input: adjust the defined p-values only.
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out
