"""The torch side: BatchLoader (in-memory and streaming) and the map-style dataset in workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakecifar.loader import BatchLoader, ShardImageDataset
from fakecifar.shards import open_shards

from helpers import random_images


@pytest.fixture
def dataset(make_shard):
    a = make_shard("a.h5", n=300, seed=1, labels=np.arange(300) % 3)
    b = make_shard("b.h5", n=77, seed=2, labels=np.arange(77) % 3)
    return open_shards([a, b])


def rows(x: torch.Tensor) -> list[bytes]:
    """Each image as bytes (rounded so float noise cannot split equal images)."""
    return [r.tobytes() for r in x.flatten(1).mul(1000).round().to(torch.int32).numpy()]


def collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("memory_limit", [1 << 30, 0], ids=["in-memory", "streaming"])
def test_every_image_once_per_epoch_normalized(dataset, memory_limit):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = BatchLoader(
        dataset, batch_size=64, shuffle=True, seed=7, mean=mean, std=std, memory_limit=memory_limit, shuffle_buffer=128
    )
    assert loader.in_memory == bool(memory_limit)
    x, y = collect(loader)
    assert x.shape == (377, 3, 8, 8) and x.dtype == torch.float32
    raw = torch.from_numpy(dataset.read("images")).permute(0, 3, 1, 2).float() / 255
    expected = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert sorted(rows(x)) == sorted(rows(expected))
    assert sorted(y.tolist()) == sorted(dataset.read("labels").tolist())
    first_order = x[:5].clone()
    x2, _ = collect(loader)  # the next epoch is shuffled differently
    assert not torch.equal(first_order, x2[:5])


def test_unshuffled_order_and_drop_last(dataset):
    loader = BatchLoader(dataset, batch_size=100, drop_last=True)
    assert len(loader) == 3
    x, y = collect(loader)
    assert x.shape[0] == 300 and y.tolist() == dataset.read("labels")[:300].tolist()


def test_ranks_get_disjoint_equal_slices(dataset):
    parts = [
        collect(BatchLoader(dataset, batch_size=50, shuffle=True, seed=1, rank=r, world_size=2))[0] for r in range(2)
    ]
    assert parts[0].shape[0] == parts[1].shape[0] == 188
    assert not set(rows(parts[0])) & set(rows(parts[1]))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_map_style_dataset_in_dataloader_workers(dataset, context):
    ds = ShardImageDataset(dataset)
    dataset.shards[0].read("images", 0, 1)  # the parent holds an open handle before workers start
    loader = torch.utils.data.DataLoader(ds, batch_size=50, num_workers=2, multiprocessing_context=context)
    images = torch.cat([x for x, _ in loader])
    assert torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(dataset.read("images")))


def test_random_images_helper_is_deterministic():
    assert np.array_equal(random_images(2, seed=3), random_images(2, seed=3))
