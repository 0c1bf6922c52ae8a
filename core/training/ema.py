"""An exponential moving average of a model's weights: what gets validated and delivered."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's parameters and buffers (its own copy)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))  # short warm-up
        src = list(model.state_dict().values())
        dst = list(self.model.state_dict().values())
        floats = [(d, s) for d, s in zip(dst, src) if d.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([d for d, _ in floats], [s for _, s in floats], 1.0 - decay)
        for d, s in zip(dst, src):
            if not d.dtype.is_floating_point:
                d.copy_(s)
