"""Images/s of the training input pipeline alone, against the study's JPEG + PyTorch baseline.

    python tools/bench_input.py [--shards DIR]

Without --shards, phantom radiographs are written and prepared at 224 px first (a minute or so).
Both sides run the study's augmentation (horizontal flip p=0.5, rotation +-7 degrees) on 224 px
grayscale images and hand over uint8 batches:

- loader: cxrjax.data.pipeline.train_loader over the ArrayRecord shards (grain, `threads`);
- baseline: a torch DataLoader over JPEG files of the same images, PIL decode +
  torchvision RandomHorizontalFlip + RandomRotation (the original code's recipe), `num_workers`.

Each configuration runs in its own process pinned to 1 or 2 CPUs (sched_setaffinity), so
"per CPU" means per CPU the process could use. Each line gives images per wall-clock second and
images per CPU-second the configuration used (process, threads and worker processes): the
latter is what one core sustains, and stays meaningful on a machine shared with other jobs. The
last line reads `loader: X img/s/core; jpeg baseline: Y img/s/core; ratio: Z` with the best
per-CPU-second figure of each side over the CPU counts.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from absl import app, flags

_SHARDS = flags.DEFINE_string("shards", None, "prepared shards (default: write phantom shards)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where phantoms/JPEGs go (default: a temp dir)")
_PATIENTS = flags.DEFINE_integer("patients", 200, "phantom patients to write without --shards")
_BATCH = flags.DEFINE_integer("batch_size", 64, "batch size of both loaders")
_SECONDS = flags.DEFINE_float("seconds", 8.0, "measuring time per configuration")
_CORES = flags.DEFINE_list("cores", ["1", "2"], "CPU counts to measure")


def _phantom_shards(workdir: Path) -> Path:
    from cxrjax.data.datasets import read_csv
    from cxrjax.data.images import PreprocessOptions
    from cxrjax.data.phantoms import write_phantom_dataset
    from cxrjax.data.prepare import prepare_dataset

    out = workdir / "shards"
    if (out / "dataset_info.json").is_file():
        return out
    csv = write_phantom_dataset(workdir / "raw", n_patients=_PATIENTS.value, image_size=256)
    prepare_dataset(
        read_csv(csv),
        out,
        options=PreprocessOptions(size=224),
        val_fraction=0.05,
        test_fraction=0.05,
        seed=0,
        salt="bench",
    )
    return out


def _write_jpegs(shards_dir: Path, out: Path) -> list[str]:
    """The training images as JPEG files: what the original code read from disk."""
    import grain
    from PIL import Image

    from cxrjax.data import shards

    info = shards.load_info(shards_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = grain.sources.ArrayRecordDataSource(info.files("train"))
    paths = []
    for i in range(len(source)):
        path = out / f"{i:06d}.jpg"
        if not path.is_file():
            Image.fromarray(shards.decode(source[i])["image"]).save(path, quality=95)
        paths.append(str(path))
    return paths


def _pin(cores: int) -> None:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < cores:
        raise SystemExit(f"asked for {cores} CPUs; this process may use {available}")
    os.sched_setaffinity(0, available[:cores])


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and its live child processes (DataLoader workers)."""
    total = time.process_time()
    for child in multiprocessing.active_children():
        with open(f"/proc/{child.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _measure(batches, batch_size: int, seconds: float) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second used)."""
    for _ in range(3):  # warm-up: threads and workers started, caches filled
        next(batches)
    count, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += batch_size
    return count / (time.perf_counter() - start), count / (_cpu_seconds() - cpu)


def _loader_rate(
    shards_dir: str, cores: int, batch_size: int, seconds: float
) -> tuple[float, float]:
    _pin(cores)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import cv2

    from cxrjax.data import pipeline, shards

    cv2.setNumThreads(1)  # parallelism comes from the loader's threads, one per CPU
    info = shards.load_info(shards_dir)
    loader = pipeline.train_loader(
        info, batch_size=batch_size, label_indices=[0], seed=0, threads=cores
    )
    return _measure(iter(loader), batch_size, seconds)


class _JpegDataset:
    def __init__(self, paths: list[str]):
        from torchvision import transforms

        self._paths = paths
        self._augment = transforms.Compose(
            [transforms.RandomHorizontalFlip(0.5), transforms.RandomRotation(7)]
        )

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from PIL import Image

        image = self._augment(Image.open(self._paths[i]).convert("L"))
        return torch.from_numpy(np.asarray(image).copy())


def _baseline_rate(
    paths: list[str], cores: int, batch_size: int, seconds: float
) -> tuple[float, float]:
    _pin(cores)
    import torch

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(
        _JpegDataset(paths),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cores if cores > 1 else 0,
        persistent_workers=cores > 1,
        multiprocessing_context="spawn" if cores > 1 else None,
    )

    def endless():
        while True:
            yield from loader

    return _measure(endless(), batch_size, seconds)


def _in_process(fn, *args) -> tuple[float, float]:
    # A fresh spawned process per configuration: its own CPU pinning, no state shared.
    # (Not a multiprocessing.Pool: its daemonic workers may not start DataLoader workers.)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def main(argv: list[str]) -> None:
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(_WORKDIR.value or tmp)
        started = time.perf_counter()
        shards_dir = Path(_SHARDS.value) if _SHARDS.value else _phantom_shards(workdir)
        paths = _write_jpegs(shards_dir, workdir / "jpeg")
        print(
            f"data: {len(paths)} training images from {shards_dir} "
            f"({time.perf_counter() - started:.0f} s to prepare); load {os.getloadavg()}"
        )
        best = {"loader": 0.0, "baseline": 0.0}
        for cores in map(int, _CORES.value):
            for name, fn, source in (
                ("loader", _loader_rate, str(shards_dir)),
                ("baseline", _baseline_rate, paths),
            ):
                wall, per_cpu_second = _in_process(fn, source, cores, _BATCH.value, _SECONDS.value)
                best[name] = max(best[name], per_cpu_second)
                print(
                    f"{name} on {cores} CPU(s): {wall:,.0f} img/s wall ({wall / cores:,.0f} "
                    f"/CPU), {per_cpu_second:,.0f} img per CPU-second used"
                )
        print(f"load average after: {os.getloadavg()}")
        # Per core = per CPU-second the pipeline used: on a shared machine, wall-clock rates
        # measure the other tenants too; both figures are printed above.
        print(
            f"loader: {best['loader']:.0f} img/s/core; jpeg baseline: {best['baseline']:.0f} "
            f"img/s/core; ratio: {best['loader'] / best['baseline']:.1f}"
        )


if __name__ == "__main__":
    app.run(main)
