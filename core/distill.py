"""Knowledge distillation on a transfer set: `fakecifar distill` without the command line.

    from fakecifar.distill import DistillSettings, distill
    from fakecifar.shards import open_shards
    from fakecifar.train import make_config
    result = distill(open_shards(["fake/"]), "student.pt", make_config(model="resnet20", epochs=6),
                     DistillSettings(teacher="resnet56.th", teacher_arch="resnet56", queries=20_000),
                     val=open_shards(["real-val/"]))

The transfer set is any images: real, mined, generated, another dataset's. Every teacher call
goes through the run's query ledger (fakecifar.ledger, `student.pt.queries`): metered where
the teacher is called, budgeted (`queries`), cached, exact across kill -9 and resume.

Offline (the default): each chosen transfer image is asked once, and the answers are written
beside the images as a *labelled transfer set* -- shards with every column of the transfer set
plus `logits` (the teacher's log-probabilities: its logits in logits mode, log-probabilities
floored at -30 in probs/top-k modes, log one-hot in label mode) and `teacher_labels` -- in
`save_transfer` (default `student.pt.transfer/`). The student is then trained on it by the
training engine, the same way `train --soft` would (which can reuse the set). When the
transfer set holds more images than the budget allows, a seeded random subset is asked and
the report says so.

Online: every augmented view of every step is a query (the student sees the teacher's answer
to exactly the image it is trained on); the ledger counts each one.

Losses: `kl` (Hinton: KL of the temperature-softened distributions, times T^2), `l1`/`l2` on
the logits (logits mode; log-probabilities otherwise), `ce` (cross-entropy on the teacher's
top-1 label: what a label-only victim allows, Knockoff Nets). `alpha` is the weight of the
teacher's term; `1 - alpha` goes to the transfer set's own labels (where it has them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .answers import LOG_FLOOR, Answers, OutputMode, parse_mode
from .errors import UsageError
from .shards import ShardSeriesWriter, ShardSet, open_dataset_output, producer, provenance_of
from .text import format_classes, format_size

LOSSES = ("kl", "l1", "l2", "ce")
TRANSFER_SUFFIX = ".transfer"


@dataclass
class DistillSettings:
    """What distillation adds to a training run. Stored in the student's metadata."""

    teacher: str = ""
    teacher_arch: str | None = None  # for foreign .th state dicts ("auto" guesses)
    mode: str | None = None  # the output mode asked of the teacher (None: the teacher's own)
    queries: int | None = None  # the hard budget of charged images
    online: bool = False
    loss: str | None = None  # kl | l1 | l2 | ce; None: kl, or ce for a label-only teacher
    temperature: float = 4.0
    alpha: float = 1.0
    save_transfer: str | None = None
    map_classes: bool = False
    query_batch: int = 256
    api_key_env: str | None = None
    cache: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_loss(settings: DistillSettings, mode: OutputMode) -> str:
    """The loss to use: the one asked, checked against what the teacher's answers allow."""
    loss = settings.loss or ("ce" if mode.kind == "label" else "kl")
    if loss not in LOSSES:
        raise UsageError(f"unknown --loss {loss!r}", f"use {', '.join(LOSSES)}")
    if mode.kind == "label" and loss != "ce":
        raise UsageError(f"--loss {loss} needs soft answers, but the teacher answers {mode}",
                         "use --loss ce (teacher labels), or a teacher mode that gives probabilities")
    if not settings.temperature > 0:
        raise UsageError(f"--temperature must be positive, got {settings.temperature}")
    if not 0 <= settings.alpha <= 1:
        raise UsageError(f"--alpha must be in [0, 1], got {settings.alpha}")
    return loss


def class_map(teacher_classes: list[str], data_classes: list[str], *, map_classes: bool, what: str) -> np.ndarray | None:
    """Transfer label -> teacher class index (None when they are the same list). Classes the
    teacher does not know map to -1 (unlabeled for the student)."""
    if teacher_classes == data_classes:
        return None
    if not map_classes:
        same_names = sorted(teacher_classes) == sorted(data_classes)
        raise UsageError(
            f"the teacher's classes {format_classes(teacher_classes)} differ from {what}'s "
            f"{format_classes(data_classes)}",
            "same names in another order: pass --map-classes" if same_names
            else "pass --map-classes to match classes by name (the student learns the teacher's classes)")
    index = {name: i for i, name in enumerate(teacher_classes)}
    return np.array([index.get(name, -1) for name in data_classes], dtype=np.int64)


def one_hot_log(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label-only answers as log-probabilities: 0 for the label, LOG_FLOOR elsewhere (KL at
    temperature 1 on these is cross-entropy on the label)."""
    out = np.full((len(labels), num_classes), LOG_FLOOR, dtype=np.float32)
    out[np.arange(len(labels)), labels] = 0.0
    return out


# ----------------------------------------------------------------------------- offline labelling


@dataclass
class LabelReport:
    directory: Path
    shards: list[Path] = field(default_factory=list)
    images: int = 0  # images in the labelled set
    available: int = 0  # images in the transfer set
    resumed_images: int = 0  # labelled by an earlier, interrupted run
    already_complete: bool = False


def label_transfer(teacher, ledger, transfer: ShardSet, out_dir: str | os.PathLike, *, rows: np.ndarray,
                   mapping: np.ndarray | None, shard_size: int = 10_000, batch: int = 256,
                   overwrite: bool = False, on_progress: Callable[[int], None] | None = None) -> LabelReport:
    """Ask the teacher (through the ledger) about transfer rows `rows` (sorted) and write them,
    with every transfer column, plus `logits` and `teacher_labels`, as shards in `out_dir`.
    Resumable: a rerun keeps the finished shards (and the ledger's cache answers what was
    asked before, free)."""
    params = {"transfer": [str(p.resolve()) for p in transfer.paths], "teacher": teacher.identity(),
              "mode": str(teacher.mode), "rows": _digest(rows), "shard_size": shard_size}
    output = open_dataset_output(out_dir, command="distill", params=params, overwrite=overwrite)
    report = LabelReport(Path(out_dir), available=len(transfer))
    try:
        _label_into(output, teacher, ledger, transfer, rows, mapping, shard_size, batch, on_progress, report)
    except BaseException:
        output.close(failed=True)
        raise
    output.close()
    return report


def _label_into(output, teacher, ledger, transfer, rows, mapping, shard_size, batch, on_progress, report) -> None:
    report.resumed_images = output.finished_images
    if output.already_complete:
        report.shards, report.images, report.already_complete = output.finished_paths, output.finished_images, True
        return
    chain = provenance_of(transfer.shards) + [{"step": "distill-label", "teacher": teacher.describe(),
                                                "mode": str(teacher.mode), "images": int(len(rows))}]
    writer = ShardSeriesWriter(output.directory, shard_size=shard_size, classes=teacher.classes,
                               image_size=transfer.image_size, producer=producer("distill"), provenance=chain,
                               overwrite=output.overwrite, dataset=output)
    columns = [c for c in transfer.columns if c not in ("logits", "teacher_labels")]
    try:
        todo = rows[output.finished_images:]
        if on_progress and output.finished_images:
            on_progress(output.finished_images)
        for start in range(0, len(todo), batch):
            index = todo[start:start + batch]
            data = {c: transfer.take(c, index) for c in columns}
            images = data.pop("images")
            answers = ledger.ask(teacher, images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255))
            soft = answers.log_probs if answers.log_probs is not None else one_hot_log(answers.labels,
                                                                                      teacher.num_classes)
            labels = data.pop("labels")
            if mapping is not None:
                labels = np.where(labels >= 0, mapping[np.clip(labels, 0, None)], -1)
            writer.add_batch(images, labels, logits=soft.astype(np.float32),
                             teacher_labels=answers.labels.astype(np.int16), **data)
            if on_progress:
                on_progress(len(index))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    output.finish(classes=teacher.classes, image_size=transfer.image_size)
    report.shards, report.images = output.finished_paths, output.finished_images


def _digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def default_transfer_dir(output: str | os.PathLike) -> Path:
    """Where offline distillation keeps its labelled transfer set: `student.pt.transfer/`."""
    return Path(os.fspath(output) + TRANSFER_SUFFIX)


def check_transfer(teacher, transfer: ShardSet, what: str = "the transfer set") -> None:
    if tuple(transfer.image_size) != tuple(teacher.input_size):
        raise UsageError(f"{transfer.paths[0]}: {what} has {format_size(transfer.image_size)} images, the teacher "
                         f"takes {format_size(teacher.input_size)}",
                         f"resize them first: fakecifar resize --size {format_size(teacher.input_size)}")
    if len(transfer) == 0:
        raise UsageError(f"{transfer.paths[0]}: {what} holds no images", "give shards with images")


def settings_json(settings: DistillSettings) -> str:
    return json.dumps(settings.to_dict(), sort_keys=True)
