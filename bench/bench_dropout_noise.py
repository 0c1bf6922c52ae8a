"""Label-noise detection by `fakecifar dropout`: flip a seeded 10% of the labels of a clean
labelled set, score it with each method, and report the precision and recall of the flagged
10% (the top-scored rows; with as many flagged as flipped, precision = recall).

    .venv/bin/python bench/bench_dropout_noise.py --data real-split/train --val real-split/val \\
        --images 10000 --methods aum,forgetting,el2n,influence,confident,random --seeds 0,1,2 \\
        --out bench/out/noise -- --proxy-epochs 8 --threads 2

Everything after `--` goes to every `fakecifar dropout` call (proxy options, --threads).
`--val` (a real validation split, never the test images) is given to the methods that need it.
Each run keeps its scores (--keep-scores) and is skipped when they exist: the script can be
stopped and rerun. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import stamp

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


def score_one(method: str, noisy: Path, n_flag: int, seed: int, ns: argparse.Namespace, extra: list[str]) -> Path:
    """Run `dropout --score method` on the noisy set (skipped when its scores exist); its run dir."""
    run = Path(ns.out) / f"{method}-seed{seed}"
    if (run / "scores.npz").exists() and (run / "report.json").exists():  # the report comes last
        return run
    cmd = [*FAKECIFAR, "dropout", str(noisy), "--score", method, "--drop", str(n_flag), "--keep-scores"]
    cmd += ["--seed", str(seed), "-o", str(run), "--overwrite"]
    if method in ("influence", "tracin"):
        cmd += ["--val", ns.val]
    if method == "random":  # the control trains nothing: no --proxy-* options
        extra = [a for i, a in enumerate(extra) if not a.startswith("--proxy") and not _value_of_proxy(extra, i)]
    subprocess.run(cmd + extra, check=True, stdout=subprocess.DEVNULL)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="clean labelled shards (e.g. a real CIFAR-10 train split)")
    ap.add_argument("--val", required=True, help="a validation split (influence, tracin)")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seeds", default="0", help="comma-separated: each its own rows, flips and proxies")
    ap.add_argument("--methods", default="aum,forgetting,el2n,influence,confident,tracin,random")
    ap.add_argument("--out", default="bench/out/noise")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then options for every dropout call")
    ns = ap.parse_args()
    extra = ns.rest[1:] if ns.rest[:1] == ["--"] else ns.rest
    stamp(Path(ns.out), {"data": ns.data, "val": ns.val, "images": ns.images, "noise": ns.noise, "options": extra})
    seeds = [int(s) for s in ns.seeds.split(",")]
    found: dict[str, list[tuple[float, float, int | None]]] = {}
    for seed in seeds:
        noisy = Path(ns.out) / f"noisy-{ns.images}-seed{seed}"
        flipped = noisy_set(ns.data, noisy, ns.images, ns.noise, seed)
        n_flag = int(flipped.sum())
        for method in ns.methods.split(","):
            run = score_one(method, noisy, n_flag, seed, ns, extra)
            values = np.load(run / "scores.npz")["scores"]
            top = np.argsort(-values, kind="stable")[:n_flag]
            cost = json.loads((run / "report.json").read_text()).get("cost", {})
            found.setdefault(method, []).append(
                (float(flipped[top].sum()) / n_flag, float(cost.get("seconds", 0.0)), cost.get("training_epochs"))
            )
    print(f"{ns.images} images, {ns.noise:.0%} of the labels flipped; flagged: as many top scores as flipped;")
    print(f"seeds {ns.seeds} (each its own rows, flips and proxies); mean ± sample std\n")
    print("| method | precision (= recall) | per seed | seconds (mean) | proxy epochs |")
    print("|---|---:|---|---:|---:|")
    for method, rows in found.items():
        p = [r[0] for r in rows]
        spread = statistics.stdev(p) if len(p) > 1 else 0.0
        each = " ".join(f"{v:.3f}" for v in p)
        print(f"| {method} | {statistics.fmean(p):.3f} ± {spread:.3f} | {each} | "
              f"{statistics.fmean(r[1] for r in rows):.0f} | {rows[0][2]} |")  # fmt: skip


if __name__ == "__main__":
    main()
