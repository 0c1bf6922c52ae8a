"""Shared fixtures: tiny real shards and image folders in tmp dirs, and a CLI driver that runs
the real `fakecifar` entry point in-process with stdout and stderr kept apart."""

from __future__ import annotations

import os

# One torch thread per test process: on this 2-core VM two threads oversubscribe and make
# timings erratic. Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import io  # noqa: E402
import json
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
    reason=f"real data not found at {SHARED_DATA} (only beside the project's development checkout)")


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


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `fakecifar ARGS...` through the real entry point (error mapping included)."""
    from fakecifar.cli.app import main
    from fakecifar.cli.common import Settings

    def run(*args, stdin: str | bytes = "") -> Result:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))  # has .buffer, like the real one
        Settings.quiet, Settings.debug = False, False
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out = capsys.readouterr()
        return Result(int(exc.value.code or 0), out.out, out.err)

    return run


HEAVY_MODULES = ("torch", "torchvision", "onnxruntime", "numpy", "h5py")


@dataclass
class FreshRun(Result):
    imported: list[str]  # which of HEAVY_MODULES the command loaded


def cli_in_fresh_process(*args) -> FreshRun:
    """Run `fakecifar ARGS...` in a new interpreter and report which heavy modules it imported:
    the light paths (--help, detect/eval on .onnx) must not pay for torch."""
    code = ("import json, sys\nfrom fakecifar.cli.app import main\n"
            f"try:\n    main({[str(a) for a in args]!r})\nexcept SystemExit as e:\n    code = e.code\n"
            f"print(json.dumps([code, [m for m in {HEAVY_MODULES!r} if m in sys.modules]]), file=sys.stderr)")
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


@pytest.fixture
def make_shard(tmp_path):
    """Write a real shard: make_shard('a.h5', n=10, size=(8, 8), classes=CLASSES3, **columns)."""
    from fakecifar.shards import ShardWriter, pixel_sha256

    def make(name="shard.h5", n=12, size=(8, 8), classes=CLASSES3, seed=0, images=None, labels=None,
             directory=None, **columns) -> Path:
        path = Path(directory or tmp_path) / name
        images = random_images(n, size, seed) if images is None else images
        labels = np.arange(len(images)) % max(1, len(classes)) if labels is None else labels
        with ShardWriter(path, classes=classes, image_size=images.shape[1:3], producer="test") as w:
            w.add_batch(images, labels, sha256=pixel_sha256(images), **columns)
        return path

    return make


def write_image(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """root/<class>/NNNN.png with 4 distinct 8x8 images per class (lossless, so pixels are known)."""
    root = tmp_path / "folder"
    images = random_images(4 * len(CLASSES3), seed=1)
    for i, img in enumerate(images):
        write_image(root / CLASSES3[i % 3] / f"{i:04d}.png", img)
    return root
