"""The `fakecifar` command: registers one thin module per command and maps every error to an
exit code in one place (`main`). Only typer is imported here: `fakecifar --help` stays instant."""

from __future__ import annotations

import os
import re
import sys
import threading
import traceback

import typer
import typer.core
from typer import Abort, Exit

# typer vendors click as typer._click since 0.26 (the floor in pyproject.toml); its usage errors
# have no public name.
from typer._click import exceptions as click_exceptions

from fakecifar import __version__

from . import confusion, detect, distill, dropout, eval, extract, import_, mine, resize, serve, split, stats, train
from .common import Settings

app = typer.Typer(
    name="fakecifar",
    help="Composable tools for synthetic-image and model-extraction research on small images.\n\n"
    "Commands read and write HDF5 shards; producers print the paths they write, one a line, "
    "so commands chain in pipes: fakecifar import SRC -o raw | fakecifar resize --size 16 -o small "
    "| fakecifar stats",
    no_args_is_help=True,
    add_completion=True,
    # Plain (click) help, not rich panels: rich shows flags as `--tta <bool>` and cuts long option
    # names (`--wd,--weight-dec…`) to fit 80 columns; the plain layout shows `--tta`,
    # `--nesterov / --no-nesterov` and wraps only the descriptions. `_Command` keeps the panels.
    rich_markup_mode=None,
    # Off: a crash would otherwise print local variables (API keys included).
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

COMMANDS = {  # in the order of a study: get data, prepare it, train, evaluate, detect
    "mine": mine,
    "import": import_,
    "resize": resize,
    "stats": stats,
    "split": split,
    "train": train,
    "distill": distill,
    "extract": extract,
    "eval": eval,
    "confusion": confusion,
    "dropout": dropout,
    "serve": serve,
    "detect": detect,
}


class _Command(typer.core.TyperCommand):
    """Plain help with the options grouped under their `rich_help_panel` titles (mine's "Pacing
    and limits", ...), as the rich layout grouped them."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"Arguments": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                title = (
                    "Arguments"
                    if param.param_type_name == "argument"
                    else getattr(param, "rich_help_panel", None) or "Options"
                )
                sections.setdefault(title, []).append(record)
        sections["Options"] = sections.pop("Options", [])  # the ungrouped ones (--help) last
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _summary(doc: str | None) -> str:
    """A command's first sentence: the root help lists it whole, not cut to fit a column."""
    return " ".join(re.split(r"\.\s", (doc or "").strip(), maxsplit=1)[0].split()).rstrip(".")


for _name, _module in COMMANDS.items():
    app.command(
        name=_name, help=_module.__doc__, short_help=_summary(_module.__doc__), no_args_is_help=False, cls=_Command
    )(_module.run)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fakecifar {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and warnings on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also FAKECIFAR_DEBUG=1)."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    Settings.quiet = quiet
    Settings.debug = Settings.debug or debug


GLOBAL_FLAGS = ("-q", "--quiet", "--debug")


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """Accept -q/--quiet/--debug after the command too (`fakecifar import ... -q`), as users
    type them: move them before the command, where the root callback reads them."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]


def _command_name(argv: list[str]) -> str:
    for arg in argv:
        if arg in COMMANDS:
            return f"fakecifar {arg}"
    return "fakecifar"


def _error(prog: str, message: str) -> None:
    """The one error line. Unprintable characters (a file name's control bytes, a newline in a
    library's message) are escaped, so the line stays one line and cannot drive the terminal."""
    from fakecifar.text import printable

    sys.stderr.write(f"{prog}: error: {printable(message)}\n")
    sys.stderr.flush()


def _on_sigterm(signum, frame) -> None:
    from fakecifar.errors import Terminated

    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every exit code is decided here: 0 ok, 1 runtime failure, 2 bad usage/input,
    130 Ctrl-C, 143 SIGTERM."""
    import signal

    from fakecifar.errors import FakecifarError, Terminated

    # SIGTERM (timeout, Slurm, docker stop) unwinds like Ctrl-C: writers discard their partial
    # files on the way out. Commands that save state on a signal (train) install their own.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None

    argv = _hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    if "--debug" in argv:
        Settings.debug = True
    prog = _command_name(argv)
    from fakecifar.manifest import set_command_line

    set_command_line(argv)  # producers record it in their manifest
    command = typer.main.get_command(app)
    code = 0
    try:
        # Without standalone mode click returns a command's typer.Exit code instead of raising it.
        result = command.main(args=argv, prog_name="fakecifar", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except Exit as exc:
        code = exc.exit_code
    except click_exceptions.NoArgsIsHelpError as exc:
        if exc.ctx:
            typer.echo(exc.ctx.get_help(), err=False)
        code = 0
    except click_exceptions.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else prog
        _error(where, f"{exc.format_message()} (see `{where} --help`)")
        code = 2
    except click_exceptions.ClickException as exc:
        _error(prog, exc.format_message())
        code = exc.exit_code
    except FakecifarError as exc:
        if Settings.debug:
            traceback.print_exc()
        _error(prog, str(exc))
        code = exc.exit_code
    except (KeyboardInterrupt, Abort):
        _error(prog, "interrupted")
        code = 130
    except Terminated:
        _error(prog, "terminated (SIGTERM)")
        code = Terminated.exit_code
    except BrokenPipeError:
        # The reader downstream went away (`| head`): stop quietly, as Unix tools do.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        code = 1
    except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are turned into a line
        if Settings.debug:
            traceback.print_exc()
            code = 1
        else:
            _error(
                prog,
                f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)",
            )
            code = 1
    if in_main_thread:  # in-process callers (tests, scripts) get their own handler back
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    sys.exit(code)
