"""Helpers shared by the benchmarks: where the real data is, and a timer."""

from __future__ import annotations

import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CACHE = REPO / "bench" / "out"


def stamp(out: Path, params: dict) -> None:
    """Keep `out` only for the parameters that made it: a rerun with others is refused (its
    cached runs would be reported under the new parameters)."""
    import json

    path = out / "params.json"
    text = json.dumps(params, sort_keys=True, indent=1, default=str)
    if path.exists() and path.read_text() != text:
        sys.exit(f"{out} holds runs made with other parameters ({path}); use another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def complete(directory: Path) -> bool:
    """Whether a dataset directory was written to the end (its manifest says complete)."""
    import json

    try:
        return bool(json.loads((directory / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def finished(checkpoint: Path) -> bool:
    """Whether a training checkpoint ran its schedule to the end (train.stopped)."""
    if not checkpoint.exists():
        return False
    from fakecifar.checkpoint import load_checkpoint

    return (load_checkpoint(checkpoint)[1].get("train") or {}).get("stopped") in ("completed", "early-stop")


def require(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"benchmark data not found: {path} (the benchmarks use ../shared/data beside the checkout)")
    return path


def unpacked(archive: str) -> Path:
    """Unpack ../shared/data/ARCHIVE once under bench/out/ and return the folder."""
    target = CACHE / archive.split(".")[0]
    if not (target / ".done").exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(require(SHARED_DATA / archive)) as tar:
            tar.extractall(target, filter="data")
        (target / ".done").touch()
    return target


def best_of(fn, repeat: int = 3) -> float:
    """Best wall time of `repeat` runs (the least disturbed by other load on a shared machine)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]


def line_chart(series: dict, path: Path, *, x_label: str, y_label: str, size: tuple[int, int] = (640, 420)) -> Path:
    """A PNG line chart (pillow only): one line per name in `series`, each a list of (x, y), y a
    fraction shown in percent; the y axis spans the data, not 0-100%, so small effects show."""
    from PIL import Image, ImageDraw

    w, h = size
    pad, legend = 56, 18 * ((len(series) + 3) // 4) + 8
    img = Image.new("RGB", (w, h + legend), "white")
    draw = ImageDraw.Draw(img)
    points = [p for line in series.values() for p in line]
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    margin = max(0.005, 0.08 * (max(ys) - min(ys)))
    y_lo, y_hi = min(ys) - margin, max(ys) + margin
    box = (pad, 16, w - 16, h - pad)
    draw.rectangle(box, outline="black")

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            box[0] + (box[2] - box[0]) * (x - x_lo) / (x_hi - x_lo),
            box[3] - (box[3] - box[1]) * (y - y_lo) / (y_hi - y_lo),
        )

    for i in range(5):
        y = y_lo + (y_hi - y_lo) * i / 4
        draw.text((4, at(x_lo, y)[1] - 6), f"{100 * y:.1f}%", fill="black")
        x = x_lo + (x_hi - x_lo) * i / 4
        draw.text((at(x, y_lo)[0] - 10, box[3] + 6), f"{x:.4g}", fill="black")
    draw.text((w // 2 - 4 * len(x_label), h - 24), x_label, fill="black")
    draw.text((box[0] + 6, box[1] + 4), y_label, fill="#444444")
    for i, (name, line) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [at(x, y) for x, y in sorted(line)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((pad + 150 * (i % 4), h + 4 + 18 * (i // 4)), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
