"""CLI conventions (DESIGN.md): light --help, one-line errors, exit codes, stdout/stderr,
progress only on a terminal, generated man pages and completions up to date."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

from fakecifar.cli.app import COMMANDS  # noqa: E402 - every registered command

from helpers import REPO, cli_in_fresh_process


@pytest.mark.parametrize("args", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_does_not_import_torch(args):
    run = cli_in_fresh_process(*args)
    assert run.exit_code == 0 and not {"torch", "torchvision", "onnxruntime"} & set(run.imported), run.stderr
    assert "Usage" in run.stdout


def test_version_and_python_dash_m(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.startswith("fakecifar ")
    proc = subprocess.run([sys.executable, "-m", "fakecifar", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == result.stdout


def test_usage_errors_are_one_line_with_exit_2(cli, tmp_path):
    missing = cli("import", tmp_path)
    assert missing.exit_code == 2
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()]
    assert missing.stderr.startswith("fakecifar import: error: Missing option '--output'")
    unknown = cli("frobnicate")
    assert unknown.exit_code == 2 and "No such command 'frobnicate'" in unknown.stderr
    bad_type = cli("split", tmp_path, "-o", tmp_path / "o", "--val", "lots")
    assert bad_type.exit_code == 2 and "--val" in bad_type.stderr
    assert cli("stats").exit_code == 2  # no arguments, empty stdin: nothing to do is an error


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(cli, make_shard, monkeypatch):
    import fakecifar.stats

    def broken(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(fakecifar.stats, "dataset_stats", broken)
    path = make_shard()
    plain = cli("stats", path)
    assert plain.exit_code == 1
    assert plain.stderr.strip() == (
        "fakecifar stats: error: internal error: RuntimeError: kaboom "
        "(rerun with --debug for the traceback and report it)"
    )
    debug = cli("--debug", "stats", path)
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "kaboom" in debug.stderr


def test_quiet_silences_messages_but_not_data(cli, image_folder, tmp_path):
    loud = cli("import", image_folder, "-o", tmp_path / "a")
    quiet = cli("-q", "import", image_folder, "-o", tmp_path / "b")
    assert loud.stderr and not quiet.stderr
    assert len(quiet.lines) == len(loud.lines) == 1


def test_progress_goes_to_stderr_only_on_a_terminal(image_folder, tmp_path):
    """With stderr on a pty a progress display appears there; stdout still carries only paths."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fakecifar", "import", str(image_folder), "-o", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "100"},
    )
    os.close(slave)
    stdout, _ = proc.communicate(timeout=60)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert stdout.decode().splitlines() == [str(tmp_path / "out" / "shard-00000.h5")]
    assert "imported 12 images" in terminal and "importing" in terminal  # the live bar was drawn
    assert "\x1b[3" not in terminal  # NO_COLOR: no foreground colours


def test_pipe_reads_paths_from_stdin(cli, make_shard, tmp_path):
    a = make_shard("a.h5")
    result = cli("resize", "--size", "4", "-o", tmp_path / "out", stdin=f"{a}\n")
    assert result.exit_code == 0 and result.lines == [str(tmp_path / "out" / "a.h5")]


def test_man_pages_and_completions_are_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_docs.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr + "\nrun `make docs` to regenerate"
    assert {p.name for p in (REPO / "man").glob("*.1")} == {"fakecifar.1"} | {
        f"fakecifar-{c}.1" for c in COMMANDS
    } or len(list((REPO / "man").glob("*.1"))) > len(COMMANDS)
    assert "complete" in (REPO / "completions" / "fakecifar.bash").read_text()


def test_global_flags_are_accepted_after_the_command(cli, image_folder, tmp_path):
    result = cli("import", image_folder, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0 and not result.stderr and len(result.lines) == 1
