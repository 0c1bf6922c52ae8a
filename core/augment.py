"""Batch-level data augmentation on tensors: a whole batch at once, on its device.

No per-image PIL work in the training loop: `BatchLoader` hands over a normalized float batch
[B, C, H, W] and these functions transform it with a handful of tensor ops.

    gen = torch.Generator().manual_seed(0)
    x = pad_crop(x, 4, gen)          # random translation by up to 4 px (reflect padding)
    x = random_flip(x, gen)          # horizontal flip with probability 1/2

Three more destroy high-frequency detail, for detectors whose signal may live there (issue 14
asks whether they help or hurt): each is applied to a seeded half of the batch's images.

    x = random_jpeg(x, mean, std, gen)   # re-encoded as JPEG at a quality in 50..95
    x = random_resize(x, gen)            # down to 50..87.5% of the side (16..28 px at 32) and back
    x = random_blur(x, gen)              # Gaussian blur, sigma in 0.4..1.2 px

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

# augment_batch applies the degradations of the stored image first (jpeg, resize, blur), then
# flip and crop.
AUGMENTATIONS = ("crop", "flip", "jpeg", "resize", "blur")
DEGRADED_FRACTION = 0.5  # of the images of a batch, for each of jpeg, resize and blur
JPEG_QUALITY = (50, 95)
RESIZE_SCALE = (0.5, 0.875)  # of the image's side: 16..28 px at 32
BLUR_SIGMA = (0.4, 1.2)
BLUR_RADIUS = 3


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
            f"use a comma-separated subset of {','.join(AUGMENTATIONS)}, or none",
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


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=generator.device if generator else "cpu")
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _chosen(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """The images a degradation applies to: each with probability DEGRADED_FRACTION."""
    return torch.rand(n, generator=generator, device=generator.device if generator else "cpu") < DEGRADED_FRACTION


def random_blur(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Gaussian blur (sigma in BLUR_SIGMA px, a 7x7 kernel: +-2.5 sigma at the largest, reflect
    borders) of a random half of the images: one depthwise convolution over the batch, a kernel
    per image."""
    b, c, h, w = x.shape
    chosen, sigma = _chosen(b, generator), _uniform(b, BLUR_SIGMA, generator)
    r = BLUR_RADIUS
    taps = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(taps.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    g = g / g.sum(1, keepdim=True)  # [B, 5]
    kernel = (g[:, :, None] * g[:, None, :]).to(x.device, x.dtype)  # [B, k, k]
    kernel = kernel.repeat_interleave(c, 0).unsqueeze(1)  # [B*C, 1, k, k]
    flat = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect" if min(h, w) > r else "replicate")
    blurred = F.conv2d(flat, kernel, groups=b * c).view(b, c, h, w)
    out = torch.where(chosen.to(x.device).view(-1, 1, 1, 1), blurred, x)
    return out.contiguous(memory_format=torch.channels_last) if _channels_last(x) else out


def random_resize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random half of the images scaled down to a square side of RESIZE_SCALE times theirs and
    back to their own size, bilinear with antialiasing: the detail above the smaller size's
    Nyquist frequency is gone, the layout is not."""
    b, _, h, w = x.shape
    chosen = _chosen(b, generator)
    sizes = (_uniform(b, RESIZE_SCALE, generator) * min(h, w)).round().long().clamp(min=1)
    out = x.clone()
    for size in sizes[chosen].unique().tolist():
        rows = (chosen & (sizes == size)).nonzero().flatten().to(x.device)
        small = F.interpolate(x[rows], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[rows] = F.interpolate(small, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return out


def random_jpeg(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random half of the images re-encoded as JPEG (quality in JPEG_QUALITY, pillow's codec
    with its default 4:2:0 chroma subsampling, an image at a time on the CPU): `x` is normalized
    by `mean`/`std` (the loader's), so each image goes back to 8-bit pixels, is coded, decoded
    and normalized again."""
    import io

    import numpy as np
    from PIL import Image

    b = len(x)
    chosen, quality = _chosen(b, generator), _uniform(b, (JPEG_QUALITY[0], JPEG_QUALITY[1] + 1), generator)
    rows = chosen.nonzero().flatten().tolist()
    if not rows:
        return x
    m, s = mean.view(1, -1, 1, 1).to(x.device), std.view(1, -1, 1, 1).to(x.device)
    pixels = ((x[rows].float() * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
    decoded = []
    for image, q in zip(pixels.permute(0, 2, 3, 1).cpu().numpy(), quality[rows].floor().tolist()):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(q))
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    coded = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(x.device, torch.float32) / 255.0
    out = x.clone()
    out[rows] = ((coded - m) / s).to(x.dtype)
    return out


def augment_batch(
    x: torch.Tensor,
    augmentations: Sequence[str],
    *,
    pad: int = 4,
    generator: torch.Generator | None = None,
    epoch: int | None = None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply `augmentations` (from `parse_augment`) to a batch: jpeg, resize, blur, flip, crop. With
    `epoch` given, flips are alternating (derandomized) instead of random. jpeg needs the
    loader's `mean` and `std` (the batch is normalized)."""
    # Alternating flips take each image's phase from its stored pixels: before any degradation.
    coins = image_coins(x) if "flip" in augmentations and epoch is not None else None
    if "jpeg" in augmentations:
        if mean is None or std is None:
            raise ValueError("the jpeg augmentation needs the batch's mean and std")
        x = random_jpeg(x, mean, std, generator)
    if "resize" in augmentations:
        x = random_resize(x, generator)
    if "blur" in augmentations:
        x = random_blur(x, generator)
    if "flip" in augmentations:
        x = (
            flip_where(x, coins ^ bool(epoch % 2))
            if coins is not None and epoch is not None
            else random_flip(x, generator)
        )
    if "crop" in augmentations:
        x = pad_crop(x, pad, generator)
    return x
