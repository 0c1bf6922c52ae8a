"""Training dynamics: what each training image did during training, recorded from the training
forward pass itself (no extra pass), for `fakecifar dropout --score el2n|aum|forgetting`.

Per epoch and per row of the training set, from the step that trained on it (augmented view,
train mode, as the papers do):
- `margin`: the assigned class's logit minus the largest other logit (AUM, Pleiss et al. 2020:
  the area under the margin is its mean over epochs; low or negative: likely mislabelled);
- `correct`: whether the prediction was the label (forgetting events, Toneva et al. 2019: a
  correct -> wrong transition between consecutive presentations);
- `el2n`: || softmax - onehot(label) ||_2 (EL2N, Paul et al. 2021: early in training, averaged
  over runs; high: hard or mislabelled).

    fakecifar train fake/train --dynamics dyn.h5 -o m.pt     # or train(..., dynamics="dyn.h5")
    aum(read_dynamics("dyn.h5"))                             # one score per row, the data's order

`train` wires the recorder (an Engine callback) into its ClassificationTask, which records every
step; the file is rewritten after every epoch.

The record is part of the resume state, so a resumed run records the same. `train` refuses it
under torchrun for now: each process would record its own rows (summed at the epoch's end), but
a save in mid-epoch holds only rank 0's, so a resumed record would be wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..loader import ROW
from .callbacks import Callback
from .runtime import Dist, all_sum

__all__ = ["ROW", "Dynamics", "TrainingDynamics", "aum", "el2n", "forgetting", "read_dynamics"]


class TrainingDynamics(Callback):
    """The per-epoch, per-row record (see the module doc). `record` is called by the task on
    every training step; the epoch's values are merged over processes at its end."""

    def __init__(
        self,
        rows: int,
        epochs: int,
        dist: Dist | None = None,
        *,
        path: str | os.PathLike | None = None,
        sha256: np.ndarray | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.rows, self.epochs, self.dist = int(rows), int(epochs), dist or Dist()
        # Where the record goes after every epoch (rank 0), with the rows' pixel hashes.
        self.path, self.sha256, self.meta = (Path(path) if path else None), sha256, dict(meta or {})
        self.margin = np.zeros((self.epochs, self.rows), np.float32)
        self.el2n = np.zeros((self.epochs, self.rows), np.float32)
        self.correct = np.full((self.epochs, self.rows), -1, np.int8)  # -1: not presented that epoch
        self.epoch = 0

    def record(self, rows: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
        """One step's rows (their index in the training set), the training forward's logits and
        the hard labels (rows whose label is < 0, unlabelled, are skipped)."""
        with torch.no_grad():
            keep = labels >= 0
            rows, logits, labels = rows[keep], logits[keep].float(), labels[keep]
            if not len(rows):
                return
            assigned = logits.gather(1, labels[:, None]).squeeze(1)
            others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
            probs = F.softmax(logits, 1)
            error = torch.linalg.vector_norm(probs - F.one_hot(labels, logits.shape[1]).float(), dim=1)
            correct = logits.argmax(1) == labels
        index = rows.cpu().numpy()
        self.margin[epoch, index] = (assigned - others).cpu().numpy()
        self.el2n[epoch, index] = error.cpu().numpy()
        self.correct[epoch, index] = correct.cpu().numpy().astype(np.int8)

    # -- the engine's callback interface

    def on_epoch_end(self, engine: Any, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"]) - 1
        if self.dist.enabled:  # each process holds its rows; zeros (and -1s) elsewhere
            device = engine.device
            for name in ("margin", "el2n"):
                row = torch.from_numpy(getattr(self, name)[epoch]).to(device)
                getattr(self, name)[epoch] = all_sum(row, self.dist).cpu().numpy()
            seen = torch.from_numpy(self.correct[epoch].astype(np.float32) + 1).to(device)  # 0: not seen
            self.correct[epoch] = (all_sum(seen, self.dist).cpu().numpy() - 1).astype(np.int8)
        self.epoch = epoch + 1

    def on_record(self, engine: Any, record: dict[str, Any]) -> None:
        if self.path is not None and self.sha256 is not None:
            self.write(self.path, sha256=self.sha256, meta=self.meta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "dynamics": {
                "margin": torch.from_numpy(self.margin.copy()),
                "el2n": torch.from_numpy(self.el2n.copy()),
                "correct": torch.from_numpy(self.correct.copy()),
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("dynamics")
        if not saved:
            return
        epochs = min(self.epochs, int(saved["margin"].shape[0]))  # a resume may add epochs
        if int(saved["margin"].shape[1]) != self.rows:
            raise ValueError(f"the run's dynamics record has {saved['margin'].shape[1]} rows, the data {self.rows}")
        for name in ("margin", "el2n", "correct"):
            getattr(self, name)[:epochs] = saved[name].numpy()[:epochs]
        self.epoch = min(int(state.get("epoch", 0)), self.epochs)

    # -- the file

    def write(self, path: str | os.PathLike, *, sha256: np.ndarray, meta: dict[str, Any]) -> Path:
        """Write the epochs recorded so far to `path` (HDF5, atomically): `margin`, `el2n`,
        `correct` [epochs, rows], the rows' pixel `sha256` (so that scores are matched to the
        rows they were computed on) and `meta` as attributes."""
        import h5py

        from ..outputs import fsync_dir

        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        done = self.epoch
        with h5py.File(partial, "w") as f:
            f.create_dataset("margin", data=self.margin[:done], compression="gzip")
            f.create_dataset("el2n", data=self.el2n[:done], compression="gzip")
            f.create_dataset("correct", data=self.correct[:done], compression="gzip")
            f.create_dataset("sha256", data=sha256)
            for key, value in meta.items():
                f.attrs[key] = value
            f.attrs["epochs"] = done
        os.replace(partial, path)
        fsync_dir(path.parent)
        return path


@dataclass
class Dynamics:
    """A dynamics file as read back: [epochs, rows] arrays, the rows' sha256, the attributes."""

    margin: np.ndarray
    el2n: np.ndarray
    correct: np.ndarray
    sha256: np.ndarray
    meta: dict[str, Any]


def read_dynamics(path: str | os.PathLike) -> Dynamics:
    import h5py

    with h5py.File(path, "r") as f:
        return Dynamics(f["margin"][:], f["el2n"][:], f["correct"][:], f["sha256"][:], {k: f.attrs[k] for k in f.attrs})


def aum(d: Dynamics) -> np.ndarray:
    """Area under the margin: the mean margin over the epochs each row was presented (low:
    suspicious). Rows never presented get +inf (nothing against them)."""
    seen = d.correct >= 0
    total = np.where(seen, d.margin, 0).sum(0, dtype=np.float64)
    count = seen.sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.inf)


def forgetting(d: Dynamics) -> np.ndarray:
    """Forgetting events: correct -> wrong transitions between a row's consecutive presentations.
    A row never predicted correctly counts as forgotten at every epoch but one more (the most
    suspicious of all, as Toneva et al. rank them)."""
    out = np.zeros(d.correct.shape[1], np.float64)
    learned = np.zeros(d.correct.shape[1], bool)
    previous = np.full(d.correct.shape[1], -1, np.int8)
    for epoch in d.correct:
        seen = epoch >= 0
        out += seen & (previous == 1) & (epoch == 0)
        learned |= epoch == 1
        previous = np.where(seen, epoch, previous)
    return np.where(learned, out, len(d.correct) + 1)


def el2n(d: Dynamics, epochs: int | None = None) -> np.ndarray:
    """Mean error L2 norm over the first `epochs` epochs (all when None; high: hard or noisy)."""
    window = slice(0, epochs or len(d.el2n))
    seen = d.correct[window] >= 0
    total = np.where(seen, d.el2n[window], 0).sum(0, dtype=np.float64)
    return total / np.maximum(seen.sum(0), 1)
