"""Checks on an output location before any work is done, shared by every command that writes.

    from fakecifar.outputs import check_output_path
    check_output_path("runs/model.pt")                  # a file, written as model.pt.partial first
    check_output_path("shards/train", directory=True)   # a directory that files are written into

`os.access` is not a writability test: for root it says yes to /sys and to read-only bind
mounts. So the check creates a probe file in the directory that will hold the output (or, when
that does not exist yet, in its nearest existing ancestor, where it would be created) and
removes it at once. Nothing permanent is created: missing directories stay missing.

Names are checked against the filesystem's limits (NAME_MAX, usually 255 bytes per component;
PATH_MAX, 4096 bytes in all) including the temporary suffix the writer adds (`.partial`), so
that a long name is refused now and not after an hour of work.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from .errors import OutputError, UsageError, write_error

__all__ = ["PARTIAL", "check_output_path", "fsync_dir", "utc_now", "write_atomically"]

PARTIAL = ".partial"  # what atomic writers append while a file is being written
_NAME_MAX = 255
_PATH_MAX = 4096


def check_output_path(
    path: str | os.PathLike[str],
    *,
    directory: bool = False,
    temp_suffix: str = PARTIAL,
    children: Sequence[str] = (),
    option: str = "-o",
    probe: bool = True,
) -> Path:
    """Refuse an output that cannot be written, before any work; returns `path` as a Path.

    `directory=False`: `path` is a file written as `path + temp_suffix` and renamed (pass
    `temp_suffix=""` for a file appended in place, such as a log). `directory=True`: `path` is a
    directory (existing or to be created) that files are written into; `children` are names
    that will be created in it (longest first is enough), checked for length too. `option`
    names the option in hints (`-o`, `--log`, ...). `probe=False` checks the names and the
    kinds of what exists but writes no probe file (e.g. on DDP ranks that do not write).

    Raises UsageError for a name or path too long, OutputError (a UsageError: exit 2) for a
    location that is not writable, not a directory, or is a directory where a file is meant;
    NoSpaceError if not even an empty probe file can be created for lack of space or inodes.
    """
    path = Path(path)
    if not str(path):
        raise UsageError(f"{option}: empty path", f"name the output, e.g. {option} out")
    ancestor = _existing_ancestor(path)
    name_max = _conf(ancestor, "PC_NAME_MAX", _NAME_MAX)
    path_max = _conf(ancestor, "PC_PATH_MAX", _PATH_MAX)
    components = list(path.parts[1:] if path.is_absolute() else path.parts)
    created = [path.name + temp_suffix] if not directory else list(children)
    for name, made in [*((c, False) for c in components), *((c, True) for c in created)]:
        size = len(os.fsencode(name))
        if size > name_max:
            if not made:
                also = ""
            elif directory:
                also = f" for {name} inside it"
            else:
                also = f" with the suffix {temp_suffix}" if temp_suffix else ""
            raise UsageError(
                f"{option} {path}: file name too long ({size} bytes{also}; the limit is {name_max})",
                f"choose a shorter {option} name",
            )
    full = [os.path.join(path, c) for c in created] if directory else [str(path) + temp_suffix]
    longest = max(len(os.fsencode(p)) for p in [str(path), *full])
    if longest >= path_max:
        text = str(path)
        shown = text if len(text) <= 100 else f"{text[:50]}...{text[-40:]}"
        raise UsageError(
            f"{option} {shown}: path too long ({longest} bytes; the limit is {path_max - 1})",
            f"choose a shorter {option} path",
        )

    if _exists(path):
        if directory:
            if not path.is_dir():
                raise OutputError(f"{path} exists and is not a directory", f"give {option} a directory")
            if probe:
                _probe(path, path, option)
        else:
            if path.is_dir():
                raise OutputError(f"{path} is a directory", f"give {option} a file name")
            if probe:
                _probe(path.parent, path, option)
        return path
    # Not there yet: the nearest existing ancestor must be a directory and writable: it is where
    # the missing directories, or the file itself, will be created.
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is not a directory", f"choose another {option}")
    if probe:
        _probe(ancestor, path, option)
    return path


def _exists(path: Path) -> bool:
    """Like Path.exists (a dangling symlink counts), but False for names the OS refuses."""
    try:
        os.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def _existing_ancestor(path: Path) -> Path:
    """`path` if it exists, else its nearest existing ancestor (which may not be a directory)."""
    current = path
    while not _exists(current) and current.parent != current:
        current = current.parent
    return current if _exists(current) else Path(".")


def _conf(where: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(where if where.is_dir() else where.parent, name)
    except (OSError, ValueError):
        return default
    return value if value and value > 0 else default


def _probe(directory: Path, path: Path, option: str) -> None:
    """Create and remove an empty file in `directory`: the only honest test of writability."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fakecifar-probe-", dir=directory)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise write_error(exc, path) from exc
        reason = exc.strerror or str(exc)
        where = "" if directory in (path, path.parent) else f" (creating it in {directory})"
        raise OutputError(
            f"cannot write {path}: {reason}{where}", f"choose a writable {option} or fix its permissions"
        ) from exc
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


# ----------------------------------------------------------------------------- atomic writes


def write_atomically(path: Path, writer: Callable[[IO[bytes]], object]) -> Path:
    """Run `writer(file)` on `path.partial`, fsync, then rename over `path`: never a half file.
    On any failure the partial is removed and `path` (an earlier version) is left as it was; a
    full disk is NoSpaceError, an unwritable place OutputError (see `_write_failure`)."""
    partial = path.with_name(path.name + PARTIAL)
    try:
        with open(partial, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    except (OSError, RuntimeError) as exc:
        error = _write_failure(exc, path, partial)  # before the unlink: it frees the space
        partial.unlink(missing_ok=True)
        if error is None:
            raise
        raise error from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; not every filesystem allows fsync on a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def utc_now() -> str:
    """UTC time to the second, ISO 8601 with a Z: what every file fakecifar writes records."""
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# torch.save reports a failed write as a RuntimeError of its zip writer, not as the OSError.
_TORCH_WRITE_FAILURES = ("unexpected pos", "failed writing file", "file write failed")
_FULL_BYTES = 1 << 20  # this little space left after a failed write means the disk filled up


def _write_failure(exc: BaseException, path: Path, partial: Path) -> BaseException | None:
    """The typed error for a failure while writing `path` (via `partial`), or None for one that
    is not about writing (a bug: re-raised as is).

    torch.save turns whatever its file's write raised into RuntimeError('... unexpected pos
    ...'), keeping the original as its context: Ctrl-C or SIGTERM (errors.Terminated) met
    inside it is raised again as itself; an OSError maps through `errors.write_error` (a
    missing or invalid location is OutputError). A torch write failure with neither is
    NoSpaceError when the partial's filesystem is (nearly) full."""
    import errno

    from .errors import FakecifarError, NoSpaceError, write_error

    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None or isinstance(cause, OSError):
            break
        if not isinstance(cause, Exception):  # KeyboardInterrupt, Terminated
            return cause
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        if cause.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
            return OutputError(
                f"cannot write {path}: {cause.strerror or cause}", "check the directory exists and is writable"
            )
        return write_error(cause, path)
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not any(m in text for m in _TORCH_WRITE_FAILURES):
        return None
    try:
        stats = os.statvfs(partial.parent)
        free = stats.f_bavail * stats.f_frsize
    except OSError:
        free = None
    if free is not None and free < _FULL_BYTES:
        return NoSpaceError(f"no space left on device writing {path}", "free space or choose another -o")
    first = text.splitlines()[0] if text else type(exc).__name__
    return FakecifarError(f"cannot write {path}: {first}", "check the output location (disk, quota, permissions)")
