"""Image priors for inverting a trained network (white-box): what makes optimised or generated
images look like the network's training data to the network itself.

    prior = BatchNormPrior(teacher)       # hooks every BatchNorm2d of `teacher`
    logits = teacher(x)                   # the forward records each layer's batch statistics
    loss = ce + 0.05 * prior.loss() + 1e-3 * total_variation(x)
    prior.remove()

`BatchNormPrior` is DeepInversion's feature-distribution regulariser (Yin et al. 2020): at each
BatchNorm2d the batch's per-channel mean and variance of its input are pulled toward the
running statistics the layer kept in training, ||mu - mu_bn||_2 + ||var - var_bn||_2, summed
over layers. It needs the network's weights and BN buffers: white-box only.
"""

from __future__ import annotations

import torch
from torch import nn


class BatchNormPrior:
    """Forward hooks on every BatchNorm2d of `module`; `loss()` is the distance of the last
    forward's batch statistics from the running ones (0 before any forward)."""

    def __init__(self, module: nn.Module):
        self.layers = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
        self._terms: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]

    def _record(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        assert isinstance(layer, nn.BatchNorm2d) and layer.running_mean is not None and layer.running_var is not None
        self._terms.append(
            torch.linalg.vector_norm(mean - layer.running_mean) + torch.linalg.vector_norm(var - layer.running_var)
        )

    def reset(self) -> None:
        """Forget the recorded statistics (call before a forward whose prior you want alone)."""
        self._terms = []

    def loss(self) -> torch.Tensor:
        """The prior of the forwards since the last reset (or loss()), then reset."""
        terms, self._terms = self._terms, []
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).sum()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's L2 total variation: the L2 norms of the differences to the right, below
    and along both diagonals, summed over the whole batch (as the paper's code, whose
    coefficients are for this form): a smoothness prior."""
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return torch.norm(d1) + torch.norm(d2) + torch.norm(d3) + torch.norm(d4)
