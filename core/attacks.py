"""Adversarial robustness: L2 projected gradient descent (Madry et al. 2018) on torch models.

The attack works in pixel space, images in [0, 1] before normalization: `model` must take
such images (wrap a checkpoint's network with `normalized(model, mean, std)`).

    adv = pgd_l2(model, x01, y, eps=0.5, steps=20)        # step size 2.5 * eps / steps
    robust = (model(adv).argmax(1) == y).float().mean()

Adversarial training (`train --adv pgd-l2`) attacks batches that are already normalized, with
the same ball and box in pixel space: `pgd_l2_normalized(Normalized(net, mean, std), x, y, ...)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import UsageError

ATTACKS = ("pgd-l2",)


def parse_eps(text: str | Sequence[float]) -> list[float]:
    """'0,0.5,1,2' -> [0.0, 0.5, 1.0, 2.0] (non-negative, finite)."""
    values = text if not isinstance(text, str) else [v for v in text.replace(" ", "").split(",") if v]
    try:
        eps = [float(v) for v in values]
    except ValueError as exc:
        raise UsageError(f"--eps {text!r} is not a list of numbers", "e.g. --eps 0,0.5,1,2") from exc
    if not eps or any(not (e >= 0 and e < float("inf")) for e in eps):
        raise UsageError(f"--eps {text!r}: give non-negative finite radii", "e.g. --eps 0,0.5,1,2")
    return eps


class Normalized(nn.Module):
    """`model((x - mean) / std)`: a network trained on normalized inputs, fed [0, 1] pixels."""

    mean: torch.Tensor  # buffers, declared so that type checkers know them
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def normalized(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> Normalized:
    return Normalized(model, mean, std).eval()


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def pgd_l2(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 20, step_size: float | None = None
) -> torch.Tensor:
    """Adversarial examples within an L2 ball of radius `eps` around `x` (in [0, 1]) that
    maximise the cross-entropy of `model`. Steps along the normalized gradient, then project
    onto the ball and the [0, 1] box. Starts at `x` (deterministic). Model is left in eval mode.
    """
    if eps <= 0 or steps <= 0:
        return x.detach()
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    model.eval()
    x = x.detach()
    delta = torch.zeros_like(x)
    # Only the images need gradients: with the weights frozen, autograd neither keeps what their
    # gradients would need nor computes them (a third less time per step on CPU, measured).
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = nn.functional.cross_entropy(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta + alpha * grad / _l2(grad)
                delta = delta * torch.clamp(eps / _l2(delta), max=1.0)  # project onto the ball
                delta = (x + delta).clamp_(0.0, 1.0) - x  # and the valid pixel box
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return (x + delta).detach()


def pgd_l2_normalized(net: Normalized, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int) -> torch.Tensor:
    """`pgd_l2` for a batch `x` already normalized for `net.model` ((x01 - mean) / std, as the
    training loop's batches are): back to [0, 1] with `net`'s mean and std, attacked there (the
    radius and the box of `eval --attack`), normalized again. The attack runs in float32, outside
    any autocast, with `net.model` in eval mode; its mode is restored afterwards."""
    was_training = net.model.training
    x01 = (x.float() * net.std + net.mean).clamp_(0.0, 1.0)
    with torch.autocast(x.device.type, enabled=False):
        adv01 = pgd_l2(net, x01, y, eps=eps, steps=steps)
    net.train(was_training)
    return ((adv01 - net.mean) / net.std).to(x.dtype)
