"""Batch-level data augmentation on tensors: a whole batch at once, on its device.

No per-image PIL work in the training loop: `BatchLoader` hands over a normalized float batch
[B, C, H, W] and these functions transform it with a handful of tensor ops.

    gen = torch.Generator().manual_seed(0)
    x = pad_crop(x, 4, gen)          # random translation by up to 4 px (reflect padding)
    x = random_flip(x, gen)          # horizontal flip with probability 1/2

`alternating_flip` is the "derandomized" flip of airbench (Jordan 2024): every image is flipped
on every other epoch, starting from a fixed per-image coin, so each epoch shows the mirror
image of what the previous one showed, instead of a fresh coin toss that repeats views.

Randomness comes only from the `generator` given, so a run is reproducible from its seed and
a resumed run draws the same augmentation as an uninterrupted one (see `step_generator`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import UsageError

AUGMENTATIONS = ("crop", "flip")


def parse_augment(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'crop,flip' / 'flip' / 'none' -> the augmentations to apply, in a fixed order."""
    if spec is None:
        return ()
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names in ([], ["none"]):
        return ()
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise UsageError(
            f"unknown augmentation {', '.join(map(repr, unknown))}",
            "use a comma-separated subset of crop,flip, or none",
        )
    return tuple(n for n in AUGMENTATIONS if n in names)


def step_generator(seed: int, epoch: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one training step, a pure function of (seed, epoch, step)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def pad_crop(
    x: torch.Tensor, pad: int, generator: torch.Generator | None = None, mode: str = "reflect"
) -> torch.Tensor:
    """Random crops of `x` padded by `pad` on each side: a translation by -pad..pad pixels in
    each direction, independently per image. `mode` is F.pad's ('reflect' avoids the border of
    'constant' zeros, which after normalization is not black).

    Done as 2 x (2*pad+1) masked slice copies (rows, then columns) instead of a per-pixel gather:
    each copy is a contiguous block move, so the cost is about two copies of the batch."""
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    if mode == "reflect" and (pad >= h or pad >= w):
        mode = "replicate"  # reflect needs pad < size
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    shifts = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=generator.device if generator else "cpu")
    shifts = shifts.to(x.device)
    rows = torch.empty((b, c, h, w + 2 * pad), dtype=x.dtype, device=x.device)
    for s in range(2 * pad + 1):
        mask = shifts[0] == s
        if mask.any():
            rows[mask] = padded[mask, :, s : s + h, :]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for s in range(2 * pad + 1):
        mask = shifts[1] == s
        if mask.any():
            out[mask] = rows[mask, :, :, s : s + w]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images where `mask` [B] is true."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip of each image with probability 1/2."""
    mask = torch.rand(len(x), generator=generator, device=generator.device if generator else "cpu") < 0.5
    return flip_where(x, mask)


def image_coins(x: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random bit per image, computed from its (un-augmented) pixels.

    The loader does not say which row an image is; its pixels identify it well enough: the same
    image gives the same bit in every epoch, different images give independent-looking bits."""
    flat = x.detach().flatten(1)[:, :64].float()
    weights = torch.linspace(1.0, 2.0, flat.shape[1], device=x.device)
    value = (flat * weights).sum(1) * 9973.0
    return (value - torch.floor(value)) >= 0.5


def alternating_flip(x: torch.Tensor, epoch: int) -> torch.Tensor:
    """Flip each image on alternate epochs, phase given by `image_coins` (airbench's
    derandomized flipping): over two epochs every image is seen once each way."""
    return flip_where(x, image_coins(x) ^ bool(epoch % 2))


def augment_batch(
    x: torch.Tensor,
    augmentations: Sequence[str],
    *,
    pad: int = 4,
    generator: torch.Generator | None = None,
    epoch: int | None = None,
) -> torch.Tensor:
    """Apply `augmentations` (from `parse_augment`) to a batch. With `epoch` given, flips are
    alternating (derandomized) instead of random."""
    if "flip" in augmentations:
        x = alternating_flip(x, epoch) if epoch is not None else random_flip(x, generator)
    if "crop" in augmentations:
        x = pad_crop(x, pad, generator)
    return x
