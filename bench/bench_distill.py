"""Distillation throughput: the student's training images/s in `distill` (offline: on the
labelled transfer set; online: every augmented view asked of the teacher through the query
ledger) vs plain `train` of the same student on the same images, side by side in one run.
Issue 10's goals: offline >= 0.95x, online >= 0.6x of train.

Student resnet20, teacher resnet56 (../shared/models, or a random resnet56 when absent: the
cost is the same), synthetic 32x32 transfer images, one torch thread, `--epochs` epochs per
variant; the figure is the engine's own images/s of the last epoch (labelling, the first epoch's
warm-up and validation left out), the median over `--repeat` interleaved repeats.

Online runs twice: with the teacher's exact pass (NCHW, in cache-sized sub-batches: bit-identical
to `fakecifar serve`) and with its fast pass (`distill --fast-teacher`: BatchNorm folded into the
convolutions, NHWC, fp32). Afterwards the two passes are compared on the same 256 images: top-1
agreement and the largest logit difference.

On a shared machine the engine's figure of a short run swings by +-10% (other jobs' load moves
under it). `--steps N` adds a finer comparison, interleaved step by step: N rounds of one
train step (resnet20 forward, backward and SGD on 256 images) and one online step per teacher
pass (the same, plus the teacher asked about those fresh images through a real ledger, as
distill's online task does), wall-clock medians (data loading left out: it is the same work on
both sides).

    .venv/bin/python bench/bench_distill.py [--images 2048] [--epochs 2] [--repeat 2] [--steps 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fakecifar import teachers
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


def agreement(teacher: str, arch: str | None, n: int = 256) -> str:
    x = np.random.default_rng(1).random((n, 3, 32, 32), dtype=np.float32)
    exact = teachers.open_teacher(teacher, arch=arch, device="cpu").query(x).logits
    fast = teachers.open_teacher(teacher, arch=arch, device="cpu", fast=True).query(x).logits
    assert exact is not None and fast is not None
    same = float((exact.argmax(1) == fast.argmax(1)).mean())
    return (
        f"fast vs exact teacher pass on {n} images: top-1 agreement {same:.2%}, "
        f"max |logit difference| {float(np.abs(exact - fast).max()):.1e}"
    )


VARIANTS = {  # name: (online, fast teacher pass)
    "distill offline": (False, False),
    "distill online": (True, False),
    "distill online, fast teacher pass": (True, True),
}


def step_table(teacher: str, arch: str | None, root: Path, rounds: int) -> list[str]:
    import torch.nn.functional as F

    from fakecifar.ledger import QueryLedger

    torch.manual_seed(0)
    student = build_model("resnet20", 10)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    labels = torch.arange(256) % 10
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rng = np.random.default_rng(2)
    passes = {
        name: teachers.open_teacher(teacher, arch=arch, device="cpu", fast=fast)
        for name, fast in (("online, exact teacher pass", False), ("online, fast teacher pass", True))
    }
    ledgers = {name: QueryLedger(root / f"steps{i}.queries") for i, name in enumerate(passes)}

    def step(name: str | None) -> float:
        x = (torch.from_numpy(rng.random((256, 3, 32, 32), dtype=np.float32)) - mean) / std
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = student(x)
        loss = F.cross_entropy(out, labels)
        if name is not None:
            images = (x * std + mean).clamp_(0.0, 1.0).contiguous()
            answers = ledgers[name].ask(passes[name], images.numpy())
            assert answers.log_probs is not None
            target = F.log_softmax(torch.from_numpy(answers.log_probs) / 4, 1)
            loss = loss + F.kl_div(F.log_softmax(out / 4, 1), target, log_target=True, reduction="batchmean")
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    names: list[str | None] = [None, *passes]
    for name in names:  # warm-up
        step(name)
    times: dict[str | None, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            times[name].append(step(name))
    for ledger in ledgers.values():
        ledger.close()
    base = statistics.median(times[None])
    lines = [f"one step at a time, {rounds} interleaved rounds, wall-clock medians", "| step | ms | train / this |"]
    lines.append("|---|---:|---:|")
    for name, values in times.items():
        v = statistics.median(values)
        lines.append(f"| {name or 'train'} | {v * 1000:.0f} | {base / v:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="rounds of the step-by-step comparison (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = make_config(model="resnet20", epochs=args.epochs, batch_size=256, precision="fp32", device="cpu")
    speeds: dict[str, list[float]] = {"train": [], **{name: [] for name in VARIANTS}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = open_shards([transfer_set(root / "transfer", args.images)])
        teacher, arch = teacher_file(root)
        for r in range(args.repeat):
            run = root / f"r{r}"
            result = train(data, run / "plain.pt", config)
            speeds["train"].append(result.history[-1]["images_per_s"])
            for i, (name, (online, fast)) in enumerate(VARIANTS.items()):
                settings = make_settings(teacher=teacher, teacher_arch=arch, online=online, fast_teacher=fast)
                d = distill(data, run / f"distill{i}.pt", config, settings)
                speeds[name].append(d.history[-1]["images_per_s"])
                print(
                    f"repeat {r + 1}: {name}: {speeds[name][-1]:.0f} img/s; train {speeds['train'][-1]:.0f} img/s; "
                    f"queries {d.ledger['queries']:,}",
                    flush=True,
                )
        check = agreement(teacher, arch)
        steps = step_table(teacher, arch, root, args.steps) if args.steps else []
    base = statistics.median(speeds["train"])
    print(f"\nstudent resnet20, teacher resnet56, {args.images} images, 1 thread, median of {args.repeat}")
    print("| variant | images/s | / train | goal |")
    print("|---|---:|---:|---|")
    for name, values in speeds.items():
        v = statistics.median(values)
        goal = "" if name == "train" else ">= 0.6" if VARIANTS[name][0] else ">= 0.95"
        print(f"| {name} | {v:.0f} | {v / base:.2f} | {goal} |")
    print(f"\n{check}")
    if steps:
        print("\n" + "\n".join(steps))


if __name__ == "__main__":
    main()
