"""`fakecifar resize` 256 -> 32 throughput vs a per-image PIL resize(..., LANCZOS) loop on the same
pixels (issue 2 goal: >= 3x), and the output's mean abs difference from that reference (goal:
within 1 gray level).

    .venv/bin/python bench/bench_resize.py [--images 2000]

Test images: real CIFAR-10 photos upscaled 8x with bicubic plus fine noise, so the 256 px
input has both smooth regions and high-frequency detail to alias.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fakecifar.resize import resize_shards
from fakecifar.shards import Shard, ShardWriter

from common import best_of, unpacked


def make_inputs(n: int) -> np.ndarray:
    files = sorted((unpacked("cifar10-train-jpg.tar.gz") / "train").glob("*/*.jpg"))[:: max(1, 50_000 // n)][:n]
    rng = np.random.default_rng(0)
    bicubic = Image.Resampling.BICUBIC
    big = np.stack([np.asarray(Image.open(f).convert("RGB").resize((256, 256), bicubic)) for f in files])
    return np.clip(big.astype(np.int16) + rng.integers(-24, 25, big.shape), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    images = make_inputs(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "big.h5"
        with ShardWriter(src, classes=["x"], image_size=(256, 256), producer="bench") as w:
            w.add_batch(images, np.zeros(len(images)))
        reference: list[np.ndarray] = []

        def pil_loop() -> None:
            reference.clear()
            shard = Shard(src)  # the reference reads the same shard, then resizes image by image
            for img in shard.read("images"):
                reference.append(np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.LANCZOS)))

        def ours() -> None:
            resize_shards([src], Path(tmp) / "small", (32, 32), overwrite=True)

        t_ref, t_ours = [], []
        for _ in range(3):  # interleaved, so both see the same machine load
            t_ref.append(best_of(pil_loop, 1))
            t_ours.append(best_of(ours, 1))
        out = Shard(Path(tmp) / "small" / "big.h5").read("images")
        mad = np.abs(out.astype(np.int16) - np.stack(reference)).mean()
    n = len(images)
    print(f"images: {n} of 256x256 -> 32x32")
    print(f"PIL LANCZOS per-image loop  {n / min(t_ref):>8,.0f} images/s")
    print(f"fakecifar resize            {n / min(t_ours):>8,.0f} images/s   ratio {min(t_ref) / min(t_ours):.2f}x")
    print(f"mean abs difference from the PIL reference: {mad:.3f} gray levels (goal < 1)")


if __name__ == "__main__":
    main()
