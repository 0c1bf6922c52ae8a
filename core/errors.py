"""Typed errors raised by the library. The CLI maps them to exit codes in one place.

`UsageError` and its subclasses mean the user's input is wrong (exit 2); everything else
derived from `FakecifarError` is a runtime failure (exit 1).
"""

from __future__ import annotations

import os


class FakecifarError(Exception):
    """Base of every error the library raises on purpose. `hint` says what to do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(FakecifarError):
    """Bad arguments or bad input data: the user must change something (exit 2)."""

    exit_code = 2


class BadShardError(UsageError):
    """A file that should be a shard is not one (truncated, not HDF5, wrong format)."""


class IncompatibleShardsError(UsageError):
    """Shards given together disagree on classes or image size."""


class OutputExistsError(UsageError):
    """An output would overwrite existing data without --overwrite."""


class BadImageError(UsageError):
    """An image file cannot be decoded, is too large, or has the wrong size."""


class BadCheckpointError(UsageError):
    """A checkpoint cannot be loaded safely or does not match the data."""


class OutputError(UsageError):
    """The output location cannot be written (permissions, not a directory, disk full)."""


class NoSpaceError(FakecifarError):
    """The disk (or quota) filled up while writing (exit 1: nothing is wrong with the input)."""


class Terminated(BaseException):
    """SIGTERM (from `timeout`, Slurm, `docker stop`): unwinds like Ctrl-C, so writers discard
    their `.partial` files; the CLI exits 143 (128 + SIGTERM)."""

    exit_code = 143


def write_error(exc: OSError, path: str | os.PathLike) -> FakecifarError:
    """The typed error for an OSError met while writing `path`: a full disk or quota is
    NoSpaceError (exit 1); a read-only or forbidden location is OutputError (exit 2); anything
    else is a runtime failure naming the file."""
    import errno

    code = getattr(exc, "errno", None)
    if code is None and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]
    text = str(exc).lower()
    if code in (errno.ENOSPC, errno.EDQUOT) or "no space left" in text or "disk quota" in text:
        return NoSpaceError(f"no space left on device writing {path}", "free space or choose another -o")
    if (
        code in (errno.EROFS, errno.EACCES, errno.EPERM)
        or "read-only file system" in text
        or "permission denied" in text
    ):
        return OutputError(
            f"cannot write {path}: {exc.strerror or 'permission denied'}", "choose a writable -o or fix its permissions"
        )
    return FakecifarError(f"cannot write {path}: {exc.strerror or exc}", "check the output location")
