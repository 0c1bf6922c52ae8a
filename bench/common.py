"""Helpers shared by the benchmarks: where the real data is, and a timer."""

from __future__ import annotations

import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CACHE = REPO / "bench" / "out"


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
