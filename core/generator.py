"""The image generator of data-free distillation, and the discriminator that pre-trains it on a
proxy set (dfms).

`Generator` is the small DCGAN-style network of DAFL, DFAD and DFME (Radford et al. 2016):
latent z -> linear -> (H/4 x W/4) maps -> two (upsample x2, conv, BN, LeakyReLU) stages ->
conv -> tanh, sized to the teacher's input. It returns images in [0, 1], the range every
teacher takes (fakecifar.teachers). `Discriminator` is its DCGAN counterpart for the GAN
pre-training of dfms on proxy images.

Options (each a `distill` setting, fakecifar.distill_config): `latent` (the size of z),
`width` (the channels of the last stage; the first has twice as many).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Generator(nn.Module):
    def __init__(self, latent: int = 256, width: int = 64, image_size: Sequence[int] = (32, 32), channels: int = 3):
        super().__init__()
        h, w = int(image_size[0]), int(image_size[1])
        if h % 4 or w % 4:
            raise ValueError(f"the generator makes images whose sides divide by 4, not {h}x{w}")
        self.latent, self.width, self.image_size = int(latent), int(width), (h, w)
        self.init = (h // 4, w // 4)
        self.project = nn.Linear(self.latent, 2 * width * self.init[0] * self.init[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(len(z), 2 * self.width, *self.init)
        return (self.body(x) + 1) * 0.5  # tanh's [-1, 1] -> [0, 1]

    def options(self) -> dict[str, object]:
        """What rebuilds it: Generator(**options())."""
        return {"latent": self.latent, "width": self.width, "image_size": list(self.image_size)}


class Discriminator(nn.Module):
    """DCGAN discriminator on [0, 1] images: strided convs -> one real/fake logit per image."""

    def __init__(self, width: int = 64, image_size: Sequence[int] = (32, 32), channels: int = 3):
        super().__init__()
        h, w = int(image_size[0]), int(image_size[1])
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
            nn.Linear(2 * width * (h // 4) * (w // 4), 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1).squeeze(1)
