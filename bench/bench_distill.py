"""Distillation throughput: the student's training images/s in `distill` (offline: on the
labelled transfer set; online: every augmented view asked of the teacher through the query
ledger) vs plain `train` of the same student on the same images, side by side in one run.
Issue 10's goals: offline >= 0.95x, online >= 0.6x of train.

Student resnet20, teacher resnet56 (../shared/models, or a random resnet56 when absent: the
cost is the same), synthetic 32x32 transfer images, one torch thread, `--epochs` epochs per
variant; the figure is the engine's own images/s of the last epoch (labelling, the first epoch's
warm-up and validation left out), the median over `--repeat` interleaved repeats.

    .venv/bin/python bench/bench_distill.py [--images 2048] [--epochs 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from fakecifar.checkpoint import CIFAR10_CLASSES, IMAGENET_MEAN, IMAGENET_STD, save_checkpoint
from fakecifar.distill import distill
from fakecifar.distill_config import make_settings
from fakecifar.manifest import describe_directory
from fakecifar.models import build_model
from fakecifar.shards import ShardWriter, open_shards
from fakecifar.train import make_config, train

SHARED_TEACHER = Path(__file__).resolve().parents[2] / "shared" / "models" / "resnet56-4bfd9763.th"


def transfer_set(folder: Path, n: int) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    folder.mkdir(parents=True)
    with ShardWriter(folder / "t.h5", classes=CIFAR10_CLASSES, image_size=(32, 32), producer="bench") as w:
        w.add_batch(images, np.arange(n) % 10)
    describe_directory(folder)
    return folder


def teacher_file(folder: Path) -> tuple[str, str | None]:
    if SHARED_TEACHER.exists():
        return str(SHARED_TEACHER), "resnet56"
    path = save_checkpoint(
        folder / "teacher.pt",
        build_model("resnet56", 10),
        arch="resnet56",
        classes=CIFAR10_CLASSES,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=32,
    )
    return str(path), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = make_config(model="resnet20", epochs=args.epochs, batch_size=256, precision="fp32", device="cpu")
    speeds: dict[str, list[float]] = {"train": [], "distill offline": [], "distill online": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = open_shards([transfer_set(root / "transfer", args.images)])
        teacher, arch = teacher_file(root)
        for r in range(args.repeat):
            run = root / f"r{r}"
            result = train(data, run / "plain.pt", config)
            speeds["train"].append(result.history[-1]["images_per_s"])
            for online in (False, True):
                name = "distill online" if online else "distill offline"
                settings = make_settings(teacher=teacher, teacher_arch=arch, online=online)
                out = run / ("online.pt" if online else "offline.pt")
                d = distill(data, out, config, settings)
                speeds[name].append(d.history[-1]["images_per_s"])
                print(
                    f"repeat {r + 1}: {name}: {speeds[name][-1]:.0f} img/s; train {speeds['train'][-1]:.0f} img/s; "
                    f"queries {d.ledger['queries']:,}",
                    flush=True,
                )
    base = statistics.median(speeds["train"])
    print(f"\nstudent resnet20, teacher resnet56, {args.images} images, 1 thread, median of {args.repeat}")
    print("| variant | images/s | / train | goal |")
    print("|---|---:|---:|---|")
    goals = {"train": "", "distill offline": ">= 0.95", "distill online": ">= 0.6"}
    for name, values in speeds.items():
        v = statistics.median(values)
        print(f"| {name} | {v:.0f} | {v / base:.2f} | {goals[name]} |")


if __name__ == "__main__":
    main()
