"""Evaluation speed on CPU: an exported .onnx on onnxruntime vs the same .pt on torch, through
`fakecifar.evaluate` (what `fakecifar eval` runs), on the same CIFAR-10 images. Also reports
how often the two runtimes agree on the predicted class (goal >= 99.9%).

The model is the pretrained ResNet-20 from ../shared/models converted to a fakecifar .pt
(or --model PATH: any fakecifar .pt). Runs are interleaved; the best of --repeat is kept.

    .venv/bin/python bench/bench_eval_onnx.py [--images 10000] [--repeat 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fakecifar.checkpoint import export_onnx, load_checkpoint, save_checkpoint
from fakecifar.evaluate import evaluate, load_classifier
from fakecifar.importing import import_sources
from fakecifar.shards import ShardWriter, open_shards

from common import CACHE, SHARED_DATA, require

SHARED_MODELS = SHARED_DATA.parent / "models"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    shards = CACHE / "cifar10-shards"
    if not shards.exists():
        import_sources([require(SHARED_DATA / "cifar10-train-jpg.tar.gz")], shards)
    full = open_shards([shards])
    subset = CACHE / f"eval-bench-{args.images}.h5"
    if not subset.exists():
        rows = np.arange(min(args.images, len(full)))
        with ShardWriter(subset, classes=full.classes, image_size=full.image_size, producer="bench") as w:
            w.add_batch(full.take("images", rows), full.take("labels", rows))
    data = open_shards([subset])
    with tempfile.TemporaryDirectory() as tmp:
        pt = args.model
        if pt is None:
            model, meta = load_checkpoint(require(SHARED_MODELS / "resnet20-12fca82f.th"), arch="resnet20")
            pt = Path(tmp) / "resnet20.pt"
            save_checkpoint(
                pt,
                model,
                arch="resnet20",
                classes=meta["classes"],
                mean=meta["mean"],
                std=meta["std"],
                input_size=meta["input_size"],
            )
        model, meta = load_checkpoint(pt)
        onnx = export_onnx(model, meta, Path(tmp) / "model.onnx")
        runtimes = {"torch (.pt)": load_classifier(pt, device="cpu"), "onnxruntime (.onnx)": load_classifier(onnx)}
        best: dict[str, float] = {}
        results: dict[str, dict] = {}
        for _ in range(args.repeat):
            for name, clf in runtimes.items():
                start = time.perf_counter()
                results[name] = evaluate(clf, data, batch_size=args.batch_size)
                best[name] = max(best.get(name, 0.0), len(data) / (time.perf_counter() - start))
    (t_name, t), (o_name, o) = results.items()
    agree = float((t["_predictions"] == o["_predictions"]).mean())
    print(
        f"{meta['arch']} on {len(data)} CIFAR-10 JPEG training images, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}, best of {args.repeat}"
    )
    ref = best[t_name]
    for name, value in best.items():
        print(f"{name:22s} {value:9,.0f} images/s  {value / ref:5.2f}x  top-1 {100 * results[name]['top1']:.2f}%")
    print(f"prediction agreement torch vs onnxruntime: {100 * agree:.3f}%")


if __name__ == "__main__":
    main()
