"""What a training run is configured by: `TrainConfig` (every knob, stored in the checkpoint for
--resume), `RUN_SETTINGS` (where it reads and writes: -o, --val, --resume, ...), `RECIPES` and
`make_config`. Each knob is defined once, here, with its flags, help and validation
(fakecifar.training.settings); `fakecifar train` and `distill` derive their options from it.

No torch here (the CLI imports this module to build its --help).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .settings import Setting, check_values, parse_numbers, setting, settings_of

SCHEDULES = ("cosine", "onecycle", "multistep", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SOFT_LOSSES = ("kl", "l1", "l2", "ce")
FLIPS = ("random", "alternate")
TARGETS = ("class", "origin", "origin+class")
# The attacks of fakecifar.attacks.ATTACKS that training can make its examples with (named here,
# not imported: that module needs torch). The radius and steps when --adv is given without them:
# the usual L2 setting on CIFAR (Madry et al.'s robustness library: eps 0.5, 7 steps).
ADV_ATTACKS = ("pgd-l2",)
ADV_EPS, ADV_STEPS = 0.5, 7
# Fake -> real without real labels (train --adapt-bn / --pseudo-label, fakecifar.training.adapt):
# the --help section, and the threshold and rounds when --pseudo-label is given without them.
ADAPT = "Fake -> real (unlabelled target images)"
PSEUDO_THRESHOLD, PSEUDO_ROUNDS = 0.9, 1

# The sections of --help, in this order (fakecifar.cli.common.with_settings).
RECIPE, MODEL, OPTIM, AUGMENT, ADVERSARIAL, VALIDATION, OUTPUT, RUNTIME = (
    "Recipe",
    "Model and targets",
    "Optimization",
    "Augmentation",
    "Adversarial training",
    "Validation",
    "Output and resume",
    "Runtime",
)
PANELS = (RECIPE, MODEL, OPTIM, AUGMENT, ADVERSARIAL, VALIDATION, OUTPUT, RUNTIME)


def _resolve_model(name: str) -> str:
    from ..models import resolve_name

    return resolve_name(name)


def _parse_augment(spec: Any) -> list[str]:
    from ..augment import parse_augment

    return list(parse_augment(spec))


@dataclass
class TrainConfig:
    """Every knob of a training run. Stored in the checkpoint (`train.args`) for --resume."""

    model: str = setting(
        "resnet20",
        "--model",
        "-m",
        help="Architecture (see --list-models). Default: resnet20.",
        normalize=_resolve_model,
        panel=MODEL,
    )
    arch_kwargs: dict = field(default_factory=dict)
    epochs: int = setting(
        30,
        "--epochs",
        "-e",
        help="Epochs. Default: 30.",
        check=(lambda v: v >= 1, "--epochs must be at least 1, got {v}"),
        panel=OPTIM,
    )
    batch_size: int = setting(
        256,
        "--batch-size",
        "-b",
        help="Global batch size (split over DDP processes). [default: 256]",
        check=(lambda v: v >= 1, "--batch-size must be at least 1, got {v}"),
        panel=OPTIM,
    )
    lr: float = setting(
        0.1,
        "--lr",
        help="Peak learning rate (SGD). Default: 0.1.",
        check=(lambda v: v > 0 and math.isfinite(v), "--lr must be positive, got {v}"),
        panel=OPTIM,
    )
    momentum: float = setting(
        0.9,
        "--momentum",
        help="SGD momentum. Default: 0.9.",
        check=(lambda v: 0 <= v < 1, "--momentum must be in [0, 1), got {v}"),
        panel=OPTIM,
    )
    weight_decay: float = setting(
        5e-4,
        "--wd",
        "--weight-decay",
        help="Weight decay. Default: 5e-4.",
        check=(lambda v: v >= 0, "--wd must be non-negative, got {v}"),
        panel=OPTIM,
    )
    nesterov: bool = setting(True, "--nesterov/--no-nesterov", help="Nesterov momentum. Default: on.", panel=OPTIM)
    schedule: str = setting(
        "cosine",
        "--schedule",
        help="cosine, onecycle, multistep or constant. [default: cosine]",
        check=(lambda v: v in SCHEDULES, "unknown --schedule {v!r} (use " + ", ".join(SCHEDULES) + ")"),
        panel=OPTIM,
    )
    warmup: float = setting(0.0, "--warmup", help="Epochs of linear warm-up (cosine/multistep/constant).", panel=OPTIM)
    milestones: list = setting(  # multistep: epochs, or fractions if <= 1
        None,
        "--milestones",
        default_factory=lambda: [0.5, 0.75],
        help="multistep: epochs (or fractions <= 1) where the lr is multiplied by --gamma. Default: 0.5,0.75.",
        parse=parse_numbers("--milestones", "100,150 or 0.5,0.75"),
        panel=OPTIM,
    )
    gamma: float = setting(0.1, "--gamma", help="multistep factor. Default: 0.1.", panel=OPTIM)
    label_smoothing: float = setting(
        0.0,
        "--label-smoothing",
        help="Label smoothing. Default: 0.",
        check=(lambda v: 0 <= v < 1, "--label-smoothing must be in [0, 1), got {v}"),
        panel=OPTIM,
    )
    augment: list = setting(
        None,
        "--augment",
        default_factory=lambda: ["crop", "flip"],
        type=str,
        help="Batch augmentation on tensors, a comma-separated list or none: crop (pad-crop by --pad), flip "
        "(horizontal), and three that destroy high-frequency detail, each on a random half of the images: jpeg "
        "(re-encoded, quality 50-95), resize (down to 50-87.5% of the side and back), blur (Gaussian, sigma 0.4-1.2). "
        "Default: crop,flip.",
        normalize=_parse_augment,
        panel=AUGMENT,
    )
    pad: int = setting(
        4,
        "--pad",
        help="Padding of the random crop, pixels. Default: 4.",
        check=(lambda v: v >= 0, "--pad must be non-negative, got {v}"),
        panel=AUGMENT,
    )
    flip: str = setting(  # or "alternate" (airbench's derandomized flip)
        "random",
        "--flip",
        help="random, or alternate (each image flipped every other epoch). [default: random]",
        check=(lambda v: v in FLIPS, "unknown flip mode {v!r}"),
        panel=AUGMENT,
    )
    precision: str = setting(
        "auto",
        "--precision",
        help="auto (fp16/bf16 mixed precision on CUDA, bf16 on CPUs with AMX, else fp32), fp32, bf16 or fp16. "
        "Default: auto.",
        check=(lambda v: v in PRECISIONS, "unknown --precision {v!r} (use " + ", ".join(PRECISIONS) + ")"),
        panel=RUNTIME,
    )
    channels_last: bool | None = setting(  # None: on where it helps (CUDA, CPU bf16)
        None,
        "--channels-last/--no-channels-last",
        help="NHWC memory layout. Default: on with CUDA or bf16.",
        panel=RUNTIME,
    )
    target: str = setting(
        "class",
        "--target",
        help="class (labels), origin (real/fake, 2 classes) or origin+class (2K classes 'real/cat' ...). "
        "Default: class.",
        check=(lambda v: v in TARGETS, "unknown --target {v!r} (use class, origin or origin+class)"),
        panel=MODEL,
    )
    soft: str | None = setting(
        None,
        "--soft",
        help="Train on the shards' `logits` column: kl (softened KL), l1 or l2 (on the logits), or ce "
        "(cross-entropy on their top-1 class).",
        check=(lambda v: v in (None, *SOFT_LOSSES), "unknown --soft {v!r} (use kl, l1, l2 or ce)"),
        panel=MODEL,
    )
    temperature: float = setting(
        4.0,
        "--temperature",
        "-T",
        help="Temperature of --soft kl. Default: 4.",
        check=(lambda v: v > 0, "--temperature must be positive, got {v}"),
        panel=MODEL,
    )
    alpha: float = setting(  # weight of the soft-target loss; 1 - alpha goes to hard labels
        1.0,
        "--alpha",
        help="Weight of the soft loss; 1-alpha goes to hard labels. [default: 1]",
        check=(lambda v: 0 <= v <= 1, "--alpha must be in [0, 1], got {v}"),
        panel=MODEL,
    )
    # Adversarial training: None for eps and steps means "not given" (their defaults apply with
    # --adv only, and giving them without --adv is refused, not ignored).
    adv: str | None = setting(
        None,
        "--adv",
        help="Adversarial training (Madry et al. 2018): pgd-l2 trains on L2 PGD adversarial examples of every "
        "batch, made against the current weights (about --adv-steps + 1 forward/backward passes per batch). "
        "Hard labels only (not with --soft).",
        check=(lambda v: v in (None, *ADV_ATTACKS), "unknown --adv {v!r} (use " + ", ".join(ADV_ATTACKS) + ")"),
        panel=ADVERSARIAL,
    )
    adv_eps: float | None = setting(
        None,
        "--adv-eps",
        help=f"L2 radius of the perturbations in [0,1] pixel space (before normalization), as eval --eps. "
        f"Default with --adv: {ADV_EPS}.",
        check=(
            lambda v: v is None or (v > 0 and math.isfinite(v)),
            "--adv-eps must be a positive finite L2 radius, got {v} (e.g. --adv-eps 0.5)",
        ),
        panel=ADVERSARIAL,
    )
    adv_steps: int | None = setting(
        None,
        "--adv-steps",
        help=f"PGD steps per batch (step size 2.5*eps/steps, no random start, as eval --attack). "
        f"Default with --adv: {ADV_STEPS}.",
        check=(lambda v: v is None or v >= 1, "--adv-steps must be at least 1, got {v}"),
        panel=ADVERSARIAL,
    )
    # Self-training on unlabelled target images (--pseudo-label TARGET, a path: ADAPT_SETTINGS).
    # None means "not given": the defaults apply with --pseudo-label only, and giving them without
    # it is refused (check_pseudo_label). Each round's training is a plain one: the rounds record
    # the values they used in the checkpoint's train.adapt, not in train.args.
    threshold: float | None = setting(
        None,
        "--threshold",
        help=f"--pseudo-label keeps the target images whose top softmax probability is at least this, in (0, 1]. "
        f"Default: {PSEUDO_THRESHOLD}.",
        check=(lambda v: v is None or 0 < v <= 1, "--threshold must be in (0, 1], got {v}"),
        panel=ADAPT,
    )
    keep_fraction: float | None = setting(
        None,
        "--keep-fraction",
        help="--pseudo-label keeps, in each predicted class, this fraction of its target images, the most "
        "confident (class-balanced self-training), instead of a --threshold: no class crowds out the others, "
        "and it works for a model whose top probability is capped, e.g. by label smoothing.",
        check=(lambda v: v is None or 0 < v <= 1, "--keep-fraction must be in (0, 1], got {v}"),
        panel=ADAPT,
    )
    rounds: int | None = setting(
        None,
        "--rounds",
        help=f"--pseudo-label rounds: predict the target images, train again (from scratch, same options) on "
        f"SHARDS plus the kept ones. Default: {PSEUDO_ROUNDS}.",
        check=(lambda v: v is None or v >= 1, "--rounds must be at least 1, got {v}"),
        panel=ADAPT,
    )
    ema: float | None = setting(  # EMA decay per step; the EMA weights are the deliverable
        None,
        "--ema",
        help="Keep an exponential moving average of the weights with this decay per step and deliver it (e.g. 0.98).",
        check=(lambda v: v is None or 0 < v < 1, "--ema must be in (0, 1), got {v}"),
        panel=OPTIM,
    )
    whiten: bool = setting(  # initialise the first conv as a patch-whitening filter bank
        False, "--whiten/--no-whiten", help="Initialise the first conv as a patch-whitening filter bank.", panel=MODEL
    )
    tta: bool = setting(  # validation averages the image and its mirror
        False, "--tta/--no-tta", help="Validate (and --pseudo-label) on the image and its mirror.", panel=VALIDATION
    )
    seed: int = setting(0, "--seed", help="Random seed (init, shuffling, augmentation). Default: 0.", panel=RUNTIME)
    device: str = setting("auto", "--device", help="auto, cpu, cuda or cuda:N. Default: auto.", panel=RUNTIME)
    patience: int | None = setting(
        None,
        "--patience",
        help="Stop after this many epochs without a better val loss.",
        check=(lambda v: v is None or v >= 1, "--patience must be at least 1, got {v}"),
        panel=VALIDATION,
    )
    recipe: str = setting(
        "standard",
        "--recipe",
        help="standard (the defaults below) or fast (CPU time-to-accuracy: resnet20, 16 epochs, one-cycle, EMA, "
        "label smoothing, whitened stem, alternating flips, flip TTA).",
        panel=RECIPE,
    )

    def to_dict(self) -> dict:
        return asdict(self)


# Where a run reads and writes: keywords of `train()`, options of `train` and `distill`.
RUN_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "output",
        ("--output", "-o"),
        "Checkpoint to write (.pt). Default with --resume: the resumed file.",
        type=Path,
        panel=OUTPUT,
    ),
    Setting(
        "val",
        ("--val",),
        "Validation shards (repeatable): per-epoch val metrics, save-best on val loss, early stopping.",
        type=list[str],
        panel=VALIDATION,
    ),
    Setting(
        "resume",
        ("--resume",),
        "Continue from a checkpoint written by train: its data, --val data and options are reused unless given "
        "again here (typically --epochs to go further).",
        type=Path,
        panel=OUTPUT,
    ),
    Setting(
        "onnx",
        ("--onnx",),
        "Also export OUTPUT with suffix .onnx (onnxruntime, normalization baked in).",
        default=False,
        type=bool,
        cli_default=False,
        panel=OUTPUT,
    ),
    Setting("log_path", ("--log",), "Append one JSON line per epoch to this file.", type=Path, panel=OUTPUT),
    Setting(
        "threads",
        ("--threads",),
        "CPU threads for torch (default: torch's, one per core). Use 1 per job when several jobs share the cores.",
        type=int,
        check=(lambda v: v is None or v >= 1, "--threads must be at least 1, got {v}"),
        panel=RUNTIME,
    ),
    Setting(
        "overwrite",
        ("--overwrite",),
        "Replace existing output files.",
        default=False,
        type=bool,
        cli_default=False,
        panel=OUTPUT,
    ),
)

# What a `train` run records besides its checkpoint, for `fakecifar dropout` (train's alone).
RECORD_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "dynamics",
        ("--dynamics",),
        "Record every training image's margin, correctness and error norm at each epoch, from the training "
        "pass itself, into this HDF5 file (for dropout --score aum|forgetting|el2n).",
        type=Path,
        panel=OUTPUT,
    ),
    Setting(
        "snapshots",
        ("--snapshots",),
        "Save every epoch's weights as DIR/epoch-NNN.pt (for dropout --score tracin).",
        type=Path,
        panel=OUTPUT,
    ),
)

# Fake -> real without real labels (train's alone; fakecifar.training.adapt): unlabelled target
# shards. Their labels, if any, are never read.
ADAPT_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "adapt_bn",
        ("--adapt-bn",),
        "After training, re-estimate every BatchNorm's statistics on these unlabelled target shards "
        "(AdaBN; repeatable); the adapted model is delivered.",
        type=list[str],
        panel=ADAPT,
    ),
    Setting(
        "pseudo_label",
        ("--pseudo-label",),
        "Self-train on these unlabelled target shards (repeatable): keep the images predicted with at least "
        "--threshold, train again on SHARDS plus them, --rounds times; each round's set is written to OUTPUT.pseudo/.",
        type=list[str],
        panel=ADAPT,
    ),
)
# train's --help sections: PANELS with the fake -> real one after adversarial training.
TRAIN_PANELS = (*PANELS[: PANELS.index(ADVERSARIAL) + 1], ADAPT, *PANELS[PANELS.index(ADVERSARIAL) + 1 :])

TRAIN_SETTINGS = settings_of(TrainConfig)

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
    """Normalize (model aliases, augmentation lists) and check every setting, then the checks
    that involve two of them; raises UsageError naming the first problem."""
    for s in TRAIN_SETTINGS:
        if s.normalize is not None:
            setattr(c, s.name, s.normalize(getattr(c, s.name)))
    check_values(TRAIN_SETTINGS, vars(c))
    if not 0 <= c.warmup < c.epochs:
        raise UsageError(f"--warmup must be in [0, epochs), got {c.warmup}")
    if not (c.nesterov is False or c.momentum > 0):
        raise UsageError("Nesterov momentum needs --momentum > 0 (or --no-nesterov)")
    check_adversarial(c)
    if c.adv is not None:
        c.adv_eps = ADV_EPS if c.adv_eps is None else float(c.adv_eps)
        c.adv_steps = ADV_STEPS if c.adv_steps is None else int(c.adv_steps)


def check_adversarial(c: Any) -> None:
    """The adversarial settings against the others: --adv-eps/--adv-steps need --adv, and --adv
    needs hard labels (the attack maximises the cross-entropy of the label). Called by
    validate_config and by the task itself, since distillation sets soft targets after it."""
    if c.adv is None:
        given = [flag for flag, value in (("--adv-eps", c.adv_eps), ("--adv-steps", c.adv_steps)) if value is not None]
        if given:
            options = " and ".join(given)
            raise UsageError(
                f"{options} {'needs' if len(given) == 1 else 'need'} --adv", f"add --adv pgd-l2, or drop {options}"
            )
    elif c.soft is not None:
        raise UsageError(
            f"--adv {c.adv} trains on hard labels, not on soft targets (--soft {c.soft})",
            "drop --soft, or drop --adv",
        )


def check_pseudo_label(c: Any, pseudo_label: bool) -> None:
    """The self-training settings against the others: --threshold/--rounds need --pseudo-label
    (`pseudo_label`: it was given), and --pseudo-label needs hard class labels (it writes the
    predicted class as the label). Called by `check_outputs`, before any data is read."""
    if not pseudo_label:
        given = [
            flag
            for flag, value in (
                ("--threshold", c.threshold),
                ("--keep-fraction", c.keep_fraction),
                ("--rounds", c.rounds),
            )
            if value is not None
        ]
        if given:
            options = " and ".join(given)
            raise UsageError(
                f"{options} {'needs' if len(given) == 1 else 'need'} --pseudo-label",
                f"add --pseudo-label TARGET_SHARDS, or drop {options}",
            )
        return
    if c.threshold is not None and c.keep_fraction is not None:
        raise UsageError(
            "--threshold and --keep-fraction are two ways to choose the pseudo-labels: give one",
            "--keep-fraction for class-balanced self-training, --threshold for a confidence cut",
        )
    if c.soft is not None:
        raise UsageError(
            f"--pseudo-label trains on predicted hard labels, not on soft targets (--soft {c.soft})",
            "drop --soft, or drop --pseudo-label",
        )
    if c.target != "class":
        raise UsageError(
            f"--pseudo-label predicts classes: it needs --target class, not --target {c.target}",
            "drop --target, or drop --pseudo-label",
        )
