"""HDF5 shards: the one on-disk format every fakecifar command reads and writes.

One file is one shard. `images` is uint8 [N, H, W, 3]; `labels` int16 [N] (-1 = unlabeled);
optional per-image columns (`logits`, `origin`, `sha256`, `prompt`, `source`, `seed`,
`influence`, or any other) share the first axis. See docs/ARCHITECTURE.md for the why.

    from fakecifar.shards import open_shards
    data = open_shards(["raw/"])            # files, directories or globs
    for start, batch in data.iter_chunks(("images", "labels")):
        ...

Writers never leave a half-written file under a real name: they write `NAME.partial`,
flush, fsync and rename. Readers open files lazily and reopen after a fork, so a `Shard` can
be handed to DataLoader workers (fork or spawn).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__
from .errors import BadShardError, IncompatibleShardsError, OutputError, OutputExistsError, UsageError, write_error
from .manifest import DatasetOutput, check_dataset_dir, check_listed_shard, read_manifest
from .outputs import PARTIAL, fsync_dir, utc_now
from .text import format_classes

FORMAT = "fakecifar-shard"
VERSION = 1
SUFFIX = ".h5"
UNLABELED = -1
ORIGIN_REAL, ORIGIN_FAKE = 0, 1
ORIGIN_NAMES = ("real", "fake")

# Per-image columns with a fixed dtype; any other column keeps the dtype it is given.
COLUMN_DTYPES: dict[str, np.dtype] = {
    "labels": np.dtype(np.int16),
    "logits": np.dtype(np.float32),
    "origin": np.dtype(np.uint8),
    "sha256": np.dtype("S32"),
    "prompt": h5py.string_dtype(),
    "source": h5py.string_dtype(),
    "seed": np.dtype(np.int64),
    "influence": np.dtype(np.float32),
}

# ~1 MiB of pixels per chunk: 256 CIFAR images, 5 images of 256 px. Whole-chunk reads are what
# make shards fast; bigger chunks than h5py's 1 MiB cache would be re-read per slice.
CHUNK_BYTES = 1 << 20
MAX_CHUNK_IMAGES = 256
# Rows per read when streaming a dataset: whole chunks, about 8 MiB of pixels.
READ_BYTES = 8 << 20


def chunk_images(height: int, width: int) -> int:
    """Images per HDF5 chunk for this image size."""
    return int(min(MAX_CHUNK_IMAGES, max(1, CHUNK_BYTES // (height * width * 3))))


def pixel_sha256(images: np.ndarray) -> np.ndarray:
    """sha256 of each image's pixels (uint8 HxWx3, C order) as S32: the exact-duplicate key."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return np.array([hashlib.sha256(img.tobytes()).digest() for img in images], dtype="S32")


def row_sha256(data: ShardSet) -> np.ndarray:
    """pixel_sha256 of every row of `data` (S32 [N]), computed from the pixels (not trusting a
    `sha256` column): what ties scores and training records to the rows they were made on."""
    parts = [pixel_sha256(chunk["images"]) for _, chunk in data.iter_chunks(("images",))]
    return np.concatenate(parts) if parts else np.zeros(0, "S32")


# --------------------------------------------------------------------------- writing


class _AtomicOutput:
    """`with` finishes the output on success and discards it on any exception."""

    def close(self):
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardWriter(_AtomicOutput):
    """Write one shard atomically. Use as a context manager; an exception discards the file.

    Columns are fixed by the first `add_batch` call: every later call gives the same names.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        classes: Sequence[str],
        image_size: tuple[int, int],
        producer: str,
        provenance: list | dict | None = None,
        attrs: dict | None = None,
        overwrite: bool = False,
        compression: str | None = None,
    ):
        self.path = Path(path)
        if self.path.suffix != SUFFIX:
            raise UsageError(f"{self.path}: shard names end in {SUFFIX}")
        if self.path.exists() and not overwrite:
            raise OutputExistsError(f"{self.path} already exists", "pass --overwrite to replace it")
        self.partial = self.path.with_name(self.path.name + PARTIAL)
        self.classes = list(classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.overwrite = overwrite
        self.compression = compression
        self._chunk = chunk_images(*self.image_size)
        self._attrs = {
            "format": FORMAT,
            "version": VERSION,
            "classes": json.dumps(self.classes),
            "created": utc_now(),
            "producer": producer,
            "provenance": json.dumps(provenance if provenance is not None else []),
            **(attrs or {}),
        }
        self._file: h5py.File | None = None
        self._raw: _GuardedFile | None = None
        self._columns: tuple[str, ...] | None = None
        self.count = 0
        self.closed = False

    # The file is created on the first write so an unused writer leaves nothing behind.
    def _open(self) -> h5py.File:
        if self._file is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._raw = _GuardedFile(self.partial)
                self._file = h5py.File(self._raw, "w", libver="latest")
            except OSError as exc:
                self._discard()
                raise write_error(exc, self.partial) from exc
        return self._file

    def _check_writes(self) -> None:
        """Raise the first write error the guarded file absorbed (the shard is discarded)."""
        if self._raw is not None and self._raw.error is not None:
            error = self._raw.error
            self.abort()
            raise write_error(error, self.path) from error

    def _create(self, name: str, first: np.ndarray) -> None:
        f = self._open()
        dtype = COLUMN_DTYPES.get(name, first.dtype)
        tail = first.shape[1:]
        kwargs = {}
        if name == "images":
            kwargs["compression"] = self.compression
        f.create_dataset(
            name,
            shape=(0, *tail),
            maxshape=(None, *tail),
            dtype=dtype,
            chunks=(self._chunk, *tail) if name == "images" else (max(self._chunk, 1024), *tail),
            **kwargs,
        )

    def add_batch(self, images: np.ndarray, labels: np.ndarray | Sequence[int] | None = None, **columns) -> None:
        """Append N images (uint8 [N,H,W,3]) with their labels and optional columns."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise UsageError(f"images must be uint8 [N,H,W,3], got {images.dtype} {list(images.shape)}")
        if images.shape[1:3] != self.image_size:
            raise UsageError(
                f"{self.path}: image size {images.shape[1]}x{images.shape[2]} "
                f"differs from the shard's {self.image_size[0]}x{self.image_size[1]}"
            )
        n = len(images)
        if labels is None:
            labels = np.full(n, UNLABELED, np.int16)
        data = {"images": images, "labels": np.asarray(labels)}
        for name, values in columns.items():
            if values is not None:
                data[name] = (
                    np.asarray(values, dtype=COLUMN_DTYPES.get(name)) if not isinstance(values, np.ndarray) else values
                )
        for name, values in data.items():
            if len(values) != n:
                raise UsageError(f"column {name!r} has {len(values)} rows for {n} images")
        names = tuple(sorted(data))
        if self._columns is None:
            self._columns = names
            for name in names:
                self._create(name, data[name])
        elif names != self._columns:
            raise UsageError(f"{self.path}: columns {list(names)} differ from the first batch's {list(self._columns)}")
        if n == 0:
            return
        f = self._open()
        for name, values in data.items():
            ds = f[name]
            ds.resize(self.count + n, axis=0)
            ds[self.count : self.count + n] = values
        self.count += n
        self._check_writes()

    def add(self, image: np.ndarray, label: int = UNLABELED, **columns) -> None:
        self.add_batch(
            np.asarray(image)[None],
            np.array([label]),
            **{k: [v] if not isinstance(v, np.ndarray) else v[None] for k, v in columns.items()},
        )

    def close(self) -> Path:
        """Finish the shard: attributes, flush, fsync, rename to the final name. Returns it."""
        if self.closed:
            return self.path
        f = self._open()
        if self._columns is None:  # an empty shard still has the required datasets
            self.add_batch(np.zeros((0, *self.image_size, 3), np.uint8))
        for key, value in self._attrs.items():
            f.attrs[key] = value
        f.flush()
        f.close()
        self._file = None
        self._check_writes()
        assert self._raw is not None  # _open() made it; only abort() clears it, and _check_writes() raises then
        try:
            self._raw.sync_and_close()
            self._raw = None
            if self.path.exists() and not self.overwrite:
                self.abort()
                raise OutputExistsError(f"{self.path} appeared while writing", "pass --overwrite to replace it")
            os.replace(self.partial, self.path)
        except OSError as exc:
            self.abort()
            raise write_error(exc, self.path) from exc
        fsync_dir(self.path.parent)
        self.closed = True
        return self.path

    def abort(self) -> None:
        """Discard the partial file (the final name is never touched)."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - closing a broken file must not mask the real error
                pass
            self._file = None
        self._discard()
        self.closed = True

    def _discard(self) -> None:
        if self._raw is not None:
            self._raw.close_quietly()
            self._raw = None
        try:
            self.partial.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only directory: nothing was created there either


class _GuardedFile:
    """The Python file h5py writes a shard through. HDF5 does not survive a failed write (on a
    full disk it segfaults while flushing its caches), so the first OSError is remembered and
    every later write is dropped: HDF5 always sees success, and the writer raises the
    remembered error once HDF5 is done with the file."""

    def __init__(self, path: Path):
        self._fh = open(path, "w+b")  # noqa: SIM115 - closed by sync_and_close/close_quietly
        self.error: OSError | None = None

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if self.error is None:
            try:
                self._fh.write(data)
            except OSError as exc:
                self.error = exc
        return n

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._fh.truncate(size)
            except OSError as exc:
                self.error = exc
        return size if size is not None else self._fh.tell()

    def flush(self) -> None:
        if self.error is None:
            try:
                self._fh.flush()
            except OSError as exc:
                self.error = exc

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buffer) -> int:
        return self._fh.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(size)

    def sync_and_close(self) -> None:
        """flush + fsync + close, raising a write error remembered or met now."""
        self.flush()
        if self.error is not None:
            raise self.error
        os.fsync(self._fh.fileno())
        self._fh.close()

    def close_quietly(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass


class ShardSeriesWriter(_AtomicOutput):
    """Write a stream of images as `PREFIX-00000.h5`, `PREFIX-00001.h5`, ... of `shard_size` each.

    Each shard is finished (atomically) as soon as it is full and `on_shard(path)` is called,
    so a consumer downstream in a pipe can start on it at once.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        shard_size: int,
        classes: Sequence[str],
        image_size: tuple[int, int],
        producer: str,
        prefix: str = "shard",
        provenance: list | None = None,
        overwrite: bool = False,
        start_index: int = 0,
        on_shard: Callable[[Path], None] | None = None,
        compression: str | None = None,
        dataset: DatasetOutput | None = None,
        resume_state: Callable[[Any], dict] | None = None,
    ):
        if shard_size < 1:
            raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.classes, self.image_size = list(classes), image_size
        self.producer, self.prefix, self.provenance = producer, prefix, provenance
        self.overwrite, self.compression = overwrite, compression
        self.on_shard = on_shard
        # With a dataset, each finished shard is recorded in its manifest (with the resume state
        # `resume_state(position)` of the shard's last row) before it is announced.
        self.dataset, self.resume_state = dataset, resume_state
        if dataset is not None:
            dataset.set_meta(classes=self.classes, image_size=image_size)
            start_index = max(start_index, len(dataset.finished))
        self.index = start_index
        self.written: list[Path] = []
        self.count = 0
        self._writer: ShardWriter | None = None
        self._last_position: Any = None

    def _current(self) -> ShardWriter:
        if self._writer is None:
            path = self.out_dir / f"{self.prefix}-{self.index:05d}{SUFFIX}"
            self._writer = ShardWriter(
                path,
                classes=self.classes,
                image_size=self.image_size,
                producer=self.producer,
                provenance=self.provenance,
                overwrite=self.overwrite,
                compression=self.compression,
            )
        return self._writer

    def add_batch(
        self, images: np.ndarray, labels=None, *, positions: Sequence | np.ndarray | None = None, **columns
    ) -> None:
        """Append images; `positions[i]` (optional) says where the input stood after row i, for
        the manifest's resume state when a shard ends on that row."""
        images = np.asarray(images)
        start = 0
        while start < len(images):
            writer = self._current()
            take = min(self.shard_size - writer.count, len(images) - start)
            sl = slice(start, start + take)
            writer.add_batch(
                images[sl],
                None if labels is None else np.asarray(labels)[sl],
                **{k: (None if v is None else np.asarray(v)[sl]) for k, v in columns.items()},
            )
            start += take
            self.count += take
            if positions is not None:
                self._last_position = positions[start - 1]
            if writer.count >= self.shard_size:
                self._finish()

    def _finish(self) -> None:
        if self._writer is not None:
            count = self._writer.count
            path = self._writer.close()
            self._writer = None
            self.index += 1
            self.written.append(path)
            if self.dataset is not None:
                resume = self.resume_state(self._last_position) if self.resume_state else None
                self.dataset.add(path, count, resume=resume)
            if self.on_shard:
                self.on_shard(path)

    def close(self) -> list[Path]:
        if self._writer is not None and self._writer.count > 0:
            self._finish()
        elif self._writer is not None:
            self._writer.abort()
            self._writer = None
        return self.written

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def open_dataset_output(out: str | os.PathLike, *, command: str, params: dict, overwrite: bool) -> DatasetOutput:
    """Lock OUT for this producer and decide: fresh, resume (an interrupted run with the same
    params), already complete, or refused. See fakecifar.manifest."""
    return DatasetOutput(out, command=command, params=params, overwrite=overwrite, producer=producer(command)).open()


def prepare_output_dir(out: str | os.PathLike, *, overwrite: bool) -> Path:
    """Create OUT if needed and check it can take new shards.

    Refuses a directory that already holds shards unless `overwrite` (then the caller's new
    shards replace them one by one as each is finished; see `remove_stale_shards`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory", "give -o a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}", "choose a writable -o") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{out} is not writable", "choose a writable -o or fix its permissions")
    existing = sorted(out.glob(f"*{SUFFIX}"))
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out} already holds {len(existing)} shard(s)", "pass --overwrite to replace them, or choose another -o"
        )
    return out


def remove_stale_shards(out: Path, keep: Iterable[Path]) -> list[Path]:
    """After an --overwrite run, delete old shards in OUT that the run did not rewrite."""
    keep = {Path(p).resolve() for p in keep}
    removed = []
    for path in sorted(out.glob(f"*{SUFFIX}")):
        if path.resolve() not in keep:
            path.unlink()
            removed.append(path)
    return removed


# --------------------------------------------------------------------------- reading


class Shard:
    """One shard, validated on construction and then opened lazily (fork- and pickle-safe)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        f = self._handle()
        try:
            attrs = dict(f.attrs)
            if attrs.get("format") != FORMAT:
                raise BadShardError(
                    f"{self.path}: not a fakecifar shard (format attribute is {attrs.get('format')!r})",
                    "create shards with `fakecifar import`",
                )
            if "images" not in f:
                raise BadShardError(f"{self.path}: shard has no 'images' dataset", "the file is damaged; recreate it")
            images = f["images"]
            if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
                raise BadShardError(
                    f"{self.path}: 'images' is {images.dtype} {list(images.shape)}, not uint8 [N,H,W,3]",
                    "the file is damaged; recreate it",
                )
            self.n = int(images.shape[0])
            self.image_size = (int(images.shape[1]), int(images.shape[2]))
            self.chunk = int(images.chunks[0]) if images.chunks else self.n or 1
            self.columns = tuple(sorted(k for k, v in f.items() if isinstance(v, h5py.Dataset)))
            for name in self.columns:
                if f[name].shape[:1] != (self.n,):
                    raise BadShardError(
                        f"{self.path}: column {name!r} has {f[name].shape[0]} rows for {self.n} images",
                        "the file is damaged; recreate it",
                    )
            self.classes = json.loads(attrs.get("classes", "[]"))
            self.version = int(attrs.get("version", 0))
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            # Touch the last chunk: a truncated file opens fine and fails only here.
            if self.n:
                images[self.n - 1]
        except BadShardError:
            self.close()
            raise
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            self.close()
            raise BadShardError(
                f"{self.path}: damaged shard ({exc})", "the file is truncated or corrupt; recreate it"
            ) from exc
        self.close()

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = None  # never reuse a handle inherited across fork
            if not self.path.is_file():
                raise UsageError(f"{self.path}: no such file")
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                kind = "not an HDF5 file" if not h5py.is_hdf5(self.path) else f"cannot open ({exc})"
                hint = "is it truncated or still being written?" if self.path.stat().st_size else "the file is empty"
                raise BadShardError(f"{self.path}: {kind}", hint) from exc
            self._pid = os.getpid()
        return self._file

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Shard({str(self.path)!r}, n={self.n}, size={self.image_size[0]}x{self.image_size[1]})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            try:
                self._file.close()
            except Exception:  # noqa: BLE001
                pass
        self._file, self._pid = None, None

    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of one column, as a numpy array; into `out[:stop-start]` if given
        (reusing a buffer spares the page faults of a fresh allocation on every block)."""
        if name not in self.columns:
            raise UsageError(f"{self.path}: has no {name!r} column")
        stop = self.n if stop is None else stop
        try:
            if out is not None:
                target = out[: stop - start]
                self._handle()[name].read_direct(target, np.s_[start:stop])
                return target
            data = self._handle()[name][start:stop]
        except (OSError, ValueError) as exc:
            raise BadShardError(
                f"{self.path}: cannot read {name!r} ({exc})", "the file is damaged; recreate it"
            ) from exc
        if data.dtype.kind == "O":
            data = np.array([v.decode() if isinstance(v, bytes) else v for v in data], dtype=object)
        return data

    def take(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows at sorted `indices` (h5py fancy indexing needs increasing order)."""
        if len(indices) == 0:
            return self.read(name, 0, 0)
        lo, hi = int(indices[0]), int(indices[-1]) + 1
        # One contiguous read then a numpy gather beats HDF5's per-row selection by far.
        return self.read(name, lo, hi)[np.asarray(indices) - lo]


class ShardSet:
    """Several compatible shards read as one dataset (same classes, same image size)."""

    def __init__(self, shards: Sequence[Shard]):
        if not shards:
            raise UsageError("no shards given")
        self.shards = list(shards)
        first = self.shards[0]
        for shard in self.shards[1:]:
            if shard.classes != first.classes:
                raise IncompatibleShardsError(
                    f"{shard.path}: classes {format_classes(shard.classes)} differ from {first.path}'s "
                    f"{format_classes(first.classes)}",
                    "give shards of one dataset, or re-import with the same --classes",
                )
            if shard.image_size != first.image_size:
                raise IncompatibleShardsError(
                    f"{shard.path}: images are {shard.image_size[0]}x{shard.image_size[1]}, {first.path} "
                    f"has {first.image_size[0]}x{first.image_size[1]}",
                    "run `fakecifar resize` to one size first",
                )
        self.classes: list[str] = list(first.classes)
        self.image_size: tuple[int, int] = first.image_size
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.columns = tuple(sorted(set.intersection(*(set(s.columns) for s in self.shards))))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.shards]

    def read(self, name: str) -> np.ndarray:
        """A whole column across all shards (load `images` this way only for small data)."""
        return np.concatenate([s.read(name) for s in self.shards]) if self.shards else np.empty(0)

    def iter_chunks(
        self, names: Sequence[str] = ("images", "labels"), rows: int | None = None
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (global_start, {name: rows}) in order, reading whole HDF5 chunks at a time."""
        for name in names:
            if name not in self.columns:
                missing = [str(s.path) for s in self.shards if name not in s.columns][:1]
                raise UsageError(f"{missing[0] if missing else 'dataset'}: has no {name!r} column")
        for base, shard in zip(self.offsets, self.shards):
            step = rows or shard.chunk * max(1, READ_BYTES // (shard.chunk * _image_bytes(shard)))
            for start in range(0, len(shard), step):
                stop = min(start + step, len(shard))
                yield int(base + start), {name: shard.read(name, start, stop) for name in names}

    def locate(self, indices: np.ndarray) -> Iterator[tuple[Shard, np.ndarray, np.ndarray]]:
        """Group global indices by shard: yields (shard, local_indices_sorted, positions)."""
        indices = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        for k in np.unique(which):
            pos = np.nonzero(which == k)[0]
            local = indices[pos] - self.offsets[k]
            order = np.argsort(local, kind="stable")
            yield self.shards[k], local[order], pos[order]

    def take(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows at any global indices, in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        out = None
        for shard, local, pos in self.locate(indices):
            rows = shard.take(name, local)
            if out is None:
                out = np.empty((len(indices), *rows.shape[1:]), dtype=rows.dtype)
            out[pos] = rows
        return out if out is not None else self.shards[0].read(name, 0, 0)

    def close(self) -> None:
        for s in self.shards:
            s.close()


def _image_bytes(shard: Shard) -> int:
    return shard.image_size[0] * shard.image_size[1] * 3


def expand_inputs(inputs: Iterable[str | os.PathLike], *, allow_incomplete: bool = False) -> list[Path]:
    """Files, directories (every *.h5 inside, sorted) and globs -> shard paths, in order.

    A directory must be a complete dataset by its manifest, and a file its directory's
    manifest lists must match it (fakecifar.manifest), unless `allow_incomplete`."""
    paths: list[Path] = []
    for item in inputs:
        text = str(item)
        p = Path(text)
        if p.is_dir():
            found = sorted(p.glob(f"*{SUFFIX}"))
            if not found:
                manifest = read_manifest(p)
                if manifest is not None and not manifest.get("complete"):
                    check_dataset_dir(p, found)
                raise UsageError(
                    f"{p}: directory holds no *{SUFFIX} shards", "give the folder `fakecifar import` wrote"
                )
            check_dataset_dir(p, found, allow_incomplete=allow_incomplete)
            paths.extend(found)
        elif p.exists():
            if p.suffix == SUFFIX:
                check_listed_shard(p, allow_incomplete=allow_incomplete)
            paths.append(p)
        elif glob.has_magic(text):
            found = sorted(Path(m) for m in glob.glob(text) if m.endswith(SUFFIX))
            if not found:
                raise UsageError(f"{text}: pattern matches no shards")
            paths.extend(found)
        else:
            raise UsageError(f"{p}: no such file or directory")
    return paths


def open_shards(inputs: Iterable[str | os.PathLike], *, allow_incomplete: bool = False) -> ShardSet:
    """Open files/directories/globs as one dataset; refuses bad or mismatched shards, and
    directories their manifest does not call complete (unless `allow_incomplete`)."""
    paths = expand_inputs(inputs, allow_incomplete=allow_incomplete)
    if not paths:
        raise UsageError("no input shards", "give shard files or directories, or pipe their paths on stdin")
    return ShardSet([Shard(p) for p in paths])


def provenance_of(shards: Sequence[Shard]) -> list:
    """The provenance chain of the first input shard, to be extended by the next step."""
    if not shards:
        return []
    try:
        chain = json.loads(shards[0].attrs.get("provenance", "[]"))
    except json.JSONDecodeError:
        chain = []
    return chain if isinstance(chain, list) else [chain]


def producer(command: str) -> str:
    return f"fakecifar {command} {__version__}"
