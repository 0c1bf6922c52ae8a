#!/usr/bin/env python3
"""Generate man/ (roff) and completions/ from the CLI itself, so they never drift.

    python scripts/gen_docs.py          # rewrite man/ and completions/
    python scripts/gen_docs.py --check  # exit 1 if the committed files are stale

click-man cannot see a typer >= 0.26 app (typer vendors its own click), so the roff is
written here from typer's click command tree.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import typer.main
from typer import Context

# Private, but the only way to get typer's completion scripts as text (present in every typer
# that pyproject.toml allows, >= 0.26).
from typer._completion_shared import get_completion_script
from typer.core import TyperGroup

from fakecifar import __version__
from fakecifar.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
SHELLS = {"bash": "fakecifar.bash", "zsh": "_fakecifar", "fish": "fakecifar.fish"}


def roff(text: str) -> str:
    """Escape text for roff: backslashes, and leading dots/quotes that would be requests."""
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def description(text: str) -> str:
    """The help text as roff: a paragraph that click keeps verbatim (first line `\\b`) is set
    without filling, as `--help` shows it."""
    out = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.split("\n")
        if lines[0].strip() == "\b":
            out.append(".nf\n" + roff("\n".join(lines[1:])) + "\n.fi")
        else:
            out.append(roff(paragraph))
    return "\n\n".join(out)


def first_sentence(text: str) -> str:
    return " ".join(re.split(r"\.\s", text.strip(), maxsplit=1)[0].split()).rstrip(".")


def _describe(param, ctx) -> tuple[str, str]:
    """(names with metavar, help with default) exactly as `--help` shows them."""
    if param.param_type_name == "argument":
        return param.name.upper(), getattr(param, "help", "") or ""
    record = param.get_help_record(ctx)
    return (record[0], record[1]) if record else (", ".join(param.opts), "")


def man_page(name: str, command, synopsis: str, see_also: list[str]) -> str:
    title = name.upper()
    help_text = (command.help or "").strip()
    summary = first_sentence(help_text)
    out = [
        f'.TH "{title}" "1" "" "fakecifar {__version__}" "fakecifar manual"',
        ".SH NAME",
        f"{name} \\- {roff(summary)}",
        ".SH SYNOPSIS",
        f".B {synopsis.split(' ', 1)[0]}",
        roff(synopsis.split(" ", 1)[1]) if " " in synopsis else "",
        ".SH DESCRIPTION",
        description(help_text),
    ]
    ctx = Context(command, info_name=name)
    params = [p for p in command.params if p.name not in ("install_completion", "show_completion")]
    args = [p for p in params if p.param_type_name == "argument"]
    opts = [p for p in params if p.param_type_name != "argument"]
    if args:
        out.append(".SH ARGUMENTS")
        for p in args:
            names, text = _describe(p, ctx)
            out += [".TP", f".B {names}", roff(text)]
    if opts:
        out.append(".SH OPTIONS")
        for p in opts:
            names, text = _describe(p, ctx)
            out += [".TP", f".B {roff(names)}", roff(text)]
    out += [".TP", ".B \\-h, \\-\\-help", "Show the help and exit."]
    if getattr(command, "commands", None):
        out.append(".SH COMMANDS")
        for sub_name, sub in command.commands.items():
            out += [".TP", f".B {sub_name}", roff(first_sentence(sub.help or ""))]
    out += [
        ".SH EXIT STATUS",
        "0 success; 1 runtime failure; 2 bad usage or bad input.",
        ".SH ENVIRONMENT",
        "FAKECIFAR_DEBUG=1 shows tracebacks; NO_COLOR disables colour.",
        ".SH SEE ALSO",
        ", ".join(f"\\fB{s}\\fR(1)" for s in see_also),
    ]
    return "\n".join(line for line in out if line is not None) + "\n"


def generate() -> dict[Path, str]:
    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)  # an app with several commands
    names = sorted(root.commands)
    files: dict[Path, str] = {
        ROOT / "man" / "fakecifar.1": man_page(
            "fakecifar", root, "fakecifar [OPTIONS] COMMAND [ARGS]...", [f"fakecifar-{n}" for n in names]
        )
    }
    for name in names:
        cmd = root.commands[name]
        files[ROOT / "man" / f"fakecifar-{name}.1"] = man_page(
            f"fakecifar-{name}",
            cmd,
            f"fakecifar {name} [OPTIONS] "
            + " ".join(f"[{p.name.upper()}]..." for p in cmd.params if p.param_type_name == "argument"),
            ["fakecifar"] + [f"fakecifar-{n}" for n in names if n != name],
        )
    for shell, filename in SHELLS.items():
        files[ROOT / "completions" / filename] = (
            get_completion_script(prog_name="fakecifar", complete_var="_FAKECIFAR_COMPLETE", shell=shell) + "\n"
        )
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    args = parser.parse_args()
    files = generate()
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    existing = set((ROOT / "man").glob("*.1")) | set((ROOT / "completions").glob("*"))
    extra = sorted(existing - set(files))
    if args.check:
        for p in stale + extra:
            print(f"stale: {p.relative_to(ROOT)}", file=sys.stderr)
        return 1 if stale or extra else 0
    for p, text in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for p in extra:
        p.unlink()
    print(f"wrote {len(files)} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
