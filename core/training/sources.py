"""Batch sources: what feeds the training loop, one epoch at a time.

A source has a length (steps per epoch, the same on every DDP process) and `batches(epoch,
skip)`, the epoch's batches from step `skip` on: a resumed run that stopped mid-epoch gets the
very batches the uninterrupted run would have had. What a batch is, is between the source and
the task: `ShardBatches` gives `(images, columns)` to `ClassificationTask`; `GeneratedBatches`
calls a function of (epoch, step), e.g. a generator network or random tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from ..augment import augment_batch, step_generator
from ..loader import BatchLoader


class BatchSource(Protocol):
    def __len__(self) -> int:
        """Steps per epoch."""
        ...

    def batches(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        """The batches of `epoch` from step `skip` on; each a pure function of (seed, epoch, step)
        for exact resume."""
        ...


class ShardBatches:
    """Shards through a `BatchLoader` (shuffled per epoch, a DDP slice per process), augmented
    on the device as whole batches (fakecifar.augment) with a generator drawn from (seed, epoch,
    step). Yields `(images, {column: tensor})`."""

    def __init__(
        self,
        loader: BatchLoader,
        augment: Sequence[str] = ("crop", "flip"),
        *,
        pad: int = 4,
        alternate_flip: bool = False,
        seed: int = 0,
    ):
        self.loader, self.augment, self.pad = loader, tuple(augment), pad
        self.alternate_flip, self.seed = alternate_flip, seed

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        self.loader.set_epoch(epoch)
        columns = self.loader.columns
        for step, batch in enumerate(self.loader):
            if step < skip:  # read and dropped: the loader's order depends on every batch before
                continue
            x = augment_batch(
                batch[0],
                self.augment,
                pad=self.pad,
                generator=step_generator(self.seed, epoch, step),
                epoch=epoch if self.alternate_flip else None,
                mean=self.loader.mean,
                std=self.loader.std,
            )
            yield x, dict(zip(columns, batch[1:]))


class GeneratedBatches:
    """`steps` batches per epoch, each `make(epoch, step)`: a source that is not shards (a
    generator network, synthetic data). Skipped steps are never made."""

    def __init__(self, steps: int, make: Callable[[int, int], Any]):
        self.steps, self.make = steps, make

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        for step in range(skip, self.steps):
            yield self.make(epoch, step)
