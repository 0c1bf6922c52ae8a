"""The built-in detector (issue 5): held-out accuracy, size, throughput, and cold start of
`fakecifar detect one.png` on onnxruntime vs the same answer through torch.

    .venv/bin/python bench/bench_detect.py --val build/detector/split/val --pt build/detector/detector.pt

--val: held-out CIFAKE shards (origin column) written by `make detector`; --pt: the torch
checkpoint the ONNX was exported from (for the torch side of the cold-start ratio); --against:
another ONNX model (the previous built-in) timed in the same loop, for a cold-start ratio
between two onnxruntime models (an ensemble has no single .pt).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fakecifar.detect import DEFAULT_MODEL, Detector
from fakecifar.shards import open_shards

FAKECIFAR = str(Path(sys.executable).parent / "fakecifar")


def accuracy(model: Path, val: list[str], tta: bool = False) -> tuple[float, float, int]:
    detector = Detector(model, tta=tta)
    data = open_shards(val)
    correct = total = 0
    start = time.perf_counter()
    for _, chunk in data.iter_chunks(("images", "origin")):
        p = detector.p_fake(chunk["images"])
        correct += int(((p >= 0.5).astype(np.uint8) == chunk["origin"]).sum())
        total += len(p)
    return correct / total, total / (time.perf_counter() - start), total


def cold(args: list[str], repeat: int) -> float:
    return cold_side_by_side([args], repeat)[0]


def cold_side_by_side(runs: list[list[str]], repeat: int) -> list[float]:
    """Median wall clock of each `fakecifar detect ARGS` as a new process, the runs taken in
    turn within each round so that machine noise falls on all of them alike."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for args, kept in zip(runs, times):
            start = time.perf_counter()
            subprocess.run([FAKECIFAR, "detect", *args], check=True, capture_output=True)
            kept.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--val", nargs="+", required=True)
    parser.add_argument("--pt", type=Path, help="torch checkpoint of the same model")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--against", type=Path, help="another .onnx to time beside --model (cold start)")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    acc, rate, n = accuracy(args.model, args.val)
    print(f"model {args.model} ({args.model.stat().st_size / 1024:.0f} KiB)")
    print(f"held-out accuracy {acc:.4%} on {n} images; batch throughput {rate:,.0f} images/s (onnxruntime)")
    acc, rate, n = accuracy(args.model, args.val, tta=True)
    print(f"with --tta (image + mirror): {acc:.4%}; {rate:,.0f} images/s")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "one.png"
        first = open_shards(args.val).shards[0].read("images", 0, 1)[0]
        Image.fromarray(first).save(image)
        t_onnx = cold(["--model", str(args.model), str(image)], args.repeat)
        print(f"cold start, one image, onnxruntime: {t_onnx:.3f} s (median of {args.repeat})")
        if args.pt:
            t_torch = cold(["--model", str(args.pt), str(image)], args.repeat)
            print(f"cold start, one image, torch:       {t_torch:.3f} s   ratio {t_torch / t_onnx:.1f}x")
        if args.against:
            ours, theirs = cold_side_by_side(
                [["--model", str(m), str(image)] for m in (args.model, args.against)], args.repeat
            )
            print(
                f"cold start side by side: {args.model.name} {ours:.3f} s, {args.against.name} {theirs:.3f} s"
                f"   ratio {ours / theirs:.2f}x (median of {args.repeat} rounds)"
            )
            acc, _, _ = accuracy(args.against, args.val)
            print(f"{args.against.name} held-out accuracy {acc:.4%}")


if __name__ == "__main__":
    main()
