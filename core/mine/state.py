"""The miner's state lives in its output folder, so that a re-run resumes and several miners
(threads, processes, hosts sharing the folder) can fill one quota without colliding.

Files in DIR:

    *.h5                              finished shards, from any producer. Immutable: a shard
                                      appears by an atomic rename, complete, or not at all.
    mine-<worker>-<run>-NNNNN.h5.partial   a shard being written (never read as a shard)
    .mine.lock                        the folder lock: held for a few milliseconds around every
                                      read-modify-write of the shared quota (flock LOCK_EX)
    .mine-worker-<id>.lock            held (flock LOCK_EX, non-blocking) by the one live miner
                                      with worker id <id> for its whole run. Its content is a
                                      JSON line: pid, host, run id, start time and the miner's
                                      *claims* -- images per class it has reserved for requests
                                      in flight or holds in its unfinished shard.

The quota rule, checked under the folder lock before every request:

    finished[c] + claims of the other live workers[c] + my claims[c] + n  <=  per_class

so concurrent miners never ask for more than the quota. A miner's claims count only while it
holds its worker lock: a killed miner's lock is released by the kernel, its claims vanish,
its half shard (`.partial`) is deleted by the next miner that starts, and the images are
mined again. The per-class counts come from reading the finished shards themselves (labels
and sha256 columns, cached per file name), so they are exact after any crash.

Why this design: nothing to run beside the miners (no server, no database), cron-safe (a
second run with the same worker id exits at once: its lock is held), and exact counts with
any number of workers. It needs working `flock` on the folder: local disks do; NFSv4 on
Linux emulates it with POSIX locks (fine); some older network filesystems ignore it, and
then the quota may overshoot by the images in flight. Exact-duplicate detection across
workers sees the other workers' *finished* shards only.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import FakecifarError, UsageError
from ..manifest import FORMAT as MANIFEST_FORMAT
from ..manifest import MANIFEST, OutputLock, command_line, read_manifest, shard_entry, write_manifest
from ..manifest import VERSION as MANIFEST_VERSION
from ..shards import PARTIAL, SUFFIX, Shard, pixel_sha256, prepare_output_dir, producer, utc_now
from .phash import HashIndex, phashes

FOLDER_LOCK = ".mine.lock"
WORKER_LOCK = ".mine-worker-{}.lock"
WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PARTIAL_NAME = re.compile(
    r"^mine-(?P<worker>.+)-\d{14}-[0-9a-f]{4}(?:-\d+x\d+)?-\d{5,}" + re.escape(SUFFIX + PARTIAL) + "$"
)


class MinerBusyError(FakecifarError):
    """Another miner with the same worker id is running on the folder."""


def check_worker_id(worker: str) -> str:
    if not WORKER_ID.match(worker or ""):
        raise UsageError(
            f"bad --worker {worker!r}", "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return worker


def new_run_id() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


class MineState:
    """Quota, claims, duplicates and locks of one miner on one folder. Thread-safe."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        classes: list[str],
        per_class: int,
        worker: str = "main",
        *,
        phash: bool = False,
    ):
        self.out = Path(out_dir)
        self.classes = list(classes)
        self.per_class = int(per_class)
        self.worker = check_worker_id(worker)
        self.run = new_run_id()
        self.prefix = f"mine-{self.worker}-{self.run}"
        self.want_phash = phash
        self._mutex = threading.RLock()
        self._folder_fd: int | None = None
        self._output_lock: OutputLock | None = None
        self._sizes: dict[str, int] = {}  # shard file name -> images
        self._worker_fd: int | None = None
        self._started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        k = len(self.classes)
        self.finished = np.zeros(k, np.int64)  # images in finished shards (all producers, all workers)
        self.pending = np.zeros(k, np.int64)  # accepted by this miner, in its unfinished shard
        self.reserved = np.zeros(k, np.int64)  # reserved for this miner's requests in flight
        self.others = np.zeros(k, np.int64)  # live claims of the other workers (as of the last sync)
        self.other_workers: list[str] = []
        self._seen: dict[str, np.ndarray] = {}  # shard file name -> its per-class counts
        self.sha: set[bytes] = set()
        self.hashes = HashIndex()
        self.removed_partials: list[Path] = []
        self._next_class = 0

    # ------------------------------------------------------------------ locks

    def open(self) -> MineState:
        """Create DIR, take this worker's lock, clean up dead partials, read the finished shards."""
        # Existing shards are welcome (that is how a run resumes), hence overwrite=True: it only
        # skips the "already holds shards" refusal; this miner never replaces a file.
        prepare_output_dir(self.out, overwrite=True)
        # Shared with the other miners of this folder, exclusive against import/resize/split.
        self._output_lock = OutputLock(self.out, command=command_line(), shared=True).acquire()
        try:
            self._folder_fd = os.open(self.out / FOLDER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._output_lock.release()
            raise UsageError(
                f"cannot create {self.out / FOLDER_LOCK}: {exc.strerror or exc}", "choose a writable -o"
            ) from exc
        try:
            with self._shared():
                self._take_worker_lock()
                self._remove_dead_partials()
                self._scan()
                self._publish()
                self._write_manifest()
        except BaseException:
            self.close()
            raise
        return self

    def _take_worker_lock(self) -> None:
        path = self.out / WORKER_LOCK.format(self.worker)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FakecifarError(f"cannot lock {path}: {exc.strerror or exc}") from exc
            info = _read_json(path)
            who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('started', '?')}"
            raise MinerBusyError(
                f"{self.out} is already being mined by worker {self.worker!r} ({who})",
                "this run exits; cron will retry later. To run several miners on one folder give each "
                "its own --worker ID",
            ) from None
        self._worker_fd = fd

    def close(self) -> None:
        """Drop the claims and release the locks (the lock files stay: unlinking a lock file
        that another process has just opened would let two miners hold 'the' lock)."""
        if self._worker_fd is not None:
            try:
                os.ftruncate(self._worker_fd, 0)
            except OSError:
                pass
            os.close(self._worker_fd)  # closing releases the flock
            self._worker_fd = None
        if self._folder_fd is not None:
            os.close(self._folder_fd)
            self._folder_fd = None
        if self._output_lock is not None:
            self._output_lock.release()
            self._output_lock = None

    def __enter__(self) -> MineState:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _shared(self) -> Iterator[None]:
        with self._mutex:
            if self._folder_fd is None:
                raise FakecifarError("mining state is closed")
            fcntl.flock(self._folder_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._folder_fd, fcntl.LOCK_UN)

    def _worker_alive(self, worker: str) -> tuple[bool, dict]:
        """Probe another worker's lock (under the folder lock, so no miner is starting)."""
        path = self.out / WORKER_LOCK.format(worker)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False, {}
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True, _read_json(path)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False, {}
        finally:
            os.close(fd)

    def _remove_dead_partials(self) -> None:
        for path in sorted(self.out.glob(f"*{SUFFIX}{PARTIAL}")):
            match = PARTIAL_NAME.match(path.name)
            if not match:
                continue  # another tool's partial file: not ours to judge
            owner = match.group("worker")
            if owner == self.worker or not self._worker_alive(owner)[0]:
                try:
                    path.unlink()
                    self.removed_partials.append(path)
                except FileNotFoundError:
                    pass

    # ------------------------------------------------------------------ reading the folder

    def _scan(self) -> None:
        """Count the finished shards not yet seen (and forget vanished ones); read the claims
        of the other live workers."""
        names = {p.name: p for p in self.out.glob(f"*{SUFFIX}") if p.is_file()}
        for name in [n for n in self._seen if n not in names]:
            self.finished -= self._seen.pop(name)  # someone removed a shard: count it no more
            self._sizes.pop(name, None)
        for name in sorted(set(names) - set(self._seen)):
            self._read_shard(names[name])
        others = np.zeros(len(self.classes), np.int64)
        workers = []
        for path in self.out.glob(WORKER_LOCK.format("*")):
            worker = path.name[len(".mine-worker-") : -len(".lock")]
            if worker == self.worker:
                continue
            alive, info = self._worker_alive(worker)
            if not alive:
                continue
            workers.append(worker)
            claims = info.get("claims")
            if not isinstance(claims, dict):
                claims = {}
            for i, name in enumerate(self.classes):
                value = claims.get(name, 0)
                if isinstance(value, int) and value > 0:
                    others[i] += value
        self.others = others
        self.other_workers = sorted(workers)

    def _read_shard(self, path: Path) -> np.ndarray:
        shard = Shard(path)  # validates; a damaged or foreign .h5 is refused naming its path
        try:
            if shard.classes != self.classes:
                raise UsageError(
                    f"{path}: holds shards of classes {_short(shard.classes)}, this run mines {_short(self.classes)}",
                    "mine into another -o, or pass the --classes the folder was mined with",
                )
            labels = shard.read("labels").astype(np.int64)
            ok = (labels >= 0) & (labels < len(self.classes))
            counts = np.bincount(labels[ok], minlength=len(self.classes)).astype(np.int64)
            if "sha256" in shard.columns:
                digests = shard.read("sha256")
            else:
                digests = np.concatenate(
                    [
                        pixel_sha256(shard.read("images", s, min(s + 1024, len(shard))))
                        for s in range(0, len(shard), 1024)
                    ]
                    or [np.empty(0, "S32")]
                )
            self.sha.update(digest32(d) for d in digests)
            if self.want_phash:
                if "phash" in shard.columns:
                    self.hashes.add_many(shard.read("phash"))
                else:
                    for s in range(0, len(shard), 1024):
                        self.hashes.add_many(phashes(shard.read("images", s, min(s + 1024, len(shard)))))
        finally:
            shard.close()
        self._seen[path.name] = counts
        self._sizes[path.name] = len(shard)
        self.finished += counts
        return counts

    # ------------------------------------------------------------------ quota

    def _publish(self) -> None:
        if self._worker_fd is None:
            return
        claims = {name: int(n) for name, n in zip(self.classes, self.pending + self.reserved) if n > 0}
        line = (
            json.dumps(
                {
                    "worker": self.worker,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "run": self.run,
                    "started": self._started,
                    "claims": claims,
                }
            )
            + "\n"
        )
        os.ftruncate(self._worker_fd, 0)
        os.pwrite(self._worker_fd, line.encode(), 0)

    def remaining(self) -> np.ndarray:
        """Images per class still free for this miner to reserve."""
        with self._mutex:
            taken = self.finished + self.others + self.pending + self.reserved
            return np.maximum(0, self.per_class - taken)

    def missing(self) -> np.ndarray:
        """Images per class not yet in finished shards or in this miner's open shard."""
        with self._mutex:
            return np.maximum(0, self.per_class - self.finished - self.pending)

    def sync(self) -> None:
        with self._shared():
            self._scan()

    def reserve(self, want: int) -> tuple[int, int] | None:
        """Reserve up to `want` images of the class that needs most (round-robin on ties).
        Returns (label, n) or None when no class has room."""
        with self._shared():
            self._scan()
            free = self.remaining()
            if not free.any():
                return None
            k = len(self.classes)
            order = [(self._next_class + i) % k for i in range(k)]
            label = max(order, key=lambda c: free[c])  # first maximum in round-robin order
            self._next_class = (label + 1) % k
            n = int(min(want, free[label]))
            self.reserved[label] += n
            self._publish()
            return label, n

    def extend(self, label: int) -> bool:
        """One more image of `label` came back than was reserved: reserve it if there is room."""
        with self._shared():
            if self.remaining()[label] <= 0:
                self._scan()
                if self.remaining()[label] <= 0:
                    return False
            self.reserved[label] += 1
            self._publish()
            return True

    def settle(self, label: int, reserved: int, accepted: int) -> None:
        """A request is over: `accepted` of its `reserved` images go to the open shard."""
        with self._shared():
            self.reserved[label] -= reserved
            self.pending[label] += accepted
            self._publish()

    def shard_finished(self, path: Path) -> None:
        """This miner renamed a finished shard into place: its images move from pending to
        finished (in that order: a reader in between over-counts, never under-counts)."""
        with self._shared():
            counts = self._seen.get(path.name)
            if counts is None:
                counts = self._read_shard(path)
            self.pending -= counts
            np.maximum(self.pending, 0, out=self.pending)
            self._publish()
            self._write_manifest()

    def _write_manifest(self) -> None:
        """The folder's manifest lists every finished shard (any worker's), rewritten under the
        folder lock after each one: a mined folder is a complete dataset at every moment; it
        just grows. `quota_met` says whether mining is done."""
        now = utc_now()
        old = read_manifest(self.out) if (self.out / MANIFEST).exists() else None
        entries = []
        for name in sorted(self._seen):
            try:
                entries.append(shard_entry(self.out / name, self._sizes[name]))
            except OSError:
                continue  # removed meanwhile; the next scan forgets it
        sizes = [s for s in (self._image_size(e["name"]) for e in entries[:1]) if s]
        write_manifest(
            self.out,
            {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "complete": True,
                "growing": True,
                "producer": producer("mine"),
                "command": command_line(),
                "params": {"classes": self.classes, "per_class": self.per_class},
                "created": (old or {}).get("created", now),
                "updated": now,
                "classes": self.classes,
                "image_size": list(sizes[0]) if sizes else None,
                "images": sum(e["images"] for e in entries),
                "quota_met": bool((self.finished >= self.per_class).all()),
                "shards": entries,
                "resume": {},
            },
        )

    def _image_size(self, name: str) -> tuple[int, int] | None:
        try:
            return Shard(self.out / name).image_size
        except FakecifarError:
            return None

    # ------------------------------------------------------------------ duplicates

    def is_duplicate(self, sha: bytes) -> bool:
        with self._mutex:
            return sha in self.sha

    def is_near(self, value: int, distance: int) -> bool:
        with self._mutex:
            return self.hashes.near(value, distance)

    def remember(self, sha: bytes, value: int | None) -> None:
        with self._mutex:
            self.sha.add(sha)
            if value is not None and self.want_phash:
                self.hashes.add(value)

    def counts(self) -> dict[str, int]:
        with self._mutex:
            return {name: int(n) for name, n in zip(self.classes, self.finished)}


def digest32(value) -> bytes:
    """A sha256 from an S32 column as its 32 bytes (numpy strips trailing NUL bytes)."""
    return bytes(value).ljust(32, b"\0")


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text().strip()
        data = json.loads(text) if text else {}
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _short(classes: list) -> str:
    from ..text import format_classes  # the one way messages list classes

    return format_classes(classes)
