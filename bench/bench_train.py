"""Training throughput on CPU: `fakecifar train`'s loop vs a plain PyTorch reference loop
(issue 3 goal: >= 2x images/s), same model (resnet20), same batch (256), same images.

The reference is what most CIFAR scripts do: torchvision ImageFolder on the JPEG folder +
RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, a DataLoader with
workers, SGD with Nesterov momentum. fakecifar's side is `fakecifar.train.train` (the loop of
`fakecifar train`: BatchLoader from shards, batch-level augmentation on tensors); its figure
is the loop's own images/s (mean/std pass, checkpoint writing excluded). Variants are
interleaved and repeated; the best of each is reported.

    .venv/bin/python bench/bench_train.py [--images 10240] [--workers 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision import transforms

from fakecifar.importing import import_sources
from fakecifar.models import build_model
from fakecifar.shards import ShardWriter, open_shards
from fakecifar.train import cpu_has_fast_bf16, make_config, train

from common import CACHE, SHARED_DATA, require, unpacked

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def subset_shard(n: int, seed: int = 0) -> tuple[Path, list[str]]:
    """The same n random CIFAR-10 training images as a shard, and as their JPEG file names."""
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


def reference_epoch(folder: Path, files: list[str], workers: int, bf16: bool = False) -> float:
    """One epoch of the plain loop over the given files; returns images/s."""
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
        torch.utils.data.Subset(dataset, index), batch_size=256, shuffle=True, num_workers=workers, drop_last=True
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
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(x)
    return n / (time.perf_counter() - start)


def fakecifar_epoch(shard: Path, precision: str, channels_last: bool | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        config = make_config(
            model="resnet20", epochs=1, batch_size=256, precision=precision, channels_last=channels_last, device="cpu"
        )
        result = train(open_shards([shard]), Path(tmp) / "m.pt", config)
    return result.history[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_240)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    folder = unpacked("cifar10-train-jpg.tar.gz") / "train"
    shard, files = subset_shard(args.images)
    bf16 = cpu_has_fast_bf16()
    variants = {
        f"reference: ImageFolder+transforms+DataLoader({args.workers} workers), fp32": lambda: reference_epoch(
            folder, files, args.workers
        ),
        "fakecifar train loop, fp32 (--precision fp32 --no-channels-last)": lambda: fakecifar_epoch(
            shard, "fp32", False
        ),
    }
    if bf16:
        variants[f"reference + bf16 autocast + channels_last ({args.workers} workers)"] = lambda: reference_epoch(
            folder, files, args.workers, bf16=True
        )
        variants["fakecifar train loop, default (--precision auto: bf16 + channels_last on this CPU)"] = lambda: (
            fakecifar_epoch(shard, "auto", None)
        )
    best: dict[str, float] = {}
    for r in range(args.repeat):
        for name, fn in variants.items():
            value = fn()
            best[name] = max(best.get(name, 0.0), value)
            print(f"  run {r + 1}: {name}: {value:,.0f} images/s", flush=True)
    ref = next(iter(best.values()))
    print(
        f"resnet20, batch 256, {args.images} images, torch threads {torch.get_num_threads()}, "
        f"AMX bf16: {bf16}; best of {args.repeat}"
    )
    for name, value in best.items():
        print(f"{name:90s} {value:8,.0f} images/s  {value / ref:5.2f}x")


if __name__ == "__main__":
    main()
