"""The wheel is what users get, and an editable install hides what it lacks: build it from a
copy of the source, check that it holds every module and data file, install it into a fresh
venv and run the installed `fakecifar` from outside the checkout. Offline: no build isolation,
no index; the fresh venv borrows the test environment's site-packages for the dependencies
(torch included) through a .pth file, so nothing is downloaded or reinstalled."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

# pyproject.toml's package-dir: source folder -> where its files land in the wheel.
LAYOUT = {"core": "fakecifar", "cli": "fakecifar/cli"}
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.partial", "*.egg-info", "build")


def expected_files() -> set[str]:
    """Every module under core/ and cli/ (subpackages too, whatever their names) and every file
    under core/data/, as wheel paths."""
    files = set()
    for src, dest in LAYOUT.items():
        for path in (REPO / src).rglob("*.py"):
            if "__pycache__" not in path.parts:
                files.add(f"{dest}/{path.relative_to(REPO / src).as_posix()}")
    for path in (REPO / "core" / "data").rglob("*"):
        if path.is_file() and not path.name.endswith(".partial"):
            files.add(f"fakecifar/data/{path.relative_to(REPO / 'core' / 'data').as_posix()}")
    return files


def run(*cmd, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a clean copy of the source (no stale build/ can leak into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in LAYOUT:
        shutil.copytree(REPO / name, src / name, ignore=JUNK)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    out = tmp / "dist"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        out,
        src,
        cwd=tmp,
        env=_env(),
    )
    (found,) = out.glob("fakecifar-*.whl")
    return found


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(expected_files() - names)
    assert not missing, (
        f"the wheel leaves out {len(missing)} file(s) of the source tree, e.g. {missing[:5]}: "
        "check package discovery and package-data in pyproject.toml"
    )
    stray = sorted(n for n in names if not n.startswith(("fakecifar/", "fakecifar-")))
    assert not stray, f"the wheel ships files outside the package: {stray[:5]}"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_installed_wheel_runs_from_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    env = _env()
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path, env=env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    # Dependencies from the test environment, after the venv's own site-packages (where the
    # wheel goes): the .pth adds the directory only, its own .pth files (the editable install's
    # finder) are not run, so `fakecifar` can only come from the wheel.
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path, env=env
        ).stdout.strip()
    )
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz-test-deps.pth").write_text("".join(f"{p}\n" for p in deps))
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path, env=env)

    elsewhere = tmp_path / "elsewhere"  # not the checkout: its core/ and cli/ can't be imported
    elsewhere.mkdir()
    where = run(
        python,
        "-c",
        "import fakecifar, fakecifar.cli.app, fakecifar.samples as s; "
        "print(fakecifar.__file__); print(s.SAMPLE_REAL); print(s.SAMPLE_FAKE)",
        cwd=elsewhere,
        env=env,
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    _, real, fake = where

    fakecifar = bin_dir / "fakecifar"
    help_text = run(fakecifar, "--help", cwd=elsewhere, env=env).stdout
    assert "Usage: fakecifar" in help_text
    for command in ("import", "train", "detect"):
        assert command in help_text

    lines = run(fakecifar, "detect", real, fake, cwd=elsewhere, env=env).stdout.splitlines()
    rows = [line.split("\t") for line in lines]
    assert [(r[0], r[1]) for r in rows] == [(real, "real"), (fake, "fake")], (
        f"{lines} (the shipped samples are images the built-in detector gets right with p < 0.01 "
        "and p > 0.99; after retraining it, pick others from cifake-sample.tar.gz)"
    )
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)
