"""What every command shares: input paths (arguments or stdin), output on stdout, messages and
progress on stderr, JSON lines. Nothing here imports numpy, h5py or torch."""

from __future__ import annotations

import inspect
import json
import os
import sys
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer

# Defined once, used by every command that reads shards (fakecifar.manifest says why).
ALLOW_INCOMPLETE = typer.Option(
    False,
    "--allow-incomplete",
    help="Read a directory even if its manifest.json is missing, says the run that wrote it was interrupted, "
    "or disagrees with its shards.",
)


def with_settings(*tables: Sequence[Any], panels: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Give a command one option per setting of `tables` (fakecifar.training.settings.Setting:
    flags, help, panel and type come from there), so commands that share settings define none
    of them themselves. The command is written `def run(<its own arguments and options>,
    **values)` and receives the settings' values in `values` (None: not given). --help shows
    the options grouped by `panels`, in that order, then the ungrouped ones."""

    def decorate(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn)
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(fn).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        derived = [
            inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=_option(s), annotation=s.type)
            for table in tables
            for s in table
        ]

        def rank(p: inspect.Parameter) -> int:
            if isinstance(p.default, typer.models.ArgumentInfo):
                return -1
            panel = getattr(p.default, "rich_help_panel", None)
            return panels.index(panel) if panel in panels else len(panels)

        params = sorted([*own, *derived], key=rank)

        def command(**kwargs: Any) -> Any:
            return fn(**kwargs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__qualname__, command.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        command.__module__ = fn.__module__
        return command

    return decorate


def _option(s: Any) -> Any:
    switch = "/" in s.flags[0]
    return typer.Option(
        s.cli_default,
        *s.flags,
        help=s.help,
        show_default=False if switch else s.show_default,
        rich_help_panel=s.panel,
    )


class Settings:
    """Global flags set by the root callback (-q, --debug)."""

    quiet = False
    debug = os.environ.get("FAKECIFAR_DEBUG", "") not in ("", "0")


def input_paths(args: list[str] | None) -> list[str]:
    """The command's inputs: its arguments, or one path per line on stdin when there are none
    (or just '-') and stdin is not a terminal."""
    from fakecifar.text import paths_from_bytes

    args = list(args or [])
    if args and args != ["-"]:
        return args
    if args == ["-"] or not sys.stdin.isatty():
        # Bytes, not text: a NUL or binary data piped by mistake is a clear error, not a crash.
        stream = getattr(sys.stdin, "buffer", None)
        data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        return paths_from_bytes(data)
    return []


def require_inputs(args: list[str] | None, what: str = "shards") -> list[str]:
    from fakecifar.errors import UsageError

    paths = input_paths(args)
    if not paths:
        raise UsageError(f"no input {what}", f"give {what} as arguments or pipe their paths on stdin")
    return paths


def emit(line: str) -> None:
    """One line of data on stdout, flushed at once so a pipe downstream can start on it.
    Unprintable characters (of a file name in a path or a table) are escaped; tabs and line
    breaks are the data's own. (JSON is already ASCII.)"""
    from fakecifar.text import printable

    sys.stdout.write(printable(line, keep="\t\n") + "\n")
    sys.stdout.flush()


def emit_json(obj) -> None:
    emit(json.dumps(obj, default=_json_default))


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def log(message: str) -> None:
    """A message for the human: stderr, silenced by -q. Unprintable characters (in a file
    name, say) are escaped: a message cannot drive the terminal."""
    from fakecifar.text import printable_lines

    if not Settings.quiet:
        typer.echo(printable_lines(message), err=True)


def warn(message: str) -> None:
    """A warning is shown even with -q: it is about the data, not about progress."""
    from fakecifar.text import printable_lines

    typer.echo(f"warning: {printable_lines(message)}", err=True)


@contextmanager
def progress(total: int | None, description: str) -> Iterator:
    """A rich progress bar on stderr when stderr is a terminal and not -q; else a no-op.
    rich honours NO_COLOR itself."""
    if Settings.quiet or not sys.stderr.isatty():
        yield _NoProgress()
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fakecifar.text import printable

    description = escape(printable(description))  # a name like 'm[/].pt' is not rich markup

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as bar:  # stdout carries data
        task = bar.add_task(description, total=total)
        yield _RichProgress(bar, task)


class _NoProgress:
    def advance(self, n: int = 1) -> None:
        pass


class _RichProgress:
    def __init__(self, bar, task):
        self.bar, self.task = bar, task

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)


def joined(items: Iterable[str], limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def report_gates(checkpoint: Any, model_name: str, data: Any = None, images: Any = None) -> None:
    """For a dynamic student (gated ResNet): log the delivered model's gate pattern, in eval mode
    on one batch of `data` (shards) or on `images` (normalized tensors): what the checkpoint
    holds (best or EMA weights), not the last training state. Nothing for other models."""
    from fakecifar.models import model_spec

    if not model_spec(model_name).gated:
        return
    from fakecifar.checkpoint import load_checkpoint
    from fakecifar.loader import BatchLoader
    from fakecifar.models import gate_report

    model, meta = load_checkpoint(checkpoint)
    if images is None:
        # memory_limit=0: stream, so that only the first chunk is read, not the whole data set
        loader = BatchLoader(data, 256, mean=meta["mean"], std=meta["std"], columns=(), memory_limit=0)
        (images,) = next(iter(loader))
    log(f"gates (execution rate per block, x = mostly executed): {gate_report(model, images)}")
