"""The settings of `fakecifar distill` beyond the student's training (fakecifar.training.config):
the teacher, what to ask it and how much. Each is defined once, here, with its flags, help and
check (fakecifar.training.settings); the command derives its options from them.

No numpy or torch here (the CLI imports this module to build its --help).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import UsageError
from .training.settings import setting, settings_of

LOSSES = ("kl", "l1", "l2", "ce")
MIXES = ("none", "mixup", "cutmix")  # fakecifar.training.mixing
DISTILL = "Teacher and queries"  # the --help section of the settings below
DATAFREE = "Data-free (--method)"
METHODS = ("transfer", "dafl", "zskt", "dfad", "dfme", "dfms")  # fakecifar.training.datafree
# Data-free settings that a resumed run must keep (another value is another run).
METHOD_SETTINGS = (
    "method",
    "latent",
    "generator_width",
    "generator_lr",
    "student_steps",
    "generator_steps",
    "directions",
    "epsilon",
    "attention",
    "diversity",
    "proxy_epochs",
    "replay",
    "bn_prior",
)


def _normalize_mode(value: str | None) -> str | None:
    from .answers import parse_mode

    return None if value is None else str(parse_mode(value))


def _parse_queries(text: str) -> int:
    from .ledger import parse_budget

    value = parse_budget(text)
    if value is None:
        raise UsageError(f"bad --queries {text!r}", "give a number of images, e.g. 20000 or 20k")
    return value


@dataclass
class DistillSettings:
    """What distillation adds to a training run (TrainConfig: the student's training, whose
    --temperature, --alpha and --seed apply). Each field is a setting of `fakecifar distill`
    (fakecifar.training.settings); stored in the student's metadata."""

    teacher: str = setting(
        "",
        "--teacher",
        help="The teacher: a .pt/.th (torch, white-box), an .onnx, or an http(s):// URL of `fakecifar serve`.",
        panel=DISTILL,
    )
    teacher_arch: str | None = setting(
        None,
        "--teacher-arch",
        help="Architecture of a foreign .th teacher (e.g. resnet56; auto guesses).",
        panel=DISTILL,
    )
    mode: str | None = setting(
        None,
        "--mode",
        help="Output mode to ask: logits, probs, probs:K, topk:K or label. Default: the teacher's "
        "own (logits for local models).",
        normalize=_normalize_mode,
        panel=DISTILL,
    )
    queries: int | None = setting(
        None,
        "--queries",
        help="Hard budget of images the teacher may be asked (e.g. 20000 or 20k); a larger "
        "transfer set is subsampled (seeded).",
        parse=_parse_queries,
        type=str,
        check=(lambda v: v is None or v >= 1, "--queries must be at least 1, got {v}"),
        panel=DISTILL,
    )
    online: bool = setting(
        False,
        "--online/--offline",
        help="online: ask the teacher about every augmented view of every step "
        "(each is a query); offline (default): ask about each transfer image once.",
        panel=DISTILL,
    )
    mix: str = setting(
        "none",
        "--mix",
        help="Online: mix each batch's views before asking the teacher (mixup or cutmix, lam ~ U(0,1)); "
        "the teacher's answer to the blend is its target, and each blend is one query.",
        check=(lambda v: v in MIXES, "unknown --mix {v!r} (use none, mixup or cutmix)"),
        panel=DISTILL,
    )
    loss: str | None = setting(
        None,
        "--loss",
        help="kl (softened KL, --temperature), l1 or l2 (on logits), or ce (teacher labels). "
        "Default: kl, or ce for a label-only teacher.",
        check=(lambda v: v is None or v in LOSSES, "unknown --loss {v!r} (use kl, l1, l2 or ce)"),
        panel=DISTILL,
    )
    save_transfer: str | None = setting(
        None,
        "--save-transfer",
        help="Offline: keep the labelled transfer set (a logits column) in this folder "
        "(default: OUTPUT.transfer/); `train --soft` can reuse it.",
        panel=DISTILL,
    )
    map_classes: bool = setting(
        False, "--map-classes", help="Match the transfer set's classes to the teacher's by name.", panel=DISTILL
    )
    query_batch: int = setting(
        256,
        "--query-batch",
        help="Images per teacher call (offline and for --val agreement).",
        check=(lambda v: v >= 1, "--query-batch must be at least 1, got {v}"),
        panel=DISTILL,
    )
    api_key_env: str | None = setting(
        None,
        "--api-key-env",
        help="Environment variable holding the key of a remote teacher (never logged).",
        panel=DISTILL,
    )
    fast_teacher: bool = setting(
        False,
        "--fast-teacher/--exact-teacher",
        help="Local torch teachers: answer with BatchNorm folded into the convolutions, channels-last "
        "(checked against the exact pass when opened; equal to float rounding, not bit-identical to serve).",
        panel=DISTILL,
    )
    cache: bool = setting(
        True, "--cache/--no-cache", help="Answer repeated images from the ledger's cache (free).", panel=DISTILL
    )

    method: str = setting(
        "transfer",
        "--method",
        help="transfer: distill on --transfer images; data-free, white-box (a .pt/.th teacher): dafl, zskt, "
        "dfad; black-box (any teacher, answers only): dfme (probabilities), dfms (labels, needs --proxy).",
        check=(lambda v: v in METHODS, "unknown --method {v!r} (use transfer, dafl, zskt, dfad, dfme or dfms)"),
        panel=DATAFREE,
    )
    latent: int = setting(
        256,
        "--latent",
        help="Size of the generator's latent code z.",
        check=(lambda v: v >= 1, "--latent must be at least 1"),
        panel=DATAFREE,
    )
    generator_width: int = setting(
        64,
        "--generator-width",
        help="Channels of the generator's last stage (the first has twice as many); also the dfms discriminator's.",
        check=(lambda v: v >= 1, "--generator-width must be at least 1"),
        panel=DATAFREE,
    )
    generator_lr: float = setting(
        1e-3,
        "--generator-lr",
        help="Adam learning rate of the generator (scheduled like the student's).",
        check=(lambda v: v > 0, "--generator-lr must be positive, got {v}"),
        panel=DATAFREE,
    )
    student_steps: int | None = setting(
        None,
        "--student-steps",
        help="Student updates per iteration. Default: the paper's (dafl 1, zskt 10, dfad, dfme and dfms 5).",
        check=(lambda v: v is None or v >= 1, "--student-steps must be at least 1"),
        panel=DATAFREE,
    )
    generator_steps: int = setting(
        1,
        "--generator-steps",
        help="Generator updates per iteration.",
        check=(lambda v: v >= 1, "--generator-steps must be at least 1"),
        panel=DATAFREE,
    )
    directions: int = setting(
        1,
        "--directions",
        help="dfme: random directions per image of the forward-difference gradient estimate (each a query).",
        check=(lambda v: v >= 1, "--directions must be at least 1"),
        panel=DATAFREE,
    )
    epsilon: float = setting(
        1e-3,
        "--epsilon",
        help="dfme: step of the forward differences, in [0, 1] pixel units.",
        check=(lambda v: v > 0, "--epsilon must be positive, got {v}"),
        panel=DATAFREE,
    )
    attention: float = setting(
        250.0,
        "--attention",
        help="zskt: weight of attention transfer on the stages teacher and student share (0: off).",
        check=(lambda v: v >= 0, "--attention must be >= 0, got {v}"),
        panel=DATAFREE,
    )
    diversity: float = setting(
        1.0,
        "--diversity",
        help="dfms: weight of the class-diversity loss (entropy of the student's mean prediction).",
        check=(lambda v: v >= 0, "--diversity must be >= 0, got {v}"),
        panel=DATAFREE,
    )
    proxy_epochs: int = setting(
        1,
        "--proxy-epochs",
        help="dfms: GAN pre-training passes over the --proxy images (no query).",
        check=(lambda v: v >= 0, "--proxy-epochs must be >= 0"),
        panel=DATAFREE,
    )
    replay: int = setting(
        0,
        "--replay",
        help="Experience replay (dafl, dfad, dfme, dfms): keep the last N generated images with the teacher's "
        "answers; each student step also learns from a batch of them (no query). 0: off.",
        check=(lambda v: v >= 0, "--replay must be >= 0"),
        panel=DATAFREE,
    )
    bn_prior: float = setting(
        0.0,
        "--bn-prior",
        help="dafl, zskt, dfad: weight of a batch-norm prior on the generator (DeepInversion): the teacher's "
        "per-layer feature means and variances on generated images pulled toward its running statistics. "
        "0: off (the papers' methods).",
        check=(lambda v: v >= 0, "--bn-prior must be >= 0, got {v}"),
        panel=DATAFREE,
    )
    steps_per_epoch: int = setting(
        50,
        "--steps-per-epoch",
        help="Data-free iterations per epoch without --queries (with it, the budget sizes the epochs).",
        check=(lambda v: v >= 1, "--steps-per-epoch must be at least 1"),
        panel=DATAFREE,
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """What no single setting's check can see: settings that need each other."""
        if not self.teacher:
            raise UsageError("Missing option '--teacher'", "give a .pt/.th/.onnx model or an http(s):// URL")
        if self.mix != "none" and not self.online:
            raise UsageError(
                f"--mix {self.mix} needs --online (the teacher is asked about each blend as it is made)",
                "add --online, or drop --mix",
            )


DISTILL_SETTINGS = settings_of(DistillSettings)


def make_settings(base: dict[str, Any] | None = None, **values: Any) -> DistillSettings:
    """DistillSettings from `base` (those stored in a resumed student) <- keyword values (None:
    not given), normalized and checked."""
    from .training.settings import check_values

    names = {s.name for s in DISTILL_SETTINGS}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise UsageError(f"unknown distill option(s) {', '.join(unknown)}")
    merged = {k: v for k, v in (base or {}).items() if k in names}
    if base:
        given = {k: v for k, v in values.items() if v is not None}
        if given.get("mode") is not None:
            given["mode"] = _normalize_mode(given["mode"])
        fixed = (*METHOD_SETTINGS, "mode", "fast_teacher")  # another value of these is another run
        changed = [k for k in fixed if k in given and k in base and given[k] != base[k]]
        if changed:
            flags = ", ".join(f"--{k.replace('_', '-')} {base[k]} (not {given[k]})" for k in changed)
            raise UsageError(
                f"--resume: the run was started with {flags}",
                "resume with the run's own options, or start a new run with -o",
            )
    merged.update({k: v for k, v in values.items() if v is not None})
    settings = DistillSettings(**merged)
    for s in DISTILL_SETTINGS:
        if s.normalize is not None:
            setattr(settings, s.name, s.normalize(getattr(settings, s.name)))
    check_values(DISTILL_SETTINGS, vars(settings))
    settings.check()
    return settings
