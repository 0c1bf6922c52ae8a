"""Helpers shared by the tests (import them with `from helpers import ...`; pytest puts tests/
on sys.path). Fixtures and pytest hooks live in conftest.py, which imports what it needs from
here: nothing imports conftest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_MODELS = SHARED / "models"
CLASSES3 = ["cat", "dog", "frog"]

needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "cifar10-train-jpg.tar.gz").exists(),
    reason=f"real data not found at {SHARED_DATA} (only beside the project's development checkout)",
)


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line]

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]


HEAVY_MODULES = ("torch", "torchvision", "onnxruntime", "numpy", "h5py")


@dataclass
class FreshRun(Result):
    imported: list[str]  # which of HEAVY_MODULES the command loaded


def cli_in_fresh_process(*args) -> FreshRun:
    """Run `fakecifar ARGS...` in a new interpreter and report which heavy modules it imported:
    the light paths (--help, detect/eval on .onnx) must not pay for torch."""
    code = (
        "import json, sys\nfrom fakecifar.cli.app import main\n"
        f"try:\n    main({[str(a) for a in args]!r})\nexcept SystemExit as e:\n    code = e.code\n"
        f"print(json.dumps([code, [m for m in {HEAVY_MODULES!r} if m in sys.modules]]), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    *messages, report = proc.stderr.splitlines() or [""]
    try:
        exit_code, imported = json.loads(report)
    except ValueError:
        raise AssertionError(f"the command did not finish:\n{proc.stderr}") from None
    return FreshRun(int(exit_code or 0), proc.stdout, "\n".join(messages), imported)


def one_error_line(result: Result, *needles: str, command: str, last: bool = False) -> None:
    """The error is one line `fakecifar COMMAND: error: ...` naming every needle. `last`: it
    ends stderr (commands like train print progress lines before it); else it is all of it."""
    lines = result.stderr.strip().splitlines()
    assert lines and (last or len(lines) == 1), result.stderr
    assert lines[-1].startswith(f"fakecifar {command}: error: "), result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def random_images(n: int, size: tuple[int, int] = (8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def write_image(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


# A `fakecifar ARGS` whose training loop blocks in the step at (epoch, step) -- in the call of
# MODULE.step_generator that draws it -- after writing MARK on stderr, until SIGTERM has set the
# loop's stop flag (or a SIGKILL ends it): the signal lands mid-epoch on every run, however slow
# or fast the machine.
_UNTIL_SIGNALLED = """
import importlib, signal, sys, time
module = importlib.import_module(sys.argv[1])
at = (int(sys.argv[2]), int(sys.argv[3]))
from fakecifar.cli.app import main

real = module.step_generator

def hooked(seed, epoch, step, *args, **kwargs):
    if (epoch, step) == at:
        print("MARK", file=sys.stderr, flush=True)
        flag = signal.getsignal(signal.SIGTERM).__self__  # the training loop's StopFlag
        deadline = time.monotonic() + 120
        while not flag.set and time.monotonic() < deadline:
            time.sleep(0.01)
    return real(seed, epoch, step, *args, **kwargs)

module.step_generator = hooked
main(sys.argv[4:])
"""


def signalled_run(module: str, at: tuple[int, int], args: list, sig: int) -> subprocess.CompletedProcess:
    """Run `fakecifar ARGS` (see _UNTIL_SIGNALLED), send `sig` once it is blocked at `at`, and
    return its exit code, stdout and whole stderr."""
    return run_blocked(_UNTIL_SIGNALLED, [module, at[0], at[1]], args, sig)


def run_blocked(script: str, script_args: list, args: list, sig: int) -> subprocess.CompletedProcess:
    """Run `python -c SCRIPT SCRIPT_ARGS... ARGS...`, a fakecifar command that prints MARK on
    stderr where it blocks; send `sig` then, and return its exit code, stdout and whole stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, script_args), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.strip() == "MARK":
            break
    proc.send_signal(sig)
    out, rest = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, out, "".join(lines) + rest)
