"""Label-noise detection by `fakecifar dropout`: flip a seeded 10% of the labels of a clean
labelled set, score it with each method, and report the precision and recall of the flagged
10% (the top-scored rows; with as many flagged as flipped, precision = recall).

    .venv/bin/python bench/bench_dropout_noise.py --data real-split/train --val real-split/val \\
        --images 10000 --methods aum,forgetting,el2n,influence,confident,random --out bench/out/noise \\
        -- --proxy-epochs 8 --threads 2

Everything after `--` goes to every `fakecifar dropout` call (proxy options, --threads).
`--val` (a real validation split, never the test images) is given to the methods that need it.
Each run keeps its scores (--keep-scores) and is skipped when they exist: the script can be
stopped and rerun. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FAKECIFAR = [sys.executable, "-m", "fakecifar"]


def noisy_set(data: str, out: Path, images: int, fraction: float, seed: int) -> np.ndarray:
    """Write `images` seeded rows of `data` to `out` with `fraction` of their labels moved to
    another class (seeded); returns the boolean mask of flipped rows (in `out`'s order)."""
    from fakecifar.manifest import describe_directory
    from fakecifar.shards import ShardWriter, open_shards

    mask_file = out / "flipped.npy"
    if mask_file.exists():
        return np.load(mask_file)
    source = open_shards([data])
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(source), size=min(images, len(source)), replace=False))
    pixels, labels = source.read("images")[rows], source.read("labels")[rows].astype(np.int64)
    flipped = np.zeros(len(rows), bool)
    flipped[rng.choice(len(rows), size=int(round(fraction * len(rows))), replace=False)] = True
    classes = len(source.classes)
    labels[flipped] = (labels[flipped] + rng.integers(1, classes, flipped.sum())) % classes
    out.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out / "noisy.h5", classes=source.classes, image_size=source.image_size, producer="bench") as w:
        w.add_batch(pixels, labels)
    describe_directory(out)
    np.save(mask_file, flipped)
    return flipped


def _value_of_proxy(args: list[str], i: int) -> bool:
    return i > 0 and args[i - 1].startswith("--proxy") and "=" not in args[i - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="clean labelled shards (e.g. a real CIFAR-10 train split)")
    ap.add_argument("--val", required=True, help="a validation split (influence, tracin)")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="aum,forgetting,el2n,influence,confident,tracin,random")
    ap.add_argument("--out", default="bench/out/noise")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then options for every dropout call")
    ns = ap.parse_args()
    extra = ns.rest[1:] if ns.rest[:1] == ["--"] else ns.rest
    out = Path(ns.out)
    noisy = out / f"noisy-{ns.images}-seed{ns.seed}"
    flipped = noisy_set(ns.data, noisy, ns.images, ns.noise, ns.seed)
    n_flag = int(flipped.sum())
    rows = []
    for method in ns.methods.split(","):
        run = out / f"{method}-seed{ns.seed}"
        scores_file = run / "scores.npz"
        seconds = None
        if not scores_file.exists():
            cmd = [*FAKECIFAR, "dropout", str(noisy), "--score", method, "--drop", str(n_flag), "--keep-scores"]
            cmd += ["--seed", str(ns.seed), "-o", str(run), "--overwrite"]
            if method in ("influence", "tracin"):
                cmd += ["--val", ns.val]
            if method == "random":  # the control trains nothing: no --proxy-* options
                passed = [
                    a for i, a in enumerate(extra) if not a.startswith("--proxy") and not _value_of_proxy(extra, i)
                ]
            else:
                passed = extra
            start = time.monotonic()
            subprocess.run(cmd + passed, check=True, stdout=subprocess.DEVNULL)
            seconds = time.monotonic() - start
        values = np.load(scores_file)["scores"]
        top = np.argsort(-values, kind="stable")[:n_flag]
        hit = int(flipped[top].sum())
        report = json.loads((run / "report.json").read_text())
        cost = report.get("cost", {})
        rows.append((method, hit / n_flag, hit / n_flag, cost.get("seconds", seconds), cost.get("training_epochs")))
    print(f"{ns.images} images, {n_flag} labels flipped (seed {ns.seed}); flagged: the top {n_flag} scores\n")
    print("| method | precision | recall | seconds | proxy epochs |")
    print("|---|---:|---:|---:|---:|")
    for method, p, r, s, e in rows:
        print(f"| {method} | {p:.3f} | {r:.3f} | {s if s is None else round(s)} | {e} |")


if __name__ == "__main__":
    main()
