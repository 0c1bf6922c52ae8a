"""Shard read throughput into normalized float batches vs torchvision ImageFolder + DataLoader
on the same JPEG images (issue 2 goal: >= 20x images/s). Also compares shard compression.

    .venv/bin/python bench/bench_loader.py [--images 50000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
import torchvision
from torchvision import transforms

from fakecifar.importing import import_sources
from fakecifar.loader import BatchLoader
from fakecifar.shards import ShardSeriesWriter, open_shards

from common import CACHE, SHARED_DATA, best_of, require, unpacked

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def epoch(loader) -> int:
    n = 0
    for x, _ in loader:
        n += len(x)
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    folder = unpacked("cifar10-train-jpg.tar.gz") / "train"
    shards = CACHE / "cifar10-shards"
    if not shards.exists():
        import_sources([require(SHARED_DATA / "cifar10-train-jpg.tar.gz")], shards)
    data = open_shards([shards])

    reference = torchvision.datasets.ImageFolder(
        str(folder), transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    )
    reference = torch.utils.data.Subset(reference, torch.randperm(len(reference))[: args.images].tolist())
    ref_loader = torch.utils.data.DataLoader(
        reference, batch_size=256, shuffle=True, num_workers=args.workers, persistent_workers=False
    )
    t_ref = best_of(lambda: epoch(ref_loader), repeat=2)

    n = min(args.images, len(data))
    idx = None if n == len(data) else torch.randperm(len(data))[:n].numpy()
    # A fresh loader each time: the epoch includes reading the shards from disk.
    t_mem = best_of(lambda: epoch(BatchLoader(data, 256, shuffle=True, mean=MEAN, std=STD, indices=idx)))
    t_stream = best_of(
        lambda: epoch(BatchLoader(data, 256, shuffle=True, mean=MEAN, std=STD, indices=idx, memory_limit=0))
    )
    print(f"images per epoch: {n}; reference workers: {args.workers}; torch threads: {torch.get_num_threads()}")
    print(f"ImageFolder+DataLoader      {n / t_ref:>10,.0f} images/s")
    print(f"BatchLoader (in memory)     {n / t_mem:>10,.0f} images/s   ratio {t_ref / t_mem:6.1f}x")
    print(f"BatchLoader (streaming)     {n / t_stream:>10,.0f} images/s   ratio {t_ref / t_stream:6.1f}x")

    # Compression of `images`: the shard format leaves it to a benchmark; none vs lzf.
    for compression in (None, "lzf"):
        target = CACHE / f"cifar10-{compression or 'none'}"
        shutil.rmtree(target, ignore_errors=True)
        with ShardSeriesWriter(
            target,
            shard_size=10_000,
            classes=data.classes,
            image_size=data.image_size,
            producer="bench",
            compression=compression,
        ) as w:
            for _, chunk in data.iter_chunks(("images", "labels")):
                w.add_batch(chunk["images"], chunk["labels"])
        size = sum(p.stat().st_size for p in target.glob("*.h5"))
        comp = open_shards([target])
        t = best_of(lambda comp=comp: epoch(BatchLoader(comp, 256, shuffle=True, mean=MEAN, std=STD, memory_limit=0)))
        print(f"compression {str(compression):5s}: {size / 2**20:7.1f} MiB, streaming {len(comp) / t:10,.0f} images/s")


if __name__ == "__main__":
    main()
