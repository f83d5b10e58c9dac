"""Compare runs the way the study did: paired bootstrap AUROC, one-sided p-values, BH correction.

  python tools/compare.py W1 W2 ... --out DIR [--bootstrap 1000] [--seed 0] [--by-image]
      [--baseline INIT] [--split test] [--test bootstrap|delong] [--min-per-class 10]

Each Wi is a run directory (holding `predictions_<split>.npz` and `config.json` with
`experiment`, `init`, `data.dataset`, `data.train_fraction`; top-level `dataset` and
`train_fraction` are read too) or a predictions file (its directory's config.json, if any,
names it). Runs on the same dataset and training fraction are compared on shared resamples, of
patients when the predictions carry patient ids (`--by-image`: of images, the study's protocol);
every other initialisation is tested against the baseline (default: the first run's) with
H1 'higher AUROC than the baseline', p = fraction of resamples where its AUROC <= the
baseline's (`bootstrap.paired_p_values`: NaN for a label without both classes in the shared
test split). `--test delong` puts DeLong's test (`cxrjax.evaluation.delong`, same hypothesis)
in the p column instead; the CSV carries the other test's p-value too, and the bootstrap
p-value of AUPRC. Benjamini-Hochberg runs over all labels and datasets of one comparison (label
means form their own family). Labels failing the small-sample rule (`--min-per-class`, default 10
positives and negatives) get no AUROC and no test, and are named on the console. Predictions of
external validation (`cxrjax.evaluate --workdir A --data B`) carry B's label names and are
compared with B's runs on the labels they share. Writes comparison.md (AUROC, AUPRC),
comparison.csv and comparison.json (with Brier and ECE too), ROC and precision-recall curves
with bands, PNGs. Every input is read and checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrjax import console
from cxrjax.errors import CxrjaxError
from cxrjax.evaluation import bootstrap as bs
from cxrjax.evaluation import delong, pipeline, report
from cxrjax.evaluation.compared_runs import ComparedRun, assign_columns, load_run, shared_labels
from cxrjax.evaluation.sample_rule import DEFAULT_MIN_PER_CLASS, SampleRule

MEAN_ROW = "mean (labels)"
TESTS = ("bootstrap", "delong")
# Metrics of every run in the table (CSV, JSON); the Markdown table shows the first two.
TABLE_METRICS = ("auroc", "auprc", "brier", "ece", "ece_mass")


def compare(
    runs: list[ComparedRun],
    n_resamples: int = 1000,
    seed: int = 0,
    by_image: bool = False,
    baseline: str | None = None,
    test: str = "bootstrap",
    rule: SampleRule | None = None,
) -> dict[str, Any]:
    """Bootstrap every run, test each column against the baseline, correct with BH.

    Resamples patients when the predictions carry them, images with `by_image`. Labels failing
    `rule` (default `SampleRule()`) get no AUROC and no test.

    `test` ("bootstrap" or "delong") gives the p-values that are corrected and tabled as `p:c`;
    the other test's go to `p_<other>:c`, the bootstrap AUPRC test's to `p_auprc:c`.
    """
    if test not in TESTS:
        raise ValueError(f"--test {test!r}: use one of {TESTS}")
    rule = rule or SampleRule()
    other = next(t for t in TESTS if t != test)
    assign_columns(runs)
    columns = list(dict.fromkeys(r.column for r in runs))
    baseline = baseline or runs[0].column
    if baseline not in columns:
        raise ValueError(f"--baseline {baseline!r} is none of the runs' columns {columns}")
    groups: dict[tuple[str, float], dict[str, ComparedRun]] = defaultdict(dict)
    for r in runs:
        groups[(r.dataset, r.train_fraction)][r.column] = r

    results: dict[tuple[str, float], dict[str, bs.BootstrapResult]] = {}
    counts_by_group: dict[tuple[str, float], np.ndarray] = {}
    entries: list[dict[str, Any]] = []
    units = set()
    excluded: dict[str, dict[str, Any]] = {}
    # Every group is checked before any is bootstrapped: a run that does not pair fails fast.
    for members in groups.values():
        shared_labels(list(members.values()))
        ref = next(iter(members.values()))
        for r in members.values():
            bs.check_paired(ref.preds, r.preds, (ref.source, r.source), by_image)
    for key, members in groups.items():
        ref = next(iter(members.values()))
        counts = bs.draw_counts(ref.preds, n_resamples, seed, by_image)
        counts_by_group[key] = counts
        res = {
            c: bs.bootstrap(r.preds, n_resamples, seed, by_image=by_image, counts=counts, rule=rule)
            for c, r in members.items()
        }
        results[key] = res
        first = next(iter(res.values()))
        units.add(first.unit)
        gone = rule.excluded_json(first.label_names, first.n_positive, first.n_negative)
        for name, e in gone.items():
            console.say(f"small-sample rule: {key[0]} ({key[1]:g}): {name}: {e['reason']}")
        excluded[f"{key[0]} ({key[1]:g})"] = gone
        names = ref.preds.label_names
        rows = [{"dataset": key[0], "train_fraction": key[1], "label": n} for n in names]
        mean_row = {"dataset": key[0], "train_fraction": key[1], "label": MEAN_ROW}
        for c, rr in res.items():
            mean_samples, mean_point = rr.mean_samples, rr.mean_point
            for row in [*rows, mean_row]:
                row[c] = {}
            for m in TABLE_METRICS:
                per = bs.summarize(rr.samples[m])
                for j, row in enumerate(rows):
                    row[c][m] = {k: float(per[k][j]) for k in ("mean", "sd", "ci_low", "ci_high")}
                    row[c][m]["point"] = float(rr.point[m][j])
                mean = bs.summarize(mean_samples[m][:, None])
                mean_row[c][m] = {k: float(mean[k][0]) for k in ("mean", "sd", "ci_low", "ci_high")}
                mean_row[c][m]["point"] = mean_point[m]
        if baseline in res:
            base = res[baseline]
            for c, rr in res.items():
                if c == baseline:
                    continue
                test_result = delong.delong_test(members[c].preds, members[baseline].preds, rule)
                found = {
                    "bootstrap": bs.paired_p_values(rr, base),
                    "delong": (test_result.p, test_result.mean_p),
                    "auprc": bs.paired_p_values(rr, base, "auprc"),
                }
                for key, name in (("p", test), (f"p_{other}", other), ("p_auprc", "auprc")):
                    p_label, p_mean = found[name]
                    for j, row in enumerate(rows):
                        row[f"{key}:{c}"] = float(p_label[j])
                    mean_row[f"{key}:{c}"] = float(p_mean)
        entries.extend([*rows, mean_row])

    # One BH family per comparison: its label p-values over all datasets; label means apart.
    for c in columns:
        for is_mean in (False, True):
            family = [e for e in entries if f"p:{c}" in e and (e["label"] == MEAN_ROW) == is_mean]
            adjusted = bs.benjamini_hochberg(np.array([e[f"p:{c}"] for e in family]))
            for e, q in zip(family, adjusted, strict=True):
                e[f"p_bh:{c}"] = float(q)
    return {
        "columns": columns,
        "baseline": baseline,
        "test": test,
        "groups": groups,
        "results": results,
        "counts": counts_by_group,
        "entries": entries,
        # One unit for all groups unless some runs lack patient ids.
        "resampling": "+".join(sorted(units)),
        "sample_rule": rule.to_json(),
        "excluded_labels": excluded,
    }


def _summary_frame(out: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for (dataset, fraction), res in out["results"].items():
        for c, rr in res.items():
            s = bs.summarize(rr.mean_samples["auroc"][:, None])
            rows.append(
                {
                    "dataset": dataset,
                    "train_fraction": fraction,
                    "init": c,
                    "auroc_point": rr.mean_point["auroc"],
                    "auroc_mean": s["mean"][0],
                    "auroc_sd": s["sd"][0],
                }
            )
    return pd.DataFrame(rows)


def _header(out: dict[str, Any], n_resamples: int, seed: int) -> str:
    unit = {"patient": "patients", "image": "images"}.get(out["resampling"], "patients or images")
    if out["test"] == "delong":
        p_text = (
            "one-sided DeLong test (Sun and Xu's algorithm) of H1 'the column's AUROC is higher "
            f"than the baseline's ({out['baseline']})'"
        )
    else:
        p_text = (
            "one-sided paired bootstrap, the fraction of shared resamples where the column's "
            f"AUROC <= the baseline's ({out['baseline']})"
        )
    return (
        "# AUROC by initialisation\n\n"
        f"AUROC and AUPRC: mean ± SD over {n_resamples} bootstrap resamples of the test {unit} "
        f"(seed {seed}). p: {p_text}; in brackets corrected by Benjamini-Hochberg across all "
        "labels and datasets of that comparison (label means corrected as their own family). "
        f"'< {1 / n_resamples:.3g}': in none of the {n_resamples} resamples. comparison.csv "
        "adds Brier score and ECE, the other test's p-value and the bootstrap p-value of "
        "AUPRC. "
        f"Labels with fewer than {out['sample_rule']['min_positives']} positives or "
        f"{out['sample_rule']['min_negatives']} negatives have no AUROC and no test (n/a).\n\n"
    )


def write_outputs(out: dict[str, Any], out_dir: Path, n_resamples: int, seed: int) -> list[Path]:
    """Table (Markdown, CSV), JSON and figures; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    other = next(t for t in TESTS if t != out["test"])
    numeric, pretty = report.comparison_rows(
        out["entries"],
        out["columns"],
        out["baseline"],
        n_resamples,
        metrics=TABLE_METRICS,
        extra_p=(f"p_{other}", "p_auprc"),
    )
    written = [out_dir / "comparison.csv", out_dir / "comparison.md", out_dir / "comparison.json"]
    numeric.to_csv(written[0], index=False)
    written[1].write_text(
        _header(out, n_resamples, seed) + report.to_markdown(pretty), encoding="utf-8"
    )
    summary = _summary_frame(out)
    meta = {
        "bootstrap": bs.bootstrap_json(n_resamples, seed, out["resampling"]),
        "sample_rule": out["sample_rule"],
        "excluded_labels": out["excluded_labels"],
        "baseline": out["baseline"],
        "test": out["test"],
        "runs": [
            {
                "source": r.source,
                "column": c,
                "experiment": r.experiment,
                "dataset": r.dataset,
                "init": r.init,
                "train_fraction": r.train_fraction,
            }
            for members in out["groups"].values()
            for c, r in members.items()
        ],
        "rows": json.loads(numeric.to_json(orient="records")),
    }
    pipeline.write_json(written[2], meta)

    for (dataset, fraction), members in out["groups"].items():
        path = out_dir / f"roc_{report.slug(dataset)}_f{fraction:g}.png"
        runs = {c: r.preds for c, r in members.items()}
        title = f"{dataset}, {fraction:.0%} of training data, 95% bootstrap bands"
        report.plot_roc_bands(runs, out["counts"][(dataset, fraction)], str(path), title)
        written.append(path)
        path = out_dir / f"pr_{report.slug(dataset)}_f{fraction:g}.png"
        report.plot_pr_bands(runs, out["counts"][(dataset, fraction)], str(path), title)
        written.append(path)
    largest = summary.groupby("dataset")["train_fraction"].transform("max")
    top = summary[summary["train_fraction"] == largest]
    written.append(out_dir / "mean_auroc.png")
    report.plot_mean_auroc(top, str(written[-1]))
    if summary.groupby("dataset")["train_fraction"].nunique().max() > 1:
        written.append(out_dir / "auroc_vs_fraction.png")
        report.plot_label_efficiency(summary, str(written[-1]))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or predictions .npz files")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--by-image",
        action="store_true",
        help="resample images, the study's protocol (default: patients, when the files have them)",
    )
    parser.add_argument(
        "--min-per-class",
        type=int,
        default=DEFAULT_MIN_PER_CLASS,
        help="fewest positives and negatives a label needs for an AUROC (default 10)",
    )
    parser.add_argument("--baseline", help="column every other is tested against")
    parser.add_argument("--split", default="test", help="split of predictions_<split>.npz")
    parser.add_argument(
        "--test", choices=TESTS, default="bootstrap", help="test in the p column (bootstrap)"
    )
    args = parser.parse_args(argv)
    if args.bootstrap < 1:
        parser.error("--bootstrap must be >= 1 for paired tests")
    try:
        rule = SampleRule.per_class(args.min_per_class)
        runs = [load_run(p, args.split) for p in args.runs]
        out = compare(
            runs, args.bootstrap, args.seed, args.by_image, args.baseline, args.test, rule
        )
        written = write_outputs(out, Path(args.out), args.bootstrap, args.seed)
    except (CxrjaxError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "comparison.md").read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
