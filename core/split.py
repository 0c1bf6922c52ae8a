"""Seeded, stratified train/val split. Images with identical pixels always land on the same
side (CIFAKE has byte-identical duplicates), so no image is in both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .shards import ShardSeriesWriter, ShardSet, open_dataset_output, pixel_sha256, producer, provenance_of


def parse_ratio(ratio: str | None, val: float | None) -> float:
    """'5:1' (train:val) or --val 0.2 -> the validation fraction."""
    if ratio is not None and val is not None:
        raise UsageError("give --ratio or --val, not both")
    if ratio is not None:
        try:
            a, b = (float(x) for x in ratio.split(":"))
        except ValueError:
            raise UsageError(f"bad --ratio {ratio!r}", "use TRAIN:VAL, e.g. 5:1") from None
        if a < 0 or b <= 0 or a + b <= 0:
            raise UsageError(f"bad --ratio {ratio!r}", "both parts positive, e.g. 5:1")
        return b / (a + b)
    fraction = 0.2 if val is None else val
    if not 0 < fraction < 1:
        raise UsageError(f"--val must be between 0 and 1, got {fraction}")
    return fraction


@dataclass
class SplitReport:
    train: list[Path] = field(default_factory=list)
    val: list[Path] = field(default_factory=list)
    train_images: int = 0
    val_images: int = 0
    duplicate_groups: int = 0


def assign_val(strata: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: per stratum, whole duplicate groups in seeded random
    order until the stratum's share reaches round(fraction * size)."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(strata), bool)
    for stratum in np.unique(strata):
        rows = np.nonzero(strata == stratum)[0]
        target = int(round(fraction * len(rows)))
        ids, sizes = np.unique(groups[rows], return_counts=True)
        order = rng.permutation(len(ids))
        chosen = ids[order][np.cumsum(sizes[order]) <= target]
        is_val[rows[np.isin(groups[rows], chosen)]] = True
    # A group spanning two strata (same pixels, different labels) follows any val member.
    is_val |= np.isin(groups, groups[is_val])
    return is_val


def split_dataset(
    data: ShardSet,
    out_dir: str | Path,
    *,
    fraction: float,
    seed: int = 0,
    shard_size: int = 10_000,
    overwrite: bool = False,
    on_shard: Callable[[Path], None] | None = None,
) -> SplitReport:
    """Write OUT/train/*.h5 and OUT/val/*.h5. Strata are (class, origin); order is kept.

    Each side is a dataset with its own manifest; a re-run with the same arguments after an
    interruption keeps each side's finished shards and writes only the rest."""
    out = Path(out_dir)
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    params = {
        "inputs": [str(p.resolve()) for p in data.paths],
        "val_fraction": round(fraction, 6),
        "seed": seed,
        "shard_size": shard_size,
    }
    sides = {}
    try:
        for part in ("train", "val"):
            sides[part] = open_dataset_output(
                out / part, command="split", params={**params, "part": part}, overwrite=overwrite
            )
        report = _split_into(data, sides, fraction=fraction, seed=seed, shard_size=shard_size, on_shard=on_shard)
    except BaseException:
        for side in sides.values():
            side.close(failed=True)
        raise
    for side in sides.values():
        side.close()
    return report


def _split_into(
    data: ShardSet, sides: dict, *, fraction: float, seed: int, shard_size: int, on_shard: Callable[[Path], None] | None
) -> SplitReport:
    labels = data.read("labels").astype(np.int64)
    origin = data.read("origin").astype(np.int64) if "origin" in data.columns else np.zeros_like(labels)
    if "sha256" in data.columns:
        digests = data.read("sha256")
    else:
        digests = np.concatenate([pixel_sha256(c["images"]) for _, c in data.iter_chunks(["images"])])
    _, groups = np.unique(digests, return_inverse=True)
    is_val = assign_val(labels * 256 + origin, groups, fraction, seed)
    report = SplitReport(duplicate_groups=int(len(groups) - len(np.unique(groups))))
    report.train_images, report.val_images = int((~is_val).sum()), int(is_val.sum())
    chain = provenance_of(data.shards) + [
        {"step": "split", "val_fraction": round(fraction, 6), "seed": seed, "inputs": [str(p) for p in data.paths]}
    ]
    writers, done = {}, {}
    for part, side in sides.items():
        done[part] = side.finished_images  # rows of this side an interrupted run already wrote
        if on_shard:
            for path in side.finished_paths:
                on_shard(path)
        if not side.already_complete:
            writers[part] = ShardSeriesWriter(
                side.directory,
                shard_size=shard_size,
                classes=data.classes,
                image_size=data.image_size,
                producer=producer("split"),
                overwrite=side.overwrite,
                on_shard=on_shard,
                dataset=side,
                provenance=chain + [{"part": part}],
            )
    try:
        taken = {"train": 0, "val": 0}  # rows of each side seen so far in input order
        for start, chunk in data.iter_chunks(data.columns):
            mask = is_val[start : start + len(chunk["images"])]
            for part, rows in (("train", ~mask), ("val", mask)):
                index = np.nonzero(rows)[0]
                skip = max(0, min(len(index), done[part] - taken[part]))
                taken[part] += len(index)
                index = index[skip:]
                if len(index) and part in writers:
                    piece = {k: v[index] for k, v in chunk.items()}
                    writers[part].add_batch(piece.pop("images"), piece.pop("labels"), **piece)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for side in sides.values():
        if not side.already_complete:
            side.finish(classes=data.classes, image_size=data.image_size)
    report.train, report.val = sides["train"].finished_paths, sides["val"].finished_paths
    return report
