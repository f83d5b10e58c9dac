"""Turn a raw chest X-ray download into preprocessed, patient-level-split ArrayRecord shards.

  python tools/prepare_data.py --dataset {vindr,chestxray14,chexpert,mimic,padchest,csv,folder}
      --raw DIR --out DIR [--size 224] [--labels NAME... | SET] [--uncertain zeros|ones|mask]
      [--vindr-aggregation majority|any] [--csv FILE] [--threshold T]
      [--resize squash|pad] [--resample reduce|zoom] [--no-equalize] [--voi-lut]
      [--no-official-split] [--val-fraction 0.1] [--test-fraction 0.2]
      [--train-fraction 0.01 0.1 0.5] [--seed 0] [--records-per-shard 10000]
      [--workers N] [--dry-run] [--bench N]

--dry-run reads the label files only (no image is opened) and prints per split the images,
patients, positives and masked entries per label; `<out>/summary.json` holds the same.
--bench N decodes and preprocesses N images of the table with 1 and 2 worker processes and
prints images/s per file type, without writing shards.
Identifiers are hashed with the salt in $CXRJAX_SALT (random when unset).

An interrupted preparation (killed, disk full) resumes when the same command is run again: the
finished shards are verified and kept, the rest written, with the salt the first run stored in
`<out>/progress.salt` (deleted once the dataset is complete). The result is byte-identical to an
uninterrupted run. A different command on the same --out is refused, naming the options that
differ; `<out>/dataset_info.json` appears last and means the dataset is complete.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cxrjax.data import prepare
from cxrjax.data.datasets import READERS, MetadataError
from cxrjax.data.images import (
    RESAMPLE_MODES,
    RESIZE_MODES,
    ImageReadError,
    PreprocessOptions,
    load_radiograph,
)
from cxrjax.data.table import RawTable
from cxrjax.errors import EXIT_USER_ERROR, ConfigError, cli

# Label-set names every reader understands besides its own subsets.
_NAMED_SETS = ("default", "all", "mimic_shared")
# Options that do not change what is written: a rerun may change them.
_RUN_ONLY = ("out", "workers", "dry_run", "bench")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(READERS))
    p.add_argument(
        "--raw", required=True, type=Path, help="dataset folder (csv: the CSV or folder)"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder for shards and JSON")
    p.add_argument(
        "--labels", nargs="+", help="label names, or one set: default, all, mimic_shared"
    )
    p.add_argument("--uncertain", default="zeros", choices=("zeros", "ones", "mask"))
    p.add_argument("--vindr-aggregation", default="majority", choices=("majority", "any"))
    p.add_argument(
        "--csv",
        type=Path,
        help="csv dataset: labels CSV when --raw is the image root;\n"
        "folder dataset (unlabeled images): optional CSV of path, patient_id",
    )
    p.add_argument("--threshold", type=float, help="csv dataset: grade >= threshold is positive")
    p.add_argument("--name", help="csv dataset: its name in results (default: the folder's name)")
    p.add_argument(
        "--attributes",
        nargs="+",
        metavar="KEY[=COLUMN]",
        help="csv dataset: sex, age, view columns for evaluate --subgroups (e.g. age=PatientAge)",
    )
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--resize", default="squash", choices=RESIZE_MODES)
    p.add_argument("--resample", default="reduce", choices=RESAMPLE_MODES)
    p.add_argument("--no-equalize", action="store_true", help="skip histogram equalisation")
    p.add_argument("--voi-lut", action="store_true", help="DICOM: apply VOI LUT / window")
    p.add_argument(
        "--no-official-split",
        action="store_true",
        help="ignore the dataset's official split: seeded patient-level split of every image\n"
        "(the study split MIMIC-CXR this way although MIMIC ships a split file)",
    )
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--train-fraction", type=float, nargs="+", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--records-per-shard",
        type=int,
        default=prepare.RECORDS_PER_SHARD,
        help=f"images per shard file (default {prepare.RECORDS_PER_SHARD})",
    )
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: all)")
    p.add_argument("--dry-run", action="store_true", help="read metadata only and print counts")
    p.add_argument("--bench", type=int, metavar="N", help="time decoding of N images; no shards")
    return p


def read_table(args: argparse.Namespace) -> RawTable:
    """Builds the RawTable with the reader of `args.dataset` and the options that apply to it."""
    labels: str | list[str] | None = args.labels
    if labels is not None and len(labels) == 1 and labels[0] in _NAMED_SETS:
        labels = labels[0]
    if args.dataset == "csv":
        if isinstance(labels, str):
            raise ConfigError(
                f"--dataset csv takes explicit --labels column names, not the set name {labels!r}",
                "name the label columns of the CSV",
            )
        table = READERS["csv"](
            args.raw,
            csv=args.csv,
            labels=labels,
            threshold=args.threshold,
            name=args.name,
            attributes=args.attributes,
        )
    elif args.dataset == "folder":
        # Unlabeled images for self-supervised pretraining; --csv optionally names patients.
        if labels is not None or args.threshold is not None or args.attributes:
            raise ConfigError(
                "--dataset folder has no labels: --labels, --threshold and --attributes do not "
                "apply",
                "drop them (--csv may give the images' patient_id)",
            )
        table = READERS["folder"](args.raw, csv=args.csv)
    else:
        if args.csv is not None or args.threshold is not None or args.name or args.attributes:
            raise ConfigError(
                "--csv, --threshold, --name and --attributes apply to --dataset csv only, not "
                f"{args.dataset}",
                "drop them",
            )
        kwargs: dict = {"labels": labels, "uncertain": args.uncertain}
        if args.dataset == "vindr":
            kwargs["aggregation"] = args.vindr_aggregation
        table = READERS[args.dataset](args.raw, **kwargs)
    if args.no_official_split:
        table = RawTable(table.name, table.label_names, table.frame.assign(split=""))
    return table


def _format_counts(summary: dict) -> str:
    names = summary["label_names"]
    splits = list(summary["splits"])
    width = max(len(n) for n in [*names, "patients"]) + 2
    lines = ["label".ljust(width) + "".join(f"{s:>16}" for s in splits)]
    for key in ("images", "patients"):
        lines.append(
            key.ljust(width) + "".join(f"{summary['splits'][s][key]:>16,}" for s in splits)
        )
    for name in names:
        cells = []
        for s in splits:
            pos, masked = (
                summary["splits"][s]["positives"][name],
                summary["splits"][s]["masked"][name],
            )
            cells.append(f"{pos:>10,}" + (f" /{masked:>4,}m" if masked else " " * 7))
        lines.append(name.ljust(width) + "".join(f"{c:>16}" for c in cells))
    lines.append("(positives per split; 'm' = masked entries)")
    return "\n".join(lines)


def _bench_one(job: tuple[str, PreprocessOptions]) -> bool:
    try:
        load_radiograph(*job)
    except ImageReadError:
        return False
    return True


def bench(paths: Sequence[str], options: PreprocessOptions, workers: Sequence[int]) -> dict:
    """images/s of read + preprocess for each file type and worker count."""
    by_type: dict[str, list[str]] = {}
    for path in paths:
        by_type.setdefault(Path(path).suffix.lower().lstrip(".") or "none", []).append(path)
    results: dict = {}
    context = multiprocessing.get_context("spawn")
    for n in workers:
        with concurrent.futures.ProcessPoolExecutor(n, mp_context=context) as pool:
            # Start the workers (imports) before the clock runs.
            list(pool.map(_bench_one, [(paths[0], options)] * n))
            for kind, group in sorted(by_type.items()):
                jobs = [(p, options) for p in group]
                start = time.perf_counter()
                ok = sum(pool.map(_bench_one, jobs, chunksize=4))
                seconds = time.perf_counter() - start
                results[f"{kind}/{n}"] = {
                    "images": len(group),
                    "ok": ok,
                    "per_s": len(group) / seconds,
                }
    return results


def command_options(args: argparse.Namespace) -> dict:
    """The options that decide the output, keyed as typed ("--size"), paths made absolute."""
    return {
        "--" + key.replace("_", "-"): str(value.resolve()) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in _RUN_ONLY
    }


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = PreprocessOptions(
            size=args.size,
            resize=args.resize,
            equalize=not args.no_equalize,
            voi_lut=args.voi_lut,
            resample=args.resample,
        )
        table = read_table(args)
    except (MetadataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{table.name}: {len(table.frame):,} images, {len(table.label_names)} labels", flush=True)
    if args.bench:
        paths = table.frame["path"].head(args.bench).tolist()
        for key, r in bench(paths, options, (1, 2)).items():
            kind, n = key.split("/")
            rate, ok = f"{r['per_s']:8.1f} images/s", f"{r['ok']}/{r['images']} ok"
            print(f"bench {kind:>6} workers={n}: {rate} ({ok})")
        return 0
    summary = prepare.prepare_dataset(
        table,
        args.out,
        options=options,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        train_fractions=args.train_fraction,
        seed=args.seed,
        workers=args.workers,
        dry_run=args.dry_run,
        records_per_shard=args.records_per_shard,
        command=command_options(args),
    )
    print(_format_counts(summary))
    if not args.dry_run:
        print(json.dumps({"skipped": summary.get("skipped", 0), "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
