"""Training throughput: `fakecifar.train.train` (the engine of `fakecifar train`) vs a minimal
hand-written loop over the same BatchLoader, model, optimizer, schedule and augmentation, side
by side in one run. The ratio engine / reference isolates what the engine costs per step
(stop/NaN checks, loss and accuracy sums, callbacks, the task indirection); issue 10's goal is
that it stays within 3% of what the pre-engine `train()` measured.

Each variant trains one epoch of resnet20 (batch 256) on a synthetic shard of random 32x32
images, with one torch thread; variants are interleaved and repeated. Each step is timed in CPU
time of this process (what other jobs on a shared machine disturb least) and in wall time; the
figures are images/s from the median step over all repeats (the first step of each epoch,
which reads the shard, is left out). The ratio is taken on CPU time.

    .venv/bin/python bench/bench_train.py [--images 2560] [--repeat 3] [--threads 1]
    .venv/bin/python bench/bench_train.py --imagefolder [--images 10240] [--workers 2] [--repeat 2]

`--imagefolder` instead compares with what most CIFAR scripts do (torchvision ImageFolder on the
JPEG folder of ../shared/data + per-image transforms + DataLoader workers; issue 3's goal >= 2x).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fakecifar.augment import augment_batch, step_generator
from fakecifar.loader import BatchLoader
from fakecifar.models import build_model
from fakecifar.shards import ShardSet, ShardWriter, open_shards
from fakecifar.train import autocast_dtype, cpu_has_fast_bf16, dataset_mean_std, lr_factor, make_config, train

BATCH = 256


def synthetic_shard(folder: Path, n: int) -> ShardSet:
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    path = folder / "bench.h5"
    with ShardWriter(path, classes=[f"c{i}" for i in range(10)], image_size=(32, 32), producer="bench") as w:
        w.add_batch(images, np.arange(n) % 10)
    return open_shards([path])


def clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def reference_epoch(data: ShardSet, precision: str, channels_last: bool, mean, std) -> list[tuple[float, float]]:
    """The loop a reader would write by hand: same loader, model, SGD, schedule, augmentation."""
    config = make_config(model="resnet20", epochs=1, batch_size=BATCH, precision=precision, device="cpu")
    amp = autocast_dtype(precision, torch.device("cpu"))
    torch.manual_seed(0)
    loader = BatchLoader(data, BATCH, shuffle=True, drop_last=True, mean=mean, std=std, channels_last=channels_last)
    model = build_model("resnet20", 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    model.train()
    stamps = []
    total = len(loader)
    for step, (x, y) in enumerate(loader):
        x = augment_batch(x, ("crop", "flip"), pad=4, generator=step_generator(0, 0, step))
        for group in opt.param_groups:
            group["lr"] = 0.1 * lr_factor(config, step, total, total)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(clock())
    return steps_of(stamps)


def engine_run(data: ShardSet, precision: str, channels_last: bool | None, on_step=None) -> float:
    """One epoch of `fakecifar.train.train`; returns its own images/s figure (the whole epoch)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = make_config(
            model="resnet20", epochs=1, batch_size=BATCH, precision=precision, channels_last=channels_last, device="cpu"
        )
        result = train(data, Path(tmp) / "m.pt", config, on_step=on_step)
    return result.history[-1]["images_per_s"]


def engine_epoch(data: ShardSet, precision: str, channels_last: bool | None) -> list[tuple[float, float]]:
    stamps: list[tuple[float, float]] = []
    engine_run(data, precision, channels_last, on_step=lambda n: stamps.append(clock()))
    return steps_of(stamps)


def steps_of(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(CPU, wall) durations of the steps after the first, from clocks read after each step (the
    first step, which reads the shard, is left out)."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]


def side_by_side(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_shard(Path(tmp), args.images)
        mean, std = dataset_mean_std(data)
        pairs: dict[str, tuple[str, bool]] = {"fp32 (--precision fp32 --no-channels-last)": ("fp32", False)}
        if cpu_has_fast_bf16():
            pairs["bf16 + channels_last (the default on this AMX CPU)"] = ("bf16", True)
        variants: dict[str, Callable[[], list[tuple[float, float]]]] = {}
        for label, (precision, cl) in pairs.items():
            variants[f"reference, {label}"] = functools.partial(reference_epoch, data, precision, cl, mean, std)
            variants[f"engine,    {label}"] = functools.partial(engine_epoch, data, precision, cl)
        steps: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for r in range(args.repeat):
            for name, fn in variants.items():
                times = fn()
                steps[name] += times
                cpu, wall = (BATCH / statistics.median(t) for t in zip(*times))
                print(f"  run {r + 1}: {name}: {cpu:6,.0f} images/s CPU time, {wall:6,.0f} wall", flush=True)
    print(
        f"resnet20, batch {BATCH}, {args.images} synthetic 32x32 images, torch threads {torch.get_num_threads()}, "
        f"median step of {args.repeat} interleaved repeats"
    )
    rate = {name: [BATCH / statistics.median(t) for t in zip(*times)] for name, times in steps.items()}
    for label in pairs:
        ref, eng = f"reference, {label}", f"engine,    {label}"
        for name in (ref, eng):
            print(f"  {name:68s} {rate[name][0]:6,.0f} images/s CPU time, {rate[name][1]:6,.0f} wall")
        cpu, wall = (rate[eng][i] / rate[ref][i] for i in (0, 1))
        print(f"  ratio engine/reference, {label}: {cpu:.3f} on CPU time ({wall:.3f} on wall time)")


# ----------------------------------------------------------------------------- issue 3: vs ImageFolder

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def subset_shard(n: int, seed: int = 0) -> tuple[Path, list[str]]:
    """The same n random CIFAR-10 training images as a shard, and as their JPEG file names."""
    from fakecifar.importing import import_sources

    from common import CACHE, SHARED_DATA, require

    shards = CACHE / "cifar10-shards"
    if not shards.exists():
        import_sources([require(SHARED_DATA / "cifar10-train-jpg.tar.gz")], shards)
    data = open_shards([shards])
    rows = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    path = CACHE / f"train-bench-{n}-{seed}.h5"
    if not path.exists():
        with ShardWriter(path, classes=data.classes, image_size=data.image_size, producer="bench") as w:
            w.add_batch(data.take("images", rows), data.take("labels", rows), source=data.take("source", rows))
    sources = [s.split(":", 1)[1] if ":" in s else s for s in open_shards([path]).read("source")]
    return path, sources


def imagefolder_epoch(folder: Path, files: list[str], workers: int, bf16: bool = False) -> float:
    """One epoch of the usual torchvision loop over the given files; returns images/s."""
    import torchvision
    from torchvision import transforms

    dataset = torchvision.datasets.ImageFolder(
        str(folder),
        transform=transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        ),
    )
    wanted = {str(Path(f).relative_to("train")) if f.startswith("train/") else f for f in files}
    index = [i for i, (p, _) in enumerate(dataset.samples) if str(Path(p).relative_to(folder)) in wanted]
    assert len(index) == len(files), (len(index), len(files))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, index), batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True
    )
    model = build_model("resnet20", 10)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    model.train()
    n = 0
    start = time.perf_counter()
    for x, y in loader:
        if bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(x)
    return n / (time.perf_counter() - start)


def imagefolder(args: argparse.Namespace) -> None:
    from common import unpacked

    folder = unpacked("cifar10-train-jpg.tar.gz") / "train"
    shard, files = subset_shard(args.images)
    data = open_shards([shard])
    bf16 = cpu_has_fast_bf16()
    variants: dict[str, Callable[[], float]] = {
        f"reference: ImageFolder+transforms+DataLoader({args.workers} workers), fp32": lambda: imagefolder_epoch(
            folder, files, args.workers
        ),
        "fakecifar train, fp32 (--precision fp32 --no-channels-last)": lambda: engine_run(data, "fp32", False),
    }
    if bf16:
        variants[f"reference + bf16 autocast + channels_last ({args.workers} workers)"] = lambda: imagefolder_epoch(
            folder, files, args.workers, bf16=True
        )
        variants["fakecifar train, default (--precision auto: bf16 + channels_last)"] = lambda: engine_run(
            data, "auto", None
        )
    best: dict[str, float] = {}
    for r in range(args.repeat):
        for name, fn in variants.items():
            value = fn()
            best[name] = max(best.get(name, 0.0), value)
            print(f"  run {r + 1}: {name}: {value:,.0f} images/s", flush=True)
    ref = next(iter(best.values()))
    print(
        f"resnet20, batch {BATCH}, {args.images} images, torch threads {torch.get_num_threads()}; best of {args.repeat}"
    )
    for name, value in best.items():
        print(f"{name:90s} {value:8,.0f} images/s  {value / ref:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, help="default 2560 (10240 with --imagefolder)")
    parser.add_argument("--repeat", type=int, help="default 3 (2 with --imagefolder)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default 1, steadiest on a shared machine; torch's own with --imagefolder)",
    )
    parser.add_argument("--imagefolder", action="store_true", help="issue 3: vs ImageFolder + DataLoader instead")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="with --imagefolder")
    args = parser.parse_args()
    args.images = args.images or (10_240 if args.imagefolder else 2560)
    args.repeat = args.repeat or (2 if args.imagefolder else 3)
    if args.threads or not args.imagefolder:
        torch.set_num_threads(args.threads or 1)
    if args.imagefolder:
        imagefolder(args)
    else:
        side_by_side(args)


if __name__ == "__main__":
    main()
