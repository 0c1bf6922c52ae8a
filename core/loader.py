"""Feeding shards to torch.

`BatchLoader` is the fast path every training and evaluation command uses: it reads whole
HDF5 chunks, keeps uint8 pixels (4x smaller than float) and converts a batch at a time to
normalized float on the target device. Datasets that fit in `memory_limit` are read once and
fully shuffled each epoch; larger ones are shuffled by blocks of chunks through a buffer.

`ShardImageDataset` is a plain map-style `torch.utils.data.Dataset` for code that wants the
usual DataLoader; each worker opens its own file handles (see `Shard`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .shards import ShardSet

DEFAULT_MEMORY_LIMIT = 4 << 30
ROW = "row"  # a column no shard stores: each image's row in the set (training dynamics)


class ShardImageDataset(torch.utils.data.Dataset):
    """Map-style dataset: item i -> (uint8 tensor [3, H, W], label). Safe with DataLoader
    workers under fork and spawn (handles are opened lazily per process)."""

    def __init__(self, data: ShardSet, transform=None):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        shard, local, _ = next(self.data.locate(np.array([index])))
        i = int(local[0])
        image = torch.from_numpy(shard.read("images", i, i + 1)[0]).permute(2, 0, 1)
        label = int(shard.read("labels", i, i + 1)[0])
        return (self.transform(image) if self.transform else image), label


def to_float_batch(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """uint8 NHWC -> normalized float32 NCHW (on the images' device).

    Transposed while still uint8 (a quarter of the bytes), then one fused multiply-add:
    measured ~10x faster than permute -> float -> /255 -> -mean -> /std."""
    scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
    shift = (-mean / std).view(1, 3, 1, 1)
    x = torch.addcmul(shift, images.permute(0, 3, 1, 2).contiguous().float(), scale)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class BatchLoader:
    """Iterate (images float [B,3,H,W] normalized, columns...) over a ShardSet.

    `columns` names the per-image columns returned beside the images (default labels);
    `rank`/`world_size` give each DDP process a disjoint slice of every epoch.
    """

    def __init__(
        self,
        data: ShardSet,
        batch_size: int = 256,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        device: str | torch.device = "cpu",
        columns: Sequence[str] = ("labels",),
        channels_last: bool = False,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 65_536,
        indices: np.ndarray | None = None,
    ):
        self.data, self.batch_size = data, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.columns, self.channels_last = tuple(columns), channels_last
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.epoch = 0
        h, w = data.image_size
        self.in_memory = len(data) * h * w * 3 <= memory_limit
        self._images: torch.Tensor | None = None
        self._columns: dict[str, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self) -> np.ndarray:
        rows = np.arange(len(self.data)) if self.indices is None else self.indices
        if self.shuffle:
            rows = np.random.default_rng((self.seed, self.epoch)).permutation(rows)
        if self.world_size > 1:
            # Equal-length slices keep DDP processes in lockstep (no rank waits on a missing batch).
            per_rank = len(rows) // self.world_size
            rows = rows[self.rank * per_rank : (self.rank + 1) * per_rank]
        return rows

    def __len__(self) -> int:
        n = len(self._rows()) if self.world_size > 1 or self.indices is not None else len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _load(self) -> None:
        if self._images is None:
            pinned = self.device.type == "cuda"
            images = torch.from_numpy(self.data.read("images"))
            self._images = images.pin_memory() if pinned else images
            self._columns = {name: self._read(name) for name in self.columns}

    def _read(self, name: str, shard: int | None = None, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A column of the whole set (shard None) or rows start:stop of one shard; ROW is each
        image's row in the set."""
        if name == ROW:
            base = 0 if shard is None else int(self.data.offsets[shard])
            return np.arange(base + start, base + (len(self.data) if stop is None else stop), dtype=np.int64)
        if shard is None:
            return self.data.read(name)
        return self.data.shards[shard].read(name, start, stop)

    def _batch(self, images: np.ndarray | torch.Tensor, columns: dict[str, np.ndarray]) -> tuple:
        x = torch.as_tensor(images).to(self.device, non_blocking=True)
        out = [to_float_batch(x, self.mean, self.std, self.channels_last)]
        for name in self.columns:
            values = columns[name]
            tensor = torch.as_tensor(values.astype(np.int64) if values.dtype.kind in "iu" else values)
            out.append(tensor.to(self.device, non_blocking=True))
        return tuple(out)

    def __iter__(self) -> Iterator[tuple]:
        if self.in_memory:
            yield from self._iter_memory()
        else:
            yield from self._iter_stream()
        self.epoch += 1

    def _iter_memory(self) -> Iterator[tuple]:
        self._load()
        images, columns = self._images, self._columns
        assert images is not None and columns is not None
        rows = self._rows()
        stop = len(rows) - (len(rows) % self.batch_size if self.drop_last else 0)
        for start in range(0, stop, self.batch_size):
            idx = rows[start : start + self.batch_size]
            if not self.shuffle and self.indices is None and self.world_size == 1:
                sl = slice(int(idx[0]), int(idx[-1]) + 1)  # sequential: a view, no gather
                yield self._batch(images[sl], {k: v[sl] for k, v in columns.items()})
            else:
                t = torch.from_numpy(idx)
                yield self._batch(images[t], {k: v[idx] for k, v in columns.items()})

    def _iter_stream(self) -> Iterator[tuple]:
        """Out-of-core: visit blocks (whole chunks) in seeded random order, shuffle rows inside
        a buffer of blocks, emit batches. Sequential reads, bounded memory."""
        names = ("images", *self.columns)
        blocks = [
            (k, start, min(start + shard.chunk, len(shard)))
            for k, shard in enumerate(self.data.shards)
            for start in range(0, len(shard), shard.chunk)
        ]
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        if self.world_size > 1:
            blocks = blocks[self.rank :: self.world_size]
        keep = None if self.indices is None else np.unique(self.indices)
        buffer_rows = max(self.batch_size, self.shuffle_buffer if self.shuffle else self.batch_size)
        pending: dict[str, list] = {n: [] for n in names}
        count = 0
        carry: dict[str, np.ndarray] | None = None

        def drain(final: bool) -> Iterator[tuple]:
            nonlocal carry
            if not pending["images"] and carry is None:
                return
            parts = {n: ([carry[n]] if carry is not None else []) + pending[n] for n in names}
            merged = {n: np.concatenate(v) for n, v in parts.items() if v}
            for n in names:
                pending[n].clear()
            carry = None
            order = rng.permutation(len(merged["images"])) if self.shuffle else np.arange(len(merged["images"]))
            full = len(order) - len(order) % self.batch_size
            for start in range(0, full, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield self._batch(merged["images"][idx], {n: merged[n][idx] for n in self.columns})
            rest = order[full:]
            if len(rest):
                if final:
                    if not self.drop_last:
                        yield self._batch(merged["images"][rest], {n: merged[n][rest] for n in self.columns})
                else:
                    carry = {n: merged[n][rest] for n in names}

        for k, start, stop in blocks:
            rows = {n: self._read(n, k, start, stop) for n in names}
            if keep is not None:
                base = int(self.data.offsets[k])
                mask = np.isin(np.arange(base + start, base + stop), keep, assume_unique=True)
                rows = {n: v[mask] for n, v in rows.items()}
            for n in names:
                pending[n].append(rows[n])
            count += len(rows["images"])
            if count >= buffer_rows:
                yield from drain(final=False)
                count = 0
        yield from drain(final=True)
