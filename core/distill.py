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
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .answers import LOG_FLOOR, OutputMode
from .distill_config import LOSSES, DistillSettings
from .errors import UsageError
from .shards import ShardSeriesWriter, ShardSet, open_dataset_output, producer, provenance_of
from .text import format_classes, format_size

TRANSFER_SUFFIX = ".transfer"


def resolve_loss(settings: DistillSettings, mode: OutputMode) -> str:
    """The loss to use: the one asked, checked against what the teacher's answers allow."""
    loss = settings.loss or ("ce" if mode.kind == "label" else "kl")
    if loss not in LOSSES:
        raise UsageError(f"unknown --loss {loss!r}", f"use {', '.join(LOSSES)}")
    if mode.kind == "label" and loss != "ce":
        raise UsageError(
            f"--loss {loss} needs soft answers, but the teacher answers {mode}",
            "use --loss ce (teacher labels), or a teacher mode that gives probabilities",
        )
    return loss


def class_map(
    teacher_classes: list[str], data_classes: list[str], *, map_classes: bool, what: str
) -> np.ndarray | None:
    """Transfer label -> teacher class index (None when they are the same list). Classes the
    teacher does not know map to -1 (unlabeled for the student)."""
    if teacher_classes == data_classes:
        return None
    if not map_classes:
        same_names = sorted(teacher_classes) == sorted(data_classes)
        raise UsageError(
            f"the teacher's classes {format_classes(teacher_classes)} differ from {what}'s "
            f"{format_classes(data_classes)}",
            "same names in another order: pass --map-classes"
            if same_names
            else "pass --map-classes to match classes by name (the student learns the teacher's classes)",
        )
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


def label_transfer(
    teacher,
    ledger,
    transfer: ShardSet,
    out_dir: str | os.PathLike,
    *,
    rows: np.ndarray,
    mapping: np.ndarray | None,
    shard_size: int = 10_000,
    batch: int = 256,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> LabelReport:
    """Ask the teacher (through the ledger) about transfer rows `rows` (sorted) and write them,
    with every transfer column, plus `logits` and `teacher_labels`, as shards in `out_dir`.
    Resumable: a rerun keeps the finished shards (and the ledger's cache answers what was
    asked before, free)."""
    params = {
        "transfer": [str(p.resolve()) for p in transfer.paths],
        "teacher": teacher.identity(),
        "mode": str(teacher.mode),
        "rows": _digest(rows),
        "shard_size": shard_size,
    }
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
    chain = provenance_of(transfer.shards) + [
        {"step": "distill-label", "teacher": teacher.describe(), "mode": str(teacher.mode), "images": int(len(rows))}
    ]
    writer = ShardSeriesWriter(
        output.directory,
        shard_size=shard_size,
        classes=teacher.classes,
        image_size=transfer.image_size,
        producer=producer("distill"),
        provenance=chain,
        overwrite=output.overwrite,
        dataset=output,
    )
    columns = [c for c in transfer.columns if c not in ("logits", "teacher_labels")]
    try:
        todo = rows[output.finished_images :]
        if on_progress and output.finished_images:
            on_progress(output.finished_images)
        for start in range(0, len(todo), batch):
            index = todo[start : start + batch]
            data = {c: transfer.take(c, index) for c in columns}
            images = data.pop("images")
            answers = ledger.ask(teacher, images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255))
            soft = (
                answers.log_probs if answers.log_probs is not None else one_hot_log(answers.labels, teacher.num_classes)
            )
            labels = data.pop("labels")
            if mapping is not None:
                labels = np.where(labels >= 0, mapping[np.clip(labels, 0, None)], -1)
            writer.add_batch(
                images, labels, logits=soft.astype(np.float32), teacher_labels=answers.labels.astype(np.int16), **data
            )
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
        raise UsageError(
            f"{transfer.paths[0]}: {what} has {format_size(transfer.image_size)} images, the teacher "
            f"takes {format_size(teacher.input_size)}",
            f"resize them first: fakecifar resize --size {format_size(teacher.input_size)}",
        )
    if len(transfer) == 0:
        raise UsageError(f"{transfer.paths[0]}: {what} holds no images", "give shards with images")


# ----------------------------------------------------------------------------- the run


@dataclass
class DistillResult:
    checkpoint: Path | None
    onnx: Path | None
    history: list[dict]
    stopped: str  # completed | early-stop | budget
    ledger: dict[str, Any]  # the query ledger's summary
    ledger_lines: list[str]
    labelled: LabelReport | None = None  # offline: the labelled transfer set
    val_metrics: dict[str, float] = field(default_factory=dict)  # student accuracy, teacher agreement
    probe: Any = None  # data-free: a batch of generated student inputs (normalized), for reports


def distill(
    transfer: ShardSet,
    output: str | os.PathLike,
    config,
    settings: DistillSettings,
    *,
    val: ShardSet | None = None,
    resume: str | os.PathLike | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    log_path: str | os.PathLike | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_message: Callable[[str], None] | None = None,
    on_label: Callable[[int], None] | None = None,
) -> DistillResult:
    """Distill `settings.teacher` into a student `config.model` on `transfer`; see the module doc."""
    from .ledger import run_ledger
    from .shards import open_shards
    from .teachers import open_teacher
    from .train import check_outputs, dist_from_env, train
    from .training.runtime import process_device

    say = on_message or (lambda _: None)
    dist = dist_from_env()
    output = Path(output)
    check_outputs(
        output,
        config,
        resume=Path(resume) if resume else None,
        onnx=onnx,
        overwrite=overwrite,
        log_path=Path(log_path) if log_path else None,
        dist=dist,
    )
    settings.check()
    if settings.queries is not None and settings.queries < config.batch_size:
        raise UsageError(
            f"--queries {settings.queries} is smaller than one batch ({config.batch_size} images)",
            "raise --queries or lower --batch-size",
        )
    teacher = open_teacher(
        settings.teacher,
        mode=settings.mode,
        arch=settings.teacher_arch,
        api_key_env=settings.api_key_env,
        batch_size=settings.query_batch,
        fast=settings.fast_teacher,
        device=str(process_device(config.device, dist)),  # under torchrun: this process's GPU
    )
    with teacher:
        loss = resolve_loss(settings, teacher.mode)
        check_transfer(teacher, transfer)
        mapping = class_map(
            teacher.classes, list(transfer.classes), map_classes=settings.map_classes, what="the transfer set"
        )
        if val is not None and list(val.classes) != teacher.classes:
            raise UsageError(
                f"{val.paths[0]}: --val classes {format_classes(val.classes)} differ from the teacher's "
                f"{format_classes(teacher.classes)}",
                "give --val shards of the teacher's classes",
            )
        if mapping is not None and settings.online:
            raise UsageError(
                "--map-classes works offline only", "drop --online, or give a transfer set of the teacher's classes"
            )
        if dist.enabled:  # join the group now: the other ranks wait for rank 0's labelled set
            from .training.runtime import start_processes

            start_processes(config.device, dist)
        with run_ledger(output, teacher, budget=settings.queries, cache=settings.cache, main=dist.main) as ledger:
            train_config = _student_config(config, loss, settings)
            labelled = None
            if settings.online:
                data = transfer
                task = _online_task(teacher, ledger, settings.mix, config.seed, dist)
            else:
                where = Path(settings.save_transfer) if settings.save_transfer else default_transfer_dir(output)
                if ledger is not None:
                    labelled = _label_offline(
                        teacher,
                        ledger,
                        transfer,
                        where,
                        mapping,
                        config,
                        settings,
                        overwrite=overwrite and not resume,
                        say=say,
                        on_label=on_label,
                    )
                if dist.enabled:
                    import torch.distributed as tdist

                    tdist.barrier()  # every rank trains on the set rank 0 has labelled
                data = open_shards([where])
                task = None
            meta = {
                "distill": {
                    **settings.to_dict(),
                    "loss": loss,
                    "mode": str(teacher.mode),
                    "teacher_describe": teacher.describe(),
                    "transfer": [str(p) for p in transfer.paths],
                    "labelled_transfer": None if settings.online else [str(p) for p in data.paths],
                }
            }
            result = train(
                data,
                output,
                train_config,
                val=val,
                resume=resume,
                onnx=onnx,
                overwrite=overwrite,
                log_path=log_path,
                on_epoch=on_epoch,
                on_step=on_step,
                dist=dist,
                task=task,
                extra_info=(lambda: {**meta, "queries": ledger.summary()}) if ledger is not None else None,
                logits_column=not settings.online,
            )
            if ledger is None:  # another DDP rank: rank 0 reports
                return DistillResult(None, None, result.history, result.stopped, {}, [], None, {})
            metrics = _agreement(output, teacher, val, ledger) if val is not None else {}
            summary, lines = ledger.summary(), ledger.report_lines()
    return DistillResult(
        result.checkpoint, result.onnx, result.history, result.stopped, summary, lines, labelled, metrics
    )


def _label_offline(
    teacher, ledger, transfer, where: Path, mapping, config, settings, *, overwrite, say, on_label
) -> LabelReport:
    """Offline: ask the teacher about the transfer images the budget allows (all of them, or a
    seeded random subset the report names) and write the labelled transfer set to `where`."""
    from .ledger import choose_subset

    rows = choose_subset(len(transfer), ledger.budget, config.seed)
    if len(rows) < len(transfer):
        ledger.note_subset(len(transfer), len(rows), config.seed)
        say(
            f"the budget allows {len(rows):,} of the {len(transfer):,} transfer images: querying a seeded random "
            f"subset (seed {config.seed})"
        )
    labelled = label_transfer(
        teacher,
        ledger,
        transfer,
        where,
        rows=rows,
        mapping=mapping,
        batch=settings.query_batch,
        overwrite=overwrite,
        on_progress=on_label,
    )
    say(
        f"labelled transfer set: {labelled.images:,} images in {where}"
        + (f" ({labelled.resumed_images:,} from an earlier run)" if labelled.resumed_images else "")
    )
    return labelled


def _student_config(config, loss: str, settings: DistillSettings):
    """The training configuration of the student: the teacher's term is a soft-target loss."""
    from dataclasses import replace

    return replace(config, soft=loss)


def _online_task(teacher, ledger, mix: str, seed: int, dist):
    """A task factory for train(): a ClassificationTask whose soft targets are the teacher's
    answers to this step's augmented images -- mixed in pairs first with `mix` (mixup, cutmix)
    -- asked through the ledger (each view is a query). A spent budget ends the run at that
    step, saved (StopTraining). Under torchrun rank 0 keeps the ledger and asks for every
    process's images (TeacherAccess)."""
    import torch

    from .augment import step_generator
    from .training.classification import ClassificationTask
    from .training.datafree import TeacherAccess
    from .training.mixing import MIX_SALT, mix_batch, mixed_labels

    class OnlineDistillation(ClassificationTask):
        def __init__(self, config, num_classes, *, val, mean, std):
            super().__init__(config, num_classes, val=val)
            self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
            self.access: TeacherAccess | None = None

        def step(self, batch, ctx):
            if mix == "none":
                return super().step(batch, ctx)
            x, cols = batch
            x, perm, kept = mix_batch(x, mix, step_generator(seed + MIX_SALT, ctx.epoch, ctx.step))
            cols = {**cols, "labels": mixed_labels(cols["labels"], perm, kept)}
            return super().step((x, cols), ctx)

        def soft_targets(self, x, cols, ctx):
            if self.access is None:
                self.access = TeacherAccess(teacher, ledger, ctx.device, white_box=False, dist=dist)
            images = (x.detach().float().cpu() * self.std + self.mean).clamp_(0.0, 1.0).contiguous()
            log_probs, labels = self.access.answers(images.to(ctx.device), soft=teacher.mode.soft)
            if not teacher.mode.soft:
                log_probs = torch.from_numpy(one_hot_log(labels.cpu().numpy(), teacher.num_classes))
            return log_probs.to(x.device)

    return OnlineDistillation


def _agreement(output: Path, teacher, val: ShardSet, ledger) -> dict[str, float]:
    """Student accuracy on --val and its agreement with the teacher's top-1 there. The teacher's
    answers on --val are queries too: they go through the same ledger and its budget (when the
    budget runs out, agreement covers the images asked so far)."""
    from .teachers import BudgetExhausted, open_teacher

    student = open_teacher(output, mode="label")  # the student's own answers: not queries
    labels = val.read("labels").astype(np.int64)
    correct = agree = asked = 0
    budget_left = True
    for start, chunk in val.iter_chunks(("images",), rows=512):
        x = chunk["images"].transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255)
        predicted = student.query(x).labels
        correct += int((predicted == labels[start : start + len(x)]).sum())
        if budget_left:
            try:
                agree += int((predicted == ledger.ask(teacher, x).labels).sum())
                asked += len(x)
            except BudgetExhausted:
                budget_left = False
    out = {"val_acc": correct / max(len(val), 1), "val_images": float(len(val))}
    if asked:
        out.update(teacher_agreement=agree / asked, agreement_images=float(asked))
    return out
