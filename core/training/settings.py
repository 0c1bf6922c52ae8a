"""The settings registry: every knob of a training command defined once, in one place.

A setting is a dataclass field whose metadata says how the command line shows it:

    @dataclass
    class TrainConfig:
        epochs: int = setting(30, "--epochs", "-e", help="Epochs. Default: 30.",
                              check=(lambda v: v >= 1, "--epochs must be at least 1, got {v}"))

`settings_of(TrainConfig)` lists them (field order) as `Setting`s: name, flags, help, default,
the command-line type, an optional `parse` (text -> value) and `normalize` (value -> canonical
value, may raise UsageError), and `check` (a predicate and the error it raises). Options that are
not part of the stored configuration (`-o`, `--resume`, ...) are plain `Setting` tables
(fakecifar.training.config.RUN_SETTINGS). The CLI derives its options from these
(`fakecifar.cli.common.with_settings`), so `train` and `distill` share one definition of each.

Nothing here imports torch or typer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError

Check = tuple[Callable[[Any], bool], str]  # (is the value valid?, error with {v} for the value)


@dataclass(frozen=True)
class Setting:
    name: str  # the config field, or the keyword of the library call
    flags: tuple[str, ...]  # "--epochs", "-e"; a switch: "--tta/--no-tta"
    help: str
    default: Any = None  # the library's default
    type: Any = str  # the type on the command line (int, float, str, bool, Path, list[str])
    cli_default: Any = None  # what the command passes when the option is absent (None: not given)
    check: Check | None = None
    parse: Callable[[str], Any] | None = None  # command-line text -> value
    normalize: Callable[[Any], Any] | None = None  # value -> canonical value (may raise UsageError)
    panel: str | None = None  # the section of --help
    show_default: bool = True

    def error(self, value: Any) -> str | None:
        """The error message for `value`, or None if it is valid."""
        if self.check is None or self.check[0](value):
            return None
        return self.check[1].format(v=value)


def setting(
    default: Any = None,
    *flags: str,
    help: str,
    default_factory: Callable[[], Any] | None = None,
    **options: Any,
) -> Any:
    """A dataclass field that is also a command-line setting (see the module docstring)."""
    meta = {"setting": dict(flags=flags, help=help, **options)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def settings_of(cls: type, exclude: Iterable[str] = ()) -> tuple[Setting, ...]:
    """The settings of a config dataclass, in field order (fields without metadata are skipped)."""
    skip = set(exclude)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("setting")
        if spec is None or f.name in skip:
            continue
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        spec = dict(spec)
        spec.setdefault("type", str if spec.get("parse") else _plain_type(hints[f.name]))
        out.append(Setting(name=f.name, default=default, **spec))
    return tuple(out)


def _plain_type(hint: Any) -> Any:
    """`int | None` -> int: what the command line parses."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def check_values(settings: Sequence[Setting], values: Mapping[str, Any]) -> None:
    """Raise UsageError for the first value (in `settings` order) its setting refuses."""
    for s in settings:
        if s.name in values:
            message = s.error(values[s.name])
            if message:
                raise UsageError(message)


def from_command_line(settings: Sequence[Setting], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values of `settings` as the command line gave them (None: not given), parsed."""
    out = {}
    for s in settings:
        value = values.get(s.name)
        out[s.name] = s.parse(value) if s.parse is not None and value is not None else value
    return out


def parse_numbers(option: str, example: str) -> Callable[[str], list[float]]:
    """A parser of comma-separated numbers ('0.5,0.75') for `option`."""

    def parse(text: str) -> list[float]:
        try:
            return [float(m) for m in text.split(",") if m.strip()]
        except ValueError as exc:
            raise UsageError(f"{option} {text!r} is not a list of numbers", f"e.g. {example}") from exc

    return parse
