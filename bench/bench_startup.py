"""Cold start of `fakecifar --help` (issue 2 goal: <= 0.3 s wall) vs `python -c "import torch"`.

.venv/bin/python bench/bench_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def wall(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    cases = {
        "fakecifar --help": [str(BIN / "fakecifar"), "--help"],
        "fakecifar import --help": [str(BIN / "fakecifar"), "import", "--help"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    results = {name: wall(cmd, args.repeat) for name, cmd in cases.items()}
    torch_time = results['python -c "import torch"']
    for name, t in results.items():
        print(f"{name:28s} {t:6.3f} s median of {args.repeat}   ({torch_time / t:5.1f}x faster than importing torch)")


if __name__ == "__main__":
    main()
