"""`fakecifar extract` on CPU: throughput (images/s) of each method and its cost per image in
teacher passes, and optionally the issue's goal -- a dfm set from a teacher trains a fresh
student to some fraction of the teacher's accuracy on real held-out images.

Every run is the real command line, `fakecifar extract --json`, into a fresh directory; the
figures are what the command reports (its own clock, the ledger's counts).

    .venv/bin/python bench/bench_extract.py --teacher ../shared/models/resnet56-4bfd9763.th \\
        --arch resnet56 --background fake/ -n 256 --threads 2 \\
        --run "dfm" --run "dfm --steps 10" --run "dfm --steps 40" \\
        --run "deepinversion --steps 50" --run "data-impressions --steps 50" --run "class-impressions --steps 50"

    # the goal: 10,000 dfm images (time it), a resnet20 trained on them with --soft l2, both on TEST
    .venv/bin/python bench/bench_extract.py --teacher ../shared/models/resnet56-4bfd9763.th \\
        --arch resnet56 --background fake/ -n 10000 --threads 2 --run dfm --train --test real-test

`--run "METHOD [extract options]"` is repeatable (default: each method at its default steps).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

FAKECIFAR = [sys.executable, "-m", "fakecifar"]
METHODS = ("dfm", "deepinversion", "data-impressions", "class-impressions")


def extract(label: str, spec: str, ns: argparse.Namespace) -> dict:
    method, *more = shlex.split(spec)
    out = Path(ns.out) / label
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*FAKECIFAR, "extract", "--teacher", ns.teacher, *(["--arch", ns.arch] if ns.arch else [])]
    cmd += ["--method", method, "-n", str(ns.images), "--threads", str(ns.threads), "--seed", str(ns.seed)]
    if method == "dfm" and ns.background and "--background" not in more:
        cmd += ["--background", ns.background]
    cmd += [*more, "--json", "-o", str(out)]
    print("$", shlex.join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{label}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"label": label, "method": method, "dir": out, "wall_s": wall, **report}


def accuracy(model: str, test: str, arch: str | None = None) -> float:
    cmd = [*FAKECIFAR, "eval", model, *(["--arch", arch] if arch else []), "--on", test, "--json"]
    line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return float(json.loads(line)["top1"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a .pt/.th teacher")
    p.add_argument("--arch", help="architecture of a foreign .th teacher (e.g. resnet56)")
    p.add_argument("--background", help="dfm's --background shards (default: noise)")
    p.add_argument("-n", "--images", type=int, default=256, help="images per run (default 256)")
    p.add_argument("--run", action="append", help='"METHOD [extract options]" (repeatable)')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/extract")
    p.add_argument("--train", action="store_true", help="train a student on each run's set (train --soft l2)")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--train-args", default="", help="more `fakecifar train` options for --train")
    p.add_argument("--test", help="real labelled shards: the student's and the teacher's accuracy (with --train)")
    ns = p.parse_args()
    runs = ns.run or list(METHODS)
    rows = [extract(f"{i}-{spec.split()[0]}", spec, ns) for i, spec in enumerate(runs)]

    print(f"\nteacher {ns.teacher}, {ns.images:,} images per run, {ns.threads} threads\n")
    print("| run | images/s | forward / backward passes per image | teacher passes (ledger) | seconds | agreement |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        passes = r["passes_per_image"]
        agree = f"{100 * r['agreement']:.1f}%" if r["agreement"] is not None else "-"
        print(
            f"| {runs[rows.index(r)]} | {r['images_per_s']:.2f} | {passes['forward']} / {passes['backward']} | "
            f"{r['queries']['queries']:,} | {r['seconds']:.1f} | {agree} |"
        )
    if ns.train:
        teacher_acc = accuracy(ns.teacher, ns.test, ns.arch) if ns.test else None
        print("\n| run | student | student accuracy | teacher accuracy | ratio | train seconds |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            model = Path(r["dir"]).with_suffix(".pt")
            cmd = [*FAKECIFAR, "train", str(r["dir"]), "--soft", "l2", "--model", ns.student]
            cmd += [*shlex.split(ns.train_args), "--threads", str(ns.threads), "--overwrite", "-o", str(model)]
            print("$", shlex.join(cmd), file=sys.stderr, flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            if ns.test and teacher_acc is not None:
                acc = accuracy(str(model), ns.test)
                print(
                    f"| {runs[rows.index(r)]} | {ns.student} | {100 * acc:.2f}% | {100 * teacher_acc:.2f}% | "
                    f"{acc / teacher_acc:.3f} | {seconds:.0f} |"
                )
            else:
                print(f"| {runs[rows.index(r)]} | {ns.student} | - | - | - | {seconds:.0f} |")


if __name__ == "__main__":
    main()
