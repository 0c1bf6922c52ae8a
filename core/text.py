"""Text that reaches the terminal: paths quoted safely, class lists and image sizes written one
way. Standard library only, so every command (and `--help`) can import it for free.

Image sizes are written height x width (HxW), as `--size` takes them: `32x48` is 32 rows of
48 pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import UsageError


def printable(text: object, keep: str = "") -> str:
    """`text` with control and other unprintable characters escaped as repr escapes them
    (`\\x1b`, `\\t`, `\\u200b`, `\\udcff` for an undecodable file-name byte); printable unicode,
    accents and CJK included, is kept, and so are the characters in `keep`. A file name cannot
    then move the cursor, clear the screen or split a one-line message."""
    text = str(text)
    rest = text
    for c in keep:  # str methods run in C: the common, clean line costs next to nothing
        rest = rest.replace(c, "")
    if rest.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def printable_lines(text: object) -> str:
    """`printable`, keeping line breaks: for messages and tables that are multi-line on purpose."""
    return printable(text, keep="\n")


def format_classes(names: Sequence[object], limit: int = 6) -> str:
    """A class list for a message, with its length and any elision marked:
    `['cat', 'dog'] (2 classes)`, `['airplane', 'automobile', 'bird', ..., 'truck'] (10 classes)`."""
    names = [str(n) for n in names]
    shown = [repr(n) for n in names]
    if len(shown) > limit:
        shown = shown[: limit - 2] + ["..."] + shown[-1:]
    count = f"{len(names)} class" + ("" if len(names) == 1 else "es")
    return printable(f"[{', '.join(shown)}] ({count})")


def format_size(size: Sequence[int]) -> str:
    """(height, width) -> 'HxW', e.g. (32, 48) -> '32x48'."""
    height, width = size
    return f"{height}x{width}"


def paths_from_bytes(data: bytes, *, neither: str | None = None) -> list[str]:
    """One path a line from stdin's bytes; blank lines are skipped. Bytes that are not text
    (a NUL, invalid UTF-8) are a UsageError: they are data piped by mistake, not file names.
    `neither` names the other thing stdin may hold (detect: "an image")."""
    try:
        text = data.decode("utf-8")
        if "\0" in text:
            raise ValueError("NUL byte")
    except ValueError:
        what = f"neither {neither} nor a list of paths" if neither else "not a list of paths"
        pipe = f"pipe {neither} or UTF-8 text, one path a line" if neither else "pipe UTF-8 text, one path a line"
        raise UsageError(f"stdin is {what}", f"{pipe}, or give the inputs as arguments") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
