"""Dataset statistics in one streaming pass: per-channel mean/std in [0, 1], counts per class
and per origin, exact duplicates, image size. Sums come from exact per-channel histograms, so
the figures equal numpy's float64 mean/std of the same pixels (population std, ddof=0)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import UsageError
from .shards import ORIGIN_NAMES, ShardSet, pixel_sha256


@dataclass
class DatasetStats:
    name: str
    images: int
    image_size: tuple[int, int]
    classes: list[str]
    mean: list[float]
    std: list[float]
    duplicates: int
    per_class: dict[str, int] = field(default_factory=dict)
    per_origin: dict[str, int] = field(default_factory=dict)
    shards: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


class _Accumulator:
    def __init__(self, num_classes: int):
        self.hist = np.zeros(768, np.int64)  # 256 levels x 3 channels
        self.labels = np.zeros(num_classes + 1, np.int64)  # last slot: unlabeled
        self.origins = np.zeros(len(ORIGIN_NAMES), np.int64)
        self.digests: set[bytes] = set()
        self.n = 0

    def add(self, images: np.ndarray, labels: np.ndarray, origin: np.ndarray | None, digests: np.ndarray) -> None:
        # +0/+256/+512 per channel turns three histograms into one bincount pass
        flat = images.reshape(-1, 3).astype(np.int16) + np.array([0, 256, 512], np.int16)
        self.hist += np.bincount(flat.ravel(), minlength=768)
        labels = np.where(labels < 0, len(self.labels) - 1, labels)
        self.labels += np.bincount(labels, minlength=len(self.labels))[: len(self.labels)]
        if origin is not None:
            self.origins += np.bincount(origin, minlength=len(ORIGIN_NAMES))[: len(ORIGIN_NAMES)]
        self.digests.update(digests.tolist())
        self.n += len(images)

    def finish(self, name: str, data: ShardSet, has_origin: bool) -> DatasetStats:
        hist = self.hist.reshape(3, 256)
        levels = np.arange(256, dtype=np.float64)
        count = hist.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (hist @ levels) / count
            var = (hist @ levels**2) / count - mean**2
        per_class = {c: int(k) for c, k in zip(data.classes, self.labels[:-1])}
        if self.labels[-1]:
            per_class["(unlabeled)"] = int(self.labels[-1])
        return DatasetStats(
            name=name,
            images=self.n,
            image_size=data.image_size,
            classes=data.classes,
            mean=[float(m) / 255 for m in np.nan_to_num(mean)],
            std=[float(np.sqrt(max(v, 0.0))) / 255 for v in np.nan_to_num(var)],
            duplicates=self.n - len(self.digests),
            per_class=per_class,
            per_origin={o: int(k) for o, k in zip(ORIGIN_NAMES, self.origins)} if has_origin else {},
            shards=len(data.shards),
        )


def dataset_stats(
    data: ShardSet, name: str, *, by: str | None = None, on_progress: Callable[[int], None] | None = None
) -> list[DatasetStats]:
    """Statistics of one dataset, or of each of its origins (`by="origin"`) side by side."""
    if by not in (None, "origin"):
        raise UsageError(f"--by must be origin, not {by!r}")
    has_origin = "origin" in data.columns
    if by == "origin" and not has_origin:
        raise UsageError(
            f"{data.paths[0]}: has no origin column to group by",
            "import with --origin real|fake or from CIFAKE folders",
        )
    columns = ["images", "labels"] + (["origin"] if has_origin else [])
    columns += ["sha256"] if "sha256" in data.columns else []
    groups = {g: _Accumulator(len(data.classes)) for g in (range(len(ORIGIN_NAMES)) if by else [None])}
    for _, chunk in data.iter_chunks(columns):
        images, labels = chunk["images"], chunk["labels"].astype(np.int64)
        origin = chunk.get("origin")
        digests = chunk["sha256"] if "sha256" in chunk else pixel_sha256(images)
        if by is None:
            groups[None].add(images, labels, origin, digests)
        else:
            assert origin is not None  # checked above: grouping by origin needs the column
            for g, acc in groups.items():
                m = origin == g
                if m.any():
                    acc.add(images[m], labels[m], origin[m], digests[m])
        if on_progress:
            on_progress(len(images))
    if by is None:
        return [groups[None].finish(name, data, has_origin)]
    return [
        acc.finish(f"{name} [{ORIGIN_NAMES[g]}]", data, True) for g, acc in groups.items() if acc.n and g is not None
    ]


def stats_table(stats: list[DatasetStats]) -> list[list[str]]:
    """Rows for a side-by-side table: one column per dataset."""

    def per(key, sub):
        return [str(getattr(s, key).get(sub, "")) for s in stats]

    rows = [
        ["images"] + [str(s.images) for s in stats],
        ["shards"] + [str(s.shards) for s in stats],
        ["size"] + [f"{s.image_size[0]}x{s.image_size[1]}" for s in stats],
        ["classes"] + [str(len(s.classes)) for s in stats],
    ]
    for i, channel in enumerate("RGB"):
        rows.append([f"mean {channel}"] + [f"{s.mean[i]:.4f}" for s in stats])
    for i, channel in enumerate("RGB"):
        rows.append([f"std {channel}"] + [f"{s.std[i]:.4f}" for s in stats])
    rows.append(["exact duplicates"] + [str(s.duplicates) for s in stats])
    origins = [o for o in ORIGIN_NAMES if any(o in s.per_origin for s in stats)]
    rows += [[f"origin {o}"] + per("per_origin", o) for o in origins]
    names = list(dict.fromkeys(c for s in stats for c in s.per_class))
    rows += [[f"class {c}"] + per("per_class", c) for c in names]
    return rows
