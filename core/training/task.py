"""What a task is to the training loop (fakecifar.training.loop.Engine).

The loop owns the schedule, EMA, precision, stop and NaN checks, DDP, history, checkpoints and
resume. A task owns the rest: the forward pass, the loss, its optimizers, how a step updates
them, its per-epoch metrics and any state of its own that a resume needs. Plain classification
is `ClassificationTask` (fakecifar.training.classification); a distillation task queries its
teacher inside `step` with the step's augmented images; a generator-based one owns a second
model and optimizer and alternates their updates in `step`.

    class MyTask(Task):
        def setup(self, model, device):
            self.opt = torch.optim.SGD(model.parameters(), lr=0.1)
        def optimizers(self):
            return [self.opt]
        def step(self, batch, ctx):
            x, y = batch
            with ctx.autocast():
                logits = ctx.net(x)
            loss = F.cross_entropy(logits.float(), y)
            ctx.update(loss, self.opt)
            return StepOutput(loss, len(x), (logits.argmax(1) == y).sum())
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .runtime import Dist


@dataclass
class StepOutput:
    """What one step reports: its loss (a scalar tensor: the loop sums it, weighted by `count`,
    for the epoch's train_loss and the NaN check), the number of examples, how many of them the
    model got right (train_acc; 0 where that means nothing), and other losses to `watch`."""

    loss: torch.Tensor
    count: int
    correct: torch.Tensor | float = 0.0
    # Other losses of the step that must stay finite (a generator's): the loop stops the run as
    # diverged, naming the first that is not, exactly as for `loss`.
    watch: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepContext:
    """The loop's side of a step, handed to `Task.step` (and `Task.evaluate`): the model to call
    (`net`: DDP-wrapped under torchrun; `model`: the bare one), the place and precision, the
    position (epoch, step within it, global step), and `autocast()` / `update()`."""

    net: nn.Module
    model: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None = None
    scaler: Any = None  # torch.amp.GradScaler with fp16 on CUDA
    dist: Dist = field(default_factory=Dist)
    epoch: int = 0
    step: int = 0
    global_step: int = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass (a no-op in fp32). Compute losses outside it, on
        `.float()` outputs: BatchNorm statistics and the loss stay float32."""
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """zero_grad, backward and step `optimizer` on `loss` (through the GradScaler in fp16)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()


class Task:
    """The interface (subclass it; the defaults do nothing). Every method runs on every DDP
    process."""

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Called once the model is on its device (before DDP wraps it and before a resume's
        state is loaded): build the optimizers here, at their base learning rates (the loop's
        schedule multiplies those per step)."""
        raise NotImplementedError

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers whose learning rate the loop schedules and whose state it saves."""
        raise NotImplementedError

    def step(self, batch: Any, ctx: StepContext) -> StepOutput:
        """One training step on `batch` (from the run's BatchSource): forward under
        `ctx.autocast()`, loss, and the updates (`ctx.update(loss, optimizer)`, in any order and
        number)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """Per-epoch metrics (e.g. val_loss, val_acc, teacher agreement) of `model` (the EMA
        weights when there is an EMA), reduced over processes. A key ending in `loss` that is not
        finite stops the run as diverged; `val_loss` drives save-best and early stopping."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """State of the task's own to save for an exact resume (besides its optimizers, which the
        loop saves): tensors, numbers, strings, lists and dicts of them (weights_only loading)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (called on resume, after `setup`)."""
