"""How a run stops early: a loss that became NaN (`TrainingDiverged`), or SIGINT/SIGTERM
(`StopFlag`, then `TrainingInterrupted` once the state is saved)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from ..errors import FakecifarError


class TrainingDiverged(FakecifarError):
    """The loss became NaN or infinite (exit 1); the checkpoint on disk is the last good one."""


class TrainingInterrupted(FakecifarError):
    """SIGINT (Ctrl-C) or SIGTERM during training: the state was saved; exit 130 (SIGINT) or 143
    (SIGTERM), 128 + the signal, like any interrupted tool."""

    exit_code = 130

    def __init__(self, message: str, hint: str | None = None, *, signum: int = signal.SIGINT):
        super().__init__(message, hint)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, like StopIteration
    """Raised by a task's `step` before it changes anything (e.g. its query budget is spent):
    the run ends at that step, its state saved mid-epoch as on a signal (so a resume with more
    budget goes on from there), and `Engine.run` returns `status`."""

    def __init__(self, status: str, message: str = ""):
        super().__init__(message or status)
        self.status, self.message = status, message


def diverged(output: Path, epoch: int, step: int, last_saved: int | None, what: str = "loss") -> TrainingDiverged:
    kept = f"{output} keeps the last good weights (epoch {last_saved})" if last_saved else "no checkpoint was written"
    return TrainingDiverged(
        f"{what} became NaN/inf in epoch {epoch + 1} at step {step}; stopped, {kept}",
        "lower --generator-lr"
        if what.startswith("generator")
        else "lower --lr, check the data, or try --precision fp32",
    )


class StopFlag:
    """SIGINT and SIGTERM set a flag the loop checks between steps (a half-done step is never
    saved) and remember which signal came; a second one stops at once (KeyboardInterrupt, or
    errors.Terminated for SIGTERM). `command` is what the resume hint tells the user to run."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, command: str = "fakecifar train") -> None:
        self.set = False
        self.signum: int | None = None
        self.command = command
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.set:
            if signum == signal.SIGTERM:
                from ..errors import Terminated

                raise Terminated()
            raise KeyboardInterrupt
        self.set = True
        self.signum = signum

    def interrupted(self, message: str, output: Path | str) -> TrainingInterrupted:
        """The error to raise once the state is saved: `message` says where the run stopped."""
        signum = self.signum or signal.SIGINT
        verb = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        return TrainingInterrupted(
            f"{verb} {message}; state saved to {output}",
            f"continue with: {self.command} --resume {output}",
            signum=signum,
        )

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()
