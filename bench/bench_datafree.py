"""Data-free distillation on CPU: each method's student accuracy on real held-out images vs the
queries it has spent and vs minutes, as a markdown table and a PNG.

Every run is the real command line, `fakecifar distill --method M --teacher T --val TEST --log
L`, with TEST real labelled shards that are only reported per epoch (never selected on: the
student is the final checkpoint). The curve points are the epochs of the run's --log (queries
as the ledger counted them, minutes of the engine's clock); the table row is the last epoch,
beside the teacher's own accuracy on TEST (`fakecifar eval`).

    .venv/bin/python bench/bench_datafree.py --teacher ../shared/models/resnet20-12fca82f.th \\
        --teacher-arch resnet20 --test real-test --out bench/out/datafree \\
        --run "dfme 1m: --method dfme --queries 1000000 --epochs 10" \\
        --run "dfms 1m: --method dfms --queries 1000000 --epochs 10 --proxy fake/" [--seeds 0,1,2]

A run whose log already ends complete is not run again (rerun with --force): the script can
be stopped and restarted, and the table re-made from the logs alone with --report-only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from common import COLOURS

FAKECIFAR = [sys.executable, "-m", "fakecifar"]


def teacher_accuracy(teacher: str, arch: str | None, test: str) -> float:
    cmd = [*FAKECIFAR, "eval", teacher, *(["--arch", arch] if arch else []), "--on", test, "--json"]
    line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return float(json.loads(line)["top1"])


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(label: str, args: list[str], seed: int, ns: argparse.Namespace) -> list[dict]:
    out = Path(ns.out)
    stem = f"{label.replace(' ', '_')}-seed{seed}"
    log, ckpt = out / f"{stem}.jsonl", out / f"{stem}.pt"
    records = read_log(log)
    done = records and records[-1].get("epoch") == records[-1].get("epochs")
    if ns.report_only or (done and not ns.force):
        return records
    teacher = ["--teacher", ns.teacher, *(["--teacher-arch", ns.teacher_arch] if ns.teacher_arch else [])]
    cmd = [*FAKECIFAR, "distill", *teacher, "--student", ns.student, "--val", ns.test, *args]
    cmd += ["--seed", str(seed), "--threads", str(ns.threads), "--log", str(log), "-o", str(ckpt)]
    if ckpt.exists() and not ns.force:
        cmd = [*FAKECIFAR, "distill", "--resume", str(ckpt), "--threads", str(ns.threads), "--log", str(log)]
    else:
        log.unlink(missing_ok=True)
        cmd.append("--overwrite")
    print("$", shlex.join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=False)
    return read_log(log)


def plot(curves: dict[str, list[tuple[float, float, float]]], teacher: float, path: Path) -> None:
    """Two panels, accuracy vs queries (millions) and vs minutes, one line per run."""
    w, h, pad = 560, 380, 50
    img = Image.new("RGB", (2 * w, h + 40), "white")
    draw = ImageDraw.Draw(img)
    for panel, (axis, name) in enumerate([(0, "queries (millions)"), (1, "minutes")]):
        x0 = panel * w
        xmax = max((p[axis] for c in curves.values() for p in c), default=1.0) or 1.0
        box = (x0 + pad, 20, x0 + w - 20, h - pad)
        draw.rectangle(box, outline="black")

        def at(xv: float, yv: float, box=box, xmax=xmax) -> tuple[float, float]:
            return (box[0] + (box[2] - box[0]) * xv / xmax, box[3] - (box[3] - box[1]) * yv)

        for tick in range(0, 11, 2):
            y = at(0, tick / 10)[1]
            draw.line((box[0] - 4, y, box[0], y), fill="black")
            draw.text((box[0] - 34, y - 6), f"{tick * 10}%", fill="black")
        for tick in range(5):
            x = at(xmax * tick / 4, 0)[0]
            draw.text((x - 10, box[3] + 6), f"{xmax * tick / 4:.2g}", fill="black")
        draw.text((x0 + w // 2 - 40, h - 22), name, fill="black")
        ty = at(0, teacher)[1]
        draw.line((box[0], ty, box[2], ty), fill="#999999")
        draw.text((box[0] + 4, ty - 12), "teacher", fill="#666666")
        for i, points in enumerate(curves.values()):
            xy = [at(p[axis], p[2]) for p in points]
            if len(xy) > 1:
                draw.line(xy, fill=COLOURS[i % len(COLOURS)], width=2)
            for x, y in xy:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=COLOURS[i % len(COLOURS)])
    for i, label in enumerate(curves):
        draw.text((pad + 150 * i, h + 16), label, fill=COLOURS[i % len(COLOURS)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--teacher-arch")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--test", required=True, help="real labelled shards: reported only")
    p.add_argument("--run", action="append", required=True, help='"LABEL: distill options"')
    p.add_argument("--seeds", default="0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/out/datafree")
    p.add_argument("--force", action="store_true")
    p.add_argument("--report-only", action="store_true")
    ns = p.parse_args()
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    teacher = teacher_accuracy(ns.teacher, ns.teacher_arch, ns.test)
    seeds = [int(s) for s in ns.seeds.split(",")]
    rows, curves = [], {}
    for spec in ns.run:
        label, _, options = spec.partition(":")
        finals = []
        for seed in seeds:
            records = run_one(label.strip(), shlex.split(options), seed, ns)
            if not records:
                continue
            curves[f"{label.strip()} s{seed}"] = [
                (r.get("queries", 0) / 1e6, r["elapsed_s"] / 60, r.get("val_acc", 0.0)) for r in records
            ]
            last = records[-1]
            finals.append((last.get("val_acc", 0.0), last.get("queries", 0), last["elapsed_s"] / 60))
        if not finals:
            continue
        accs = [f[0] for f in finals]
        spread = f" ± {100 * statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        rows.append(
            f"| {label.strip()} | {len(finals)} | {int(statistics.mean(f[1] for f in finals)):,} | "
            f"{statistics.mean(f[2] for f in finals):.1f} | {100 * statistics.mean(accs):.2f}%{spread} | "
            f"{100 * statistics.mean(accs) / teacher:.1f}% |"
        )
    print(f"teacher on {ns.test}: {100 * teacher:.2f}%\n")
    print("| run | seeds | queries spent | minutes | real held-out top-1 | % of teacher |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    png = Path(ns.out) / "datafree.png"
    plot(curves, teacher, png)
    print(f"\ncurves: {png}")


if __name__ == "__main__":
    main()
