"""Train a classifier on shards: `fakecifar train` without the command line.

    from fakecifar.shards import open_shards
    from fakecifar.train import make_config, train
    result = train(open_shards(["split/train"]), "model.pt", make_config(model="resnet20", epochs=30),
                   val=open_shards(["split/val"]), onnx=True)
    result.paths, result.history[-1]["val_acc"]

`train()` checks the request and the data, then builds a run of the training engine
(fakecifar.training): `ShardBatches` (a `BatchLoader`: uint8 kept in memory, normalized float
made per batch on the device, batch-level augmentation on tensors) feed a `ClassificationTask`
(SGD, label smoothing or soft targets, L2 PGD adversarial training with `adv`, validation
loss/accuracy) in the `Engine` loop (per-step
schedule, optional EMA of the weights, mixed precision -- fp16/bf16 on CUDA, bf16 on CPUs with
AMX --, channels_last, exact resume, mid-epoch too, and DDP under `torchrun`: only rank 0
writes), with the callbacks that keep the best weights on validation loss, stop early, write the
checkpoint and the `--log`.

Checkpoints are fakecifar `.pt` files (fakecifar.checkpoint) with one extra entry, `resume`, that
holds what continuing needs (raw and EMA weights, optimizer state, epoch/step, early-stopping
state); `state_dict` is always the deliverable (best on validation loss with `val`, else the EMA
or last weights). Everything in it loads with `torch.load(weights_only=True)`.

Failures are typed: `TrainingDiverged` (NaN/inf loss: exit 1, the checkpoint on disk is the last
good one), `TrainingInterrupted` (SIGINT or SIGTERM: state saved, exit 130 or 143, the message says
how to resume) and `NoSpaceError` (the disk filled up: exit 1, the checkpoint on disk is the last
one saved, no `.partial` is left). `check_outputs` refuses what can be refused without the data
(outputs that exist, cannot be written or have too long a name; a resume of another architecture);
`train` calls it first, and the CLI calls it before opening any shard.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .checkpoint import _torch_load, export_onnx, load_checkpoint
from .errors import BadCheckpointError, OutputExistsError, UsageError, write_error
from .evaluate import check_target, make_targets, needed_columns, target_classes
from .loader import ROW, BatchLoader
from .models import build_model, model_spec
from .outputs import check_output_path
from .shards import ShardSet, row_sha256
from .text import format_classes
from .training.callbacks import Callback, Checkpoint, EarlyStopping, EpochSnapshots, Hooks, JsonlLog, SaveBest
from .training.classification import ClassificationTask, hard_loss, soft_loss
from .training.config import (
    FLIPS,
    PRECISIONS,
    RECIPES,
    SCHEDULES,
    SOFT_LOSSES,
    TrainConfig,
    check_pseudo_label,
    make_config,
    validate_config,
)
from .training.dynamics import TrainingDynamics
from .training.ema import EMA
from .training.loop import Engine
from .training.runtime import (
    Dist,
    autocast_dtype,
    cpu_has_fast_bf16,
    dist_from_env,
    finish_processes,
    start_processes,
)
from .training.schedules import lr_factor, schedule_of
from .training.sources import ShardBatches
from .training.stopping import StopFlag as _StopFlag
from .training.stopping import TrainingDiverged, TrainingInterrupted
from .training.task import Task

__all__ = [
    "EMA",
    "FLIPS",
    "PRECISIONS",
    "RECIPES",
    "SCHEDULES",
    "SOFT_LOSSES",
    "Dist",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "_StopFlag",
    "autocast_dtype",
    "check_outputs",
    "cpu_has_fast_bf16",
    "dataset_mean_std",
    "dist_from_env",
    "first_conv",
    "hard_loss",
    "lr_factor",
    "make_config",
    "model_table",
    "soft_loss",
    "stored_run",
    "train",
    "validate_config",
    "whiten_init",
]


# ----------------------------------------------------------------------------- initialisation


def dataset_mean_std(data: ShardSet, rows: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] of the training images (fakecifar.stats' exact pass)."""
    from .stats import dataset_stats

    stats = dataset_stats(data, "train")[0]
    std = [s if s > 1e-6 else 1.0 for s in stats.std]
    return stats.mean, std


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1:
            return m
    return None


@torch.no_grad()
def whiten_init(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> bool:
    """Initialise the first conv as a whitening filter bank of the training patches (airbench):
    the top eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue), in +/- pairs.
    `images` are normalized float [N, 3, H, W]. Returns False if the model has no such conv."""
    conv = first_conv(model)
    if conv is None:
        return False
    kh, kw = conv.kernel_size
    x = images.float()
    patches = F.unfold(x, (kh, kw)).transpose(1, 2).reshape(-1, 3 * kh * kw)
    if len(patches) > 200_000:
        patches = patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[:200_000]]
    cov = patches.T.double() @ patches.double() / len(patches)
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0), vectors.T.flip(0)  # largest first, one per row
    filters = vectors / torch.sqrt(values.clamp_min(0) + eps)[:, None]
    out = conv.out_channels
    pairs = min(out // 2, len(filters))
    weight = conv.weight.detach().clone()
    chosen = filters[:pairs].reshape(pairs, 3, kh, kw).to(weight)
    weight[:pairs] = chosen
    weight[pairs : 2 * pairs] = -chosen
    conv.weight.copy_(weight)
    return True


# ----------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    checkpoint: Path | None
    onnx: Path | None
    history: list[dict]
    config: TrainConfig
    classes: list[str]
    stopped: str  # "completed" | "early-stop"
    best_epoch: int | None = None
    adaptation: dict | None = None  # --adapt-bn / --pseudo-label: the checkpoint's train.adapt

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.checkpoint, self.onnx) if p is not None]


# ----------------------------------------------------------------------------- refusals


def _check_output(
    path: Path,
    *,
    overwrite: bool,
    allowed: Sequence[Path] = (),
    option: str = "-o",
    temp_suffix: str = ".partial",
    probe: bool = True,
) -> None:
    """Refuse a name too long, a directory, an existing `path` (unless `overwrite` or it is one
    of `allowed`), a place that cannot be written (with `probe`, a probe file is created and
    removed: only the process that writes probes, rank 0 under DDP)."""
    check_output_path(path, temp_suffix=temp_suffix, option=option, probe=False)
    if path.exists() and not overwrite and path.resolve() not in {p.resolve() for p in allowed}:
        raise OutputExistsError(f"{path} already exists", "pass --overwrite to replace it, or --resume it")
    if probe:
        check_output_path(path, temp_suffix=temp_suffix, option=option)


def check_outputs(
    output: str | os.PathLike,
    config: TrainConfig,
    *,
    resume: str | os.PathLike | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    log_path: str | os.PathLike | None = None,
    dist: Dist | None = None,
    dynamics: str | os.PathLike | None = None,
    snapshots: str | os.PathLike | None = None,
    adapt_bn: Any = None,
    pseudo_label: Any = None,
) -> None:
    """Every refusal that needs no training data, so that it comes before any data is read:
    `-o` named .onnx, an existing output without `overwrite`, a directory, a name or path too
    long, an unwritable place (tested with a probe file, not os.access, which says yes to root
    everywhere), a `--log` that cannot be written, a `resume` checkpoint of another
    architecture than `config.model`. Creates nothing. `train` calls it first.
    `adapt_bn`/`pseudo_label` (target paths or shards; None: not asked): the fake -> real
    requests (fakecifar.training.adapt), e.g. --threshold without --pseudo-label."""
    dist = dist or dist_from_env()
    output = Path(output)
    resume_path = Path(resume) if resume else None
    check_pseudo_label(config, pseudo_label is not None)
    if adapt_bn is not None or pseudo_label is not None:
        from .training.adapt import check_adapt_outputs

        check_adapt_outputs(
            output, config, resume=resume_path, overwrite=overwrite, pseudo_label=pseudo_label is not None, dist=dist
        )
    if output.suffix == ".onnx":
        raise UsageError(f"-o {output}: name the .pt checkpoint", "--onnx writes the .onnx beside it")
    allowed = [resume_path] if resume_path else []
    _check_output(output, overwrite=overwrite, allowed=allowed, probe=dist.main)
    if onnx:
        _check_output(output.with_suffix(".onnx"), overwrite=overwrite or resume_path is not None, probe=dist.main)
    if log_path:
        log_path = Path(log_path)
        # A resumed run appends to its log; a new one refuses to clobber one.
        _check_output(
            log_path, overwrite=overwrite or resume_path is not None, option="--log", temp_suffix="", probe=dist.main
        )
        if dist.main and log_path.is_file():
            try:  # appending nothing changes nothing, and is the honest test (os.access lies to root)
                open(log_path, "a").close()
            except OSError as exc:
                raise write_error(exc, log_path) from exc
    if dynamics and dist.enabled:
        # A mid-epoch save holds rank 0's rows of that epoch only: a resumed record would be wrong.
        raise UsageError("--dynamics records in one process for now", "run it without torchrun")
    if dynamics:  # rewritten after every epoch: a resumed run carries it on
        _check_output(
            Path(dynamics), overwrite=overwrite or resume_path is not None, option="--dynamics", probe=dist.main
        )
    if snapshots:
        check_output_path(
            Path(snapshots), directory=True, children=["epoch-000.pt.partial"], option="--snapshots", probe=dist.main
        )
    if resume_path:
        _, meta = load_checkpoint(resume_path)
        _check_arch(resume_path, meta, config)


def _check_arch(path: Path, meta: Mapping[str, Any], config: TrainConfig) -> None:
    if meta["arch"] != config.model:
        raise UsageError(
            f"{path}: checkpoint is a {meta['arch']}, not a {config.model}",
            f"resume with --model {meta['arch']} (or drop --model)",
        )


# ----------------------------------------------------------------------------- training


def train(
    data: ShardSet,
    output: str | os.PathLike,
    config: TrainConfig,
    *,
    val: ShardSet | None = None,
    resume: str | os.PathLike | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    log_path: str | os.PathLike | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    dist: Dist | None = None,
    task: Callable[..., Task] | None = None,
    extra_info: Callable[[], Mapping[str, Any]] | None = None,
    logits_column: bool | None = None,
    dynamics: str | os.PathLike | None = None,
    snapshots: str | os.PathLike | None = None,
    adapt_bn: ShardSet | None = None,
    pseudo_label: ShardSet | None = None,
    on_message: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train `config.model` on `data`; write `output` (.pt) after every epoch and, with `onnx`,
    `output` with suffix .onnx at the end. See the module docstring for the details.

    Fake -> real without real labels (fakecifar.training.adapt; `on_message` gets its report
    lines): `adapt_bn` re-estimates the delivered model's BatchNorm statistics on these unlabelled
    target shards; `pseudo_label` self-trains on them for `config.rounds` rounds.

    `task(config, num_classes, val=val_loader, mean=, std=)` makes the task instead of a
    ClassificationTask (distillation plugs in here); `extra_info()` is merged into the
    checkpoint's `train` metadata at every save (e.g. a query ledger's summary);
    `logits_column` says whether batches carry the data's `logits` (default: with --soft; an
    online distillation task asks its teacher instead); `dynamics`: record every row's margin,
    correctness and error norm per epoch into this HDF5 file (fakecifar.training.dynamics);
    `snapshots`: a directory for every epoch's weights (epoch-NNN.pt)."""
    if adapt_bn is not None or pseudo_label is not None:
        from .training.adapt import adapted_train  # it runs the trainings through this function

        return adapted_train(
            data,
            output,
            config,
            adapt_bn=adapt_bn,
            pseudo_label=pseudo_label,
            val=val,
            resume=resume,
            onnx=onnx,
            overwrite=overwrite,
            log_path=log_path,
            on_epoch=on_epoch,
            on_step=on_step,
            on_message=on_message,
            dist=dist,
            task=task,
            extra_info=extra_info,
            logits_column=logits_column,
            dynamics=dynamics,
            snapshots=snapshots,
        )
    dist = dist or dist_from_env()
    output = Path(output)
    resume_path = Path(resume) if resume else None
    log_path = Path(log_path) if log_path else None

    # ---- everything that can be refused is refused before any work or any write
    check_outputs(
        output,
        config,
        resume=resume_path,
        onnx=onnx,
        overwrite=overwrite,
        log_path=log_path,
        dist=dist,
        dynamics=dynamics,
        snapshots=snapshots,
    )
    state: dict[str, Any] = {}
    stored_meta: dict[str, Any] | None = None
    if resume_path:
        stored_meta, state = _load_resume(resume_path, config)
        if int(state.get("epoch", 0)) >= config.epochs:
            raise UsageError(
                f"{resume_path}: training already finished ({int(state.get('epoch', 0))} of {config.epochs} epochs)",
                "pass a larger --epochs to continue",
            )
    logits_column = config.soft is not None if logits_column is None else logits_column
    classes = _check_data(data, val, config, resume_path, stored_meta, logits_column)
    log = JsonlLog(log_path, append=resume_path is not None) if log_path and dist.main else None
    if dist.main:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, output) from exc

    # ---- rows, targets, normalization
    use_soft = config.soft is not None
    small = {c: data.read(c) for c in needed_columns(config.target)}
    targets_all = make_targets(small.get("labels"), small.get("origin"), len(data.classes), config.target)
    rows = np.arange(len(data)) if use_soft else np.nonzero(targets_all >= 0)[0]
    if len(rows) == 0:
        raise UsageError(f"{data.paths[0]}: no image has a {config.target} target", "give labelled shards")
    if len(rows) < dist.world_size:
        raise UsageError(f"{len(rows)} training images for {dist.world_size} processes")
    mean, std = (stored_meta["mean"], stored_meta["std"]) if stored_meta is not None else dataset_mean_std(data)

    device = start_processes(config.device, dist)
    try:
        amp_dtype = autocast_dtype(config.precision, device)
        channels_last = (
            config.channels_last
            if config.channels_last is not None
            else (device.type == "cuda" or amp_dtype is not None)
        )
        torch.manual_seed(config.seed)
        source, val_loader = _sources(
            data, val, rows, config, mean, std, device, channels_last, dist, logits_column, rows_column=bool(dynamics)
        )
        model = _model(data, rows, config, len(classes), mean, std, fresh=not state)
        meta = {
            "arch": config.model,
            "arch_kwargs": config.arch_kwargs,
            "classes": classes,
            "mean": mean,
            "std": std,
            "input_size": list(data.image_size),
        }
        info = {
            "data": [str(p) for p in data.paths],
            "val": [str(p) for p in val.paths] if val else None,
            "images": int(len(rows)),
            "world_size": dist.world_size,
            "device": str(device),
            "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "channels_last": bool(channels_last),
            "fakecifar": __version__,
            "target": config.target,
        }
        best = SaveBest(enabled=val is not None)
        callbacks: list[Callback] = [
            best,
            EarlyStopping(config.patience, enabled=val is not None),
            Checkpoint(
                output,
                meta=meta,
                info=(lambda: {**info, **extra_info()}) if extra_info else info,
                args=config.to_dict,
                build=lambda: build_model(config.model, len(classes), **config.arch_kwargs),
                best=best,
            ),
            *([log] if log else []),
            Hooks(on_step=on_step, on_epoch=on_epoch),
        ]
        the_task = (task or _classification)(config, len(data.classes), val=val_loader, mean=mean, std=std)
        if dynamics:
            callbacks.append(_dynamics_recorder(the_task, data, config, Path(dynamics), dist))
        if snapshots and dist.main:
            callbacks.append(EpochSnapshots(Path(snapshots), meta))
        engine = Engine(
            model,
            the_task,
            source,
            epochs=config.epochs,
            schedule=schedule_of(config, len(source)),
            device=device,
            dist=dist,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
            ema=config.ema,
            callbacks=callbacks,
            resume=state,
            output=output,
        )
        stopped = engine.run()
        written_onnx = None
        if onnx and dist.main:
            final, final_meta = load_checkpoint(output)
            written_onnx = export_onnx(final, final_meta, output.with_suffix(".onnx"))
    finally:
        finish_processes(dist)
    return TrainResult(
        output if dist.main else None, written_onnx, engine.history, config, classes, stopped, best.epoch
    )


def _dynamics_recorder(task: Task, data: ShardSet, config: TrainConfig, path: Path, dist: Dist) -> TrainingDynamics:
    """The --dynamics callback, wired into the task that records it (a ClassificationTask)."""
    if not isinstance(task, ClassificationTask):
        raise UsageError("--dynamics records the training pass of train's classification task", "drop --dynamics")
    digests = row_sha256(data)
    meta = {"classes": json.dumps(list(data.classes)), "target": config.target, "seed": config.seed}
    recorder = TrainingDynamics(
        len(data), config.epochs, dist, path=path if dist.main else None, sha256=digests, meta=meta
    )
    task.dynamics = recorder
    return recorder


def _classification(config: TrainConfig, num_classes: int, *, val, mean, std) -> ClassificationTask:
    return ClassificationTask(config, num_classes, val=val, mean=mean, std=std)


def _check_data(
    data: ShardSet,
    val: ShardSet | None,
    config: TrainConfig,
    resume_path: Path | None,
    stored_meta: Mapping[str, Any] | None,
    logits_column: bool,
) -> list[str]:
    """The target classes, once the data is known to fit the request (targets, validation data of
    the same classes and size, a `logits` column for soft targets, the resumed run's classes)."""
    check_target(data, config.target)
    if val is not None:
        check_target(val, config.target)
        if val.classes != data.classes:
            raise UsageError(
                f"{val.paths[0]}: validation classes differ from the training data's",
                "give --val shards of the same dataset",
            )
        if val.image_size != data.image_size:
            raise UsageError(
                f"{val.paths[0]}: validation images are {val.image_size[0]}x{val.image_size[1]}, "
                f"training {data.image_size[0]}x{data.image_size[1]}",
                "resize one of them",
            )
    classes = target_classes(data.classes, config.target)
    if stored_meta is not None and stored_meta["classes"] != classes:
        raise BadCheckpointError(
            f"{resume_path}: checkpoint classes {format_classes(stored_meta['classes'])} differ "
            f"from the training data's {format_classes(classes)}",
            "resume on the data it was trained on",
        )
    if logits_column:
        if "logits" not in data.columns:
            raise UsageError(
                f"{data.paths[0]}: --soft needs a 'logits' column (teacher outputs)",
                "write one with `fakecifar extract` or a teacher's predictions",
            )
        width = data.shards[0].read("logits", 0, 1).shape[1] if len(data.shards[0]) else len(classes)
        if width != len(classes):
            raise UsageError(
                f"{data.paths[0]}: 'logits' has {width} columns for {len(classes)} classes",
                "soft targets must cover the target classes",
            )
    return classes


def _sources(
    data: ShardSet,
    val: ShardSet | None,
    rows: np.ndarray,
    config: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    channels_last: bool,
    dist: Dist,
    logits_column: bool,
    *,
    rows_column: bool = False,
) -> tuple[ShardBatches, BatchLoader | None]:
    """The training batches (this process's slice, augmented) and the validation loader."""
    columns = needed_columns(config.target) + (("logits",) if logits_column else ()) + ((ROW,) if rows_column else ())
    per_rank_batch = max(1, config.batch_size // dist.world_size)
    loader = BatchLoader(
        data,
        per_rank_batch,
        shuffle=True,
        seed=config.seed,
        drop_last=len(rows) // dist.world_size > per_rank_batch,
        mean=mean,
        std=std,
        device=device,
        columns=tuple(dict.fromkeys(columns)),
        channels_last=channels_last,
        rank=dist.rank,
        world_size=dist.world_size,
        indices=None if len(rows) == len(data) else rows,
    )
    source = ShardBatches(
        loader, config.augment, pad=config.pad, alternate_flip=config.flip == "alternate", seed=config.seed
    )
    if val is None:
        return source, None
    val_small = {c: val.read(c) for c in needed_columns(config.target)}
    val_targets = make_targets(val_small.get("labels"), val_small.get("origin"), len(val.classes), config.target)
    val_loader = BatchLoader(
        val,
        max(per_rank_batch, 256),
        shuffle=False,
        mean=mean,
        std=std,
        device=device,
        columns=needed_columns(config.target),
        channels_last=channels_last,
        indices=np.nonzero(val_targets >= 0)[0][dist.rank :: dist.world_size],
    )
    return source, val_loader


def _model(
    data: ShardSet,
    rows: np.ndarray,
    config: TrainConfig,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    fresh: bool,
) -> nn.Module:
    """`config.model` for this data; a `fresh` one (not resumed) gets its data-derived start:
    the whitened stem (--whiten) or the fitted part (pca-logreg's PCA basis)."""
    if "input_size" in inspect.signature(model_spec(config.model).builder).parameters:
        # Models whose shape depends on the image size (pca-logreg) are built for this data.
        config.arch_kwargs.setdefault("input_size", list(data.image_size))
    model = build_model(config.model, num_classes, **config.arch_kwargs)
    if fresh and config.whiten:
        sample_rows = np.sort(np.random.default_rng(config.seed).permutation(rows)[:5000])
        sample = BatchLoader(data, 5000, mean=mean, std=std, columns=(), indices=sample_rows)
        whiten_init(model, next(iter(sample))[0])
    if fresh and getattr(model, "needs_fit", False):
        # Models with a data-derived part (pca-logreg's PCA basis) fit it before the first step.
        fitted: Any = model
        sample_rows = np.sort(np.random.default_rng(config.seed).permutation(rows)[: fitted.fit_images])
        fitted.fit_unsupervised(
            x for (x,) in BatchLoader(data, 1024, mean=mean, std=std, columns=(), indices=sample_rows)
        )
    return model


def _load_resume(path: Path, config: TrainConfig) -> tuple[dict, dict]:
    """(metadata, resume state) of a checkpoint to continue; refuses another architecture."""
    _, meta = load_checkpoint(path)
    _check_arch(path, meta, config)
    raw = _torch_load(path, "cpu")
    state = raw.get("resume") if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or "model" not in state:
        raise BadCheckpointError(
            f"{path}: checkpoint holds no training state to resume",
            "it was not written by `fakecifar train`; start a new run from scratch",
        )
    return meta, dict(state)


def stored_run(path: str | os.PathLike) -> tuple[dict[str, Any], list[str], list[str]]:
    """(training arguments, training shards, validation shards) recorded in a checkpoint, so
    that --resume needs nothing repeated."""
    _, meta = load_checkpoint(path)
    train_meta = meta.get("train") or {}
    args = train_meta.get("args") or {}
    data = train_meta.get("data") or []
    val = train_meta.get("val") or []
    return (
        dict(args) if isinstance(args, Mapping) else {},
        [str(p) for p in data if isinstance(p, str)],
        [str(p) for p in val if isinstance(p, str)],
    )


def model_table() -> list[list[str]]:
    """Rows name, parameters (10 classes), description: for `train --list-models`."""
    from .models import MODELS

    rows = []
    for name, spec in MODELS.items():
        rows.append([name, f"{spec.param_count(10) / 1e6:.2f}M", spec.description])
    return rows


def modifier_lines() -> list[str]:
    """The MODEL+MODIFIER variants, for `train --list-models` under the table."""
    from .models import MODIFIERS

    lines = ["", "Modifiers (MODEL+MODIFIER, e.g. resnet20+highpass; several may follow one another):"]
    return lines + [f"  +{name:<9} {text}" for name, text in MODIFIERS.items()]
