"""External validation: a trained run scored on another prepared dataset, on the labels both share.

The predictions carry the evaluated dataset's label names (its spelling, e.g. `COVID-19`) and,
in `model_label_names`, the run output that scored each column, so they pair with the
predictions of a run trained on that dataset (`tools/compare.py RUN_B A_on_B/predictions_test.npz`)
and still say which output was used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cxrjax import console
from cxrjax.errors import ConfigError, MissingInputError
from cxrjax.evaluation.predictions import Predictions
from cxrjax.run_dir import RunDir


def parse_label_map(items: list[str]) -> dict[str, str]:
    """["their=our", ...] -> {"their": "our"}."""
    out = {}
    for item in items:
        theirs, sep, ours = item.partition("=")
        if not sep or not theirs or not ours:
            raise ConfigError(
                f"--label-map {item!r} is not their_name=our_name",
                "Write e.g. --label-map Effusion=pleural_effusion.",
            )
        out[theirs] = ours
    return out


def predict_run(
    workdir: Path,
    data: Path,
    split: str,
    checkpoint: str,
    label_map: dict[str, str],
    batch_size: int,
    external: bool = True,
) -> tuple[Predictions, dict[str, Any]]:
    """Run `workdir` on `split` of the prepared dataset `data`, on the labels both share.

    Returns the predictions and the metadata the metrics JSON records: trained_on, tested_on,
    the matched (dataset, run) label pairs and the rest. With `external` the columns are named
    as `data` names them; else (the run's own dataset) as the run does, like the predictions
    its trainer saved.
    """
    # Lazy: these pull in jax, flax and the data stack, which --predictions does not need.
    from cxrjax.data import shards
    from cxrjax.data.datasets.labels import relabel
    from cxrjax.engine.inference import Predictor

    try:
        info = shards.load_info(data)
    except FileNotFoundError:
        raise MissingInputError(
            f"no prepared dataset at {data} (missing {data / shards.INFO_FILE})",
            "Prepare it with tools/prepare_data.py, or pass --data DIR of one.",
        ) from None
    predictor = Predictor.from_run(workdir, checkpoint)
    matching = relabel(info.label_names, predictor.label_names, label_map)
    if not matching.matched:
        raise ConfigError(
            f"{data} shares no label with {workdir}: it has {info.label_names}, the run "
            f"predicts {predictor.label_names}",
            "Pair labels with --label-map their_name=our_name.",
        )
    outputs = [j for j, i in enumerate(matching.indices) if i is not None]
    columns = [matching.indices[j] for j in outputs]
    if matching.unmatched_target or matching.unmatched_source:
        console.say(
            f"labels not matched: run {list(matching.unmatched_target)}, dataset "
            f"{list(matching.unmatched_source)} (pair them with --label-map their=our)"
        )
    preds = predictor.predict_split(
        info, split, batch_size=batch_size, label_indices=columns, output_indices=outputs
    )
    if external:
        preds = dataclasses.replace(
            preds,
            label_names=[info.label_names[c] for c in columns],
            model_label_names=preds.label_names,
        )
    facts = RunDir(workdir).read_facts()
    meta = {
        "trained_on": facts.dataset,
        "tested_on": info.name,
        "data": str(data),
        "matched_labels": [list(pair) for pair in matching.matched],
        "unmatched_run_labels": list(matching.unmatched_target),
        "unmatched_dataset_labels": list(matching.unmatched_source),
    }
    return preds, meta
