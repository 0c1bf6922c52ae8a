"""The dropout table (issue 13): train on generated images with the most harmful ones dropped by
each scoring method, beside random removal of the same count, and report top-1 on real held-out
photos (mean and spread over seeds); writes drop.md, drop.json and drop.png under --out.

    .venv/bin/python bench/bench_dropout_drop.py --data fake10k --val fake-split/val \\
        --test real-split/val --seeds 0,1,2 --jobs 2 --out bench/out/drop \\
        --recipe fast --epochs 6 --batch-size 256 --lr 0.2 --threads 1

Per seed s:
- a baseline: `train DATA --seed s` on every image (the 0% row);
- each method scores DATA once (`dropout --keep-scores --seed s`): influence through the
  baseline's last layer (`--model`, on the --val loss), the training-dynamics methods and tracin
  from their own proxy trained with the same recipe and seed, confident from k-fold proxies;
- each count filters by those scores (`dropout --scores FILE --drop N`: no rescoring) and a fresh
  model is trained with seed s on what is kept.

Every training uses the same options (--recipe, --epochs, --batch-size, --lr, --model: chosen
on --val, held-out generated images), keeps its last epoch (nothing is selected per run) and is
evaluated once on --test, real photos nothing selects on. Every step is skipped when its output
exists: stop and rerun at will.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fakecifar.shards import open_shards

from common import complete, finished, line_chart, stamp

FAKECIFAR = [sys.executable, "-m", "fakecifar"]
PRINT_LOCK = threading.Lock()
DEFAULT_CELLS = ["influence,tracin,aum,el2n,forgetting,confident,random:50,125,500", "influence,aum,random:1000,2000"]


def run(cmd: list[str], log: Path) -> None:
    with PRINT_LOCK:
        print("$", shlex.join(cmd), file=sys.stderr, flush=True)
    with log.open("a") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(cmd)}; see {log}")


def top1(model: Path, shards: list[str]) -> float:
    """Top-1 of `model` over all of `shards` (eval prints a line per dataset: image-weighted)."""
    evaluated = subprocess.run(
        [*FAKECIFAR, "eval", str(model), "--on", *shards, "--json", "--threads", "1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = [json.loads(line) for line in evaluated.stdout.splitlines() if line.strip()]
    assert len(lines) == len(shards), evaluated.stdout
    return sum(r["top1"] * r["images"] for r in lines) / sum(r["images"] for r in lines)


def evaluate(model: Path, test: list[str], val: list[str]) -> dict:
    """Top-1 of `model` on the real test photos (reported only) and on held-out generated images."""
    return {"test_top1": top1(model, test), "val_top1": top1(model, val)}


class Bench:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.out = Path(ns.out)
        for sub in ("scores", "kept", "models", "logs"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        # One recipe for every training, the proxies' included (--proxy-* are train's settings).
        recipe = {"recipe": ns.recipe, "epochs": ns.epochs, "model": ns.model, "batch-size": ns.batch_size, "lr": ns.lr}
        given = [(k, str(v)) for k, v in recipe.items() if v is not None]
        self.recipe = [a for k, v in given for a in (f"--{k}", v)] + ["--threads", str(ns.threads)]
        self.proxy = [a for k, v in given for a in (f"--proxy-{k}", v)] + ["--threads", str(ns.threads)]

    def train_and_eval(self, data: list[str], name: str, seed: int) -> dict:
        """Train on `data` with `seed` (its last epoch is kept), evaluate on --test and --val."""
        result = self.out / "models" / f"{name}.json"
        if result.exists():
            return json.loads(result.read_text())
        model = self.out / "models" / f"{name}.pt"
        log = self.out / "logs" / f"{name}.log"
        start = time.monotonic()
        cmd = [*FAKECIFAR, "train", *data, *self.recipe, "--seed", str(seed), "-o", str(model)]
        if not finished(model):  # killed after the training, before its result: evaluate only
            run(cmd + (["--resume", str(model)] if model.exists() else ["--overwrite"]), log)
        seconds = time.monotonic() - start
        metrics = {**evaluate(model, self.ns.test, self.ns.val), "train_seconds": round(seconds, 1)}
        metrics["images"] = len(open_shards(data))
        result.write_text(json.dumps(metrics))
        return metrics

    def scores(self, method: str, seed: int, baseline: Future | None) -> Path:
        """Score the data once with `method` and `seed`; the scores file."""
        run_dir = self.out / "scores" / f"{method}-s{seed}"
        scores = run_dir / "scores.npz"
        if scores.exists():
            return scores
        cmd = [*FAKECIFAR, "dropout", *self.ns.data, "--score", method, "--drop", "500", "--keep-scores"]
        cmd += ["--seed", str(seed), "-o", str(run_dir), "--overwrite"]
        if method in ("influence", "tracin"):
            cmd += ["--val", *self.ns.val]
        if method == "influence":
            assert baseline is not None
            baseline.result()
            cmd += ["--model", str(self.out / "models" / f"base-s{seed}.pt"), "--threads", str(self.ns.threads)]
        elif method != "random":
            cmd += self.proxy
        run(cmd, self.out / "logs" / f"score-{method}-s{seed}.log")
        return scores

    def dropped(self, method: str, seed: int, count: int, scores: Future) -> dict:
        """Drop `count` by the scores, train a fresh model on the rest."""
        name = f"{method}-s{seed}-n{count}"
        kept = self.out / "kept" / name
        if not complete(kept):
            cmd = [*FAKECIFAR, "dropout", *self.ns.data, "--scores", str(scores.result()), "--drop", str(count)]
            run(cmd + ["--sheet", "0", "-o", str(kept), "--overwrite"], self.out / "logs" / f"drop-{name}.log")
        return self.train_and_eval([str(kept)], name, seed)


def summarize(cells: dict, methods: list[str], counts: list[int], images: int, out: Path, note: str) -> str:
    def stat(values: list[float]) -> str:
        if not values:
            return ""
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * mean:.2f} ± {100 * spread:.2f}"

    def label(count: int) -> str:
        parts = [f"{count / 500:.0%} of 500"] if count <= 500 else []
        return ", ".join([*parts, f"{100 * count / images:.3g}% of the set"])

    lines = [note, "", "| dropped | images | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    base = [m["test_top1"] for m in cells.get(("base", 0), [])]
    lines.append("| none (baseline) | 0 | " + " | ".join(stat(base) for _ in methods) + " |")
    for count in counts:
        row = [stat([m["test_top1"] for m in cells.get((method, count), [])]) for method in methods]
        lines.append(f"| {label(count)} | {count} | " + " | ".join(row) + " |")
    lines += ["", "Held-out generated images (--val):", ""]
    lines += ["| dropped | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    base_val = [m["val_top1"] for m in cells.get(("base", 0), [])]
    lines.append("| none | " + " | ".join(stat(base_val) for _ in methods) + " |")
    for count in counts:
        row = [stat([m["val_top1"] for m in cells.get((method, count), [])]) for method in methods]
        lines.append(f"| {count} | " + " | ".join(row) + " |")
    series = {}
    for method in methods:
        points = [(0.0, statistics.fmean(base))] if base else []
        for count in counts:
            values = [m["test_top1"] for m in cells.get((method, count), [])]
            if values:
                points.append((float(count), statistics.fmean(values)))
        series[method] = points
    line_chart(series, out / "drop.png", x_label="images dropped", y_label="real top-1 (mean over seeds)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="labelled training shards (generated images)")
    ap.add_argument("--val", nargs="+", required=True, help="held-out generated images: selection, influence")
    ap.add_argument("--test", nargs="+", required=True, help="real held-out photos: reported only")
    ap.add_argument(
        "--cells",
        action="append",
        help="METHODS:COUNTS, e.g. influence,random:50,125,500 (repeatable; default: every method at 50,125,500 "
        "and influence, aum and random at 1000 and 2000 too)",
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--jobs", type=int, default=2, help="trainings side by side")
    ap.add_argument("--out", default="bench/out/drop")
    ns = ap.parse_args()
    stamp(Path(ns.out), {k: v for k, v in vars(ns).items() if k not in ("jobs", "threads", "seeds", "cells")})
    bench = Bench(ns)
    plan: dict[str, list[int]] = {}
    for cell in ns.cells or DEFAULT_CELLS:
        names, _, numbers = cell.partition(":")
        for method in names.split(","):
            plan.setdefault(method, []).extend(int(c) for c in numbers.split(",") if c)
    methods = list(plan)
    seeds = [int(s) for s in ns.seeds.split(",")]
    cells: dict[tuple[str, int], list[Future]] = {}
    started = time.monotonic()
    # Submitted in dependency order: a task waits only on tasks submitted before it, which the
    # pool (first in, first out) has already started, so waiting cannot deadlock.
    with ThreadPoolExecutor(max_workers=ns.jobs) as pool:
        for seed in seeds:
            base = pool.submit(bench.train_and_eval, ns.data, f"base-s{seed}", seed)
            cells.setdefault(("base", 0), []).append(base)
            # influence waits for the baseline (its model): submitted last, it holds no worker idle.
            order = sorted(methods, key=lambda m: m == "influence")
            scored = {m: pool.submit(bench.scores, m, seed, base) for m in order}
            for method, counts in plan.items():
                for count in counts:
                    job = pool.submit(bench.dropped, method, seed, count, scored[method])
                    cells.setdefault((method, count), []).append(job)
    results = {key: [f.result() for f in futures] for key, futures in cells.items()}
    images = results[("base", 0)][0]["images"]
    all_counts = sorted({c for counts in plan.values() for c in counts})
    note = (
        f"{images:,} training images ({', '.join(ns.data)}); `train {shlex.join(bench.recipe)}`; seeds {ns.seeds}; "
        f"real top-1 on {', '.join(ns.test)} (mean ± sample std over seeds); {time.monotonic() - started:.0f} s"
    )
    table = summarize(results, methods, all_counts, images, Path(ns.out), note)
    (Path(ns.out) / "drop.md").write_text(table + "\n")
    raw = {f"{k[0]}/{k[1]}": v for k, v in results.items()}
    (Path(ns.out) / "drop.json").write_text(json.dumps(raw, indent=1))
    print(table)


if __name__ == "__main__":
    main()
