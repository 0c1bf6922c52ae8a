"""A dataset directory knows whether it is complete: `manifest.json`, one writer at a time.

A shard is atomic by itself (it appears complete under its name or not at all), but a
*directory* of shards is a dataset only when every shard its producer meant to write is
there. Each producer keeps `DIR/manifest.json`:

    {"format": "fakecifar-manifest", "version": 1, "complete": true,
     "producer": "fakecifar import 0.1.0", "command": "fakecifar import raw.tar.gz -o DIR",
     "params": {...the arguments that decide the output...},
     "created": "...", "updated": "...", "classes": [...], "image_size": [32, 32],
     "images": 30000, "shards": [{"name": "shard-00000.h5", "images": 10000, "bytes": 30757120}, ...],
     "resume": {...producer-specific cursor...}}

It is rewritten atomically after every finished shard (`complete: false`) and once more as
the producer's last act (`complete: true`). Readers (`open_shards`) refuse a directory whose
manifest is missing, incomplete, or disagrees with the files (a listed shard missing or of
another size, an unlisted shard present) unless told `allow_incomplete`. A re-run of the
same command with the same `params` resumes from the manifest; other arguments are refused.

`DIR/.fakecifar.lock` is held (flock) by the producer writing DIR: exclusively by import,
resize and split, shared by `mine` workers (which coordinate among themselves); so a second
producer on the same -o exits at once naming the holder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import FakecifarError, OutputError, OutputExistsError, UsageError, write_error
from .outputs import PARTIAL, utc_now

MANIFEST = "manifest.json"
LOCK = ".fakecifar.lock"
FORMAT = "fakecifar-manifest"
VERSION = 1
SUFFIX = ".h5"
ALLOW_HINT = "pass --allow-incomplete to read it anyway"


class IncompleteDatasetError(UsageError):
    """A directory of shards is not known to be a complete dataset."""


class OutputBusyError(FakecifarError):
    """Another producer holds the output directory's lock (exit 1: wait, or use another -o)."""


_command: list[str] | None = None


def set_command_line(argv: list[str]) -> None:
    """The CLI says what was typed (without the program name); library use falls back to sys.argv."""
    global _command
    _command = list(argv)


def command_line() -> str:
    """The command as the user typed it (for the manifest and lock: humans read them)."""
    import shlex

    args = _command if _command is not None else sys.argv[1:]
    return " ".join(["fakecifar", *(shlex.quote(a) for a in args)])


# --------------------------------------------------------------------------- reading


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a directory, or None if it has none. A damaged one is an error."""
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IncompleteDatasetError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IncompleteDatasetError(f"{path}: damaged manifest ({exc.msg})", ALLOW_HINT) from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("shards"), list)
    ):
        raise IncompleteDatasetError(f"{path}: not a fakecifar manifest", ALLOW_HINT)
    return manifest


def manifest_problem(directory: Path, manifest: dict | None, shards: Iterable[Path]) -> str | None:
    """Why the directory is not a complete dataset (one line), or None if it is."""
    if manifest is None:
        return (
            f"{directory}: no {MANIFEST}, so nothing says the dataset is complete (an interrupted or older producer?)"
        )
    listed = {e["name"]: e for e in manifest["shards"] if isinstance(e, dict) and "name" in e}
    present = {p.name: p for p in shards}
    for name, entry in listed.items():
        if name not in present:
            return f"{directory}: {name} is listed in {MANIFEST} but missing"
        size = _size(present[name])
        if entry.get("bytes") is not None and size != entry["bytes"]:
            return f"{directory}: {name} has {size} bytes, {MANIFEST} says {entry['bytes']} (changed since written)"
    extra = sorted(set(present) - set(listed))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        return f"{directory}: {extra[0]}{more} not listed in {MANIFEST}"
    if not manifest.get("complete"):
        done = sum(int(e.get("images", 0)) for e in listed.values())
        return (
            f"{directory}: incomplete: `{manifest.get('command', manifest.get('producer', '?'))}` "
            f"stopped after {len(listed)} shard(s) ({done} images)"
        )
    return None


def check_dataset_dir(directory: str | os.PathLike, shards: Iterable[Path], *, allow_incomplete: bool = False) -> None:
    """Refuse a directory that is not a complete dataset (unless `allow_incomplete`)."""
    if allow_incomplete:
        return
    directory = Path(directory)
    problem = manifest_problem(directory, read_manifest(directory), shards)
    if problem:
        manifest = read_manifest(directory)
        hint = ALLOW_HINT
        if manifest is not None and not manifest.get("complete") and manifest.get("command"):  # resumable
            hint = f"rerun `{manifest['command']}` to finish it, or {ALLOW_HINT}"
        raise IncompleteDatasetError(problem, hint)


def check_listed_shard(path: Path, *, allow_incomplete: bool = False) -> None:
    """A shard named on its own is atomic; but if its directory has a manifest, it must list it
    (with the same size): otherwise the file was changed or added behind the producer's back."""
    if allow_incomplete:
        return
    manifest = read_manifest(path.parent)
    if manifest is None:
        return
    entry = next((e for e in manifest["shards"] if isinstance(e, dict) and e.get("name") == path.name), None)
    if entry is None:
        raise IncompleteDatasetError(f"{path}: not listed in {path.parent / MANIFEST}", ALLOW_HINT)
    if entry.get("bytes") is not None and _size(path) != entry["bytes"]:
        raise IncompleteDatasetError(
            f"{path}: {_size(path)} bytes, {MANIFEST} says {entry['bytes']} (changed since written)", ALLOW_HINT
        )


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


# --------------------------------------------------------------------------- writing


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write DIR/manifest.json atomically (partial, fsync, rename, fsync the directory)."""
    from .outputs import write_atomically

    data = (json.dumps(manifest, indent=1) + "\n").encode()
    return write_atomically(Path(directory) / MANIFEST, lambda fh: fh.write(data))


def shard_entry(path: Path, images: int) -> dict:
    return {"name": path.name, "images": int(images), "bytes": path.stat().st_size}


def describe_directory(
    directory: str | os.PathLike, *, command: str | None = None, producer: str = "fakecifar"
) -> Path:
    """Write a complete manifest for the shards a directory holds now: to adopt shards written
    by other tools (or by `ShardWriter` directly) as one dataset."""
    from .shards import Shard

    directory = Path(directory)
    shards = [Shard(p) for p in sorted(directory.glob(f"*{SUFFIX}"))]
    now = utc_now()
    first = shards[0] if shards else None
    return write_manifest(
        directory,
        {
            "format": FORMAT,
            "version": VERSION,
            "complete": True,
            "producer": producer,
            "command": command or "described",
            "params": {},
            "created": now,
            "updated": now,
            "classes": first.classes if first else [],
            "image_size": list(first.image_size) if first else None,
            "images": sum(len(s) for s in shards),
            "shards": [shard_entry(s.path, len(s)) for s in shards],
        },
    )


class OutputLock:
    """flock on DIR/.fakecifar.lock for the life of a producer. Exclusive for import, resize and
    split; shared for mine workers. The kernel releases it when the process dies (kill -9
    included), so a stale lock never blocks a re-run."""

    def __init__(self, directory: str | os.PathLike, *, command: str, shared: bool = False):
        self.path = Path(directory) / LOCK
        self.command, self.shared = command, shared
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        # Held through a read-only descriptor: a lock must not keep the filesystem busy for
        # writing (it would block a remount); the holder's label is written through another.
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(exc, self.path) from exc
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputBusyError(
                    f"{self.path.parent} is being written by {holder} (lock {self.path})",
                    "wait for it to finish, or choose another -o",
                ) from None
            raise write_error(exc, self.path) from exc
        if not self.shared:  # a shared lock has several holders: the file names none of them
            info = json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": utc_now()}
            )
            try:
                self.path.write_text(info + "\n")
            except OSError:
                pass  # the lock holds without its label
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (fakecifar mine workers share it)"
    return (
        f"pid {info['pid']} on {info.get('host', '?')} (`{info.get('command', '?')}`, since {info.get('since', '?')})"
    )


class DatasetOutput:
    """The producer's side of an output directory: lock, resume-or-refuse, manifest updates.

    out = DatasetOutput(dir, command="import", params={...}, overwrite=False).open()
    out.finished      # shards already written by an interrupted run with the same params
    out.add(path, n, resume={...})   # after each finished shard (before announcing it)
    out.finish(classes=..., image_size=...)   # the last act: complete
    out.close()       # always (releases the lock); an unfinished run keeps its manifest
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        command: str,
        params: Mapping[str, Any],
        overwrite: bool = False,
        producer: str | None = None,
    ):
        self.directory = Path(directory)
        self.command = command
        self.params = json.loads(json.dumps(dict(params), default=str))  # what JSON will give back
        self.overwrite = overwrite
        self.producer = producer or f"fakecifar {command}"
        self.line = command_line()
        self.finished: list[dict] = []
        self.resume_state: dict = {}
        self.already_complete = False
        self._created_dir = False
        self._lock: OutputLock | None = None
        self._manifest: dict = {}

    # ---- opening: everything that can be refused is refused here, before any work
    def open(self) -> DatasetOutput:
        from .outputs import check_output_path

        out = self.directory
        check_output_path(out, directory=True)  # first: a too-long name makes even exists() fail
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out} exists and is not a directory", "give -o a directory")
        if not out.exists():
            try:
                out.mkdir(parents=True)
                self._created_dir = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise write_error(exc, out) from exc
        self._lock = OutputLock(out, command=self.line).acquire()
        try:
            self._inspect()
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def _inspect(self) -> None:
        out = self.directory
        shards = sorted(out.glob(f"*{SUFFIX}"))
        manifest = read_manifest(out) if (out / MANIFEST).exists() else None
        now = utc_now()
        base = {
            "format": FORMAT,
            "version": VERSION,
            "complete": False,
            "producer": self.producer,
            "command": self.line,
            "params": self.params,
            "created": now,
            "updated": now,
            "classes": None,
            "image_size": None,
            "images": 0,
            "shards": [],
            "resume": {},
        }
        if self.overwrite or (not shards and manifest is None):
            self._manifest = base
            return
        same = (
            manifest is not None
            and manifest.get("params") == self.params
            and manifest.get("producer", "").split(" ")[:2] == self.producer.split(" ")[:2]
        )
        if same and manifest is not None and manifest_problem(out, {**manifest, "complete": True}, shards) is None:
            self._manifest = {**base, **manifest, "command": self.line}
            self.finished = list(manifest["shards"])
            self.resume_state = dict(manifest.get("resume") or {})
            self.already_complete = bool(manifest.get("complete"))
            for stale in out.glob(f"*{SUFFIX}{PARTIAL}"):  # left by a killed run; we hold the lock
                stale.unlink(missing_ok=True)
            return
        if manifest is None:
            raise OutputExistsError(
                f"{out} already holds {len(shards)} shard(s) and no {MANIFEST}",
                "pass --overwrite to replace them, or choose another -o",
            )
        if not same:
            if manifest.get("complete"):
                raise OutputExistsError(
                    f"{out} holds the complete output of `{manifest.get('command', '?')}`, run with other arguments",
                    "pass --overwrite to replace it, or choose another -o",
                )
            raise OutputExistsError(
                f"{out} holds an interrupted run of `{manifest.get('command', '?')}` with other arguments",
                "rerun that command to resume it, pass --overwrite to replace it, or choose another -o",
            )
        problem = manifest_problem(out, {**manifest, "complete": True}, shards)
        raise OutputExistsError(f"cannot resume: {problem}", "pass --overwrite to start again, or choose another -o")

    @property
    def meta(self) -> dict:
        """The manifest as it stands (classes, image_size, ...)."""
        return self._manifest

    @property
    def finished_paths(self) -> list[Path]:
        return [self.directory / e["name"] for e in self.finished]

    @property
    def finished_images(self) -> int:
        return sum(int(e["images"]) for e in self.finished)

    def add(self, path: Path, images: int, *, resume: Mapping[str, Any] | None = None) -> None:
        """Record a finished shard (call before announcing it downstream)."""
        self.finished.append(shard_entry(Path(path), images))
        if resume is not None:
            self.resume_state = dict(resume)
        self._write(complete=False)

    def finish(
        self,
        *,
        classes: list[str] | None = None,
        image_size: tuple[int, int] | None = None,
        resume: Mapping[str, Any] | None = None,
    ) -> Path:
        """The producer's last act: the manifest says complete."""
        if self.overwrite:
            from .shards import remove_stale_shards

            remove_stale_shards(self.directory, self.finished_paths)
        if resume is not None:
            self.resume_state = dict(resume)
        self._manifest.update(
            classes=classes if classes is not None else self._manifest.get("classes"),
            image_size=list(image_size) if image_size else self._manifest.get("image_size"),
        )
        path = self._write(complete=True)
        self.already_complete = True
        return path

    def set_meta(self, *, classes: list[str] | None = None, image_size: tuple[int, int] | None = None) -> None:
        if classes is not None:
            self._manifest["classes"] = list(classes)
        if image_size is not None:
            self._manifest["image_size"] = [int(image_size[0]), int(image_size[1])]

    def _write(self, *, complete: bool) -> Path:
        self._manifest.update(
            complete=complete,
            updated=utc_now(),
            shards=self.finished,
            images=self.finished_images,
            resume=self.resume_state,
        )
        return write_manifest(self.directory, self._manifest)

    def close(self, *, failed: bool = False) -> None:
        """Release the lock. A run that failed before writing anything leaves no trace of itself
        in a directory it created."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if failed and self._created_dir and not self.finished:
            for name in (LOCK, MANIFEST):
                (self.directory / name).unlink(missing_ok=True)
            try:
                self.directory.rmdir()
            except OSError:
                pass

    def __enter__(self) -> DatasetOutput:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
