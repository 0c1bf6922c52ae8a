"""What a teacher (or a victim behind `fakecifar serve`) answers: its *output mode*.

A deployed model rarely shows its logits. The mode says how much it gives away:

    logits      the raw logits                       (white-box-like; most informative)
    probs       softmax probabilities                ("probs:K" rounds them to K decimals)
    topk:K      the K most likely classes with their probabilities
    label       the top-1 class only                 (hard-label black box)

`answer(logits, mode)` turns a model's logits into what the mode reveals, as a JSON-able dict
(the wire format of docs/serve.md); `Answers.from_wire(...)` reads it back; `Answers` gives a
student what it can learn from: `log_probs` (a logit-like vector for KL with temperature; None
for label-only), `labels` (top-1, always), `logits` (only in logits mode).

No torch here: the server and black-box clients work on numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UsageError

KINDS = ("logits", "probs", "topk", "label")
MAX_DECIMALS = 8
# log(0) is -inf; probabilities rounded to 0 (or classes outside a top-k) get this floor instead,
# so KL stays finite: e^-30 is far below any probability a model reports.
LOG_FLOOR = -30.0


@dataclass(frozen=True)
class OutputMode:
    kind: str  # one of KINDS
    k: int | None = None  # topk: how many classes
    decimals: int | None = None  # probs: rounded to this many decimals

    def __str__(self) -> str:
        if self.kind == "topk":
            return f"topk:{self.k}"
        if self.kind == "probs" and self.decimals is not None:
            return f"probs:{self.decimals}"
        return self.kind

    @property
    def soft(self) -> bool:
        """Does the answer carry more than a label?"""
        return self.kind != "label"


def parse_mode(text: str | OutputMode) -> OutputMode:
    """'logits', 'probs', 'probs:2', 'topk:5' or 'label' -> OutputMode."""
    if isinstance(text, OutputMode):
        return text
    spec = str(text).strip().lower()
    kind, _, arg = spec.partition(":")
    hint = "use logits, probs, probs:K (K decimals), topk:K or label"
    if kind not in KINDS or (arg and kind in ("logits", "label")):
        raise UsageError(f"unknown output mode {text!r}", hint)
    if kind == "topk":
        if not arg.isdigit() or int(arg) < 1:
            raise UsageError(f"output mode {text!r} needs a positive K, e.g. topk:5", hint)
        return OutputMode("topk", k=int(arg))
    if kind == "probs" and arg:
        if not arg.isdigit() or int(arg) > MAX_DECIMALS:
            raise UsageError(f"output mode {text!r}: decimals must be 0-{MAX_DECIMALS}", hint)
        return OutputMode("probs", decimals=int(arg))
    return OutputMode(kind)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def answer(logits: np.ndarray, mode: OutputMode) -> dict[str, Any]:
    """What `mode` reveals of these logits [N, C], as the JSON-able body fields of the protocol."""
    logits = np.asarray(logits, dtype=np.float32)
    if mode.kind == "logits":
        return {"logits": logits.tolist()}
    if mode.kind == "label":
        return {"labels": logits.argmax(axis=1).astype(int).tolist()}
    probs = softmax(logits)
    if mode.kind == "probs":
        if mode.decimals is not None:
            probs = np.round(probs, mode.decimals)
        return {"probs": probs.astype(np.float32).tolist()}
    k = min(int(mode.k or 1), logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return {
        "topk": {
            "indices": top.astype(int).tolist(),
            "probs": np.take_along_axis(probs, top, axis=1).astype(np.float32).tolist(),
        }
    }


@dataclass
class Answers:
    """A batch of answers in one mode, as arrays."""

    mode: OutputMode
    labels: np.ndarray  # int64 [N], top-1 class
    log_probs: np.ndarray | None  # float32 [N, C]: logits, or log-probabilities (floored); None for label
    logits: np.ndarray | None = None  # float32 [N, C], logits mode only

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_logits(cls, logits: np.ndarray, mode: OutputMode) -> Answers:
        """What a local model answers in `mode` (the same numbers the server would send)."""
        return cls.from_wire(answer(logits, mode), mode, num_classes=np.asarray(logits).shape[1])

    @classmethod
    def from_wire(cls, body: Mapping[str, Any], mode: OutputMode, num_classes: int) -> Answers:
        """Read a protocol response body; raises ValueError on a body that does not fit `mode`."""
        if mode.kind == "logits":
            values = _matrix(body.get("logits"), num_classes, "logits")
            return cls(mode, values.argmax(1).astype(np.int64), values, values)
        if mode.kind == "probs":
            probs = _matrix(body.get("probs"), num_classes, "probs")
            if (probs < 0).any() or (probs > 1.0 + 1e-3).any():
                raise ValueError("probabilities outside [0, 1]")
            return cls(mode, probs.argmax(1).astype(np.int64), _log(probs))
        if mode.kind == "label":
            raw = body.get("labels")
            if not isinstance(raw, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
                raise ValueError("'labels' is not a list of integers")
            labels = np.asarray(raw, dtype=np.int64)
            if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"a label outside 0..{num_classes - 1}")
            return cls(mode, labels, None)
        top = body.get("topk")
        if not isinstance(top, Mapping):
            raise ValueError("'topk' is missing")
        k = min(int(mode.k or 1), num_classes)
        indices = np.asarray(top.get("indices"), dtype=np.float64)
        probs = np.asarray(top.get("probs"), dtype=np.float64)
        if indices.ndim != 2 or indices.shape[1] != k or probs.shape != indices.shape:
            raise ValueError(f"'topk' is not two [N, {k}] lists")
        if not np.isfinite(probs).all() or (indices < 0).any() or (indices >= num_classes).any():
            raise ValueError("'topk' holds a class index out of range or a non-finite probability")
        index = indices.astype(np.int64)
        full = np.zeros((len(index), num_classes))
        np.put_along_axis(full, index, probs, axis=1)
        rest = num_classes - k
        if rest:  # the mass the answer did not show, spread evenly over the classes it hid
            missing = np.clip(1.0 - probs.sum(axis=1, keepdims=True), 0.0, 1.0) / rest
            hidden = np.ones_like(full, dtype=bool)
            np.put_along_axis(hidden, index, False, axis=1)
            full = np.where(hidden, missing, full)
        return cls(mode, index[:, 0] if k else full.argmax(1), _log(full))

    def to_wire(self) -> dict[str, Any]:
        """The arrays as a compact JSON-able dict (for caches and ledgers, not the protocol)."""
        return {
            "labels": self.labels.tolist(),
            "log_probs": None if self.log_probs is None else self.log_probs.tolist(),
            "logits": None if self.logits is None else self.logits.tolist(),
        }


def _matrix(value: Any, num_classes: int, name: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{name!r} is not a matrix of numbers") from None
    if array.ndim != 2 or array.shape[1] != num_classes:
        raise ValueError(f"{name!r} has shape {list(array.shape)}, expected [N, {num_classes}]")
    if not np.isfinite(array).all():
        raise ValueError(f"{name!r} holds NaN or infinite values")
    return array


def _log(probs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(np.asarray(probs, dtype=np.float64)), LOG_FLOOR).astype(np.float32)
