"""Turn the layouts people have into shards.

Sources (each a directory, a .tar/.tar.gz archive of one, or a single file):
- image folders: `root/<class>/*.png|jpg|...` (class = the image's parent folder; images
  directly in the root are unlabeled);
- the CIFAKE layout: `.../REAL|FAKE/NNNN (k).jpg` (class k, 1-based, from the name; no
  suffix means class 1; origin from the folder);
- CIFAR-10/100 python pickle batches (`data_batch_N`, `test_batch`, `train`, `test`, with
  `batches.meta`/`meta` for names), read by a restricted unpickler: a pickle can run code,
  and these files come from the internet.
Archives are streamed (twice: names, then contents), so memory stays flat.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import overload

import numpy as np

from .errors import BadImageError, UsageError
from .images import decode_image, is_image_name, resize_image
from .shards import ORIGIN_NAMES, ShardSeriesWriter, pixel_sha256, producer
from .text import format_classes

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAKE_NAME = re.compile(r"^\d+(?: \((\d+)\))?\.\w+$")
PICKLE_BATCH = re.compile(r"^(data_batch_\d+|test_batch|train|test)$")
PICKLE_META = ("batches.meta", "meta")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
MAX_MEMBER_BYTES = 512 << 20


@overload
def parse_classes(spec: str) -> list[str]: ...
@overload
def parse_classes(spec: None) -> None: ...
def parse_classes(spec: str | None) -> list[str] | None:
    """`--classes`: 'cifar10', comma-separated names, or a file with one name a line."""
    if spec is None:
        return None
    if spec == "cifar10":
        return list(CIFAR10_CLASSES)
    path = Path(spec)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    else:
        names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--classes {spec!r} names no classes")
    if len(set(names)) != len(names):
        raise UsageError(f"--classes {spec!r} repeats a name")
    return names


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """A file inside a source: `parts` is its path relative to the source root."""

    display: str
    parts: tuple[str, ...]


class Source:
    """A directory, an archive or one file, listed once and then read in a stable order."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise UsageError(f"{self.path}: no such file or directory")
        self.is_archive = self.path.is_file() and self.path.name.lower().endswith(ARCHIVE_SUFFIXES)
        self.entries = self._list()

    def _list(self) -> list[Entry]:
        if self.path.is_dir():
            entries: list[Entry] = []
            for root, dirs, files in os.walk(self.path):
                dirs.sort()
                rel = Path(root).relative_to(self.path).parts
                entries.extend(Entry(str(Path(root) / f), (*rel, f)) for f in sorted(files))
            return entries
        if self.is_archive:
            try:
                with tarfile.open(self.path, "r|*") as tar:
                    return [Entry(f"{self.path}:{m.name}", PurePosixPath(m.name).parts) for m in tar if m.isfile()]
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise UsageError(f"{self.path}: unreadable archive ({exc})", "is it truncated?") from exc
        return [Entry(str(self.path), (self.path.name,))]

    def read(self, wanted: set[Entry]) -> Iterator[tuple[Entry, bytes | Exception]]:
        """Yield (entry, bytes) for the wanted entries, in listing order; a read failure is
        yielded as the exception so the caller decides whether it is fatal."""
        if self.is_archive:
            by_name = {e.parts: e for e in wanted}
            with tarfile.open(self.path, "r|*") as tar:
                for member in tar:
                    entry = by_name.get(PurePosixPath(member.name).parts)
                    if entry is None or not member.isfile():
                        continue
                    if member.size > MAX_MEMBER_BYTES:
                        yield entry, BadImageError(f"{entry.display}: {member.size:,} bytes is too large")
                        continue
                    fh = tar.extractfile(member)
                    yield entry, fh.read() if fh else b""
            return
        for entry in self.entries:
            if entry in wanted:
                try:
                    yield entry, Path(entry.display).read_bytes()
                except OSError as exc:
                    yield entry, BadImageError(f"{entry.display}: cannot read ({exc.strerror or exc})")


# --------------------------------------------------------------------------- layouts


@dataclass
class Plan:
    """What one source contributes: its layout, class names and the entries to read."""

    source: Source
    layout: str  # "folder" | "cifake" | "pickle"
    class_names: list[str] = field(default_factory=list)  # names found (folder) or defined (others)
    entries: list[Entry] = field(default_factory=list)
    meta: list[Entry] = field(default_factory=list)
    ignored: int = 0


def plan_source(source: Source) -> Plan:
    entries = source.entries
    names = [e.parts[-1] for e in entries]
    if any(PICKLE_BATCH.match(n) for n in names) and not any(is_image_name(n) for n in names):
        batches = [e for e in entries if PICKLE_BATCH.match(e.parts[-1])]
        meta = [e for e in entries if e.parts[-1] in PICKLE_META]
        return Plan(source, "pickle", entries=batches, meta=meta, ignored=len(entries) - len(batches) - len(meta))
    images = [e for e in entries if is_image_name(e.parts[-1])]
    ignored = len(entries) - len(images)
    if any(p.upper() in ("REAL", "FAKE") for e in images for p in e.parts[:-1]):
        return Plan(source, "cifake", entries=images, ignored=ignored)
    found = sorted({e.parts[-2] for e in images if len(e.parts) >= 2})
    return Plan(source, "folder", class_names=found, entries=images, ignored=ignored)


def _cifake_origin(entry: Entry) -> int:
    for part in reversed(entry.parts[:-1]):
        if part.upper() in ("REAL", "FAKE"):
            return ORIGIN_NAMES.index(part.lower())
    raise UsageError(f"{entry.display}: not under a REAL or FAKE folder")


def _cifake_class(entry: Entry) -> int:
    match = CIFAKE_NAME.match(entry.parts[-1])
    if not match:
        raise BadImageError(f"{entry.display}: name does not follow the CIFAKE 'NNNN (k).jpg' pattern")
    return int(match.group(1) or 1) - 1


# CIFAR pickles hold dicts, lists, bytes and numpy arrays; nothing else may be built.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_cifar_pickle(data: bytes, name: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any failure of an untrusted pickle is bad input
        raise UsageError(f"{name}: not a CIFAR python batch ({exc})") from exc
    if not isinstance(obj, dict):
        raise UsageError(f"{name}: not a CIFAR python batch (a {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _pickle_class_names(plan: Plan) -> list[str]:
    for entry, data in plan.source.read(set(plan.meta)):
        if isinstance(data, Exception):
            raise data
        meta = load_cifar_pickle(data, entry.display)
        for key in ("label_names", "fine_label_names"):
            if key in meta:
                return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]
    return []


# --------------------------------------------------------------------------- import


@dataclass
class ImportReport:
    written: list[Path] = field(default_factory=list)
    images: int = 0
    duplicates: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    resized: int = 0
    ignored_files: int = 0
    classes: list[str] = field(default_factory=list)
    image_size: tuple[int, int] | None = None
    per_class: dict[str, int] = field(default_factory=dict)
    resumed_shards: int = 0  # finished by an interrupted run with the same arguments
    already_complete: bool = False  # the same import had finished before: nothing was done


def _resolve_classes(plans: list[Plan], given: list[str] | None) -> list[str]:
    defined = [p.class_names for p in plans if p.layout != "folder" and p.class_names]
    for a in defined[1:]:
        if a != defined[0]:
            raise UsageError("sources define different class lists", "import them separately or pass --classes")
    found = sorted({n for p in plans if p.layout == "folder" for n in p.class_names})
    classes = given or (defined[0] if defined else found)
    missing = [n for n in found if n not in classes]
    if missing:
        raise UsageError(
            f"class folder(s) {format_classes(missing)} not in the class list {format_classes(classes)}",
            "add them to --classes or remove the folders",
        )
    return classes


def import_sources(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    classes: list[str] | None = None,
    origin: str | None = None,
    shard_size: int = 10_000,
    dedup: bool = False,
    size: tuple[int, int] | None = None,
    on_mismatch: str = "error",
    strict: bool = False,
    overwrite: bool = False,
    on_shard: Callable[[Path], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    batch: int = 512,
) -> ImportReport:
    """Import every source into shards under out_dir. See the module doc for layouts.

    `size` fixes the image size (else the first image's); images of another size are an
    error (`on_mismatch="error"`), resized (`"resize"`) or skipped (`"skip"`).

    The output directory's manifest records, with each finished shard, where in the sources
    the import stood; a re-run with the same arguments skips what is finished (without
    decoding it again) and goes on from there. A finished import re-run is a no-op.
    """
    from .shards import open_dataset_output

    if on_mismatch not in ("error", "resize", "skip"):
        raise UsageError(f"--on-mismatch must be error, resize or skip, not {on_mismatch!r}")
    if origin is not None and origin not in ORIGIN_NAMES:
        raise UsageError(f"--origin must be real or fake, not {origin!r}")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    for s in sources:
        if not Path(s).exists():
            raise UsageError(f"{s}: no such file or directory")
    params = {
        "sources": [str(Path(s).resolve()) for s in sources],
        "classes": classes,
        "origin": origin,
        "shard_size": shard_size,
        "dedup": dedup,
        "size": list(size) if size else None,
        "on_mismatch": on_mismatch,
        "strict": strict,
    }
    # The output is locked and checked before the sources are listed (a big archive takes a while).
    output = open_dataset_output(out_dir, command="import", params=params, overwrite=overwrite)
    try:
        report = _import_into(
            output,
            sources,
            classes=classes,
            origin=origin,
            shard_size=shard_size,
            dedup=dedup,
            size=size,
            on_mismatch=on_mismatch,
            strict=strict,
            on_shard=on_shard,
            on_progress=on_progress,
            batch=batch,
        )
    except BaseException:
        output.close(failed=True)
        raise
    output.close()
    return report


def _finished_report(output, report: ImportReport, dedup: bool, seen: set[bytes]) -> None:
    """Counts of the shards an interrupted run finished, read back from the shards themselves."""
    from .shards import Shard

    for path in output.finished_paths:
        shard = Shard(path)
        for label in shard.read("labels"):
            name = report.classes[label] if label >= 0 else "(unlabeled)"
            report.per_class[name] = report.per_class.get(name, 0) + 1
        if dedup and "sha256" in shard.columns:
            seen.update(bytes(d) for d in shard.read("sha256"))
        shard.close()
        report.written.append(path)
    report.images = output.finished_images
    report.resumed_shards = len(output.finished)


def _import_into(
    output, sources, *, classes, origin, shard_size, dedup, size, on_mismatch, strict, on_shard, on_progress, batch
) -> ImportReport:
    state = output.resume_state
    if output.already_complete:
        report = ImportReport(
            classes=list(output.meta.get("classes") or []),
            image_size=tuple(output.meta["image_size"]) if output.meta.get("image_size") else size,
            duplicates=int(state.get("duplicates", 0)),
            resized=int(state.get("resized", 0)),
            skipped=list(state.get("skipped", [])),
            already_complete=True,
        )
        _finished_report(output, report, False, set())
        if on_shard:
            for path in report.written:
                on_shard(path)
        return report
    plans = [plan_source(Source(s)) for s in sources]
    for plan in plans:
        if not plan.entries:
            raise UsageError(
                f"{plan.source.path}: no images found",
                "expected root/<class>/*.jpg|png, REAL|FAKE/NNNN (k).jpg, or CIFAR pickle batches",
            )
        if plan.layout == "cifake":
            plan.class_names = list(CIFAR10_CLASSES) if classes is None else list(classes)
        elif plan.layout == "pickle":
            plan.class_names = classes or _pickle_class_names(plan)
            if not plan.class_names:
                raise UsageError(
                    f"{plan.source.path}: CIFAR batches without batches.meta or meta",
                    "pass --classes with the class names",
                )
    class_list = _resolve_classes(plans, classes)
    stored_size = output.meta.get("image_size")
    report = ImportReport(
        classes=class_list,
        image_size=tuple(stored_size) if stored_size else size,
        ignored_files=sum(p.ignored for p in plans),
        duplicates=int(state.get("duplicates", 0)),
        resized=int(state.get("resized", 0)),
        skipped=list(state.get("skipped", [])),
    )
    has_origin = origin is not None or any(p.layout == "cifake" for p in plans)
    if has_origin and origin is None and any(p.layout != "cifake" for p in plans):
        raise UsageError("some sources carry real/fake origin and some do not", "pass --origin real|fake")
    default_origin = ORIGIN_NAMES.index(origin) if origin is not None else 0
    seen: set[bytes] = set()
    _finished_report(output, report, dedup, seen)
    if on_shard:  # a pipe re-run downstream sees the whole dataset, finished shards first
        for path in report.written:
            on_shard(path)
    # Where the finished shards end: entry number (over all sources' entries, in listing
    # order) and images of that entry already taken (pickle batches hold many).
    resume_entry, resume_image = (int(v) for v in state.get("position", (0, 0)))
    skip_positions: list[tuple[int, int]] = [(0, 0)] * len(report.skipped)  # all before the cursor
    provenance = [{"step": "import", "sources": [str(s) for s in sources], "dedup": dedup}]
    writer: ShardSeriesWriter | None = None
    pending: dict[str, list] = {"images": [], "labels": [], "origin": [], "source": [], "position": [], "resized": []}

    def resume_state(position) -> dict:
        entry, image, duplicates, resized = position
        skipped = [text for text, at in zip(report.skipped, skip_positions) if at < (entry, image)]
        return {"position": [entry, image], "duplicates": duplicates, "resized": resized, "skipped": skipped}

    def flush() -> None:
        nonlocal writer
        if not pending["images"]:
            return
        images = np.stack(pending["images"])
        digests = pixel_sha256(images)
        keep = np.ones(len(images), bool)
        if dedup:
            for i, d in enumerate(digests):
                if d in seen:
                    keep[i] = False
                seen.add(d)
        resized = np.asarray(pending["resized"], bool)
        # Counters as they stood after each row, for the resume state of a shard ending there.
        dups_after = report.duplicates + np.cumsum(~keep)
        resized_after = report.resized - int(resized.sum()) + np.cumsum(resized)
        report.duplicates += int((~keep).sum())
        if writer is None:
            assert report.image_size is not None  # add() set it before pending got its first image
            writer = ShardSeriesWriter(
                output.directory,
                shard_size=shard_size,
                classes=class_list,
                image_size=report.image_size,
                producer=producer("import"),
                provenance=provenance,
                overwrite=output.overwrite,
                on_shard=on_shard,
                dataset=output,
                resume_state=resume_state,
            )
        labels = np.asarray(pending["labels"], np.int16)[keep]
        columns = {"sha256": digests[keep], "source": np.asarray(pending["source"], dtype=object)[keep]}
        if has_origin:
            columns["origin"] = np.asarray(pending["origin"], np.uint8)[keep]
        positions = [(*pending["position"][i], int(dups_after[i]), int(resized_after[i])) for i in np.nonzero(keep)[0]]
        writer.add_batch(images[keep], labels, positions=positions, **columns)
        for label in labels:
            name = class_list[label] if label >= 0 else "(unlabeled)"
            report.per_class[name] = report.per_class.get(name, 0) + 1
        report.images += int(keep.sum())
        for values in pending.values():
            values.clear()

    def add(image: np.ndarray, label: int, image_origin: int, name: str, position: tuple[int, int]) -> None:
        if report.image_size is None:
            report.image_size = image.shape[:2]
        was_resized = False
        if image.shape[:2] != report.image_size:
            h, w = report.image_size
            if on_mismatch == "error":
                raise BadImageError(
                    f"{name}: image is {image.shape[0]}x{image.shape[1]}, the dataset is {h}x{w}",
                    f"pass --size {h}x{w} --on-mismatch resize (or skip)",
                )
            if on_mismatch == "skip":
                report.skipped.append(f"{name}: size {image.shape[0]}x{image.shape[1]}")
                skip_positions.append(position)
                return
            image = resize_image(image, report.image_size)
            report.resized += 1
            was_resized = True
        pending["images"].append(image)
        pending["labels"].append(label)
        pending["origin"].append(image_origin)
        pending["source"].append(name)
        pending["position"].append((position[0], position[1] + 1))
        pending["resized"].append(was_resized)
        if len(pending["images"]) >= batch:
            flush()

    def bad(error: Exception, position: tuple[int, int]) -> None:
        if strict:
            raise error if isinstance(error, BadImageError) else BadImageError(str(error))
        report.skipped.append(str(error))
        skip_positions.append(position)

    try:
        first = 0  # entry number of each plan's first entry
        for plan in plans:
            index = {n: i for i, n in enumerate(class_list)}
            number = {entry: first + i for i, entry in enumerate(plan.entries)}
            wanted = {entry for entry, k in number.items() if k >= resume_entry}
            first += len(plan.entries)
            if on_progress:
                on_progress(len(plan.entries) - len(wanted))
            for entry, data in plan.source.read(wanted):
                k = number[entry]
                if on_progress:
                    on_progress(1)
                if isinstance(data, Exception):
                    bad(data, (k, 0))
                    continue
                if plan.layout == "pickle":
                    for j, (image, label) in enumerate(_pickle_images(data, entry.display, len(class_list))):
                        if k > resume_entry or j >= resume_image:
                            add(image, label, default_origin, entry.display, (k, j))
                    continue
                if k == resume_entry and resume_image > 0:
                    continue  # taken by a finished shard
                try:
                    image = decode_image(data, entry.display)
                    if plan.layout == "cifake":
                        label, image_origin = _cifake_class(entry), _cifake_origin(entry)
                        if label >= len(class_list):
                            raise BadImageError(
                                f"{entry.display}: class {label + 1} but only {len(class_list)} classes",
                                "pass the full --classes list",
                            )
                    else:
                        label = index[entry.parts[-2]] if len(entry.parts) >= 2 else -1
                        image_origin = default_origin
                except BadImageError as exc:
                    bad(exc, (k, 0))
                    continue
                add(image, label, image_origin, entry.display, (k, 0))
        flush()
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if report.images == 0:
        raise UsageError(
            f"no images imported from {', '.join(map(str, sources))}",
            f"{len(report.skipped)} skipped; rerun with --strict to see why",
        )
    report.written = list(output.finished_paths)
    output.finish(
        classes=class_list,
        image_size=report.image_size,
        resume={
            "position": [first, 0],
            "duplicates": report.duplicates,
            "resized": report.resized,
            "skipped": report.skipped,
        },
    )
    return report


def _pickle_images(data: bytes, name: str, num_classes: int) -> Iterator[tuple[np.ndarray, int]]:
    batch = load_cifar_pickle(data, name)
    pixels = batch.get("data")
    labels = batch.get("labels", batch.get("fine_labels"))
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.shape[1] % 3 or labels is None:
        raise UsageError(f"{name}: not a CIFAR python batch (no data/labels)")
    side = int(round((pixels.shape[1] // 3) ** 0.5))
    if side * side * 3 != pixels.shape[1]:
        raise UsageError(f"{name}: rows of {pixels.shape[1]} values are not square RGB images")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(pixels):
        raise UsageError(f"{name}: {len(pixels)} images but {len(labels)} labels")
    if num_classes and labels.size and labels.max() >= num_classes:
        raise UsageError(
            f"{name}: label {labels.max()} but only {num_classes} classes", "pass --classes with every class name"
        )
    images = pixels.reshape(-1, 3, side, side).transpose(0, 2, 3, 1).astype(np.uint8)
    yield from zip(images, labels.tolist())
