"""Typed errors raised by the library. The CLI maps them to exit codes in one place.

`UsageError` and its subclasses mean the user's input is wrong (exit 2); everything else
derived from `FakecifarError` is a runtime failure (exit 1).
"""


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
