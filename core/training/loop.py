"""The training loop: `Engine(model, task, source, ...).run()`.

The engine owns what every training command shares: epochs and steps, the learning-rate
schedule (a factor of each optimizer's base lr, per step), the EMA of the weights, mixed
precision (autocast, GradScaler), the stop (SIGINT/SIGTERM) and NaN checks agreed across DDP
processes, the per-epoch record and history, and the resume state (assembled here, written by
the Checkpoint callback, loaded here). The task (fakecifar.training.task) owns the forward pass,
the loss and the optimizers; the source (fakecifar.training.sources) the batches; callbacks
(fakecifar.training.callbacks) the files and the decisions to stop early.

Per epoch: batches -> task.step -> EMA -> sums and stop/NaN check -> on_step; then the record
(train_loss, train_acc, lr, images_per_s, the task's metrics, time_s, elapsed_s) -> on_epoch_end
(every process: save-best, early stopping) -> the save (on_save, rank 0) -> on_record (rank 0:
log lines, progress, snapshots). Same seed, same data: the same weights, interrupted or not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .callbacks import Callback
from .ema import EMA
from .runtime import Dist, all_sum, any_rank
from .sources import BatchSource
from .stopping import StopFlag, StopTraining, diverged
from .task import StepContext, Task

F64 = torch.float64


class Engine:
    """Train `model` with `task` on `source` for `epochs` (see the module docstring).

    `schedule(global_step)` -> lr factor; `ema`: decay per step (the EMA model is what the task
    evaluates and the callbacks deliver); `resume`: a state saved by this engine (the `resume`
    entry of a checkpoint); `output` and `command` name the checkpoint and the command in the
    messages of interrupted and diverged runs."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        source: BatchSource,
        *,
        epochs: int,
        schedule: Callable[[int], float] = lambda step: 1.0,
        device: torch.device | None = None,
        dist: Dist | None = None,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        ema: float | None = None,
        callbacks: Sequence[Callback] = (),
        resume: Mapping[str, Any] | None = None,
        output: str | Path = "model.pt",
        command: str = "fakecifar train",
    ):
        self.task, self.source, self.epochs, self.schedule = task, source, epochs, schedule
        self.device, self.dist = device or torch.device("cpu"), dist or Dist()
        self.callbacks, self.output, self.command = list(callbacks), Path(output), command
        state = dict(resume or {})
        self.resumed = bool(state)
        if state:
            model.load_state_dict(state["model"])
        model.to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        task.setup(model, self.device)
        self.optimizers = list(task.optimizers())
        self.base_lrs = [[group["lr"] for group in opt.param_groups] for opt in self.optimizers]
        saved = state.get("optimizer")
        if saved:
            for opt, opt_state in zip(self.optimizers, [saved] if isinstance(saved, Mapping) else saved):
                opt.load_state_dict(opt_state)
        if state.get("task") is not None:
            task.load_state_dict(state["task"])
        self.ema = EMA(model, ema) if ema else None
        if self.ema and state.get("ema"):
            self.ema.model.load_state_dict(state["ema"])
            self.ema.updates = int(state.get("ema_updates", 0))
        net: nn.Module = model
        if self.dist.enabled:
            cuda = self.device.type == "cuda"
            net = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if cuda else None)
        fp16_cuda = amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.ctx = StepContext(net, model, self.device, amp_dtype, self.scaler, self.dist)

        self.steps_per_epoch = len(source)
        self.history: list[dict] = list(state.get("history", []))
        self.start_epoch = int(state.get("epoch", 0))
        self.skip_steps = int(state.get("step", 0))
        self.global_step = int(state.get("global_step", self.start_epoch * self.steps_per_epoch + self.skip_steps))
        # The sums of the steps done before a mid-epoch interruption, so that the resumed epoch's
        # record covers the whole epoch (rank 0 carries them: they were summed over processes).
        self.carried = dict(state.get("epoch_partial") or {}) if self.skip_steps and self.dist.main else {}
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        for cb in self.callbacks:
            cb.load_state_dict(state)
        self.run_start = time.perf_counter()
        self.last_saved: int | None = self.start_epoch if self.resumed else None
        self.stop_reason: str | None = None

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and delivered: the EMA weights if any, else the trained ones."""
        return self.ema.model if self.ema else self.model

    def request_stop(self, reason: str) -> None:
        """From `on_epoch_end` (on every process alike): end the run after this epoch, with
        `reason` as its final status (e.g. "early-stop")."""
        self.stop_reason = reason

    # ------------------------------------------------------------------------- the run

    def run(self) -> str:
        """Train to the last epoch; returns the final status (completed, or a callback's reason).
        Raises TrainingDiverged (NaN/inf loss; nothing saved) or TrainingInterrupted (a signal;
        the state saved first)."""
        stopped = "completed"
        with StopFlag(self.command) as stop:
            for epoch in range(self.start_epoch, self.epochs):
                try:
                    record = self._train_epoch(epoch, stop)
                except StopTraining as exc:  # the task ended the run mid-epoch (state saved)
                    return exc.status
                done = epoch + 1
                self.stop_reason = None
                for cb in self.callbacks:
                    cb.on_epoch_end(self, record)
                early = self.stop_reason is not None
                if early:
                    stopped = str(self.stop_reason)
                # A signal during validation or the save stops here, at the epoch boundary.
                halt = not early and done < self.epochs and any_rank(stop.set, self.device, self.dist)
                self.save(done, 0, stopped if (early or done == self.epochs) else "interrupted" if halt else "running")
                self.last_saved = done
                if self.dist.main:
                    for cb in self.callbacks:
                        cb.on_record(self, record)
                if early:
                    break
                if halt:
                    raise stop.interrupted(f"after epoch {done}/{self.epochs}", self.output)
        return stopped

    def _train_epoch(self, epoch: int, stop: StopFlag) -> dict[str, Any]:
        """The steps of one epoch, then its record (validation included)."""
        self.model.train()
        device, ctx = self.device, self.ctx
        start = time.perf_counter()
        before = self.carried if epoch == self.start_epoch else {}
        skip = self.skip_steps if epoch == self.start_epoch else 0
        loss_sum = torch.tensor(float(before.get("loss_sum", 0.0)), dtype=F64, device=device)
        correct = torch.tensor(float(before.get("correct", 0.0)), dtype=F64, device=device)
        seen_before, time_before = int(before.get("seen", 0)), float(before.get("time_s", 0.0))
        seen = 0  # images of this epoch trained by this run (the speed is measured on them)
        step = 0
        ctx.epoch = epoch
        for step_index, batch in enumerate(self.source.batches(epoch, skip), start=skip):
            ctx.step, ctx.global_step = step_index, self.global_step
            factor = self.schedule(self.global_step)
            for opt, bases in zip(self.optimizers, self.base_lrs):
                for group, base in zip(opt.param_groups, bases):
                    group["lr"] = base * factor
            try:
                out = self.task.step(batch, ctx)
            except StopTraining as exc:
                self._save_partial(
                    epoch, step_index, loss_sum, correct, seen + seen_before, time_before, start, exc.status
                )
                raise
            if self.ema:
                self.ema.update(self.model)
            self.global_step += 1
            step = step_index + 1
            with torch.no_grad():
                loss_sum += out.loss.detach().double() * out.count
                correct += out.correct
            seen += out.count
            # Every step on CPU (free) and under DDP (all ranks must agree on when to stop);
            # every 25 steps on one GPU, where each check waits for the device.
            stop_now = nan_now = False
            for name, watched in out.watch.items():
                if not torch.isfinite(watched).all():  # checked at once, on this process (one-process tasks)
                    raise diverged(self.output, epoch, step, self.last_saved, what=name)
            if self.dist.enabled or device.type == "cpu" or step % 25 == 0 or stop.set:
                flags = torch.stack(
                    [torch.tensor(float(stop.set), dtype=F64, device=device), (~torch.isfinite(loss_sum)).double()]
                )
                stop_now, nan_now = (v > 0 for v in all_sum(flags, self.dist).tolist())
            if nan_now:
                raise diverged(self.output, epoch, step, self.last_saved)
            if stop_now:
                self._save_partial(
                    epoch, step, loss_sum, correct, seen + seen_before, time_before, start, "interrupted"
                )
                where = f"in epoch {epoch + 1}/{self.epochs} after step {step}/{self.steps_per_epoch}"
                raise stop.interrupted(where, self.output)
            for cb in self.callbacks:
                cb.on_step(self, out.count)
        if not torch.isfinite(loss_sum):
            raise diverged(self.output, epoch, step, self.last_saved)
        train_time = time.perf_counter() - start
        stats = torch.tensor(
            [loss_sum.item(), correct.item(), float(seen + seen_before), float(seen)], dtype=F64, device=device
        )
        all_sum(stats, self.dist)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "epochs": self.epochs,
            "train_loss": stats[0].item() / max(stats[2].item(), 1),
            "train_acc": stats[1].item() / max(stats[2].item(), 1),
            "lr": self.optimizers[0].param_groups[0]["lr"],
            "images_per_s": stats[3].item() / max(train_time, 1e-9),
        }
        metrics = self.task.evaluate(self.eval_model, ctx)
        record.update(metrics)
        for key, value in metrics.items():
            if key.endswith("loss") and not math.isfinite(value):
                what = "validation loss" if key == "val_loss" else key
                raise diverged(self.output, epoch, step, self.last_saved, what=what)
        record["time_s"] = time_before + time.perf_counter() - start
        record["elapsed_s"] = self.elapsed_before + time.perf_counter() - self.run_start
        self.history.append(record)
        return record

    def _save_partial(
        self,
        epoch: int,
        step: int,
        loss_sum: torch.Tensor,
        correct: torch.Tensor,
        seen: int,
        time_before: float,
        start: float,
        stopped: str,
    ) -> None:
        """Save mid-epoch, after `step` steps, with the epoch's sums so far (for its record on resume)."""
        sums = torch.stack([loss_sum, correct, torch.tensor(float(seen), dtype=F64, device=self.device)])
        loss_total, correct_total, seen_total = all_sum(sums, self.dist).tolist()
        partial = {
            "loss_sum": loss_total,
            "correct": correct_total,
            "seen": int(seen_total),
            "time_s": time_before + time.perf_counter() - start,
        }
        self.save(epoch, step, stopped, partial=partial)

    # ------------------------------------------------------------------------- resume state

    def save(self, epoch_done: int, step_in_epoch: int, stopped: str, partial: dict | None = None) -> None:
        """Assemble the resume state and hand it to the callbacks' `on_save` (rank 0 only).
        `partial`: the loss/accuracy sums of the steps done in an interrupted epoch (loss_sum,
        correct, seen, time_s), for its record after the resume."""
        if not self.dist.main:
            return
        optimizers = [opt.state_dict() for opt in self.optimizers]
        state: dict[str, Any] = {
            "epoch": epoch_done,
            "step": step_in_epoch,
            "global_step": self.global_step,
            "epoch_partial": partial,
            "model": cpu_copy(self.model),
            "optimizer": optimizers[0] if len(optimizers) == 1 else optimizers,
            "ema": cpu_copy(self.ema.model) if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }
        for cb in self.callbacks:
            state.update(cb.state_dict())
        task_state = self.task.state_dict()
        if task_state is not None:
            state["task"] = task_state
        state["history"] = self.history
        state["elapsed_s"] = self.elapsed_before + time.perf_counter() - self.run_start
        for cb in self.callbacks:
            cb.on_save(self, state, epoch_done, stopped)


def cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
