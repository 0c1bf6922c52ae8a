"""The classification task: SGD on hard labels (with label smoothing), or on soft targets (the
batch's `logits` column: KL at a temperature, or MSE of logits) mixed with hard labels by
`alpha`; validation loss and accuracy per epoch (with flip TTA). With `adv` (train --adv pgd-l2),
each step trains on L2 PGD adversarial examples of its batch (Madry et al. 2018,
fakecifar.attacks.pgd_l2_normalized) instead of the batch itself.

Batches are `(images, columns)` from `ShardBatches`. A distillation task that queries a teacher
online subclasses it and overrides `soft_targets` (the teacher sees this step's augmented
images) and `evaluate` (to add teacher agreement), and keeps its ledger in `state_dict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import Normalized, pgd_l2_normalized
from ..evaluate import needed_columns
from ..loader import ROW, BatchLoader
from .config import check_adversarial
from .runtime import Dist, all_sum
from .task import StepContext, StepOutput, Task

if TYPE_CHECKING:
    from .dynamics import TrainingDynamics


def soft_loss(kind: str, logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distillation loss against the teacher's logits (or log-probabilities): KL(teacher_T ||
    student_T) * T^2 (Hinton et al.), mean absolute (l1) or squared (l2) error of the logits, or
    cross-entropy on the teacher's top-1 class (ce: all a label-only teacher gives)."""
    if kind == "kl":
        t = temperature
        return F.kl_div(
            F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True
        ) * (t * t)
    if kind == "l1":
        return F.l1_loss(logits, teacher)
    if kind == "ce":
        return F.cross_entropy(logits, teacher.argmax(1))
    return F.mse_loss(logits, teacher)


def hard_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def batch_targets(cols: dict[str, torch.Tensor], target: str, num_classes: int) -> torch.Tensor:
    """The class index of each image for `target` (class, origin, origin+class); -1: none."""
    if target == "class":
        return cols["labels"]
    origin = cols["origin"].long()
    if target == "origin":
        return origin
    labels = cols["labels"]
    return torch.where((labels >= 0), origin * num_classes + labels, torch.full_like(labels, -1))


class ClassificationTask(Task):
    """`config` is a TrainConfig (lr, momentum, weight_decay, nesterov, target, soft,
    temperature, alpha, label_smoothing, tta, adv, adv_eps, adv_steps); `num_classes` counts the
    data's classes (the origin+class target doubles them); `val` feeds the per-epoch validation;
    `mean` and `std` are the batches' normalization, which adversarial training needs to attack in
    [0, 1] pixel space (train() passes them to a task factory)."""

    def __init__(
        self,
        config: Any,
        num_classes: int,
        val: BatchLoader | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        self.config, self.num_classes, self.val = config, num_classes, val
        self.hard_weight = (1.0 - config.alpha) if config.soft is not None else 1.0
        self.optimizer: torch.optim.Optimizer | None = None
        self.adv = getattr(config, "adv", None)
        if self.adv is not None:
            check_adversarial(config)  # again: distillation sets its soft targets after validate_config
            if mean is None or std is None:
                raise ValueError(
                    "adversarial training needs the batches' mean and std: ClassificationTask(mean=, std=)"
                )
        self.normalization = (list(mean), list(std)) if mean is not None and std is not None else None
        # train --dynamics sets it (fakecifar.training.dynamics); the batches then carry ROW.
        self.dynamics: TrainingDynamics | None = None
        self.attacked: Normalized | None = None  # the model fed [0, 1] pixels, for the attack

    def setup(self, model: nn.Module, device: torch.device) -> None:
        c = self.config
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov
        )
        if self.adv is not None and self.normalization is not None:
            # `model` is the bare module (ctx.model), never the DDP wrapper: the attack's gradients
            # are taken w.r.t. the images only, so there is nothing to synchronise, and each
            # process attacks its own slice of the batch.
            self.attacked = Normalized(model, *self.normalization)

    def adversarial(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The step's training images: `x` itself, or with --adv its PGD adversarial examples
        (normalized like `x`). The attack is deterministic (no random start, as `eval --attack`),
        so a step's examples are a function of the weights and the batch: resume stays exact.

        BatchNorm: the attack runs in eval mode, so its iterates neither move the running
        statistics nor see each other through batch statistics; the update that follows runs in
        train mode on the adversarial batch, so the statistics follow the inputs the model is
        trained on, as in Madry et al. (clean accuracy pays a little for it)."""
        if self.attacked is None:
            return x
        c = self.config
        return pgd_l2_normalized(self.attacked, x, y, eps=c.adv_eps, steps=c.adv_steps)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        assert self.optimizer is not None, "setup() first"
        return [self.optimizer]

    def soft_targets(self, x: torch.Tensor, cols: dict[str, torch.Tensor], ctx: StepContext) -> torch.Tensor | None:
        """The teacher's logits (or log-probabilities) for this batch; None: hard labels only."""
        return cols.get("logits")

    def loss(self, logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        if teacher is None:
            return hard_loss(logits, y, c.label_smoothing)
        loss = c.alpha * soft_loss(c.soft, logits, teacher.float(), c.temperature)
        if self.hard_weight > 0:
            mask = y >= 0
            if mask.any():
                loss = loss + self.hard_weight * hard_loss(logits[mask], y[mask], c.label_smoothing)
        return loss

    def step(self, batch: tuple[torch.Tensor, dict[str, torch.Tensor]], ctx: StepContext) -> StepOutput:
        x, cols = batch
        y = batch_targets(cols, self.config.target, self.num_classes)
        x = self.adversarial(x, y)  # train_loss and train_acc are then those of the adversarial batch
        with ctx.autocast():
            logits = ctx.net(x)
        loss = self.loss(logits.float(), y, self.soft_targets(x, cols, ctx))
        # Dynamic students (gated ResNets, fakecifar.models) add their gates' sparsity term;
        # ctx.model: the bare module, which a DDP wrapper does not forward attributes of.
        gate_loss = getattr(ctx.model, "gate_loss", None)
        if gate_loss is not None:
            loss = loss + gate_loss()
        ctx.update(loss, self.optimizers()[0])
        if self.dynamics is not None:  # train --dynamics: this forward's per-row record
            self.dynamics.record(cols[ROW], logits.detach(), y, ctx.epoch)
        with torch.no_grad():
            mask = y >= 0
            correct = (logits.argmax(1)[mask] == y[mask]).sum()
        return StepOutput(loss, len(x), correct)

    def evaluate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        if self.val is None:
            return {}
        val_loss, val_acc = _validate(
            model, self.val, self.config, self.num_classes, ctx.amp_dtype, ctx.device, ctx.dist
        )
        return {"val_loss": val_loss, "val_acc": val_acc}


@torch.no_grad()
def _validate(
    model: nn.Module,
    loader: BatchLoader,
    config: Any,
    num_classes: int,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    dist: Dist,
) -> tuple[float, float]:
    """(loss, accuracy) of `model` on `loader`, summed over processes (each has its slice)."""
    was_training = model.training
    model.eval()
    columns = needed_columns(config.target)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in loader:
        x, cols = batch[0], dict(zip(columns, batch[1:]))
        y = batch_targets(cols, config.target, num_classes)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
            if config.tta:
                logits = (logits + model(x.flip(-1))) / 2
        logits = logits.float()
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    all_sum(totals, dist)
    model.train(was_training)
    n = max(totals[2].item(), 1)
    return totals[0].item() / n, totals[1].item() / n
