"""Fake -> real without real labels (issue 13): a classifier trained on generated images, made to
work on real ones with unlabelled real images (cheap) and no real labels (dear).

    adapt_batchnorm(model, batches)               AdaBN (Li et al. 2016): the BatchNorm statistics
                                                  re-estimated on target images, weights untouched
    pseudo_labels(model, batches, threshold)      the target images predicted with a top
                                                  probability >= threshold, with that class
    adapted_train(data, output, config, ...)      what `train(..., adapt_bn=, pseudo_label=)` runs

`train --adapt-bn TARGET` trains as usual, then resets every BatchNorm's running statistics and
averages them (momentum None: a cumulative average, every batch weighing the same) over forward
passes of the target images, BatchNorm layers in train mode, everything else in eval mode,
under no_grad; the momenta are restored and that model is delivered (checkpoint and --onnx).
Batches are balanced (sizes differ by at most one), so the mean of the batch means is the mean
over the target images.

`train --pseudo-label TARGET --threshold P --rounds R` self-trains (or `--keep-fraction F`: in
each predicted class, its most confident F, class-balanced; a threshold keeps few images of a
model trained with label smoothing, whose top probability stays below 1 - smoothing). Round 0 is the training on
SHARDS; round k >= 1 predicts the target images with round k-1's delivered model (eval mode,
flip-TTA with --tta), keeps those with a top probability >= P, labels them with the predicted
class, writes them as shards to OUTPUT.pseudo/round-k/ (a dataset with its manifest: labels, a
float32 `confidence`, the image's `target_row` in TARGET, `sha256`) and trains again, from
scratch with the same options and epochs, on SHARDS plus those shards. From scratch rather than
fine-tuning: the cost is the same (the same epochs either way), a fresh start does not carry the
previous round's errors forward in its weights (the model would otherwise start out fitting its
own pseudo-labels, with near-zero loss on them), and it needs nothing but an ordinary `train`.
With --adapt-bn too, every round's model is BN-adapted before it predicts (and the last is
delivered adapted).

Each round trains into OUTPUT itself; the checkpoint's `train.adapt` says which round it holds,
whether that round is finalized (BN adapted, evaluated) and what every round kept, so that
`--resume OUTPUT` continues at round granularity: finished rounds are not redone, a round's
pseudo-labelled shards are reused, and an interrupted round's training resumes exactly, mid-epoch
(train's own resume). Killed between a round's pseudo-labelling and its first save, the
checkpoint still holds the previous round: the resume predicts again with the same weights,
finds the complete round-k shards (same parameters, same weights digest) and reuses them.

Protocol: the target images are unlabelled by assumption; per-round accuracy is only measured on
--val, which must be other images (a separate real split or held-out generated images), never the
target: `--pseudo-label` with a --val shard that is also a target is refused.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import _torch_load, export_onnx, load_checkpoint, save_checkpoint
from ..errors import BadCheckpointError, OutputExistsError, UsageError
from ..loader import BatchLoader
from ..manifest import read_manifest
from ..outputs import check_output_path
from ..shards import (
    ShardSeriesWriter,
    ShardSet,
    open_dataset_output,
    open_shards,
    pixel_sha256,
    producer,
    provenance_of,
)
from .callbacks import JsonlLog
from .config import PSEUDO_ROUNDS, PSEUDO_THRESHOLD, TrainConfig
from .runtime import Dist, dist_from_env, process_device

if TYPE_CHECKING:
    from ..train import TrainResult

PSEUDO_SUFFIX = ".pseudo"
SHARD_SIZE = 10_000
BATCH = 256
# The top-level entries of a checkpoint that save_checkpoint writes itself; the others (resume)
# are carried over when a finalized round rewrites it.
_FORMAT_KEYS = (
    "format",
    "version",
    "arch",
    "arch_kwargs",
    "classes",
    "mean",
    "std",
    "input_size",
    "state_dict",
    "train",
)


# ----------------------------------------------------------------------------- the two tools


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (those AdaBN re-estimates)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[Any]) -> int:
    """AdaBN: reset every BatchNorm's running statistics and re-estimate them as the cumulative
    average (momentum None) over forward passes of `batches` (normalized float images, or tuples
    whose first item they are), the BatchNorm layers in train mode and every other module in
    eval mode (dropout off), under no_grad: no weight changes. The momenta and the model's mode
    are restored. Returns the number of images seen."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    modes = [m.training for m in model.modules()]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in layers:
        m.train()
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            seen += len(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for module, mode in zip(model.modules(), modes):
            module.training = mode
    return seen


def _logits(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    logits = model(x).float()
    if tta:  # as validation's TTA: the mean of the logits of the image and its mirror
        logits = (logits + model(x.flip(-1)).float()) / 2
    return logits


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Any], tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(top softmax probability float32, predicted class int64) of every image, in order, in eval mode."""
    was = model.training
    model.eval()
    probs, classes = [], []
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            p = torch.softmax(_logits(model, x, tta), dim=1)
            top, cls = p.max(dim=1)
            probs.append(top.cpu().numpy())
            classes.append(cls.cpu().numpy())
    finally:
        model.train(was)
    if not probs:
        return np.empty(0, np.float32), np.empty(0, np.int64)
    return np.concatenate(probs).astype(np.float32), np.concatenate(classes).astype(np.int64)


@dataclass
class PseudoLabels:
    rows: np.ndarray  # int64: the kept images' indices in the target set, ascending
    labels: np.ndarray  # int64: their predicted class
    confidence: np.ndarray  # float32: their top probability
    total: int  # target images predicted

    def per_class(self, classes: list[str]) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(classes))
        return {name: int(n) for name, n in zip(classes, counts)}


def pseudo_labels(
    model: nn.Module, batches: Iterable[Any], threshold: float | None, tta: bool = False, fraction: float | None = None
) -> PseudoLabels:
    """The images of `batches` (unshuffled: row i is the i-th image) whose top probability is
    at least `threshold`, with the predicted class as their label; or, with `fraction`, the most
    confident `fraction` of the images predicted as each class (class-balanced self-training,
    Zou et al. 2018: no class crowds out the others, whatever the model's calibration)."""
    confidence, labels = predict(model, batches, tta)
    if fraction is None:
        assert threshold is not None
        keep = np.nonzero(confidence >= np.float32(threshold))[0]
    else:
        chosen = []
        for c in np.unique(labels):
            rows = np.nonzero(labels == c)[0]
            order = rows[np.argsort(-confidence[rows], kind="stable")]
            chosen.append(order[: math.ceil(fraction * len(rows) - 1e-9)])
        keep = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return PseudoLabels(keep.astype(np.int64), labels[keep], confidence[keep], len(confidence))


def selection_rule(threshold: float | None, fraction: float | None) -> str:
    """How --pseudo-label chooses, in words (for messages)."""
    return f"p >= {threshold}" if fraction is None else f"the top {fraction:g} of each predicted class"


def accuracy(model: nn.Module, batches: Iterable[Any], targets: np.ndarray, tta: bool = False) -> float:
    """Top-1 accuracy of the predictions on `batches` (unshuffled) against `targets` (NaN without images)."""
    _, predicted = predict(model, batches, tta)
    return float(np.mean(predicted == np.asarray(targets))) if len(predicted) else math.nan


def balanced_batch(n: int, batch: int) -> int:
    """The batch size that splits n images into ceil(n / batch) batches differing by at most one
    image, so that no batch is a tiny remainder (a cumulative average weighs batches alike)."""
    batches = max(1, -(-n // max(1, batch)))
    return max(1, -(-n // batches))


def weights_digest(model: nn.Module) -> str:
    """A short hash of the weights and buffers: which model made a round's pseudo-labels."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the pseudo-labelled set


def pseudo_root(output: str | os.PathLike) -> Path:
    """Where a --pseudo-label run keeps its rounds: `model.pt.pseudo/round-K/`."""
    return Path(os.fspath(output) + PSEUDO_SUFFIX)


def round_dir(output: str | os.PathLike, k: int) -> Path:
    return pseudo_root(output) / f"round-{k}"


def write_pseudo_shards(
    directory: Path,
    target: ShardSet,
    labels: PseudoLabels,
    *,
    classes: list[str],
    params: Mapping[str, Any],
    overwrite: bool = False,
    shard_size: int = SHARD_SIZE,
    batch: int = 1024,
) -> tuple[list[Path], bool]:
    """Write the kept target images as shards in `directory` (through the standard writers: a
    dataset with its manifest): `labels` the predicted class, `confidence` float32, `target_row`
    int64 (the index in the target set), `sha256`. A complete directory written with the same
    `params` is reused; an interrupted one is finished. Returns (shard paths, reused)."""
    out = open_dataset_output(directory, command="train", params=dict(params), overwrite=overwrite)
    try:
        reused = out.already_complete
        if not reused:
            chain = provenance_of(target.shards) + [
                {
                    "step": "pseudo-label",
                    "round": params.get("round"),
                    "threshold": params.get("threshold"),
                    "keep_fraction": params.get("keep_fraction"),
                }
            ]
            writer = ShardSeriesWriter(
                out.directory,
                shard_size=shard_size,
                classes=classes,
                image_size=target.image_size,
                producer=producer("train"),
                provenance=chain,
                overwrite=out.overwrite,
                dataset=out,
            )
            try:
                for start in range(out.finished_images, len(labels.rows), batch):
                    sl = slice(start, start + batch)
                    images = target.take("images", labels.rows[sl])
                    writer.add_batch(
                        images,
                        labels.labels[sl].astype(np.int16),
                        confidence=labels.confidence[sl].astype(np.float32),
                        target_row=labels.rows[sl].astype(np.int64),
                        sha256=pixel_sha256(images),
                    )
                writer.close()
            except BaseException:
                writer.abort()
                raise
            out.finish(classes=classes, image_size=target.image_size)
        paths = out.finished_paths
    except BaseException:
        out.close(failed=True)
        raise
    out.close()
    return paths, reused


# ----------------------------------------------------------------------------- refusals


def check_adapt_outputs(
    output: Path, config: TrainConfig, *, resume: Path | None, overwrite: bool, pseudo_label: bool, dist: Dist
) -> None:
    """What an --adapt-bn/--pseudo-label run refuses before any data is read (called by
    `check_outputs`): torchrun, and OUTPUT.pseudo/ left by another run (without --overwrite or
    --resume) or in a place that cannot be written."""
    if dist.enabled:
        raise UsageError(
            "--adapt-bn and --pseudo-label run in one process, not under torchrun", "run `fakecifar train` directly"
        )
    if pseudo_label:
        root = pseudo_root(output)
        check_output_path(root, directory=True, children=["round-1"], option="--pseudo-label", probe=dist.main)
        if root.exists() and resume is None and not overwrite:
            raise OutputExistsError(
                f"{root} already exists (the pseudo-labelled rounds of an earlier run)",
                "pass --overwrite to replace it, or --resume the run that wrote it",
            )


def check_targets(
    data: ShardSet, val: ShardSet | None, adapt_bn: ShardSet | None, pseudo_label: ShardSet | None, config: TrainConfig
) -> None:
    """The target shards against the training data: images of the training size, some images,
    a model with BatchNorm for --adapt-bn, and no --val shard that is also a --pseudo-label
    target (their labels are unknown by assumption; what measures the rounds must be other images)."""
    for flag, target in (("--adapt-bn", adapt_bn), ("--pseudo-label", pseudo_label)):
        if target is None:
            continue
        if target.image_size != data.image_size:
            (h, w), (th, tw) = data.image_size, target.image_size
            raise UsageError(
                f"{flag} {target.paths[0]}: target images are {th}x{tw}, the training images {h}x{w}",
                f"resize them first: fakecifar resize {target.paths[0]} --size {h}x{w} -o DIR",
            )
        if len(target) < 2:
            raise UsageError(f"{flag} {target.paths[0]}: {len(target)} target image(s)", "give at least 2")
    if adapt_bn is not None and not _has_batchnorm(config, data):
        raise UsageError(
            f"--adapt-bn: {config.model} has no BatchNorm layer to adapt", "choose a model with BatchNorm (resnet20)"
        )
    if pseudo_label is not None and val is not None:
        targets = {p.resolve() for p in pseudo_label.paths}
        shared = [p for p in val.paths if p.resolve() in targets]
        if shared:
            raise UsageError(
                f"--val {shared[0]} is also a --pseudo-label target: the target images are unlabelled by assumption, "
                "and the rounds must be judged on other images",
                "give --val a separate real split or held-out generated images",
            )


def _has_batchnorm(config: TrainConfig, data: ShardSet) -> bool:
    import inspect

    from ..evaluate import target_classes
    from ..models import build_model, model_spec

    kwargs = dict(config.arch_kwargs)
    if "input_size" in inspect.signature(model_spec(config.model).builder).parameters:
        kwargs.setdefault("input_size", list(data.image_size))
    model = build_model(config.model, len(target_classes(data.classes, config.target)), **kwargs)
    return bool(batchnorm_layers(model))


def stored_targets(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(--adapt-bn shards, --pseudo-label shards) recorded in a checkpoint, for --resume."""
    _, meta = load_checkpoint(path)
    adapt = (meta.get("train") or {}).get("adapt") or {}

    def paths(entry: Any) -> list[str]:
        target = entry.get("target") if isinstance(entry, Mapping) else None
        return [str(p) for p in target if isinstance(p, str)] if isinstance(target, list) else []

    return paths(adapt.get("bn")), paths(adapt.get("pseudo"))


# ----------------------------------------------------------------------------- the run


def _val_origin(val: ShardSet | None) -> str | None:
    """What --val holds by its origin column: real, generated, mixed or unknown."""
    if val is None:
        return None
    if "origin" not in val.columns:
        return "unknown origin"
    origin = val.read("origin")
    real, fake = int((origin == 0).sum()), int((origin == 1).sum())
    if real and not fake:
        return "real"
    if fake and not real:
        return "generated"
    return f"mixed: {real} real, {fake} generated"


def adapted_train(
    data: ShardSet,
    output: str | os.PathLike,
    config: TrainConfig,
    *,
    adapt_bn: ShardSet | None = None,
    pseudo_label: ShardSet | None = None,
    val: ShardSet | None = None,
    resume: str | os.PathLike | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    log_path: str | os.PathLike | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_message: Callable[[str], None] | None = None,
    dist: Dist | None = None,
    task: Any = None,
    extra_info: Callable[[], Mapping[str, Any]] | None = None,
    logits_column: bool | None = None,
    dynamics: str | os.PathLike | None = None,
    snapshots: str | os.PathLike | None = None,
) -> TrainResult:
    """`train` with --adapt-bn and/or --pseudo-label (see the module docstring). Every training
    goes through `fakecifar.train.train`; this adds the BN adaptation, the rounds, their report
    (`on_message`) and their record in the checkpoint (`train.adapt`)."""
    from ..evaluate import target_classes
    from ..train import TrainResult, check_outputs, train

    say = on_message or (lambda _m: None)
    dist = dist or dist_from_env()
    output = Path(output)
    resume_path = Path(resume) if resume else None
    log_path = Path(log_path) if log_path else None
    pseudo = pseudo_label is not None

    # ---- refusals, before any work or write
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
        adapt_bn=adapt_bn,
        pseudo_label=pseudo_label,
    )
    if task is not None:
        raise UsageError("--adapt-bn and --pseudo-label work with train's classification task only")
    if pseudo and (dynamics or snapshots):
        raise UsageError(
            "--dynamics and --snapshots record one training, --pseudo-label runs several",
            "drop --dynamics/--snapshots, or drop --pseudo-label",
        )
    check_targets(data, val, adapt_bn, pseudo_label, config)
    run = _Run.resumed(resume_path, config) if resume_path is not None else _Run()
    # --keep-fraction or --threshold (one of them; a resume keeps the recorded one unless told)
    fraction: float | None = None
    threshold: float | None = None
    given_fraction = config.keep_fraction if config.keep_fraction is not None else run.keep_fraction
    if given_fraction is not None and (config.keep_fraction is not None or config.threshold is None):
        fraction = float(given_fraction)
    else:
        threshold = float(next(v for v in (config.threshold, run.threshold, PSEUDO_THRESHOLD) if v is not None))
    rule = selection_rule(threshold, fraction)
    rounds = int(next(v for v in (config.rounds, run.rounds, PSEUDO_ROUNDS) if v is not None)) if pseudo else 0
    if resume_path is not None:
        if pseudo and run.round > rounds:
            raise UsageError(
                f"{resume_path}: the self-training is at round {run.round}, past --rounds {rounds}",
                f"pass --rounds {run.round} or more",
            )
        if run.finalized and run.round >= rounds:
            done = f"{run.round} of {rounds} rounds" if pseudo else f"{run.epochs_done} of {config.epochs} epochs"
            raise UsageError(
                f"{resume_path}: training already finished ({done})",
                "pass a larger --rounds to continue" if pseudo else "pass a larger --epochs to continue",
            )

    classes = target_classes(data.classes, config.target)
    device = process_device(config.device, dist)
    # Each round's training is a plain one: the self-training knobs live in train.adapt.
    round_config = replace(config, threshold=None, rounds=None, keep_fraction=None)
    val_origin = _val_origin(val)
    val_targets = _targets(val, config) if val is not None else None

    def info(finalized: bool) -> dict[str, Any]:
        adapt: dict[str, Any] = {
            "round": run.round,
            "rounds": rounds if pseudo else None,
            "finalized": finalized,
            "bn": None,
            "pseudo": None,
            "records": run.records,
            "val": [str(p) for p in val.paths] if val is not None else None,
            "val_origin": val_origin,
        }
        if adapt_bn is not None:
            adapt["bn"] = run.bn or {"target": [str(p) for p in adapt_bn.paths], "adapted": False}
        if pseudo_label is not None:
            adapt["pseudo"] = {
                "target": [str(p) for p in pseudo_label.paths],
                "threshold": threshold,
                "keep_fraction": fraction,
                "rounds": rounds,
                "tta": bool(config.tta),
                "from": "scratch",
            }
        out = {"data": [str(p) for p in data.paths], "adapt": adapt}
        return {**out, **(extra_info() if extra_info else {})}

    if pseudo:
        if resume_path is None and overwrite:
            _remove_rounds(pseudo_root(output))
        measured = (
            f"--val {', '.join(str(p) for p in val.paths)} ({len(val):,} images, {val_origin})"
            if val is not None
            else None
        )
        say(
            f"self-training: {rounds} round(s), keeping {rule}, {config.epochs} epochs each, from scratch; "
            + (
                f"per-round accuracy on {measured}, never on the target images"
                if measured
                else "no --val: per-round accuracy is not measured (choose --threshold/--rounds/--epochs on "
                "held-out generated images or a separate real split, never on the test set)"
            )
        )
    log = JsonlLog(log_path, append=resume_path is not None) if log_path and pseudo else None
    source = resume_path if resume_path is not None else output  # the checkpoint of the current round

    while True:
        k = run.round
        if not run.trained:
            round_data = data if k == 0 else _round_data(data, run.records[k])
            if pseudo and k > 0:
                say(
                    f"round {k}/{rounds}: training from scratch on {len(data):,} + {run.records[k]['kept']:,} "
                    "pseudo-labelled images" + (" (resuming)" if run.in_progress else "")
                )
            run.bn = None

            def hook(record: dict, k: int = k) -> None:
                if log is not None:
                    log.on_record(None, {"round": k, **record})  # type: ignore[arg-type]
                if on_epoch:
                    on_epoch(record)

            result = train(
                round_data,
                output,
                round_config,
                val=val,
                resume=source if run.in_progress else None,
                onnx=False,
                overwrite=True,  # the caller's outputs were checked above
                log_path=None if log is not None else log_path,
                on_epoch=hook,
                on_step=on_step,
                dist=dist,
                extra_info=lambda: info(False),
                logits_column=logits_column,
                dynamics=dynamics,
                snapshots=snapshots,
            )
            run.history, run.stopped, run.best_epoch = result.history, result.stopped, result.best_epoch
            run.trained, run.in_progress, run.finalized = True, False, False
            source = output
        if not run.finalized:
            model, meta = _finalize(source, run, adapt_bn, val, val_targets, config, device, rounds, say)
            _rewrite(source, output, model, meta, info(True))
            run.finalized = True
            source = output
        if not pseudo or k >= rounds:
            break
        # ---- the next round's pseudo-labelled set, from this round's delivered model
        assert pseudo_label is not None  # pseudo
        record = _pseudo_round(
            k + 1, rounds, source, output, pseudo_label, data, threshold, fraction, config, device, overwrite, say
        )
        del run.records[k + 1 :]
        run.records.append(record)
        if record["kept"] == 0:
            say(f"round {k + 1}/{rounds}: no target image kept ({rule}); stopping after round {k}")
            model, meta = load_checkpoint(source)
            _rewrite(source, output, model, meta, info(True))
            source = output
            break
        run.round, run.trained, run.in_progress, run.finalized = k + 1, False, False, False

    written_onnx = None
    final, final_meta = load_checkpoint(source)
    if onnx:
        written_onnx = export_onnx(final, final_meta, output.with_suffix(".onnx"))
    adaptation = dict((final_meta.get("train") or {}).get("adapt") or {})
    effective = replace(config, threshold=threshold, rounds=rounds, keep_fraction=fraction) if pseudo else config
    return TrainResult(
        source, written_onnx, run.history, effective, classes, run.stopped, run.best_epoch, adaptation=adaptation
    )


@dataclass
class _Run:
    """Where a run stands: the round its checkpoint holds and how far that round got (from the
    checkpoint's train.adapt on --resume), and the per-round records."""

    round: int = 0
    trained: bool = False  # the training of `round` is over
    in_progress: bool = False  # it is not, and the checkpoint holds its state: resume it
    finalized: bool = False  # its BN adaptation and evaluation are done, the checkpoint rewritten
    records: list[dict] = field(default_factory=lambda: [{"round": 0}])  # index = round
    bn: dict | None = None  # the BN adaptation of `round`'s model, once done
    threshold: float | None = None  # as recorded
    keep_fraction: float | None = None
    rounds: int | None = None
    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)
    stopped: str = "completed"
    best_epoch: int | None = None

    @classmethod
    def resumed(cls, path: Path, config: TrainConfig) -> _Run:
        _, meta = load_checkpoint(path)
        info = dict(meta.get("train") or {})
        saved_adapt = info.get("adapt")
        adapt: Mapping[str, Any] = saved_adapt if isinstance(saved_adapt, Mapping) else {}
        stopped, done = str(info.get("stopped") or "running"), int(info.get("epochs_done") or 0)
        # A larger --epochs continues the round the checkpoint holds, as a plain --resume does.
        trained = stopped == "early-stop" or (stopped == "completed" and done >= config.epochs)
        k = int(adapt.get("round", 0))
        records = [dict(r) for r in adapt.get("records") or [] if isinstance(r, Mapping)][: k + 1]
        if len(records) < k + 1:
            if k > 0:
                raise BadCheckpointError(
                    f"{path}: train.adapt says round {k} but records {len(records)} round(s)",
                    "start again with --overwrite",
                )
            records = [{"round": 0}]
        saved_pseudo = adapt.get("pseudo")
        pseudo: Mapping[str, Any] = saved_pseudo if isinstance(saved_pseudo, Mapping) else {}
        bn = adapt.get("bn") if isinstance(adapt.get("bn"), Mapping) else None
        finalized = trained and bool(adapt.get("finalized"))
        return cls(
            round=k,
            trained=trained,
            in_progress=not trained,
            finalized=finalized,
            records=records,
            bn=dict(bn) if finalized and bn and bn.get("adapted") else None,
            threshold=pseudo.get("threshold"),
            keep_fraction=pseudo.get("keep_fraction"),
            rounds=pseudo.get("rounds"),
            epochs_done=done,
            history=list(info.get("history") or []),
            stopped=stopped,
            best_epoch=info.get("best_epoch"),
        )


def _targets(data: ShardSet, config: TrainConfig) -> np.ndarray:
    from ..evaluate import make_targets, needed_columns

    small = {c: data.read(c) for c in needed_columns(config.target)}
    return make_targets(small.get("labels"), small.get("origin"), len(data.classes), config.target)


def _round_data(data: ShardSet, record: Mapping[str, Any]) -> ShardSet:
    """SHARDS plus round k's pseudo-labelled shards (which must be complete)."""
    where = record.get("shards")
    if not where:
        raise BadCheckpointError(f"round {record.get('round')}: no pseudo-labelled shards recorded", "start again")
    pseudo = open_shards([where])
    return ShardSet([*data.shards, *pseudo.shards])


def _remove_rounds(root: Path) -> None:
    """A fresh --overwrite run: drop the rounds an earlier run wrote (only directories whose
    manifest says `fakecifar train` made them)."""
    if not root.is_dir():
        return
    for directory in sorted(root.glob("round-*")):
        manifest = read_manifest(directory) if directory.is_dir() else None
        if manifest is not None and str(manifest.get("producer", "")).startswith("fakecifar train"):
            shutil.rmtree(directory)


def _loader(data: ShardSet, meta: Mapping[str, Any], device: torch.device, **kwargs: Any) -> BatchLoader:
    return BatchLoader(data, mean=meta["mean"], std=meta["std"], device=device, **kwargs)


def _finalize(
    source: Path,
    run: _Run,
    adapt_bn: ShardSet | None,
    val: ShardSet | None,
    val_targets: np.ndarray | None,
    config: TrainConfig,
    device: torch.device,
    rounds: int,
    say: Callable[[str], None],
) -> tuple[nn.Module, dict]:
    """The end of a round: the BN adaptation (--adapt-bn) and the val accuracy (--val) of the
    delivered model in `source`; returns it (adapted) and its metadata for the rewrite."""
    model, meta = load_checkpoint(source)
    model.to(device)
    record = run.records[run.round]
    val_loader = None
    if val is not None and val_targets is not None:
        rows = np.nonzero(val_targets >= 0)[0]
        val_loader = _loader(val, meta, device, batch_size=BATCH, columns=(), indices=rows)
        val_targets = val_targets[rows]
    name = f"round {run.round}/{rounds}" if rounds else "training"
    if adapt_bn is not None:
        if val_loader is not None:
            assert val_targets is not None  # set with val_loader
            record["val_acc_before_bn"] = accuracy(model, val_loader, val_targets, config.tta)
        batch = balanced_batch(len(adapt_bn), max(config.batch_size, BATCH))
        target = _loader(adapt_bn, meta, device, batch_size=batch, columns=(), shuffle=True, seed=config.seed)
        seen = adapt_batchnorm(model, target)
        layers = len(batchnorm_layers(model))
        run.bn = {
            "target": [str(p) for p in adapt_bn.paths],
            "adapted": True,
            "images": seen,
            "layers": layers,
            "batch": batch,
            "round": run.round,
        }
    if val_loader is not None:
        assert val_targets is not None  # set with val_loader
        record["val_acc"] = accuracy(model, val_loader, val_targets, config.tta)
    if adapt_bn is not None:
        change = ""
        if val_loader is not None:
            change = f": val_acc {100 * record['val_acc_before_bn']:.2f}% -> {100 * record['val_acc']:.2f}%"
        say(f"{name}: adapted {layers} BatchNorm layers on {seen:,} target images" + change)
    elif val_loader is not None and rounds:
        say(f"{name}: val_acc {100 * record['val_acc']:.2f}%" + (" (SHARDS only)" if run.round == 0 else ""))
    return model, meta


def _rewrite(source: Path, output: Path, model: nn.Module, meta: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    """Write `model` as the deliverable of `output`, with `source`'s training state (resume) and
    train metadata updated by `info`."""
    raw = _torch_load(source, "cpu")
    extra = {key: value for key, value in raw.items() if key not in _FORMAT_KEYS}
    train_meta = {**dict(raw.get("train") or {}), **info}
    save_checkpoint(
        output,
        model.cpu(),
        arch=meta["arch"],
        arch_kwargs=meta["arch_kwargs"],
        classes=meta["classes"],
        mean=meta["mean"],
        std=meta["std"],
        input_size=meta["input_size"],
        train=train_meta,
        extra=extra,
    )


def _pseudo_round(
    k: int,
    rounds: int,
    source: Path,
    output: Path,
    target: ShardSet,
    data: ShardSet,
    threshold: float | None,
    fraction: float | None,
    config: TrainConfig,
    device: torch.device,
    overwrite: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Round k's pseudo-labelled set: predict the target with the model in `source`, keep what
    its rule keeps (`threshold` or `fraction`), write it (or reuse it) in OUTPUT.pseudo/round-k/."""
    model, meta = load_checkpoint(source)
    model.to(device)
    loader = _loader(target, meta, device, batch_size=BATCH, columns=())
    labels = pseudo_labels(model, loader, threshold, tta=config.tta, fraction=fraction)
    directory = round_dir(output, k)
    params = {
        "target": [str(p.resolve()) for p in target.paths],
        "threshold": threshold,
        "keep_fraction": fraction,
        "tta": bool(config.tta),
        "round": k,
        "model": weights_digest(model.cpu()),
    }
    paths: list[Path] = []
    reused = False
    if len(labels.rows):
        paths, reused = write_pseudo_shards(
            directory, target, labels, classes=list(data.classes), params=params, overwrite=overwrite
        )
    per_class = labels.per_class(list(data.classes))
    counts = ", ".join(f"{name} {n:,}" for name, n in per_class.items())
    say(
        f"round {k}/{rounds}: kept {len(labels.rows):,} of {labels.total:,} target images "
        f"({selection_rule(threshold, fraction)})"
        + (f": {counts}" if len(labels.rows) else "")
        + (f" -> {directory}" if paths else "")
        + (" (reused: written by an earlier run)" if reused else "")
    )
    return {
        "round": k,
        "target_images": labels.total,
        "kept": int(len(labels.rows)),
        "per_class": per_class,
        "mean_confidence": float(labels.confidence.mean()) if len(labels.rows) else None,
        "shards": str(directory) if paths else None,
        "model": params["model"],
    }
