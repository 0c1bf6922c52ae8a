"""Mixing the images of a batch (mixup, cutmix) for distillation with online queries.

When the teacher is asked about every training view, a mixed image needs no mixed label: the
teacher's answer to the blend *is* its target, and answers between classes carry most of what
a teacher knows beyond its top-1 (Knockoff Nets, Orekondy et al. 2019; mixup, Zhang et al.
2018; CutMix, Yun et al. 2019). The blend is drawn from a generator of (seed, epoch, step)
(fakecifar.augment.step_generator, salted apart from the crops'), so a resumed run mixes
exactly as an uninterrupted one would.

Images are mixed after normalization: mixing is convex, so it commutes with the per-channel
affine normalization.
"""

from __future__ import annotations

import torch

from ..distill_config import MIXES

MIX_SALT = 0x6D6978  # added to the run's seed: the mixes' draws are not the crops' draws


def mix_batch(
    x: torch.Tensor, kind: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x` (N, C, H, W) mixed with a permutation `perm` of itself, one weight lam ~ U(0, 1) per
    image (Beta(1, 1), the papers' default): mixup blends whole images, lam * x + (1 - lam) *
    x[perm]; cutmix pastes a box of area about 1 - lam from x[perm]. Returns (mixed, perm, kept):
    `kept` is the share of each mixed image that is still its own (for its hard label)."""
    n = len(x)
    if kind == "none" or n < 2:
        return x, torch.arange(n, device=x.device), torch.ones(n, device=x.device)
    perm = torch.randperm(n, generator=generator).to(x.device)
    lam = torch.rand(n, generator=generator)
    if kind == "mixup":
        lam = lam.to(x.device, x.dtype)
        return lam.view(n, 1, 1, 1) * x + (1 - lam.view(n, 1, 1, 1)) * x[perm], perm, lam
    if kind == "cutmix":
        h, w = x.shape[-2:]
        cut = torch.sqrt(1 - lam)
        ch, cw = (cut * h).round().long(), (cut * w).round().long()
        cy = torch.randint(0, h, (n,), generator=generator)
        cx = torch.randint(0, w, (n,), generator=generator)
        ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        top, bottom = (cy - ch // 2).clamp(0, h).view(n, 1, 1), (cy + (ch + 1) // 2).clamp(0, h).view(n, 1, 1)
        left, right = (cx - cw // 2).clamp(0, w).view(n, 1, 1), (cx + (cw + 1) // 2).clamp(0, w).view(n, 1, 1)
        box = (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)  # (N, H, W)
        kept = 1 - box.flatten(1).float().mean(1)
        return torch.where(box.unsqueeze(1).to(x.device), x[perm], x), perm, kept.to(x.device)
    raise ValueError(f"unknown mix {kind!r} (use {', '.join(MIXES)})")


def mixed_labels(labels: torch.Tensor, perm: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The hard label of each mixed image: that of whichever image fills most of it."""
    return torch.where(kept >= 0.5, labels, labels[perm])
