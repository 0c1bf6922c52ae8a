"""Callbacks: what the training loop calls around its epochs, and the owners of every file a run
writes (the checkpoint, the JSON-lines log, per-epoch snapshots) and of the decisions to keep
the best weights and to stop early.

Hooks, in the order the loop calls them (fakecifar.training.loop):

    on_step(engine, count)             after each step (every process)
    on_epoch_end(engine, record)       every process, before the save; may engine.request_stop()
    on_save(engine, state, epoch, stopped)   rank 0: the resume state was assembled: write it
    on_record(engine, record)          rank 0, after the save: log lines, progress, snapshots
    state_dict() / load_state_dict(state)    entries of the resume state this callback owns

A callback's `state_dict` keys go into the checkpoint's `resume` entry beside the loop's own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..checkpoint import save_checkpoint
from ..errors import write_error

if TYPE_CHECKING:
    from .loop import Engine


class Callback:
    def on_step(self, engine: Engine, count: int) -> None:
        pass

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        pass

    def on_save(self, engine: Engine, state: dict[str, Any], epoch: int, stopped: str) -> None:
        pass

    def on_record(self, engine: Engine, record: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class ResumeValues(Callback):
    """Fixed values kept in the resume state (e.g. a budget-sized run's steps per epoch), so a
    resumed run reads them back instead of deriving them again."""

    def __init__(self, **values: Any):
        self.values = values

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)


class Hooks(Callback):
    """Plain functions: `on_step(count)` on every process, `on_epoch(record)` on rank 0."""

    def __init__(self, on_step: Callable[[int], None] | None = None, on_epoch: Callable[[dict], None] | None = None):
        self.step_fn, self.epoch_fn = on_step, on_epoch

    def on_step(self, engine: Engine, count: int) -> None:
        if self.step_fn:
            self.step_fn(count)

    def on_record(self, engine: Engine, record: dict[str, Any]) -> None:
        if self.epoch_fn:
            self.epoch_fn(record)


class SaveBest(Callback):
    """Keep a copy of the evaluated weights of the epoch with the lowest `val_loss`: the
    deliverable (Checkpoint asks `best.state`). `enabled=False` (no validation in this run)
    ignores a best state from before, which would freeze the delivered weights."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.val_loss: float | None = None
        self.epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        loss = record.get("val_loss")
        if loss is not None and (self.val_loss is None or loss < self.val_loss):
            self.val_loss, self.epoch = loss, record["epoch"]
            self.state = {k: v.detach().cpu().clone() for k, v in engine.eval_model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.val_loss, "best_epoch": self.epoch, "best_state": self.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.enabled:
            self.val_loss, self.epoch = state.get("best_val_loss"), state.get("best_epoch")
            self.state = state.get("best_state")


class EarlyStopping(Callback):
    """Stop after `patience` epochs without a lower `val_loss` (status "early-stop")."""

    def __init__(self, patience: int | None, enabled: bool = True):
        self.patience, self.enabled = patience, enabled
        self.best: float | None = None
        self.bad_epochs = 0

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        loss = record.get("val_loss")
        if loss is None:
            return
        if self.best is None or loss < self.best:
            self.best, self.bad_epochs = loss, 0
        else:
            self.bad_epochs += 1
        if self.patience is not None and self.bad_epochs >= self.patience:
            engine.request_stop("early-stop")

    def state_dict(self) -> dict[str, Any]:
        return {"bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bad_epochs = int(state.get("bad_epochs", 0))
        if self.enabled:
            self.best = state.get("best_val_loss")


class Checkpoint(Callback):
    """Write the fakecifar `.pt` (fakecifar.checkpoint) after every epoch and on interruption:
    `state_dict` is the deliverable (the best weights on validation loss, else the evaluated
    ones), `train` the run's metadata (`info`, the arguments, history, status), `resume` the
    engine's state. `meta`: arch, arch_kwargs, classes, mean, std, input_size; `build()` makes an
    empty model of the architecture; `args()` the arguments to record."""

    def __init__(
        self,
        output: Path,
        *,
        meta: Mapping[str, Any],
        info: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
        args: Callable[[], dict],
        build: Callable[[], nn.Module],
        best: SaveBest | None = None,
    ):
        self.output, self.meta, self.info, self.args, self.build, self.best = output, meta, info, args, build, best

    def deliverable(self, engine: Engine) -> dict[str, torch.Tensor]:
        if self.best is not None and self.best.state is not None:
            return self.best.state
        return {k: v.detach().cpu().clone() for k, v in engine.eval_model.state_dict().items()}

    def on_save(self, engine: Engine, state: dict[str, Any], epoch: int, stopped: str) -> None:
        holder = self.build()
        holder.load_state_dict(self.deliverable(engine))
        best = self.best or SaveBest(enabled=False)
        train_meta = {
            **(self.info() if callable(self.info) else self.info),
            "args": self.args(),
            "epochs_done": epoch,
            "stopped": stopped,
            "history": engine.history,
            "metrics": engine.history[-1] if engine.history else {},
            "best_epoch": best.epoch,
            "best_val_loss": best.val_loss,
            "elapsed_s": state["elapsed_s"],
        }
        save_checkpoint(self.output, holder, train=train_meta, extra={"resume": state}, **self.meta)


class JsonlLog(Callback):
    """One JSON line per epoch record. Created (or, with `append`, opened for appending) at
    once, so that a log that cannot be written fails before the first epoch, not after it."""

    def __init__(self, path: Path, append: bool = False):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            open(self.path, "a" if append else "w").close()
        except OSError as exc:
            raise write_error(exc, self.path) from exc

    def on_record(self, engine: Engine, record: dict[str, Any]) -> None:
        append_line(self.path, json.dumps(record))


class EpochSnapshots(Callback):
    """The evaluated weights of every `every`-th epoch as a loadable checkpoint
    `DIRECTORY/epoch-NNN.pt` (e.g. for influence scores along the trajectory)."""

    def __init__(self, directory: Path, meta: Mapping[str, Any], every: int = 1):
        self.directory, self.meta, self.every = Path(directory), meta, every

    def on_record(self, engine: Engine, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        if epoch % self.every == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"epoch-{epoch:03d}.pt"
            save_checkpoint(path, engine.eval_model, train=dict(record), **self.meta)


def append_line(path: Path, line: str) -> None:
    """Append one line to a log; on failure (a full disk) cut the file back to its earlier lines,
    so that it never ends in half a record, and raise the typed error."""
    size = None
    try:
        with open(path, "a") as fh:
            size = fh.tell()
            fh.write(line + "\n")
            fh.flush()
    except OSError as exc:
        if size is not None:
            try:
                os.truncate(path, size)
            except OSError:
                pass
        raise write_error(exc, path) from exc
