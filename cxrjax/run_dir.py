"""A run directory: the one place that knows its layout. A run directory is self-contained.

    RUN/
      config.json            the experiment config the run was started with
      run.json               run facts: everything inference needs (architecture, labels, image
                             size, the preparation's preprocessing, the input normalisation) and
                             what a resume must match
      checkpoints/<step>/    latest K train states + the shared data-iterator state (orbax)
      best/<step>/           parameters with the best validation mean AUROC (orbax)
      tb/                    TensorBoard events
      parameters.txt         the parameter overview (one line of it goes to the console)
      results.json           final validation/test summary
      predictions_<split>.npz
      sources/<name>/        multi-source runs: each source's predictions + config naming it
      RUNNING                lock held by the live training process

Inference (`cxrjax.engine.inference`) needs only `run.json` and a checkpoint: a run directory
copied to another machine, with the prepared dataset gone, predicts and evaluates as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

import ml_collections

from cxrjax.errors import MissingInputError, RunDirError

FACTS_VERSION = 2


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What a trained run is, independent of the data it was trained on.

    `preprocessing` holds the `PreprocessOptions` fields of the training images (so a new
    radiograph is prepared the same way); `mean`/`std` are the per-channel input normalisation
    applied on the device to [0, 1] images.
    """

    variant: str
    label_names: tuple[str, ...]
    image_size: int
    preprocessing: dict[str, Any]
    normalization: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dtype: str
    dataset: str
    batch_size: int
    ema: bool
    # Architecture options beyond the variant (pooling, LoRA adapters); {} for plain runs.
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    # Fields a resumed run must share with the checkpoints it resumes from. The topology
    # (processes, devices, FSDP) is deliberately absent: checkpoints restore onto any of them.
    RESUME_FIELDS = ("variant", "label_names", "image_size", "batch_size", "ema", "model_options")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["label_names"] = list(self.label_names)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["model_options"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.model_options.items()
        }
        return {"version": FACTS_VERSION, **out}

    @classmethod
    def from_json(cls, raw: dict[str, Any], source: Path) -> RunFacts:
        optional = ("model_options",)
        missing = [
            f.name for f in dataclasses.fields(cls) if f.name not in raw and f.name not in optional
        ]
        if missing:
            raise RunDirError(
                f"{source} lacks {missing}: the run was trained before run directories became "
                "self-contained.",
                f"Rerun its training command once (it resumes, rewrites {source.name} and "
                "re-evaluates), or convert it with tools/convert_checkpoint.py.",
            )
        return cls(
            variant=raw["variant"],
            label_names=tuple(raw["label_names"]),
            image_size=int(raw["image_size"]),
            preprocessing=dict(raw["preprocessing"]),
            normalization=raw["normalization"],
            mean=tuple(float(v) for v in raw["mean"]),
            std=tuple(float(v) for v in raw["std"]),
            dtype=raw["dtype"],
            dataset=raw["dataset"],
            batch_size=int(raw["batch_size"]),
            ema=bool(raw["ema"]),
            model_options=dict(raw.get("model_options", {})),
        )


class RunDir:
    """Paths and small files of one run directory; the only code that names them."""

    CONFIG = "config.json"
    FACTS = "run.json"
    RESULTS = "results.json"
    LOCK = "RUNNING"
    PARAMETERS = "parameters.txt"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def checkpoints(self) -> Path:
        return self.path.absolute() / "checkpoints"

    @property
    def best(self) -> Path:
        return self.path.absolute() / "best"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def parameters(self) -> Path:
        return self.path / self.PARAMETERS

    @property
    def results(self) -> Path:
        return self.path / self.RESULTS

    def predictions(self, split: str, checkpoint: str = "best", out: Path | None = None) -> Path:
        """predictions_<split>.npz for the best checkpoint, predictions_<split>_latest.npz else."""
        suffix = "" if checkpoint == "best" else f"_{checkpoint}"
        return (out or self.path) / f"predictions_{split}{suffix}.npz"

    @staticmethod
    def metrics_for(predictions: Path, out: Path | None = None) -> Path:
        """The metrics JSON of a predictions file, in `out` or beside it:
        predictions_test.npz -> metrics_test.json, other.npz -> other_metrics.json."""
        stem = predictions.stem
        name = (
            "metrics" + stem[len("predictions") :]
            if stem.startswith("predictions")
            else f"{stem}_metrics"
        )
        return (out or predictions.parent) / f"{name}.json"

    def source(self, name: str) -> RunDir:
        """sources/<name>/ of a multi-source run: one source's predictions and a config that
        names it as the dataset (readable by tools/compare.py like a run directory)."""
        return RunDir(self.path / "sources" / name)

    def source_views(self) -> list[RunDir]:
        """The sources/<name>/ views a finished multi-source run wrote (none for one source)."""
        return [RunDir(p.parent) for p in sorted(self.path.glob(f"sources/*/{self.CONFIG}"))]

    # ------------------------------------------------------------------ reading
    def is_run(self) -> bool:
        return (self.path / self.FACTS).is_file()

    def require(self) -> RunDir:
        """Raises unless this is a run directory (one with run facts)."""
        if not self.path.is_dir():
            raise MissingInputError(
                f"{self.path}: no such run directory",
                "Pass the --workdir a training run wrote (it holds run.json and checkpoints/).",
            )
        if not self.is_run():
            raise RunDirError(
                f"{self.path} is not a cxrjax run directory (no {self.FACTS})",
                "Pass the --workdir of a training run, or a converted weights folder where the "
                "command accepts one.",
            )
        return self

    def read_facts(self) -> RunFacts:
        path = self.require().path / self.FACTS
        return RunFacts.from_json(_read_json(path), path)

    def read_recorded_facts(self) -> dict[str, Any]:
        """run.json as written, also by runs from before it held every fact: converting such a
        run needs only its variant, labels and image size, which every run recorded."""
        return _read_json(self.require().path / self.FACTS)

    def read_config(self) -> ml_collections.ConfigDict:
        path = self.path / self.CONFIG
        if not path.is_file():
            raise RunDirError(f"{self.path} has no {self.CONFIG}", "Use the run's own folder.")
        return ml_collections.ConfigDict(_read_json(path))

    def read_results(self) -> dict[str, Any]:
        return _read_json(self.results)

    # ------------------------------------------------------------------ writing
    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        _write_atomic(self.path / self.CONFIG, config.to_json_best_effort(indent=2))

    def write_results(self, results: dict[str, Any]) -> None:
        _write_atomic(self.results, json.dumps(results, indent=2))

    def write_parameters(self, text: str) -> None:
        _write_atomic(self.parameters, text)

    def check_resumable(self, facts: RunFacts) -> None:
        """Records `facts`, or refuses when the existing checkpoints were made for others.

        A run directory from before `run.json` held every fact is compared on the fields it
        has and then upgraded, so it stays usable for inference.
        """
        path = self.path / self.FACTS
        if path.is_file():
            saved = _read_json(path)
            now = facts.to_json()
            # Run directories from before model_options existed had none.
            saved.setdefault("model_options", {})
            differing = {
                k: (saved[k], now[k])
                for k in facts.RESUME_FIELDS
                if _comparable(k, saved[k]) != _comparable(k, now[k])
            }
            if differing:
                lines = "\n".join(
                    f"  {k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in differing.items()
                )
                raise RunDirError(
                    f"the checkpoints in {self.path} do not match this config:\n{lines}",
                    "Use another --workdir, or restore the config the run was started with.",
                )
        _write_atomic(path, json.dumps(facts.to_json(), indent=2))

    def lock(self, primary: bool = True) -> WorkdirLock:
        """The training lock; only the primary process of a multi-host run takes it."""
        return WorkdirLock(self.path / self.LOCK, primary)


class WorkdirLock:
    """Refuses a second training process on the same run directory while the first is alive.

    The owner is host:pid; a lock left by a killed process on this host is taken over.
    """

    def __init__(self, path: Path, primary: bool = True):
        self.path = path
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.primary = primary

    def __enter__(self) -> WorkdirLock:
        if not self.primary:
            return self
        if self.path.exists():
            host, _, pid = self.path.read_text().partition(":")
            alive = host != socket.gethostname() or _pid_alive(int(pid or 0))
            if alive:
                raise RunDirError(
                    f"{self.path.parent} is in use by process {pid} on {host}.",
                    f"Wait for it, use another --workdir, or delete {self.path} if that run is "
                    "gone.",
                )
        self.path.write_text(self.owner)
        return self

    def __exit__(self, *exc) -> None:
        if self.primary and self.path.exists():
            self.path.unlink()


def _comparable(field: str, value: Any) -> Any:
    # Shards prepared before the label vocabulary named some labels differently (`effusion`);
    # they load under canonical names, and a run started on them must still resume.
    if field == "label_names":
        from cxrjax.data.datasets.labels import canonical

        return [canonical(n) or n for n in value]
    return value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file", "Use a complete run directory.") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e})", "Restore it from a copy.") from e


def _write_atomic(path: Path, text: str) -> None:
    # A kill -9 mid-write must never leave a truncated JSON a later run would fail to parse.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
