"""Train a classifier on shards: `fakecifar train` without the command line.

    from fakecifar.shards import open_shards
    from fakecifar.train import make_config, train
    result = train(open_shards(["split/train"]), "model.pt", make_config(model="resnet20", epochs=30),
                   val=open_shards(["split/val"]), onnx=True)
    result.paths, result.history[-1]["val_acc"]

The loop: `BatchLoader` batches (uint8 kept in memory, normalized float made per batch on the
device), batch-level augmentation on tensors (fakecifar.augment), SGD with a per-step schedule,
optional EMA of the weights, label smoothing or soft targets, mixed precision (fp16/bf16 on CUDA,
bf16 on CPUs with AMX), channels_last, per-epoch validation with early stopping and save-best on
validation loss, exact resume (mid-epoch too), and DDP under `torchrun` (only rank 0 writes).

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

import copy
import inspect
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .augment import augment_batch, parse_augment, step_generator
from .checkpoint import _torch_load, export_onnx, load_checkpoint, save_checkpoint
from .errors import BadCheckpointError, FakecifarError, OutputExistsError, UsageError, write_error
from .evaluate import check_target, make_targets, needed_columns, resolve_device, target_classes
from .loader import BatchLoader
from .models import MODELS, build_model, resolve_name
from .outputs import check_output_path
from .shards import ShardSet
from .text import format_classes

SCHEDULES = ("cosine", "onecycle", "multistep", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SOFT_LOSSES = ("kl", "l2")
FLIPS = ("random", "alternate")


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


# ----------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Every knob of a training run. Stored in the checkpoint (`train.args`) for --resume."""

    model: str = "resnet20"
    arch_kwargs: dict = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"
    warmup: float = 0.0  # epochs of linear warm-up (cosine, multistep, constant)
    milestones: list = field(default_factory=lambda: [0.5, 0.75])  # multistep: epochs, or fractions if <= 1
    gamma: float = 0.1
    label_smoothing: float = 0.0
    augment: list = field(default_factory=lambda: ["crop", "flip"])
    pad: int = 4
    flip: str = "random"  # or "alternate" (airbench's derandomized flip)
    precision: str = "auto"
    channels_last: bool | None = None  # None: on where it helps (CUDA, CPU bf16)
    target: str = "class"
    soft: str | None = None
    temperature: float = 4.0
    alpha: float = 1.0  # weight of the soft-target loss; 1 - alpha goes to hard labels
    ema: float | None = None  # EMA decay per step; the EMA weights are the deliverable
    whiten: bool = False  # initialise the first conv as a patch-whitening filter bank
    tta: bool = False  # validation averages the image and its mirror
    seed: int = 0
    device: str = "auto"
    patience: int | None = None
    recipe: str = "standard"

    def to_dict(self) -> dict:
        return asdict(self)


# Recipes are defaults, not locks: any option given explicitly overrides them.
RECIPES: dict[str, dict[str, Any]] = {
    "standard": {},
    # The fastest CPU time-to-accuracy this toolkit found (see docs/train.md and bench/RESULTS.md):
    # airbench's ideas that carry over to a small ResNet on CPU.
    "fast": {
        "model": "resnet20",
        "epochs": 16,
        "batch_size": 512,
        "lr": 0.4,
        "schedule": "onecycle",
        "label_smoothing": 0.2,
        "weight_decay": 5e-4,
        "flip": "alternate",
        "ema": 0.98,
        "whiten": True,
        "tta": True,
        "precision": "auto",
        "channels_last": True,
    },
}

_FIELDS = {f.name for f in fields(TrainConfig)}


def make_config(recipe: str | None = None, base: Mapping[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """Defaults <- recipe <- `base` (e.g. the args stored in a checkpoint) <- `overrides`.
    `None` in overrides means "not given"."""
    recipe = recipe or (base or {}).get("recipe") or "standard"
    if recipe not in RECIPES:
        raise UsageError(f"unknown --recipe {recipe!r}", f"available: {', '.join(RECIPES)}")
    values: dict[str, Any] = {**RECIPES[recipe], "recipe": recipe}
    values.update({k: v for k, v in (base or {}).items() if k in _FIELDS})
    unknown = [k for k in overrides if k not in _FIELDS]
    if unknown:
        raise UsageError(f"unknown training option(s) {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["recipe"] = recipe
    config = TrainConfig(**values)
    validate_config(config)
    return config


def validate_config(c: TrainConfig) -> None:
    c.model = resolve_name(c.model)
    c.augment = list(parse_augment(c.augment))
    checks = [
        (c.epochs >= 1, f"--epochs must be at least 1, got {c.epochs}"),
        (c.batch_size >= 1, f"--batch-size must be at least 1, got {c.batch_size}"),
        (c.lr > 0 and math.isfinite(c.lr), f"--lr must be positive, got {c.lr}"),
        (0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}"),
        (c.weight_decay >= 0, f"--wd must be non-negative, got {c.weight_decay}"),
        (c.schedule in SCHEDULES, f"unknown --schedule {c.schedule!r} (use {', '.join(SCHEDULES)})"),
        (c.precision in PRECISIONS, f"unknown --precision {c.precision!r} (use {', '.join(PRECISIONS)})"),
        (0 <= c.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {c.label_smoothing}"),
        (
            c.target in ("class", "origin", "origin+class"),
            f"unknown --target {c.target!r} (use class, origin or origin+class)",
        ),
        (c.soft in (None, *SOFT_LOSSES), f"unknown --soft {c.soft!r} (use kl or l2)"),
        (c.temperature > 0, f"--temperature must be positive, got {c.temperature}"),
        (0 <= c.alpha <= 1, f"--alpha must be in [0, 1], got {c.alpha}"),
        (c.ema is None or 0 < c.ema < 1, f"--ema must be in (0, 1), got {c.ema}"),
        (c.patience is None or c.patience >= 1, f"--patience must be at least 1, got {c.patience}"),
        (c.flip in FLIPS, f"unknown flip mode {c.flip!r}"),
        (c.pad >= 0, f"--pad must be non-negative, got {c.pad}"),
        (0 <= c.warmup < c.epochs, f"--warmup must be in [0, epochs), got {c.warmup}"),
        (c.nesterov is False or c.momentum > 0, "Nesterov momentum needs --momentum > 0 (or --no-nesterov)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


# ----------------------------------------------------------------------------- schedules


def lr_factor(config: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total_steps`."""
    t = min(step / max(total_steps, 1), 1.0)
    if config.schedule == "onecycle":
        # Linear ramp 0.1 -> 1 over the first 25%, then linear decay to 0 (Smith & Topin 2019,
        # in airbench's piecewise-linear form).
        peak = 0.25
        return 0.1 + 0.9 * t / peak if t < peak else max(0.0, (1 - t) / (1 - peak))
    warm = config.warmup * steps_per_epoch
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if config.schedule == "cosine":
        span = max(total_steps - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min((step - warm) / span, 1.0)))
    if config.schedule == "multistep":
        epoch = step / max(steps_per_epoch, 1)
        marks = [m * config.epochs if m <= 1 else m for m in config.milestones]
        return config.gamma ** sum(epoch >= m for m in marks)
    return 1.0


# ----------------------------------------------------------------------------- helpers


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """RANK/WORLD_SIZE/LOCAL_RANK as set by torchrun (single process when absent)."""
    try:
        return Dist(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError as exc:
        raise UsageError(f"bad torchrun environment: {exc}") from exc


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --precision on this device (None: full fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16":
            return torch.float16
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if precision == "fp16":
        raise UsageError("--precision fp16 needs CUDA", "use bf16 or fp32 on CPU")
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (Intel AMX), where bf16 autocast is ~2-3x faster."""
    try:
        return bool(torch.cpu._is_amx_tile_supported()) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def dataset_mean_std(data: ShardSet, rows: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] of the training images (fakecifar.stats' exact pass)."""
    from .stats import dataset_stats

    stats = dataset_stats(data, "train")[0]
    std = [s if s > 1e-6 else 1.0 for s in stats.std]
    return stats.mean, std


class EMA:
    """Exponential moving average of a model's parameters and buffers (its own copy)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))  # short warm-up
        src = list(model.state_dict().values())
        dst = list(self.model.state_dict().values())
        floats = [(d, s) for d, s in zip(dst, src) if d.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([d for d, _ in floats], [s for _, s in floats], 1.0 - decay)
        for d, s in zip(dst, src):
            if not d.dtype.is_floating_point:
                d.copy_(s)


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


def soft_loss(kind: str, logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distillation loss: KL(teacher_T || student_T) * T^2 (Hinton et al.) or MSE of the logits."""
    if kind == "kl":
        t = temperature
        return F.kl_div(
            F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True
        ) * (t * t)
    return F.mse_loss(logits, teacher)


def hard_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


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

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.checkpoint, self.onnx) if p is not None]


class _StopFlag:
    """SIGINT and SIGTERM set a flag the loop checks between steps (a half-done step is never
    saved) and remember which signal came; a second one stops at once (KeyboardInterrupt, or
    errors.Terminated for SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.set = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.set:
            if signum == signal.SIGTERM:
                from .errors import Terminated

                raise Terminated()
            raise KeyboardInterrupt
        self.set = True
        self.signum = signum

    def interrupted(self, message: str, output: Path) -> TrainingInterrupted:
        """The error to raise once the state is saved: `message` says where the run stopped."""
        signum = self.signum or signal.SIGINT
        verb = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        return TrainingInterrupted(
            f"{verb} {message}; state saved to {output}",
            f"continue with: fakecifar train --resume {output}",
            signum=signum,
        )

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()


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
) -> None:
    """Every refusal that needs no training data, so that it comes before any data is read:
    `-o` named .onnx, an existing output without `overwrite`, a directory, a name or path too
    long, an unwritable place (tested with a probe file, not os.access, which says yes to root
    everywhere), a `--log` that cannot be written, a `resume` checkpoint of another
    architecture than `config.model`. Creates nothing. `train` calls it first."""
    dist = dist or dist_from_env()
    output = Path(output)
    resume_path = Path(resume) if resume else None
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
) -> TrainResult:
    """Train `config.model` on `data`; write `output` (.pt) after every epoch and, with `onnx`,
    `output` with suffix .onnx at the end. See the module docstring for the details."""
    dist = dist or dist_from_env()
    output = Path(output)
    onnx_path = output.with_suffix(".onnx") if onnx else None
    resume_path = Path(resume) if resume else None
    log_path = Path(log_path) if log_path else None

    # ---- everything that can be refused is refused before any work or any write
    check_outputs(output, config, resume=resume_path, onnx=onnx, overwrite=overwrite, log_path=log_path, dist=dist)
    state: dict[str, Any] = {}
    stored_meta: dict[str, Any] | None = None
    if resume_path:
        stored_meta, state = _load_resume(resume_path, config)
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
    use_soft = config.soft is not None
    if use_soft:
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

    if log_path and dist.main:
        try:  # fail now, not after an epoch, if it cannot be written
            log_path.parent.mkdir(parents=True, exist_ok=True)
            open(log_path, "a" if resume_path else "w").close()
        except OSError as exc:
            raise write_error(exc, log_path) from exc
    if dist.main:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, output) from exc

    # ---- rows, targets, normalization
    columns = tuple(dict.fromkeys((*needed_columns(config.target), *(("logits",) if use_soft else ()))))
    small = {c: data.read(c) for c in needed_columns(config.target)}
    targets_all = make_targets(small.get("labels"), small.get("origin"), len(data.classes), config.target)
    hard_weight = (1.0 - config.alpha) if use_soft else 1.0
    rows = np.arange(len(data)) if use_soft else np.nonzero(targets_all >= 0)[0]
    if len(rows) == 0:
        raise UsageError(f"{data.paths[0]}: no image has a {config.target} target", "give labelled shards")
    if len(rows) < dist.world_size:
        raise UsageError(f"{len(rows)} training images for {dist.world_size} processes")
    if stored_meta is not None:
        mean, std = stored_meta["mean"], stored_meta["std"]
    else:
        mean, std = dataset_mean_std(data)

    # ---- devices and processes
    if dist.enabled:
        import torch.distributed as tdist

        if torch.cuda.is_available() and config.device in ("auto", "cuda") or str(config.device).startswith("cuda"):
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
            local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
        if not tdist.is_initialized():
            tdist.init_process_group(backend=backend)
    else:
        device = resolve_device(config.device)
    amp_dtype = autocast_dtype(config.precision, device)
    channels_last = (
        config.channels_last if config.channels_last is not None else (device.type == "cuda" or amp_dtype is not None)
    )
    torch.manual_seed(config.seed)

    per_rank_batch = max(1, config.batch_size // dist.world_size)
    per_rank_rows = len(rows) // dist.world_size
    loader = BatchLoader(
        data,
        per_rank_batch,
        shuffle=True,
        seed=config.seed,
        drop_last=per_rank_rows > per_rank_batch,
        mean=mean,
        std=std,
        device=device,
        columns=columns,
        channels_last=channels_last,
        rank=dist.rank,
        world_size=dist.world_size,
        indices=None if len(rows) == len(data) else rows,
    )
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * config.epochs
    val_loader = None
    if val is not None:
        val_small = {c: val.read(c) for c in needed_columns(config.target)}
        val_targets = make_targets(val_small.get("labels"), val_small.get("origin"), len(val.classes), config.target)
        val_rows = np.nonzero(val_targets >= 0)[0][dist.rank :: dist.world_size]
        val_loader = BatchLoader(
            val,
            max(per_rank_batch, 256),
            shuffle=False,
            mean=mean,
            std=std,
            device=device,
            columns=needed_columns(config.target),
            channels_last=channels_last,
            indices=val_rows,
        )

    # ---- model, optimizer, EMA
    if "input_size" in inspect.signature(MODELS[resolve_name(config.model)].builder).parameters:
        # Models whose shape depends on the image size (pca-logreg) are built for this data.
        config.arch_kwargs.setdefault("input_size", list(data.image_size))
    model = build_model(config.model, len(classes), **config.arch_kwargs)
    if state:
        model.load_state_dict(state["model"])
    elif config.whiten:
        sample_rows = np.sort(np.random.default_rng(config.seed).permutation(rows)[:5000])
        sample = BatchLoader(data, 5000, mean=mean, std=std, columns=(), indices=sample_rows)
        whiten_init(model, next(iter(sample))[0])
    if not state and getattr(model, "needs_fit", False):
        # Models with a data-derived part (pca-logreg's PCA basis) fit it before the first step.
        sample_rows = np.sort(np.random.default_rng(config.seed).permutation(rows)[: model.fit_images])
        model.fit_unsupervised(
            x for (x,) in BatchLoader(data, 1024, mean=mean, std=std, columns=(), indices=sample_rows)
        )
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    if state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    ema = EMA(model, config.ema) if config.ema else None
    if ema and state.get("ema"):
        ema.model.load_state_dict(state["ema"])
        ema.updates = int(state.get("ema_updates", 0))
    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])

    history: list[dict] = list(state.get("history", []))
    start_epoch = int(state.get("epoch", 0))
    skip_steps = int(state.get("step", 0))
    global_step = int(state.get("global_step", start_epoch * steps_per_epoch + skip_steps))
    # The sums of the steps done before a mid-epoch interruption, so that the resumed epoch's
    # record covers the whole epoch (rank 0 carries them: they were summed over processes).
    carried: dict[str, Any] = dict(state.get("epoch_partial") or {}) if skip_steps and dist.main else {}
    best = {"val_loss": None, "epoch": None, "state": None}
    if val is not None:  # without validation now, a best state from before would freeze the weights
        best = {
            "val_loss": state.get("best_val_loss"),
            "epoch": state.get("best_epoch"),
            "state": state.get("best_state"),
        }
    bad_epochs = int(state.get("bad_epochs", 0))
    elapsed_before = float(state.get("elapsed_s", 0.0))
    run_start = time.perf_counter()
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
    if start_epoch >= config.epochs:
        raise UsageError(
            f"{resume_path}: training already finished ({start_epoch} of {config.epochs} epochs)",
            "pass a larger --epochs to continue",
        )

    def eval_model() -> nn.Module:
        return ema.model if ema else model

    def deliverable() -> dict[str, torch.Tensor]:
        if best["state"] is not None:
            return best["state"]
        return {k: v.detach().cpu().clone() for k, v in eval_model().state_dict().items()}

    def save(epoch_done: int, step_in_epoch: int, stopped: str, partial: dict | None = None) -> None:
        """Write the checkpoint (rank 0). `partial`: the loss/accuracy sums of the steps done in an
        interrupted epoch (loss_sum, correct, seen, time_s), for its record after the resume."""
        if not dist.main:
            return
        resume_state = {
            "epoch": epoch_done,
            "step": step_in_epoch,
            "global_step": global_step,
            "epoch_partial": partial,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "ema": {k: v.detach().cpu().clone() for k, v in ema.model.state_dict().items()} if ema else None,
            "ema_updates": ema.updates if ema else 0,
            "scaler": scaler.state_dict() if scaler else None,
            "best_val_loss": best["val_loss"],
            "best_epoch": best["epoch"],
            "best_state": best["state"],
            "bad_epochs": bad_epochs,
            "history": history,
            "elapsed_s": elapsed_before + time.perf_counter() - run_start,
        }
        holder = build_model(config.model, len(classes), **config.arch_kwargs)
        holder.load_state_dict(deliverable())
        train_meta = {
            **info,
            "args": config.to_dict(),
            "epochs_done": epoch_done,
            "stopped": stopped,
            "history": history,
            "metrics": history[-1] if history else {},
            "best_epoch": best["epoch"],
            "best_val_loss": best["val_loss"],
            "elapsed_s": resume_state["elapsed_s"],
        }
        save_checkpoint(output, holder, train=train_meta, extra={"resume": resume_state}, **meta)

    # ---- the loop
    stopped = "completed"
    last_saved_epoch = start_epoch if resume_path else None
    with _StopFlag() as stop:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            loader.set_epoch(epoch)
            epoch_start = time.perf_counter()
            before = carried if epoch == start_epoch else {}
            loss_sum = torch.tensor(float(before.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
            correct = torch.tensor(float(before.get("correct", 0.0)), dtype=torch.float64, device=device)
            seen_before, time_before = int(before.get("seen", 0)), float(before.get("time_s", 0.0))
            seen = 0  # images of this epoch trained by this run (the speed is measured on them)
            step = 0
            for step_index, batch in enumerate(loader):
                if step_index < skip_steps:
                    continue
                x, cols = batch[0], dict(zip(columns, batch[1:]))
                gen = step_generator(config.seed, epoch, step_index)
                x = augment_batch(
                    x,
                    config.augment,
                    pad=config.pad,
                    generator=gen,
                    epoch=epoch if config.flip == "alternate" else None,
                )
                y = _batch_targets(cols, config.target, len(data.classes))
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(config, global_step, total_steps, steps_per_epoch)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits = net(x)
                loss = _loss(logits.float(), y, cols.get("logits"), config, hard_weight)
                optimizer.zero_grad(set_to_none=True)
                if scaler:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                if ema:
                    ema.update(model)
                global_step += 1
                step = step_index + 1
                with torch.no_grad():
                    loss_sum += loss.detach().double() * len(x)
                    mask = y >= 0
                    correct += (logits.argmax(1)[mask] == y[mask]).sum()
                seen += len(x)
                # Every step on CPU (free) and under DDP (all ranks must agree on when to stop);
                # every 25 steps on one GPU, where each check waits for the device.
                stop_now = nan_now = False
                if dist.enabled or device.type == "cpu" or step % 25 == 0 or stop.set:
                    flags = torch.stack(
                        [
                            torch.tensor(float(stop.set), dtype=torch.float64, device=device),
                            (~torch.isfinite(loss_sum)).double(),
                        ]
                    )
                    if dist.enabled:
                        import torch.distributed as tdist

                        tdist.all_reduce(flags)
                    stop_now, nan_now = (v > 0 for v in flags.tolist())
                if nan_now:
                    raise _diverged(output, epoch, step, last_saved_epoch, dist)
                if stop_now:
                    sums = torch.stack(
                        [loss_sum, correct, torch.tensor(float(seen + seen_before), dtype=torch.float64, device=device)]
                    )
                    if dist.enabled:
                        import torch.distributed as tdist

                        tdist.all_reduce(sums)
                    loss_total, correct_total, seen_total = sums.tolist()
                    save(
                        epoch,
                        step,
                        "interrupted",
                        partial={
                            "loss_sum": loss_total,
                            "correct": correct_total,
                            "seen": int(seen_total),
                            "time_s": time_before + time.perf_counter() - epoch_start,
                        },
                    )
                    _finish_dist(dist)
                    raise stop.interrupted(
                        f"in epoch {epoch + 1}/{config.epochs} after step {step}/{steps_per_epoch}", output
                    )
                if on_step:
                    on_step(len(x))
            skip_steps = 0
            if not torch.isfinite(loss_sum):
                raise _diverged(output, epoch, step, last_saved_epoch, dist)
            train_time = time.perf_counter() - epoch_start
            stats = torch.tensor(
                [loss_sum.item(), correct.item(), float(seen + seen_before), float(seen)],
                dtype=torch.float64,
                device=device,
            )
            if dist.enabled:
                import torch.distributed as tdist

                tdist.all_reduce(stats)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "epochs": config.epochs,
                "train_loss": stats[0].item() / max(stats[2].item(), 1),
                "train_acc": stats[1].item() / max(stats[2].item(), 1),
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": stats[3].item() / max(train_time, 1e-9),
            }
            if val_loader is not None:
                val_loss, val_acc = _validate(
                    eval_model(), val_loader, config, len(val.classes), amp_dtype, device, dist
                )
                record.update({"val_loss": val_loss, "val_acc": val_acc})
                if not math.isfinite(val_loss):
                    raise _diverged(output, epoch, step, last_saved_epoch, dist, what="validation loss")
                if best["val_loss"] is None or val_loss < best["val_loss"]:
                    best.update(
                        val_loss=val_loss,
                        epoch=epoch + 1,
                        state={k: v.detach().cpu().clone() for k, v in eval_model().state_dict().items()},
                    )
                    bad_epochs = 0
                else:
                    bad_epochs += 1
            record["time_s"] = time_before + time.perf_counter() - epoch_start
            record["elapsed_s"] = elapsed_before + time.perf_counter() - run_start
            history.append(record)
            done = epoch + 1
            early = config.patience is not None and val_loader is not None and bad_epochs >= config.patience
            if early:
                stopped = "early-stop"
            # A signal during validation or the save stops here, at the epoch boundary.
            halt = not early and done < config.epochs and _any_rank(stop.set, device, dist)
            save(done, 0, stopped if (early or done == config.epochs) else "interrupted" if halt else "running")
            last_saved_epoch = done
            if dist.main and log_path:
                _append_line(log_path, json.dumps(record))
            if on_epoch and dist.main:
                on_epoch(record)
            if early:
                break
            if halt:
                _finish_dist(dist)
                raise stop.interrupted(f"after epoch {done}/{config.epochs}", output)

    written_onnx = None
    if onnx_path is not None and dist.main:
        final, final_meta = load_checkpoint(output)
        written_onnx = export_onnx(final, final_meta, onnx_path)
    _finish_dist(dist)
    return TrainResult(output if dist.main else None, written_onnx, history, config, classes, stopped, best["epoch"])


def _any_rank(flag: bool, device: torch.device, dist: Dist) -> bool:
    """`flag` on any process (every process must call it: all decide together)."""
    if not dist.enabled:
        return bool(flag)
    import torch.distributed as tdist

    t = torch.tensor(float(flag), dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.item() > 0


def _append_line(path: Path, line: str) -> None:
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


def _batch_targets(cols: dict[str, torch.Tensor], target: str, num_classes: int) -> torch.Tensor:
    if target == "class":
        return cols["labels"]
    origin = cols["origin"].long()
    if target == "origin":
        return origin
    labels = cols["labels"]
    return torch.where((labels >= 0), origin * num_classes + labels, torch.full_like(labels, -1))


def _loss(
    logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None, config: TrainConfig, hard_weight: float
) -> torch.Tensor:
    if teacher is None:
        return hard_loss(logits, y, config.label_smoothing)
    loss = config.alpha * soft_loss(config.soft, logits, teacher.float(), config.temperature)
    if hard_weight > 0:
        mask = y >= 0
        if mask.any():
            loss = loss + hard_weight * hard_loss(logits[mask], y[mask], config.label_smoothing)
    return loss


@torch.no_grad()
def _validate(
    model: nn.Module,
    loader: BatchLoader,
    config: TrainConfig,
    num_classes: int,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    dist: Dist,
) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    columns = needed_columns(config.target)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in loader:
        x, cols = batch[0], dict(zip(columns, batch[1:]))
        y = _batch_targets(cols, config.target, num_classes)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
            if config.tta:
                logits = (logits + model(x.flip(-1))) / 2
        logits = logits.float()
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(totals)
    model.train(was_training)
    n = max(totals[2].item(), 1)
    return totals[0].item() / n, totals[1].item() / n


def _diverged(
    output: Path, epoch: int, step: int, last_saved: int | None, dist: Dist, what: str = "loss"
) -> TrainingDiverged:
    _finish_dist(dist)
    kept = f"{output} keeps the last good weights (epoch {last_saved})" if last_saved else "no checkpoint was written"
    return TrainingDiverged(
        f"{what} became NaN/inf in epoch {epoch + 1} at step {step}; stopped, {kept}",
        "lower --lr, check the data, or try --precision fp32",
    )


def _finish_dist(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


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
