"""Shared fixtures: tiny real shards and image folders in tmp dirs, and a CLI driver that runs
the real `fakecifar` entry point in-process with stdout and stderr kept apart. Helpers that
tests import (constants, `cli_in_fresh_process`, `random_images`, ...) are in helpers.py."""

from __future__ import annotations

import os

# One torch thread per test process: on this 2-core VM two threads oversubscribe and make
# timings erratic. Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import io
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import CLASSES3, Result, random_images, write_image


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


@pytest.fixture
def make_shard(tmp_path):
    """Write a real shard: make_shard('a.h5', n=10, size=(8, 8), classes=CLASSES3, **columns).
    The directory's manifest then lists every shard in it (`manifest=False`: left as it was)."""
    from fakecifar.manifest import describe_directory
    from fakecifar.shards import ShardWriter, pixel_sha256

    def make(
        name="shard.h5",
        n=12,
        size=(8, 8),
        classes=CLASSES3,
        seed=0,
        images=None,
        labels=None,
        directory=None,
        manifest=True,
        **columns,
    ) -> Path:
        path = Path(directory or tmp_path) / name
        images = random_images(n, size, seed) if images is None else images
        labels = np.arange(len(images)) % max(1, len(classes)) if labels is None else labels
        with ShardWriter(path, classes=classes, image_size=images.shape[1:3], producer="test") as w:
            w.add_batch(images, labels, sha256=pixel_sha256(images), **columns)
        if manifest:
            describe_directory(path.parent, command="test fixture")
        return path

    return make


@pytest.fixture
def image_folder(tmp_path):
    """root/<class>/NNNN.png with 4 distinct 8x8 images per class (lossless, so pixels are known)."""
    root = tmp_path / "folder"
    images = random_images(4 * len(CLASSES3), seed=1)
    for i, img in enumerate(images):
        write_image(root / CLASSES3[i % 3] / f"{i:04d}.png", img)
    return root


# ----------------------------------------------------------------------------- full disks


@pytest.fixture
def tmpfs_dir(tmp_path):
    """Factory: `tmpfs_dir(size="2m", readonly=False)` mounts a fresh tmpfs of that size under
    tmp_path and returns its directory; each is unmounted at teardown. Skips the test, with the
    reason, where mounting is impossible (not root, no CAP_SYS_ADMIN, no mount binary)."""
    import shutil
    import subprocess

    mounted: list[Path] = []

    def mount(size: str = "2m", readonly: bool = False) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("cannot mount a small filesystem: no `mount` command")
        options = f"size={size}" + (",ro" if readonly else "")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            reason = (proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}"
            pytest.skip(f"cannot mount a {size} tmpfs (needs root or CAP_SYS_ADMIN): {reason}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def full_disk_dir(tmpfs_dir):
    """An empty directory on its own 2 MiB tmpfs: a disk that really fills up (ENOSPC). Fill it
    with the `fill_disk` fixture, `fill_disk(full_disk_dir, leave=N)`, to leave about N bytes
    free. Skips where it cannot be mounted; for those machines, also inject OSError(ENOSPC) in a
    test that needs no mount."""
    return tmpfs_dir("2m")


@pytest.fixture
def fill_disk():
    """`fill_disk(directory, leave=0)`: write `directory/filler` until its filesystem has about
    `leave` bytes free (to a page; 0: not one byte). Returns the filler's path."""
    import errno

    def fill(directory: Path, leave: int = 0, name: str = "filler") -> Path:
        path = Path(directory) / name
        stats = os.statvfs(directory)
        page = stats.f_frsize or 4096
        want = max(0, stats.f_bavail * stats.f_frsize - leave) // page * page
        block = b"\0" * (1 << 20)
        with open(path, "ab", buffering=0) as fh:  # unbuffered: nothing left to fail on close
            try:
                while want > 0:
                    want -= fh.write(block[: min(want, len(block))])
                while leave == 0:  # to the last byte
                    fh.write(b"\0" * page)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        return path

    return fill


# Fixtures of the teacher tests (tiny real models, the protocol server), for every test file.
pytest_plugins = ("teacher_server",)
