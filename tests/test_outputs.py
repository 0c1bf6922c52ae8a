"""fakecifar.outputs.check_output_path: the shared refusal of outputs that cannot be written,
for files (`train -o m.pt`) and directories (`import -o DIR`). It must create nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakecifar.errors import NoSpaceError, OutputError, UsageError
from fakecifar.outputs import check_output_path


def _listing(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def test_writable_files_and_directories_pass_and_nothing_is_created(tmp_path: Path) -> None:
    (tmp_path / "old.pt").write_bytes(b"x")
    (tmp_path / "shards").mkdir()
    before = _listing(tmp_path)
    assert check_output_path(tmp_path / "m.pt") == tmp_path / "m.pt"
    check_output_path(tmp_path / "old.pt")  # existing files are the caller's business (--overwrite)
    check_output_path(tmp_path / "new" / "deeper" / "m.pt")  # missing directories: probed where made
    check_output_path(tmp_path / "shards", directory=True, children=["train-00000.h5.partial"])
    check_output_path(tmp_path / "new" / "shards", directory=True)
    check_output_path(str(tmp_path / "log.jsonl"), temp_suffix="", option="--log")
    assert _listing(tmp_path) == before


def test_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_output_path("m.pt")
    check_output_path("out", directory=True)
    assert _listing(tmp_path) == []


def test_wrong_kinds_are_output_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path / "dir")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_output_path(tmp_path / "file", directory=True)
    with pytest.raises(OutputError, match=f"{tmp_path / 'file'} is not a directory"):
        check_output_path(tmp_path / "file" / "sub" / "m.pt")


def test_too_long_names_and_paths_are_usage_errors(tmp_path: Path) -> None:
    before = _listing(tmp_path)
    with pytest.raises(UsageError, match="file name too long") as info:
        check_output_path(tmp_path / ("a" * 300), directory=True, option="-o")
    assert info.value.exit_code == 2 and "300 bytes" in str(info.value) and "shorter -o" in str(info.value)
    with pytest.raises(UsageError, match=r"with the suffix \.partial"):
        check_output_path(tmp_path / ("b" * 250))  # 250 fits; 258 with .partial does not
    check_output_path(tmp_path / ("b" * 250), temp_suffix="")
    with pytest.raises(UsageError, match="inside it"):
        check_output_path(tmp_path / "out", directory=True, children=["c" * 256])
    with pytest.raises(UsageError, match="path too long"):
        check_output_path(tmp_path.joinpath(*["d" * 200] * 25), directory=True)
    with pytest.raises(UsageError, match="file name too long"):  # multibyte: bytes count, not characters
        check_output_path(tmp_path / ("é" * 128 + ".pt"), temp_suffix="")
    assert _listing(tmp_path) == before


def test_unwritable_places_are_found_by_a_probe_not_os_access() -> None:
    # As root, os.access("/sys", W_OK) is true, yet no file can be created there.
    with pytest.raises(OutputError, match="cannot write /sys/m.pt") as info:
        check_output_path("/sys/m.pt")
    assert info.value.exit_code == 2
    with pytest.raises(OutputError, match="cannot write /sys/x/y"):
        check_output_path("/sys/x/y", directory=True)
    check_output_path("/sys/m.pt", probe=False)  # names and kinds only


def test_read_only_and_full_filesystems(tmpfs_dir, fill_disk) -> None:
    ro = tmpfs_dir("1m", readonly=True)
    with pytest.raises(OutputError, match="Read-only file system"):
        check_output_path(ro / "m.pt")
    with pytest.raises(OutputError, match="Read-only file system"):
        check_output_path(ro / "shards", directory=True)
    full = tmpfs_dir("1m")
    fill_disk(full, leave=0)
    check_output_path(full / "m.pt")  # an empty probe still fits: the disk fills while writing
    no_inodes = tmpfs_dir("1m,nr_inodes=3")  # the root directory takes one
    with pytest.raises(OSError):
        for i in range(10):
            (no_inodes / f"f{i}").touch()
    with pytest.raises(NoSpaceError, match="no space left on device writing"):  # not even an empty file
        check_output_path(no_inodes / "m.pt")
