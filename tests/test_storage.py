"""The storage layer under faults: full disks, read-only mounts, kill -9 and resume, manifests,
one writer per output directory. Every producer (import, resize, split, mine) goes through it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakecifar.manifest import MANIFEST, OutputLock, describe_directory, read_manifest
from fakecifar.samples import CIFAKE_SAMPLE
from fakecifar.shards import Shard, open_shards

from helpers import CLASSES3, one_error_line, random_images


def shard_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.h5"))


def no_partials(*directories: Path) -> bool:
    return not [p for d in directories if d.exists() for p in d.rglob("*.partial")]


def manifest_of(directory: Path) -> dict:
    """The directory's manifest, which it must have."""
    manifest = read_manifest(directory)
    assert manifest is not None, f"{directory}: no manifest"
    return manifest


def check_intact(directory: Path) -> int:
    """Every shard the manifest lists opens and has the count it says; returns the images."""
    manifest = read_manifest(directory)
    assert manifest is not None
    for entry in manifest["shards"]:
        assert len(Shard(directory / entry["name"])) == entry["images"]
    return sum(e["images"] for e in manifest["shards"])


def kill_after_shards(imports: str, call: str, shards: int) -> subprocess.CompletedProcess:
    """Run a producer in a fresh interpreter that SIGKILLs itself once `shards` shards are out:
    a real kill -9 at a known point (no cleanup runs, a half shard may be left)."""
    code = "\n".join(
        [
            "import os, signal",
            imports,
            "done = []",
            "def on_shard(path):",
            "    done.append(path)",
            f"    if len(done) == {shards}:",
            "        os.kill(os.getpid(), signal.SIGKILL)",
            call,
        ]
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


# --------------------------------------------------------------------------- full disk


def test_import_on_a_full_disk_is_one_line_exit_1_and_keeps_finished_shards(cli, tmpfs_dir):
    disk = tmpfs_dir("1800k")  # room for two 100-image shards of 32x32, not for four
    out = disk / "raw"
    result = cli("import", "--sample", "--shard-size", "100", "-o", out)
    assert result.exit_code == 1, result.stderr
    one_error_line(
        result, "no space left on device writing", str(out), "(free space or choose another -o)", command="import"
    )
    assert no_partials(disk)
    finished = shard_names(out)
    assert finished and result.lines == [str(out / n) for n in finished]  # announced ones are kept
    assert check_intact(out) == 100 * len(finished)
    assert manifest_of(out)["complete"] is False
    refused = cli("stats", out)
    assert refused.exit_code == 2 and "incomplete" in refused.stderr and "--allow-incomplete" in refused.stderr
    # Free space (a bigger disk) and rerun the same command: it resumes and completes.
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    again = cli("import", "--sample", "--shard-size", "100", "-o", out)
    assert again.exit_code == 0, again.stderr
    assert "resumed" in again.stderr and check_intact(out) == 400 and manifest_of(out)["complete"]


@pytest.mark.parametrize("command", ["resize", "split"])
def test_resize_and_split_on_a_full_disk(cli, tmpfs_dir, tmp_path, command):
    src = tmp_path / "src"
    assert cli("import", "--sample", "--shard-size", "100", "-o", src).exit_code == 0
    disk = tmpfs_dir("1m")
    out = disk / "out"
    args = ["--size", "32", "-o", out] if command == "resize" else ["--shard-size", "100", "-o", out]
    result = cli(command, src, *args)
    assert result.exit_code == 1, result.stderr
    one_error_line(result, "no space left on device writing", "(free space or choose another -o)", command=command)
    assert no_partials(disk)
    assert check_intact(src) == 400  # the input is untouched


def test_injected_write_errors_without_a_mount(cli, tmp_path, monkeypatch):
    """Where no filesystem can be mounted: the same path, with the disk running out after 1 MB."""
    from fakecifar import shards

    room = {"bytes": 1_000_000}  # past the first 100-image shard, short of the second

    class FillingFile:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            room["bytes"] -= len(memoryview(data).cast("B"))
            if room["bytes"] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._fh.write(data)

        def __getattr__(self, name):
            return getattr(self._fh, name)

    real_init = shards._GuardedFile.__init__

    def init(self, path):
        real_init(self, path)
        self._fh = FillingFile(self._fh)

    monkeypatch.setattr(shards._GuardedFile, "__init__", init)
    out = tmp_path / "raw"
    result = cli("import", "--sample", "--shard-size", "100", "-o", out)
    assert result.exit_code == 1, result.stderr
    one_error_line(result, "no space left on device writing", command="import")
    assert no_partials(out) and shard_names(out) == ["shard-00000.h5"] and check_intact(out) == 100


def test_read_only_output_mid_run_keeps_what_was_finished(tmpfs_dir):
    """The output filesystem turns read-only between two shards (a remount, as on I/O errors)."""
    from fakecifar.errors import OutputError
    from fakecifar.importing import import_sources

    disk = tmpfs_dir("8m")
    out = disk / "raw"
    finished = []

    def on_shard(path):
        finished.append(path)
        if len(finished) == 1:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

    try:
        with pytest.raises(OutputError, match="cannot write .*Read-only file system"):
            import_sources([CIFAKE_SAMPLE], out, shard_size=100, on_shard=on_shard)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    assert shard_names(out) == ["shard-00000.h5"] and check_intact(out) == 100 and no_partials(disk)


# --------------------------------------------------------------------------- manifests and resume


def test_kill_9_mid_import_then_readers_refuse_and_a_rerun_resumes_exactly(cli, tmp_path):
    out, whole = tmp_path / "raw", tmp_path / "whole"
    proc = kill_after_shards(
        "from fakecifar.importing import import_sources",
        f"import_sources([{str(CIFAKE_SAMPLE)!r}], {str(out)!r}, shard_size=60, dedup=True, on_shard=on_shard)",
        shards=3,
    )
    assert proc.returncode == -9, proc.stderr
    assert shard_names(out) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    for args in (
        ["stats", out],
        ["split", out, "-o", tmp_path / "s"],
        ["resize", out, "--size", "8", "-o", tmp_path / "r"],
    ):
        result = cli(*args)
        assert result.exit_code == 2, result.stderr
        one_error_line(
            result,
            str(out),
            "incomplete",
            "stopped after 3 shard(s) (180 images)",
            "--allow-incomplete",
            command=args[0],
        )
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()
    anyway = cli("stats", out, "--allow-incomplete", "--json")
    assert anyway.exit_code == 0 and anyway.json_lines()[0]["images"] == 180
    again = cli("import", CIFAKE_SAMPLE, "--shard-size", "60", "--dedup", "-o", out)
    assert again.exit_code == 0, again.stderr
    assert again.lines == [str(out / n) for n in shard_names(out)]  # finished ones first, then the rest
    assert {n: out.joinpath(n).stat().st_mtime_ns for n in before} == before  # not rewritten
    assert cli("import", CIFAKE_SAMPLE, "--shard-size", "60", "--dedup", "-o", whole).exit_code == 0
    a, b = open_shards([out]), open_shards([whole])
    for column in ("sha256", "labels", "origin", "source"):
        assert np.array_equal(a.read(column), b.read(column)), column
    assert manifest_of(out)["images"] == manifest_of(whole)["images"] == len(b)
    # Done: the same command again changes nothing and says so.
    done = cli("import", CIFAKE_SAMPLE, "--shard-size", "60", "--dedup", "-o", out)
    assert done.exit_code == 0 and "nothing to do" in done.stderr and len(done.lines) == len(shard_names(out))


def test_interrupted_run_with_other_arguments_is_refused(cli, tmp_path):
    out = tmp_path / "raw"
    proc = kill_after_shards(
        "from fakecifar.importing import import_sources",
        f"import_sources([{str(CIFAKE_SAMPLE)!r}], {str(out)!r}, shard_size=100, on_shard=on_shard)",
        shards=1,
    )
    assert proc.returncode == -9
    result = cli("import", "--sample", "--shard-size", "50", "-o", out)
    assert result.exit_code == 2
    one_error_line(
        result, "holds an interrupted run of", "with other arguments", "rerun that command", command="import"
    )
    assert shard_names(out) == ["shard-00000.h5"] and check_intact(out) == 100


@pytest.mark.parametrize("command", ["resize", "split"])
def test_kill_9_mid_resize_or_split_then_rerun_resumes(cli, tmp_path, command):
    src = tmp_path / "src"
    assert cli("import", "--sample", "--shard-size", "50", "-o", src).exit_code == 0
    out = tmp_path / "out"
    if command == "resize":
        call = f"resize_shards([{str(src)!r}], {str(out)!r}, (16, 16), on_shard=on_shard)"
        args = ["--size", "16", "-o", out]
        proc = kill_after_shards("from fakecifar.resize import resize_shards", call, shards=3)
    else:
        call = (
            f"split_dataset(open_shards([{str(src)!r}]), {str(out)!r}, fraction=0.25, seed=1, "
            "shard_size=40, on_shard=on_shard)"
        )
        args = ["--val", "0.25", "--seed", "1", "--shard-size", "40", "-o", out]
        proc = kill_after_shards(
            "from fakecifar.split import split_dataset\nfrom fakecifar.shards import open_shards", call, shards=3
        )
    assert proc.returncode == -9, proc.stderr
    result = cli(command, src, *args)
    assert result.exit_code == 0, result.stderr
    reference = tmp_path / "reference"
    assert cli(command, src, *[reference if a == out else a for a in args]).exit_code == 0
    parts = ["train", "val"] if command == "split" else [""]
    for part in parts:
        a, b = open_shards([out / part]), open_shards([reference / part])
        assert len(a) == len(b) and np.array_equal(a.read("images"), b.read("images")), part
        assert manifest_of(out / part)["complete"]
    assert no_partials(out)


def test_a_shard_deleted_between_two_commands_is_named(cli, tmp_path):
    out = tmp_path / "raw"
    assert cli("import", "--sample", "--shard-size", "100", "-o", out).exit_code == 0
    kept = (out / "shard-00002.h5").read_bytes()
    (out / "shard-00002.h5").unlink()
    for args in (["stats", out], ["train", out, "-o", tmp_path / "m.pt", "--epochs", "1"]):
        result = cli(*args)
        assert result.exit_code == 2, result.stderr
        one_error_line(
            result, "shard-00002.h5 is listed in manifest.json but missing", "--allow-incomplete", command=args[0]
        )
    assert not (tmp_path / "m.pt").exists()
    assert cli("stats", out, "--allow-incomplete").exit_code == 0
    # A shard changed or added behind the producer's back is caught too.
    (out / "shard-00002.h5").write_bytes(kept)
    assert cli("stats", out).exit_code == 0
    (out / "extra.h5").write_bytes((out / "shard-00000.h5").read_bytes())
    result = cli("stats", out)
    assert result.exit_code == 2 and "extra.h5 not listed in manifest.json" in result.stderr


def test_shards_without_a_manifest_are_refused_as_a_directory_but_read_one_by_one(cli, tmp_path):
    from fakecifar.shards import ShardWriter

    d = tmp_path / "loose"
    for name in ("a.h5", "b.h5"):
        with ShardWriter(d / name, classes=CLASSES3, image_size=(8, 8), producer="other tool") as w:
            w.add_batch(random_images(6), np.arange(6) % 3)
    result = cli("stats", d)
    assert result.exit_code == 2
    one_error_line(result, f"{d}: no manifest.json", "--allow-incomplete", command="stats")
    assert cli("stats", d / "a.h5", d / "b.h5").exit_code == 0  # a shard alone is atomic
    describe_directory(d)  # adopt them as one dataset
    assert cli("stats", "--json", d).json_lines()[0]["images"] == 12


def test_manifest_documents_the_dataset(cli, tmp_path):
    out = tmp_path / "raw"
    assert cli("import", "--sample", "--dedup", "--shard-size", "150", "-o", out).exit_code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["producer"].startswith("fakecifar import")
    assert manifest["command"].startswith("fakecifar import") and "--dedup" in manifest["command"]
    assert manifest["images"] == 400 and manifest["image_size"] == [32, 32] and len(manifest["classes"]) == 10
    assert [e["name"] for e in manifest["shards"]] == shard_names(out)
    assert all(e["bytes"] == (out / e["name"]).stat().st_size for e in manifest["shards"])


# --------------------------------------------------------------------------- one writer per directory


@pytest.mark.parametrize("command", ["import", "resize", "split"])
def test_a_second_producer_on_the_same_output_exits_at_once(cli, tmp_path, command):
    src = tmp_path / "src"
    assert cli("import", "--sample", "--shard-size", "200", "-o", src).exit_code == 0
    out = tmp_path / "busy"
    out.mkdir()
    lock_dir = out / "train" if command == "split" else out
    lock_dir.mkdir(exist_ok=True)
    args = {
        "import": ["import", "--sample", "-o", out],
        "resize": ["resize", src, "--size", "8", "-o", out],
        "split": ["split", src, "-o", out],
    }[command]
    with OutputLock(lock_dir, command="fakecifar import elsewhere"):
        result = cli(*args)
    assert result.exit_code == 1, result.stderr
    one_error_line(
        result,
        "is being written by pid",
        str(os.getpid()),
        "fakecifar import elsewhere",
        ".fakecifar.lock",
        command=command,
    )
    assert shard_names(lock_dir) == []


def test_import_refuses_to_write_into_a_folder_being_mined(cli, tmp_path):
    out = tmp_path / "mined"
    out.mkdir()
    with OutputLock(out, command="fakecifar mine", shared=True):
        result = cli("import", "--sample", "-o", out)
    assert result.exit_code == 1 and "is being written by" in result.stderr and shard_names(out) == []


def test_too_long_output_name_is_a_usage_error_before_any_work(cli, tmp_path):
    out = tmp_path / ("x" * 300)
    result = cli("import", "--sample", "-o", out)
    assert result.exit_code == 2, result.stderr
    one_error_line(result, "too long", command="import")
    assert list(tmp_path.iterdir()) == []  # nothing created


# --------------------------------------------------------------------------- signals


def test_sigterm_mid_import_exits_143_cleanly_and_the_rerun_resumes(cli, tmp_path):
    """SIGTERM (timeout, Slurm, docker stop) arrives while the third shard is being written."""
    out = tmp_path / "raw"
    code = "\n".join(
        [
            "import os, signal",
            "from fakecifar import shards",
            "from fakecifar.cli.app import main",
            "real = shards.ShardSeriesWriter._finish",
            "def finish(self):",
            "    real(self)",
            "    if len(self.written) == 2:",
            "        os.kill(os.getpid(), signal.SIGTERM)",
            "shards.ShardSeriesWriter._finish = finish",
            f"main(['import', '--sample', '--shard-size', '60', '-o', {str(out)!r}])",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "fakecifar import: error: terminated (SIGTERM)"
    assert no_partials(out) and shard_names(out) == ["shard-00000.h5", "shard-00001.h5"]
    assert check_intact(out) == 120 and not manifest_of(out)["complete"]
    again = cli("import", "--sample", "--shard-size", "60", "-o", out)
    assert again.exit_code == 0 and "resumed: 2 shard(s)" in again.stderr and check_intact(out) == 400
