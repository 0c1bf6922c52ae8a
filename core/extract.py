"""Turn a trained classifier back into a dataset: `fakecifar extract` without the command line.

    from fakecifar.extract import extract, make_settings
    report = extract(make_settings(teacher="resnet56-4bfd9763.th", teacher_arch="resnet56", method="dfm",
                                   images=10_000, background=["mined/"]), "dfm-set")
    report.shards            # DIR/shard-00000.h5, ...: `images`, `labels` (the intended class), `logits`

Four methods (`METHODS`), each optimising images against a white-box torch teacher:

- `dfm` (Data from Model, Benz et al. 2020): start from substitute background images (any
  shards, or uniform noise), draw a *virtual logit* vector per image (the intended class from
  N(20, 2), the others N(mu, 1) with the mu spread evenly over [-3, 3] in random order) and run
  L2 PGD (normalised gradient steps, projected on an L2 ball around the background and on the
  [0, 1] box) until the teacher's logits match it: min ||f(x) - v||^2.
- `deepinversion` (Yin et al. 2020): from noise, Adam on cross-entropy to the intended class +
  BatchNorm-statistics matching (each BN layer's batch mean/variance vs its running ones) +
  total-variation and L2 priors, with random jitter and flips.
- `class-impressions` (Nayak et al. 2019, after Mopuri et al.): from noise, Adam on
  cross-entropy to a one-hot of the intended class.
- `data-impressions` (Nayak et al. 2019, Zero-Shot KD): the class similarity of the last linear
  layer's weights (cosine, min-max normalised per class) sets the concentration of Dirichlet
  soft targets (beta x the sampled class's row, half the images at each of two betas); Adam on
  the cross-entropy of the teacher's softmax at temperature 20 to the target.

Images are optimised in [0, 1] pixel space (the teacher normalises inside its `module`) and
stored as uint8; `logits` are the teacher's answers on the *stored* (quantised) pixels, asked
again through the ledger after rounding, so soft labels match what a student will see.

Every teacher pass is metered by the run's query ledger (`DIR/ledger.sqlite`): each forward +
backward of an optimisation step is `QueryLedger.charge`d (white-box, not cacheable) before it
runs, the final answers are `QueryLedger.ask`ed (cached). An image costs `steps` forward +
backward passes and one forward. `queries` is a hard budget, checked before anything is done.

Resumable shard by shard: the output is a dataset directory (fakecifar.manifest); every random
draw of a batch is a function of (seed, shard, batch) (`batch_rng`), so a rerun with the same
arguments after an interruption keeps the finished shards and writes the same images as an
uninterrupted run. A non-finite loss or image stops the run (ExtractionDiverged, exit 1): the
shards already written stay, listed in an incomplete manifest.

No numpy or torch at import: the CLI builds its --help from the settings here.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .distill_config import DISTILL_SETTINGS
from .errors import FakecifarError, UsageError
from .training.config import RUN_SETTINGS, RUNTIME, TRAIN_SETTINGS
from .training.settings import Setting, check_values, parse_numbers, setting, settings_of

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from .priors import BatchNormPrior

LEDGER = "ledger.sqlite"  # the run's query ledger, inside the output directory
EXTRACT = "Extraction"  # the --help sections of the settings below
DFM = "dfm (Benz et al.)"
OPTIMISED = "deepinversion, class- and data-impressions"
TARGET_ORDERS = ("balanced", "random", "teacher")
NOISE = "noise"
# Salts of the random draws: a batch's draws, the background order and random targets differ.
BATCH_SALT, BACKGROUND_SALT, TARGET_SALT = 0xE7, 0xB6, 0x7A


class ExtractionDiverged(FakecifarError):
    """The loss or the images became non-finite: the run stopped, the finished shards are kept
    (exit 1)."""


# ----------------------------------------------------------------------------- the methods


@dataclass(frozen=True)
class Method:
    """One way of making images from a model: what it needs of the teacher, its own options
    (with their defaults) and the function that optimises a batch."""

    name: str
    summary: str
    needs: str  # what the teacher must give, for the refusal of a black-box teacher
    defaults: dict[str, Any]  # its options (ExtractSettings fields) and their defaults
    start: str  # "background" (dfm: --background, or noise) or "noise"
    optimise: str  # the name of the batch function in this module (looked up when run)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "dfm",
            "L2 PGD from background images to random virtual logits (Benz et al. 2020)",
            "the teacher's gradients with respect to its input (L2 PGD)",
            {"steps": 20, "step_size": 0.1, "eps": None, "top_logit": 20.0, "top_std": 2.0, "spread": 3.0},
            "background",
            "pgd_to_logits",
        ),
        Method(
            "deepinversion",
            "noise optimised to the class, the BatchNorm statistics and image priors (Yin et al. 2020)",
            "the teacher's gradients and its BatchNorm statistics",
            {
                "steps": 200,
                "lr": 0.05,
                "bn_weight": 1.0,
                "tv_weight": 1e-3,
                "l2_weight": 0.0,
                "jitter": 2,
                "flip": True,
            },
            "noise",
            "optimise_deepinversion",
        ),
        Method(
            "data-impressions",
            "noise optimised to Dirichlet soft targets from the class similarity (Nayak et al. 2019)",
            "the teacher's gradients and its last linear layer's weights",
            {"steps": 100, "lr": 0.05, "betas": [1.0, 0.1], "temperature": 20.0},
            "noise",
            "optimise_impressions",
        ),
        Method(
            "class-impressions",
            "noise optimised to a one-hot of the class (Nayak et al. 2019, after Mopuri et al. 2018)",
            "the teacher's gradients with respect to its input",
            {"steps": 100, "lr": 0.05},
            "noise",
            "optimise_impressions",
        ),
    )
}
# Every option some method has, and the flag a message names it by.
METHOD_OPTIONS = sorted({k for m in METHODS.values() for k in m.defaults})


def _parse_betas(text: str) -> list[float]:
    return parse_numbers("--betas", "1.0,0.1")(text)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class ExtractSettings:
    """What decides an extraction. Fields with a setting are `fakecifar extract`'s own options;
    the teacher, budget, device and threads are distill's and train's (`SHARED_SETTINGS`). A
    method option left None takes the method's default (`Method.defaults`); one given to a
    method that does not take it is refused."""

    teacher: str = ""  # --teacher (distill's)
    teacher_arch: str | None = None  # --teacher-arch / --arch (distill's)
    queries: int | None = None  # --queries (distill's): hard budget of teacher passes
    device: str = "auto"  # --device (train's)
    method: str = setting(
        "dfm",
        "--method",
        help="dfm (L2 PGD from --background images to virtual logits), deepinversion (BatchNorm statistics + "
        "priors), data-impressions (Dirichlet soft targets), class-impressions (one-hot). Default: dfm.",
        check=(lambda v: v in METHODS, f"unknown --method {{v!r}} (use {', '.join(METHODS)})"),
        panel=EXTRACT,
    )
    images: int | None = setting(
        None,
        "-n",
        "--images",
        help="Images to extract (required).",
        check=(lambda v: v is None or v >= 1, "-n must be at least 1, got {v} (nothing to extract)"),
        panel=EXTRACT,
    )
    targets: str = setting(
        "balanced",
        "--targets",
        help="Intended classes: balanced (cycle through the classes), random (uniform), or teacher (dfm with "
        "--background shards: the teacher's top class on each background image, one more forward). "
        "Default: balanced.",
        check=(lambda v: v in TARGET_ORDERS, "unknown --targets {v!r} (use balanced, random or teacher)"),
        panel=EXTRACT,
    )
    steps: int | None = setting(
        None,
        "--steps",
        help="Optimisation steps per image, each a forward+backward pass of the teacher. "
        "Default: dfm 20, deepinversion 200, impressions 100.",
        check=(lambda v: v is None or v >= 1, "--steps must be at least 1, got {v}"),
        panel=EXTRACT,
    )
    batch_size: int = setting(
        128,
        "--batch-size",
        help="Images optimised together (deepinversion matches BatchNorm statistics per batch). Default: 128.",
        check=(lambda v: v >= 1, "--batch-size must be at least 1, got {v}"),
        panel=EXTRACT,
    )
    shard_size: int = setting(
        1000,
        "--shard-size",
        help="Images per output shard: the unit of resume. Default: 1000.",
        check=(lambda v: v >= 1, "--shard-size must be at least 1, got {v}"),
        panel=EXTRACT,
    )
    seed: int = setting(
        0,
        "--seed",
        help="Random seed (backgrounds, targets, noise, jitter): the same seed gives the same images. Default: 0.",
        check=(lambda v: v >= 0, "--seed must be >= 0, got {v}"),
        panel=RUNTIME,
    )
    background: list[str] | None = setting(
        None,
        "--background",
        help="dfm: shards, directories or globs of substitute images to start from (any: mined, generated, "
        "another dataset; repeatable; `-`: their paths on stdin), or `noise` (uniform). Default: noise.",
        type=list[str],
        panel=DFM,
    )
    step_size: float | None = setting(
        None,
        "--step-size",
        help="dfm: L2 length of each PGD step, in [0, 1] pixel units. Default: 0.1.",
        check=(lambda v: v is None or v > 0, "--step-size must be positive, got {v}"),
        panel=DFM,
    )
    eps: float | None = setting(
        None,
        "--eps",
        help="dfm: L2 radius around the background, in [0, 1] pixel units. Default: none (unconstrained, the "
        "paper's large radius; the steps bound the distance: at most steps x step size).",
        check=(lambda v: v is None or v > 0, "--eps must be positive, got {v}"),
        panel=DFM,
    )
    top_logit: float | None = setting(
        None,
        "--top-logit",
        help="dfm: mean of the intended class's virtual logit. Default: 20.",
        panel=DFM,
    )
    top_std: float | None = setting(
        None,
        "--top-std",
        help="dfm: its standard deviation. Default: 2.",
        check=(lambda v: v is None or v >= 0, "--top-std must be >= 0, got {v}"),
        panel=DFM,
    )
    spread: float | None = setting(
        None,
        "--spread",
        help="dfm: the other classes' virtual logits are N(mu, 1), the mu evenly over [-S, S] in random order. "
        "Default: 3.",
        check=(lambda v: v is None or v >= 0, "--spread must be >= 0, got {v}"),
        panel=DFM,
    )
    lr: float | None = setting(
        None,
        "--lr",
        help="Adam learning rate of the pixels (deepinversion, impressions), in [0, 1] pixel units. Default: 0.05.",
        check=(lambda v: v is None or v > 0, "--lr must be positive, got {v}"),
        panel=OPTIMISED,
    )
    bn_weight: float | None = setting(
        None,
        "--bn-weight",
        help="deepinversion: weight of BatchNorm-statistics matching. Default: 1 (the paper's 10 is for 2000 GPU "
        "steps: in 200 it keeps the class from being reached).",
        check=(lambda v: v is None or v >= 0, "--bn-weight must be >= 0, got {v}"),
        panel=OPTIMISED,
    )
    tv_weight: float | None = setting(
        None,
        "--tv-weight",
        help="deepinversion: weight of the total-variation (L2) prior on the normalised image. Default: 0.001.",
        check=(lambda v: v is None or v >= 0, "--tv-weight must be >= 0, got {v}"),
        panel=OPTIMISED,
    )
    l2_weight: float | None = setting(
        None,
        "--l2-weight",
        help="deepinversion: weight of the L2 prior on the normalised image. Default: 0.",
        check=(lambda v: v is None or v >= 0, "--l2-weight must be >= 0, got {v}"),
        panel=OPTIMISED,
    )
    jitter: int | None = setting(
        None,
        "--jitter",
        help="deepinversion: random shift of up to N pixels each step (0: off). Default: 2.",
        check=(lambda v: v is None or v >= 0, "--jitter must be >= 0, got {v}"),
        panel=OPTIMISED,
    )
    flip: bool | None = setting(
        None,
        "--flip/--no-flip",
        help="deepinversion: random horizontal flips each step. Default: on.",
        panel=OPTIMISED,
    )
    betas: list[float] | None = setting(
        None,
        "--betas",
        help="data-impressions: Dirichlet scales, the images split evenly among them. Default: 1.0,0.1.",
        parse=_parse_betas,
        type=str,
        check=(
            lambda v: v is None or (len(v) >= 1 and all(b > 0 for b in v)),
            "--betas must be positive numbers, got {v}",
        ),
        panel=OPTIMISED,
    )
    temperature: float | None = setting(
        None,
        "--temperature",
        help="data-impressions: softmax temperature of the teacher's answers matched to the targets. Default: 20.",
        check=(lambda v: v is None or v > 0, "--temperature must be positive, got {v}"),
        panel=OPTIMISED,
    )

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def option(self, name: str) -> Any:
        """A method option: the value given, else the method's default."""
        value = getattr(self, name)
        return self.spec.defaults.get(name) if value is None else value

    def resolved(self) -> dict[str, Any]:
        """The method's options with their defaults filled in (for the manifest and provenance)."""
        return {name: self.option(name) for name in self.spec.defaults}

    def check(self) -> None:
        """What no single setting's check can see."""
        if not self.teacher:
            raise UsageError("Missing option '--teacher'", "give a .pt/.th model (a white-box torch teacher)")
        if self.images is None:
            raise UsageError("Missing option '-n' / '--images'", "say how many images to extract, e.g. -n 10000")
        if self.background and self.spec.start != "background":
            raise UsageError(f"--method {self.method} starts from noise: --background is for dfm", "drop --background")
        if self.targets == "teacher" and self.method != "dfm":
            raise UsageError(
                f"--targets teacher takes the teacher's class of each background image: it is for dfm, not "
                f"--method {self.method}",
                "use --targets balanced or random",
            )
        given = [name for name in METHOD_OPTIONS if getattr(self, name) is not None]
        foreign = [name for name in given if name not in self.spec.defaults]
        if foreign:
            takers = [m.name for m in METHODS.values() if foreign[0] in m.defaults]
            raise UsageError(
                f"{_flag(foreign[0])} is an option of {' and '.join(takers)}, not of --method {self.method}",
                f"drop {_flag(foreign[0])}",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pick(table: Sequence[Setting], name: str, **changes: Any) -> Setting:
    found = next(s for s in table if s.name == name)
    return replace(found, **changes) if changes else found


# The teacher, budget and runtime options are those of distill and train (one definition each).
SHARED_SETTINGS: tuple[Setting, ...] = (
    _pick(
        DISTILL_SETTINGS,
        "teacher",
        help="The teacher: a .pt/.th (torch, white-box; every method needs its gradients). Required.",
    ),
    _pick(DISTILL_SETTINGS, "teacher_arch", flags=("--teacher-arch", "--arch")),
    _pick(
        DISTILL_SETTINGS,
        "queries",
        help="Hard budget of teacher passes (e.g. 500k): each image costs --steps forward+backward passes and "
        "one forward; refused before anything is done if the remaining shards need more.",
    ),
    _pick(TRAIN_SETTINGS, "device"),
)
RUNTIME_SETTINGS: tuple[Setting, ...] = (
    _pick(RUN_SETTINGS, "threads"),
    _pick(RUN_SETTINGS, "overwrite", help="Replace an existing output directory's shards (the ledger is kept)."),
)
EXTRACT_SETTINGS: tuple[Setting, ...] = (*SHARED_SETTINGS, *settings_of(ExtractSettings))
PANELS = (EXTRACT, DFM, OPTIMISED)


def make_settings(**values: Any) -> ExtractSettings:
    """ExtractSettings from keyword values (None: not given), checked."""
    names = {s.name for s in EXTRACT_SETTINGS}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise UsageError(f"unknown extract option(s) {', '.join(unknown)}")
    settings = ExtractSettings(**{k: v for k, v in values.items() if v is not None})
    check_values(EXTRACT_SETTINGS, vars(settings))
    settings.check()
    return settings


# ----------------------------------------------------------------------------- random draws


def batch_rng(seed: int, shard: int, batch: int) -> np.random.Generator:
    """The generator of every random draw of one batch (its background or noise, virtual logits,
    soft targets, jitter): a function of (seed, shard, batch) alone, so a resumed run draws the
    same."""
    import numpy as np

    return np.random.default_rng([BATCH_SALT, int(seed), int(shard), int(batch)])


def intended_classes(start: int, stop: int, num_classes: int, order: str, rng: np.random.Generator) -> np.ndarray:
    """The intended class of images [start, stop): balanced cycles through the classes by image
    index (equal counts, to one); random draws them uniformly from `rng`."""
    import numpy as np

    if order == "balanced":
        return (np.arange(start, stop) % num_classes).astype(np.int64)
    return rng.integers(0, num_classes, stop - start).astype(np.int64)


def virtual_logits(
    targets: np.ndarray,
    num_classes: int,
    rng: np.random.Generator,
    *,
    top_logit: float = 20.0,
    top_std: float = 2.0,
    spread: float = 3.0,
) -> np.ndarray:
    """DfM's virtual logit vectors, float32 [N, K]: the target class ~ N(top_logit, top_std), each
    other class ~ N(mu, 1) where the K-1 mu are evenly spaced over [-spread, spread] and dealt to
    the other classes in a random order per image."""
    import numpy as np

    targets = np.asarray(targets, dtype=np.int64)
    n = len(targets)
    mus = np.linspace(-spread, spread, max(num_classes - 1, 1))[: num_classes - 1]
    others = rng.permuted(np.tile(mus, (n, 1)), axis=1) + rng.standard_normal((n, num_classes - 1))
    out = np.empty((n, num_classes), dtype=np.float64)
    mask = np.ones((n, num_classes), dtype=bool)
    mask[np.arange(n), targets] = False
    out[mask] = others.ravel()  # row-major: each row's other classes, in class order
    out[np.arange(n), targets] = rng.normal(top_logit, top_std, n)
    return out.astype(np.float32)


def class_similarity(weight: Any) -> np.ndarray:
    """Zero-Shot KD's class similarity matrix [K, K] from the last linear layer's weights [K, D]:
    the cosine similarity of the class vectors, min-max normalised per row (each class is 1 to
    itself, 0 to its least similar class)."""
    import numpy as np

    w = weight.detach().cpu().double().numpy() if hasattr(weight, "detach") else np.asarray(weight, np.float64)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    sim = w @ w.T
    lo, hi = sim.min(axis=1, keepdims=True), sim.max(axis=1, keepdims=True)
    return (sim - lo) / np.maximum(hi - lo, 1e-12)


def dirichlet_targets(
    classes: np.ndarray, similarity: np.ndarray, betas: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Soft targets float32 [N, K]: image i's ~ Dirichlet(betas[i] x similarity[classes[i]])
    (concentrations floored at 1e-3: the least similar class has similarity 0)."""
    import numpy as np

    out = np.empty((len(classes), similarity.shape[1]), dtype=np.float64)
    for i, (k, beta) in enumerate(zip(classes, betas)):
        alpha = np.maximum(float(beta) * similarity[int(k)], 1e-3)
        sample = rng.dirichlet(alpha)
        if not np.all(np.isfinite(sample)) or sample.sum() <= 0:  # all gammas underflowed
            sample = alpha / alpha.sum()
        out[i] = sample
    return out.astype(np.float32)


# ----------------------------------------------------------------------------- losses


def deepinversion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    bn_loss: torch.Tensor,
    x_normalised: torch.Tensor,
    *,
    bn_weight: float,
    tv_weight: float,
    l2_weight: float,
) -> torch.Tensor:
    """Yin et al.'s objective: CE to the targets + bn_weight x BN-statistics loss + tv_weight x
    TV(x) + l2_weight x ||x||_2, the priors on the image the network sees (normalised), so the
    paper's coefficients carry over."""
    import torch.nn.functional as F

    from .priors import total_variation

    loss = F.cross_entropy(logits, targets) + bn_weight * bn_loss
    if tv_weight:
        loss = loss + tv_weight * total_variation(x_normalised)
    if l2_weight:
        loss = loss + l2_weight * x_normalised.norm()
    return loss


# ----------------------------------------------------------------------------- one batch


@dataclass
class _Batch:
    """One batch to make: its images' global index range, intended classes and random draws."""

    shard: int
    index: int
    start: int
    stop: int
    targets: np.ndarray
    rng: np.random.Generator
    background: np.ndarray | None  # uint8 NHWC (dfm with --background)


class _Runner:
    """The teacher as the methods see it: every pass charged to the ledger before it runs, every
    step checked for non-finite values."""

    def __init__(self, teacher: Any, ledger: Any, settings: ExtractSettings, net: nn.Module):
        import torch

        self.teacher, self.ledger, self.settings = teacher, ledger, settings
        self.device = torch.device(teacher.device)
        self.net = net  # for gradients: the teacher's module (or its BatchNorm-folded copy)
        self.num_classes = teacher.num_classes
        self.input_size = tuple(teacher.input_size)
        self.similarity: np.ndarray | None = None
        self.bn: BatchNormPrior | None = None
        module = teacher.module
        self.mean, self.std = module.mean, module.std  # fakecifar.attacks.Normalized's buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A forward pass whose backward will follow: one white-box charge of len(x) images."""
        self.ledger.charge(self.teacher, len(x))
        return self.net(x).float()

    def check(self, batch: _Batch, step: int, loss: torch.Tensor, x: torch.Tensor) -> None:
        import torch

        if not (bool(torch.isfinite(loss).all()) and bool(torch.isfinite(x).all())):
            what = "loss" if not bool(torch.isfinite(loss).all()) else "images"
            raise ExtractionDiverged(
                f"non-finite {what} at step {step + 1} of the batch of images {batch.start}-{batch.stop - 1} "
                f"(shard {batch.shard}): stopped",
                f"lower {'--step-size' if self.settings.method == 'dfm' else '--lr'} or check the teacher; the "
                "finished shards are kept (the same arguments would diverge again: use another -o)",
            )

    def noise(self, batch: _Batch) -> torch.Tensor:
        """Uniform noise in [0, 1], [N, 3, H, W], from the batch's draws."""
        import torch

        n, (h, w) = batch.stop - batch.start, self.input_size
        return torch.from_numpy(batch.rng.random((n, 3, h, w), dtype="float32")).to(self.device)


def pgd_to_logits(run: _Runner, batch: _Batch) -> torch.Tensor:
    """dfm: L2 PGD from the background (or noise) to the batch's virtual logits."""
    import torch

    s = run.settings
    if batch.background is not None:
        x0 = torch.from_numpy(batch.background).to(run.device).permute(0, 3, 1, 2).float().div(255)
    else:
        x0 = run.noise(batch)
    v = virtual_logits(
        batch.targets,
        run.num_classes,
        batch.rng,
        top_logit=s.option("top_logit"),
        top_std=s.option("top_std"),
        spread=s.option("spread"),
    )
    target = torch.from_numpy(v).to(run.device)
    step_size, eps = float(s.option("step_size")), s.option("eps")
    x0 = x0.contiguous(memory_format=torch.channels_last)
    x = x0.clone()
    for step in range(int(s.option("steps"))):
        x.requires_grad_(True)
        loss = (run.forward(x) - target).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x.detach() - step_size * grad / _l2(grad)
            if eps is not None:
                delta = x - x0
                x = x0 + delta * torch.clamp(float(eps) / _l2(delta), max=1.0)
            x = x.clamp_(0.0, 1.0)
        run.check(batch, step, loss.detach(), x)
    return x.detach()


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def _optimise(run: _Runner, batch: _Batch, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]):
    """Adam (Kingma & Ba: betas 0.9, 0.999, eps 1e-8) on the pixels for --steps steps, each
    projected back on [0, 1]; `objective(x)` does the forward pass (through `run.forward`) and
    gives the loss. Written out here: `torch.optim.Adam` imports torch._dynamo, seconds of start-up."""
    import torch

    lr, (b1, b2), eps = float(run.settings.option("lr")), (0.9, 0.999), 1e-8
    x = x.clone()
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    for step in range(int(run.settings.option("steps"))):
        x.requires_grad_(True)
        loss = objective(x)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            t = step + 1
            denom = (v / (1 - b2**t)).sqrt_().add_(eps)
            x = (x.detach() - lr / (1 - b1**t) * m / denom).clamp_(0.0, 1.0)
        run.check(batch, step, loss.detach(), x)
    return x.detach()


def optimise_deepinversion(run: _Runner, batch: _Batch) -> torch.Tensor:
    """deepinversion: from N(mean, std) noise (the normalised image ~ N(0, 1), clipped to the
    pixel box), CE + BN statistics + priors, a random jitter and flip each step."""
    import torch

    s = run.settings
    n, (h, w) = batch.stop - batch.start, run.input_size
    z = torch.from_numpy(batch.rng.standard_normal((n, 3, h, w), dtype="float32")).to(run.device)
    x0 = (z * run.std + run.mean).clamp(0.0, 1.0)
    targets = torch.from_numpy(batch.targets).to(run.device)
    jitter, flip = int(s.option("jitter")), bool(s.option("flip"))
    weights = {k: float(s.option(k)) for k in ("bn_weight", "tv_weight", "l2_weight")}
    assert run.bn is not None

    def objective(x: torch.Tensor) -> torch.Tensor:
        view = x
        if jitter:
            dy, dx = (int(v) for v in batch.rng.integers(-jitter, jitter + 1, 2))
            view = torch.roll(view, shifts=(dy, dx), dims=(2, 3))
        if flip and batch.rng.random() < 0.5:
            view = torch.flip(view, dims=(3,))
        assert run.bn is not None
        run.bn.reset()
        logits = run.forward(view)
        return deepinversion_loss(logits, targets, run.bn.loss(), (view - run.mean) / run.std, **weights)

    return _optimise(run, batch, x0, objective)


def optimise_impressions(run: _Runner, batch: _Batch) -> torch.Tensor:
    """class-impressions: CE to a one-hot; data-impressions: CE of the softmax at --temperature
    to Dirichlet soft targets. Both from uniform noise."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    s = run.settings
    x0 = run.noise(batch)
    if s.method == "data-impressions":
        assert run.similarity is not None
        betas = list(s.option("betas"))
        k = run.num_classes
        per_image = np.array([betas[(i // k) % len(betas)] for i in range(batch.start, batch.stop)])
        soft = torch.from_numpy(dirichlet_targets(batch.targets, run.similarity, per_image, batch.rng))
        soft = soft.to(run.device)
        temperature = float(s.option("temperature"))

        def objective(x: torch.Tensor) -> torch.Tensor:
            log_p = F.log_softmax(run.forward(x) / temperature, dim=1)
            return -(soft * log_p).sum(1).mean()

    else:
        targets = torch.from_numpy(batch.targets).to(run.device)

        def objective(x: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(run.forward(x), targets)

    return _optimise(run, batch, x0, objective)


# ----------------------------------------------------------------------------- the run


@dataclass
class ExtractReport:
    directory: Path
    method: str
    shards: list[Path] = field(default_factory=list)
    images: int = 0  # images in the output
    made: int = 0  # images this run made (not resumed)
    resumed_images: int = 0  # finished by an earlier, interrupted run
    already_complete: bool = False
    seconds: float = 0.0  # time spent making images in this run
    steps: int = 0  # forward+backward passes per image
    extra_forward: int = 0  # --targets teacher: the teacher's answer on the background
    agreement: float | None = None  # made images whose teacher top-1 is the intended class
    ledger: dict[str, Any] = field(default_factory=dict)
    ledger_lines: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float | None:
        return self.made / self.seconds if self.made and self.seconds > 0 else None

    @property
    def passes_per_image(self) -> dict[str, int]:
        """Teacher passes one image costs: --steps forward+backward, the final forward (and with
        --targets teacher, one on the background)."""
        return {"forward": self.steps + 1 + self.extra_forward, "backward": self.steps}


def check_teacher(method: str, spec: str | os.PathLike) -> None:
    """Refuse a remote teacher before anything is sent to it (every method needs gradients)."""
    text = os.fspath(spec)
    if "://" in text:
        raise UsageError(
            f"--method {method} needs {METHODS[method].needs}, and {text} is a remote (black-box) teacher",
            "give the model file: a .pt/.th (torch) teacher, with --arch for a foreign .th",
        )


def check_white_box(method: str, teacher: Any) -> None:
    if not teacher.white_box or teacher.module is None:
        raise UsageError(
            f"--method {method} needs {METHODS[method].needs}, and {teacher.name} is a black-box {teacher.kind} "
            "teacher",
            "give a .pt/.th (torch) teacher, with --arch for a foreign .th",
        )


def open_background(spec: Sequence[str] | None, input_size: Sequence[int], *, allow_incomplete: bool = False):
    """dfm's background: None for noise (no --background, or `noise`), else the shards, which
    must hold images of the teacher's input size."""
    from .shards import open_shards
    from .text import format_size

    paths = list(spec or [])
    if not paths or paths == [NOISE]:
        return None
    if NOISE in paths:
        raise UsageError("--background noise cannot be mixed with shards", "give shards, or `noise` alone")
    data = open_shards(paths, allow_incomplete=allow_incomplete)
    if tuple(data.image_size) != tuple(input_size):
        size = format_size(tuple(input_size))
        raise UsageError(
            f"{data.paths[0]}: --background images are {format_size(data.image_size)}, the teacher takes {size}",
            f"resize them first: fakecifar resize --size {size} -o DIR {' '.join(paths)}",
        )
    if len(data) == 0:
        raise UsageError(f"{data.paths[0]}: --background holds no images", "give shards with images, or `noise`")
    return data


def extract(
    settings: ExtractSettings,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    threads: int | None = None,
    allow_incomplete: bool = False,
    on_shard: Callable[[Path], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> ExtractReport:
    """Make `settings.images` images from `settings.teacher` by `settings.method` into the dataset
    directory `out_dir`; see the module docstring. `on_shard(path)` is called for each shard of
    the output as it is finished (the finished shards of an earlier run first)."""
    from .ledger import QueryLedger
    from .shards import open_dataset_output
    from .teachers import open_teacher

    settings.check()
    say = on_message or (lambda _: None)
    method = settings.spec
    check_teacher(settings.method, settings.teacher)
    teacher = open_teacher(
        settings.teacher, mode="logits", arch=settings.teacher_arch, device=settings.device, threads=threads
    )
    with teacher:
        check_white_box(settings.method, teacher)
        background = (
            open_background(settings.background, teacher.input_size, allow_incomplete=allow_incomplete)
            if method.start == "background"
            else None
        )
        if settings.targets == "teacher" and background is None:
            raise UsageError(
                "--targets teacher takes the teacher's class of each background image, and the background is noise",
                "give --background shards, or use --targets balanced or random",
            )
        net, bn, similarity = _prepare(settings, teacher)
        params = {
            "method": settings.method,
            "images": settings.images,
            "seed": settings.seed,
            "targets": settings.targets,
            "batch_size": settings.batch_size,
            "shard_size": settings.shard_size,
            **settings.resolved(),
            "background": [str(p.resolve()) for p in background.paths] if background is not None else NOISE,
            "teacher": teacher.identity(),
        }
        output = open_dataset_output(out_dir, command="extract", params=params, overwrite=overwrite)
        report = ExtractReport(
            Path(out_dir),
            settings.method,
            steps=int(settings.option("steps")),
            extra_forward=int(settings.targets == "teacher"),
        )
        ledger_file = Path(out_dir) / LEDGER
        fresh_ledger = not ledger_file.exists()
        try:
            with QueryLedger(ledger_file, budget=settings.queries, teacher=teacher) as ledger:
                try:
                    _extract_into(
                        output,
                        teacher,
                        ledger,
                        settings,
                        params,
                        background,
                        net,
                        bn,
                        similarity,
                        report,
                        on_shard,
                        on_progress,
                        say,
                    )
                finally:
                    if bn is not None:
                        bn.remove()
                    report.ledger, report.ledger_lines = ledger.summary(), ledger.report_lines()
        except BaseException:
            nothing = not output.finished and not report.ledger.get("queries")
            if fresh_ledger and nothing:  # refused before any pass: leave no trace of the run
                for name in (LEDGER, LEDGER + "-wal", LEDGER + "-journal"):
                    (Path(out_dir) / name).unlink(missing_ok=True)
            output.close(failed=True)
            raise
        output.close()
    return report


def _prepare(settings: ExtractSettings, teacher: Any):
    """The network the gradients flow through (the teacher's module; its BatchNorm-folded copy
    where no method needs the BatchNorm layers), the BN hooks of deepinversion, the class
    similarity of data-impressions."""
    from torch import nn

    from .priors import BatchNormPrior
    from .teachers import fold_batchnorm

    module = teacher.module
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    inner = getattr(module, "model", module)
    bn = similarity = None
    if settings.method == "deepinversion":
        bn = BatchNormPrior(inner)
        if not bn.layers:
            raise UsageError(
                f"--method deepinversion needs the teacher's BatchNorm statistics, and {teacher.name} "
                f"({teacher.arch}) has no BatchNorm layers",
                "use --method class-impressions or data-impressions",
            )
        return module, bn, similarity
    if settings.method == "data-impressions":
        linear = [m for m in inner.modules() if isinstance(m, nn.Linear)]
        if not linear or linear[-1].out_features != teacher.num_classes:
            raise UsageError(
                f"--method data-impressions needs the teacher's last linear layer (its class vectors), and "
                f"{teacher.name} ({teacher.arch}) ends in none with {teacher.num_classes} outputs",
                "use --method class-impressions or deepinversion",
            )
        similarity = class_similarity(linear[-1].weight)
    # Eval-mode BatchNorm is an affine map: folded into the convolutions (checked against the
    # module on a probe batch, else the module itself), the same gradients ~1.3x faster on a CPU.
    net = fold_batchnorm(module, teacher.input_size, teacher.device)  # channels-last (a copy), or `module`
    for p in net.parameters():
        p.requires_grad_(False)
    return net, bn, similarity


def _extract_into(
    output, teacher, ledger, settings, params, background, net, bn, similarity, report, on_shard, on_progress, say
) -> None:
    import numpy as np
    import torch

    from .shards import ShardSeriesWriter, pixel_sha256, producer, provenance_of

    n, size, batch_size = int(settings.images), settings.shard_size, settings.batch_size
    shards = math.ceil(n / size)
    done = len(output.finished)
    report.resumed_images = output.finished_images
    for path in output.finished_paths:
        if on_shard:
            on_shard(path)
    if output.already_complete:
        report.shards, report.images, report.already_complete = output.finished_paths, output.finished_images, True
        return
    if on_progress and output.finished_images:
        on_progress(output.finished_images)
    per_image = report.passes_per_image["forward"]  # what the ledger counts: each forward, its backward free
    need = (n - output.finished_images) * per_image
    if ledger.remaining is not None and ledger.remaining < need:
        left = n - output.finished_images
        raise UsageError(
            f"--queries: the budget has {ledger.remaining:,} teacher passes left, and the {left:,} images to make "
            f"need {need:,} ({per_image} each: --steps {report.steps} forward+backward, "
            f"{report.passes_per_image['forward'] - report.steps} forward)",
            f"raise --queries to {ledger.spent + need:,} (the budget covers {LEDGER}'s whole life), or lower -n "
            "or --steps",
        )
    run = _Runner(teacher, ledger, settings, net)
    run.bn, run.similarity = bn, similarity
    chain = (provenance_of(background.shards) if background is not None else []) + [
        {
            "step": "extract",
            "method": settings.method,
            "parameters": {k: v for k, v in params.items() if k != "teacher"},
            "teacher": teacher.describe(),
        }
    ]
    writer = ShardSeriesWriter(
        output.directory,
        shard_size=size,
        classes=teacher.classes,
        image_size=teacher.input_size,
        producer=producer("extract"),
        provenance=chain,
        overwrite=output.overwrite,
        dataset=output,
        on_shard=on_shard,
    )
    optimise = globals()[settings.spec.optimise]
    order = None
    if background is not None:
        order = np.random.default_rng([BACKGROUND_SALT, settings.seed]).permutation(len(background))
    agree = 0
    started = time.perf_counter()
    try:
        for k in range(done, shards):
            lo, hi = k * size, min(n, (k + 1) * size)
            t0, agree_shard = time.perf_counter(), 0
            targets = (
                np.zeros(hi - lo, np.int64)  # --targets teacher: asked per batch, below
                if settings.targets == "teacher"
                else intended_classes(
                    lo,
                    hi,
                    teacher.num_classes,
                    settings.targets,
                    np.random.default_rng([TARGET_SALT, settings.seed, k]),
                )
            )
            pixels = None
            if order is not None:
                rows = order[np.arange(lo, hi) % len(order)]
                pixels = background.take("images", rows)  # one read per shard
            for j, b0 in enumerate(range(lo, hi, batch_size)):
                b1 = min(hi, b0 + batch_size)
                batch = _Batch(
                    k,
                    j,
                    b0,
                    b1,
                    targets[b0 - lo : b1 - lo],
                    batch_rng(settings.seed, k, j),
                    None if pixels is None else pixels[b0 - lo : b1 - lo],
                )
                if settings.targets == "teacher":
                    assert batch.background is not None
                    start = batch.background.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
                    batch.targets = ledger.ask(teacher, np.ascontiguousarray(start)).labels.astype(np.int64)
                x = optimise(run, batch)
                images = (x.float().mul(255).round_().clamp_(0, 255)).to(torch.uint8)
                stored = np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())
                quantised = images.cpu().numpy().astype(np.float32) / np.float32(255)
                answers = ledger.ask(teacher, np.ascontiguousarray(quantised))
                assert answers.logits is not None  # the teacher answers in logits mode
                top = answers.logits.argmax(1)
                agree_shard += int((top == batch.targets).sum())
                writer.add_batch(
                    stored,
                    batch.targets,
                    logits=answers.logits.astype(np.float32),
                    teacher_labels=top.astype(np.int16),
                    origin=np.ones(len(stored), np.uint8),
                    sha256=pixel_sha256(stored),
                )
                report.made += len(stored)
                if on_progress:
                    on_progress(len(stored))
            agree += agree_shard
            dt = time.perf_counter() - t0
            say(
                f"shard {k + 1}/{shards}: {hi - lo:,} images in {dt:.1f}s ({(hi - lo) / max(dt, 1e-9):.1f} img/s); "
                f"the teacher's top class is the intended one for {100 * agree_shard / (hi - lo):.1f}%"
            )
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        report.seconds = time.perf_counter() - started
        report.agreement = agree / report.made if report.made else None
    output.finish(classes=teacher.classes, image_size=teacher.input_size)
    report.shards, report.images = output.finished_paths, output.finished_images
