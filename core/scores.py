"""Scores of training images for `fakecifar dropout`: one registry, method name -> scorer.

    from fakecifar.scores import SCORERS, ScoreRequest, score
    scores = score("influence", ScoreRequest(data, val=val, model="model.pt"))
    scores.values        # float64 [N], one per row of `data`: larger = more harmful

Every scorer returns the same `Scores` (values, the scoring model's predicted class where it
has one, details, cost) with one sign convention: **larger = more harmful**, so `dropout`
drops the top of the ranking whatever the method. A method is one `register`-ed function.

Methods (docs/dropout.md has the formulas and costs):

- `influence`: influence of each training image on the total validation loss through the last
  linear layer of a trained model (`--model`, or a proxy trained here on the engine), with the
  exact Hessian of the cross-entropy in the last layer's weights (the Gauss-Newton form is the
  exact Hessian there, since the logits are linear in them), formed as a C(D+1) x C(D+1)
  float64 matrix and solved by Cholesky: no LiSSA, no recursion depth, no NaN.
- `confident`: confident learning (Northcutt et al. 2021) on out-of-sample probabilities from
  k-fold proxies (or a `--model` trained on other images).
- `aum`, `forgetting`, `el2n`: training dynamics of a proxy trained here, recorded from its own
  training steps (`train --dynamics`, fakecifar.training.dynamics): no extra pass.
- `tracin`: TracIn through the last layer over the proxy's per-epoch weights (`train --snapshots`).
- `random`: the seeded control every experiment carries.

Module level imports nothing heavy (the CLI builds its --help from the registry): numpy,
torch and the training engine are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadCheckpointError, FakecifarError, UsageError
from .text import format_classes, format_size

if TYPE_CHECKING:
    import numpy as np

    from .shards import ShardSet
    from .training.config import TrainConfig

DIRECTION = "larger = more harmful"
DEFAULT_DAMPING = 1e-3
DEFAULT_FOLDS = 3

# ----------------------------------------------------------------------------- the proxy model

PROXY = "Proxy model (trained when --model is not given)"


@dataclass
class ProxySpec:
    """How a proxy is trained when no `--model` is given: train's settings (None: the default
    here: resnet20, train's standard recipe, 4 epochs; fast needs more steps than a few epochs give)."""

    model: str | None = None
    epochs: int | None = None
    recipe: str | None = None
    batch_size: int | None = None
    lr: float | None = None

    DEFAULTS = {"model": "resnet20", "epochs": 4, "recipe": "standard"}

    def given(self) -> list[str]:
        """The --proxy-* options given (for the refusal of proxy options with --model)."""
        return [f"--proxy-{k.replace('_', '-')}" for k, v in self.as_dict().items() if v is not None]

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "epochs": self.epochs, "recipe": self.recipe, "batch_size": self.batch_size,
                "lr": self.lr}  # fmt: skip

    def resolved(self) -> dict[str, Any]:
        values = {k: v for k, v in self.as_dict().items() if v is not None}
        return {**self.DEFAULTS, **values}

    def config(self, *, seed: int, device: str) -> TrainConfig:
        """The proxy's TrainConfig (train's defaults, recipe and checks: one definition)."""
        from .training.config import make_config

        values = self.resolved()
        recipe = values.pop("recipe")
        try:
            return make_config(recipe, seed=seed, device=device, **values)
        except UsageError as exc:
            message = exc.message
            for name in ("model", "epochs", "recipe", "batch-size", "lr"):
                message = message.replace(f"--{name}", f"--proxy-{name}")
            raise UsageError(message, exc.hint) from None


def proxy_settings() -> tuple:
    """The --proxy-* options: train's settings (fakecifar.training.config) under other flags,
    so their help and checks are defined once."""
    from .training.config import TRAIN_SETTINGS

    by_name = {s.name: s for s in TRAIN_SETTINGS}
    out = []
    for name, flag, text in (
        ("model", "--proxy-model", "Architecture of the proxy (see train --list-models). Default: resnet20."),
        ("epochs", "--proxy-epochs", "Epochs of each proxy. Default: 4."),
        ("recipe", "--proxy-recipe", "train's recipe for the proxy: standard or fast. Default: standard."),
        ("batch_size", "--proxy-batch-size", "Batch size of the proxy. Default: the recipe's."),
        ("lr", "--proxy-lr", "Peak learning rate of the proxy. Default: the recipe's."),
    ):
        s = by_name[name]
        check = None
        if s.check is not None:
            check = (s.check[0], s.check[1].replace(s.flags[0], flag))
        out.append(
            replace(s, name=f"proxy_{name}", flags=(flag,), help=text, panel=PROXY, check=check, cli_default=None)
        )
    return tuple(out)


# ----------------------------------------------------------------------------- request and result


@dataclass
class ScoreRequest:
    """What a scorer gets: the training data (every row must be labelled), its labels, the
    validation data, an existing model or how to train a proxy, and where to keep its work."""

    data: ShardSet
    labels: np.ndarray | None = None  # int64 [N]; read from `data` when None
    val: ShardSet | None = None
    model: Path | None = None
    proxy: ProxySpec = field(default_factory=ProxySpec)
    folds: int = DEFAULT_FOLDS
    damping: float = DEFAULT_DAMPING
    seed: int = 0
    device: str = "auto"
    work_dir: Path | None = None  # proxies and fold data; resumable; None: a temporary directory
    # What an earlier `train --dynamics FILE` / `--snapshots DIR` recorded on these rows, read
    # instead of training a proxy (aum, forgetting, el2n / tracin).
    dynamics: Path | None = None
    snapshots: Path | None = None
    on_message: Callable[[str], None] | None = None
    on_epoch: Callable[[dict], None] | None = None
    on_step: Callable[[int], None] | None = None

    def say(self, text: str) -> None:
        if self.on_message:
            self.on_message(text)


@dataclass
class Scores:
    """One score per row of the data (float64, `DIRECTION`: larger = more harmful)."""

    method: str
    values: np.ndarray
    predicted: np.ndarray | None = None  # int64 [N] the scoring model's class; -1 where none
    details: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Scorer:
    name: str
    run: Callable[[ScoreRequest], Scores]
    summary: str
    cost: str
    needs_val: bool = False
    uses_model: bool = False  # takes --model, or trains proxies with --proxy-*
    folds: bool = False  # takes --folds
    trains_proxy: bool = False  # always trains its proxy (--proxy-*), recording its training


SCORERS: dict[str, Scorer] = {}


def register(
    name: str, *, summary: str, cost: str, needs_val=False, uses_model=False, folds=False, trains_proxy=False
) -> Callable:
    """Add a method to the registry (a decorator on `fn(request) -> Scores`)."""

    def decorate(fn: Callable[[ScoreRequest], Scores]) -> Callable[[ScoreRequest], Scores]:
        SCORERS[name] = Scorer(name, fn, summary, cost, needs_val, uses_model, folds, trains_proxy)
        return fn

    return decorate


def get_scorer(name: str) -> Scorer:
    scorer = SCORERS.get(str(name).strip().lower())
    if scorer is None:
        raise UsageError(f"unknown --score {name!r}", "available: " + ", ".join(SCORERS))
    return scorer


RECORDS = {"dynamics": ("aum", "forgetting", "el2n"), "snapshots": ("tracin",)}


def _record_given(req: ScoreRequest) -> tuple[str, Path] | None:
    given = [(kind, path) for kind, path in (("dynamics", req.dynamics), ("snapshots", req.snapshots)) if path]
    return given[0] if given else None


def check_request(scorer: Scorer, req: ScoreRequest) -> None:
    """Everything a scorer would refuse, checked before any work (and before any output exists)."""
    if scorer.needs_val and req.val is None:
        raise UsageError(f"--score {scorer.name} needs --val", "give validation shards (never the test set)")
    if req.dynamics is not None and req.snapshots is not None:
        raise UsageError("--dynamics and --snapshots feed different methods: give one")
    record = _record_given(req)
    if record is not None:
        kind, path = record
        if scorer.name not in RECORDS[kind]:
            raise UsageError(
                f"--{kind} is read by --score {'/'.join(RECORDS[kind])}, not {scorer.name}", f"drop --{kind}"
            )
        if req.model is not None or req.proxy.given():
            raise UsageError(
                f"--{kind} {path} replaces the proxy: --model and --proxy-* would train or read another",
                "drop them",
            )
        check_record(kind, path, req)
    if scorer.trains_proxy and req.model is not None:
        flag = "--snapshots" if scorer.name == "tracin" else "--dynamics"
        raise UsageError(
            f"--score {scorer.name} reads how a model trained, not a checkpoint: it trains its own proxy",
            f"drop --model (--proxy-* set the proxy), or give {flag} of a `train {flag}` run on these shards",
        )
    if not scorer.uses_model and not scorer.trains_proxy:
        if req.model is not None:
            raise UsageError(f"--score {scorer.name} uses no model: drop --model")
        if req.proxy.given():
            raise UsageError(f"--score {scorer.name} trains no proxy: drop {', '.join(req.proxy.given())}")
    elif record is None and req.model is not None and req.proxy.given():
        raise UsageError(
            f"{', '.join(req.proxy.given())} describe a proxy to train, but --model {req.model} is given",
            "drop --model to train a proxy, or drop the --proxy-* options",
        )
    if not (req.damping >= 0 and req.damping < float("inf")):
        raise UsageError(f"--damping must be a non-negative number, got {req.damping}")
    if scorer.folds and req.model is None and req.folds < 2:
        raise UsageError(f"--folds must be at least 2, got {req.folds}")
    if (scorer.uses_model or scorer.trains_proxy) and req.model is None and record is None:
        req.proxy.config(seed=req.seed, device=req.device)  # refuses bad --proxy-* values now
    if scorer.uses_model and req.model is not None:
        meta = check_model_file(req.model, req.data)
        if scorer.name == "confident":
            trained_on = {_resolved(p) for p in (meta.get("train") or {}).get("data") or [] if isinstance(p, str)}
            overlap = trained_on & {_resolved(p) for p in req.data.paths}
            if overlap:
                raise UsageError(
                    f"{req.model} was trained on {sorted(overlap)[0]}: its probabilities on these images are "
                    "in-sample, and confident learning needs out-of-sample ones",
                    "drop --model (k-fold proxies are trained), or give a model trained on other images",
                )


def check_record(kind: str, path: Path, req: ScoreRequest) -> None:
    """An earlier training's record must be readable and about these rows: a dynamics file's
    row hashes are the data's (same images, same order); snapshots are checkpoints of the data's
    classes."""
    if kind == "dynamics":
        from .shards import row_sha256
        from .training.dynamics import read_dynamics

        try:
            d = read_dynamics(path)
        except (OSError, KeyError) as exc:
            raise UsageError(
                f"--dynamics {path}: not a record written by train --dynamics ({exc})", "give that file"
            ) from None
        if d.sha256.shape != (len(req.data),) or not bool((d.sha256 == row_sha256(req.data)).all()):
            raise UsageError(
                f"--dynamics {path} was recorded on other images ({len(d.sha256):,} rows; these shards have "
                f"{len(req.data):,}, or they differ by pixel hash or order)",
                "give the record of a `train --dynamics` run on exactly these shards",
            )
        if int(d.meta.get("epochs", 0)) < 1:
            raise UsageError(f"--dynamics {path} holds no finished epoch", "let its training run an epoch or more")
        return
    files = sorted(Path(path).glob("epoch-*.pt")) if Path(path).is_dir() else []
    if not files:
        raise UsageError(f"--snapshots {path}: no epoch-*.pt in it", "give the directory of a train --snapshots run")
    for file in files:
        check_model_file(file, req.data)


def _resolved(path: str | os.PathLike) -> str:
    return str(Path(path).resolve())


def score(method: str, req: ScoreRequest) -> Scores:
    """Run the scorer `method` on `req` (checked first) and time it into `scores.cost`."""
    import numpy as np

    scorer = get_scorer(method)
    if req.labels is None:
        req.labels = req.data.read("labels").astype(np.int64)
    check_request(scorer, req)
    start = time.monotonic()
    temporary = None
    if req.work_dir is None:
        import tempfile

        temporary = req.work_dir = Path(tempfile.mkdtemp(prefix="fakecifar-dropout-"))
    try:
        result = scorer.run(req)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
            req.work_dir = None
    values = np.asarray(result.values, dtype=np.float64)
    if values.shape != (len(req.data),) or not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum()) if values.shape == (len(req.data),) else -1
        raise FakecifarError(
            f"--score {method} gave {bad if bad >= 0 else 'the wrong number of'} non-finite scores",
            "this is a bug: rerun with --debug and report it",
        )
    result.values = values
    result.cost = {"seconds": round(time.monotonic() - start, 3), "images_scored": len(values), **result.cost}
    return result


# ----------------------------------------------------------------------------- models


def check_model_file(path: str | os.PathLike, data: ShardSet) -> dict:
    """The metadata of a `--model` checkpoint that can score `data`; refuses an .onnx (no
    features, no gradients), a file that is no checkpoint, other classes or another image size."""
    from .checkpoint import is_onnx, load_checkpoint

    path = Path(path)
    if not path.exists():
        raise UsageError(f"--model {path}: no such file")
    if is_onnx(path):
        raise UsageError(
            f"--model {path}: an .onnx model gives no features", "give the .pt checkpoint written beside it"
        )
    _, meta = load_checkpoint(path)
    if list(meta["classes"]) != list(data.classes):
        raise BadCheckpointError(
            f"--model {path}: model classes {format_classes(meta['classes'])} differ from the data's "
            f"{format_classes(data.classes)}",
            "give a checkpoint trained on these classes, or drop --model to train a proxy",
        )
    if tuple(meta["input_size"]) != tuple(data.image_size):
        raise BadCheckpointError(
            f"--model {path} takes {format_size(meta['input_size'])} images, the data has "
            f"{format_size(data.image_size)}",
            "run `fakecifar resize` first, or drop --model to train a proxy",
        )
    return meta


def _run_key(req: ScoreRequest) -> dict[str, Any]:
    """What decides a proxy: the data (paths and size), the proxy's settings, the seed."""
    return {
        "data": [_resolved(p) for p in req.data.paths],
        "images": len(req.data),
        "proxy": req.proxy.resolved(),
        "seed": req.seed,
        "device": req.device,
    }


def _work_key(work: Path, key: Mapping[str, Any]) -> None:
    """Keep `work` only if an earlier run with the same `key` left it (it holds resumable
    proxies); otherwise start it empty."""
    stamp = work / "key.json"
    text = json.dumps(dict(key), sort_keys=True, default=str)
    if work.exists():
        try:
            same = stamp.read_text() == text
        except OSError:
            same = False
        if not same:
            shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(text)


def train_proxy(
    data: ShardSet,
    path: Path,
    req: ScoreRequest,
    what: str,
    *,
    dynamics: Path | None = None,
    snapshots: Path | None = None,
) -> dict:
    """Train (or finish, or reuse) a proxy checkpoint at `path` on the training engine
    (fakecifar.train.train); returns its cost: epochs and image-epochs trained now. `dynamics` /
    `snapshots`: train's `dynamics=` / `snapshots=`, recorded while it trains."""
    from .checkpoint import load_checkpoint
    from .train import TrainingInterrupted, train
    from .training.runtime import Dist

    config = req.proxy.config(seed=req.seed, device=req.device)
    resume = None
    if path.exists():
        try:
            _, meta = load_checkpoint(path)
            info = meta.get("train") or {}
            if info.get("stopped") in ("completed", "early-stop") and int(info.get("epochs_done", 0)) >= config.epochs:
                req.say(f"{what}: reusing {path} ({info.get('epochs_done')} epochs, from an earlier run)")
                return {"epochs": 0, "image_epochs": 0}
            resume = path
            done = int(info.get("epochs_done", 0))
        except FakecifarError:
            path.unlink(missing_ok=True)
    if resume is None:
        done = 0
        req.say(f"{what}: training {config.model} on {len(data):,} images, {config.epochs} epochs")
    else:
        req.say(f"{what}: resuming {path} after epoch {done} of {config.epochs}")
    try:
        result = train(
            data,
            path,
            config,
            resume=resume,
            on_epoch=req.on_epoch,
            on_step=req.on_step,
            dist=Dist(),
            dynamics=dynamics,
            snapshots=snapshots,
        )
    except TrainingInterrupted as exc:
        raise TrainingInterrupted(
            f"interrupted while training the {what}; its state is saved in {path}",
            "rerun the same command to continue from there",
            signum=exc.signum,
        ) from exc
    epochs = len(result.history) - done
    return {"epochs": max(0, epochs), "image_epochs": max(0, epochs) * len(data)}


def load_scoring_model(path: Path, data: ShardSet, device: str):
    """(model in eval mode, metadata, torch device) of a checkpoint whose classes fit `data`."""
    from .checkpoint import load_checkpoint
    from .evaluate import resolve_device

    check_model_file(path, data)
    dev = resolve_device(device)
    model, meta = load_checkpoint(path, map_location=dev)
    model.eval()
    return model, meta, dev


def features_and_logits(model, meta: Mapping, data: ShardSet, device, *, path: Path, batch_size: int = 512):
    """(penultimate features float64 [N, D], logits float64 [N, C]) of every row, in eval mode.
    The model must end in `linear(forward_features(x))` (every zoo model does): checked on the
    first batch."""
    import numpy as np
    import torch

    linear = getattr(model, "linear", None)
    if not isinstance(linear, torch.nn.Linear) or not hasattr(model, "forward_features"):
        raise BadCheckpointError(
            f"{path}: a {meta.get('arch')} has no linear last layer on forward_features",
            "influence needs a model of the zoo (see train --list-models)",
        )
    from .loader import BatchLoader

    loader = BatchLoader(data, batch_size, mean=meta["mean"], std=meta["std"], device=device, columns=())
    feats, logits = [], []
    checked = False
    with torch.no_grad():
        for (x,) in loader:
            f = model.forward_features(x).float()
            out = linear(f)
            if not checked:
                full = model(x).float()
                if not torch.allclose(full, out, atol=1e-3 * (1 + float(full.abs().max()))):
                    raise BadCheckpointError(
                        f"{path}: the {meta.get('arch')}'s output is not its last linear layer on forward_features",
                        "influence needs a model whose head is one linear layer",
                    )
                checked = True
            feats.append(f.cpu().double().numpy())
            logits.append(out.cpu().double().numpy())
    d, c = linear.in_features, linear.out_features
    return (
        np.concatenate(feats) if feats else np.zeros((0, d)),
        np.concatenate(logits) if logits else np.zeros((0, c)),
    )


# ----------------------------------------------------------------------------- influence


def softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _augmented(features: np.ndarray) -> np.ndarray:
    import numpy as np

    features = np.asarray(features, dtype=np.float64)
    return np.concatenate([features, np.ones((len(features), 1))], axis=1)


def last_layer_hessian(features: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """H = 1/N sum_i (diag(p_i) - p_i p_i^T) kron z_i z_i^T, z_i = [phi_i, 1]: the exact Hessian
    of the mean cross-entropy w.r.t. the last layer's [W, b] (C x (D+1), flattened row-major,
    index c*(D+1)+d), as a float64 C(D+1) x C(D+1) matrix. Block (c, c') is
    Z^T diag(p_c delta_cc' - p_c p_c') Z: C(C+1)/2 matrix products, N(D+1)^2 each."""
    import numpy as np

    z = _augmented(features)
    p = np.asarray(probs, dtype=np.float64)
    n, d1 = z.shape
    c = p.shape[1]
    h = np.zeros((c, d1, c, d1))
    for a in range(c):
        for b in range(a + 1):
            w = p[:, a] * ((a == b) - p[:, b])
            block = (z * w[:, None]).T @ z
            h[a, :, b, :] = block
            if a != b:
                h[b, :, a, :] = block.T
    return h.reshape(c * d1, c * d1) / max(n, 1)


def last_layer_influence(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    l2: float = 0.0,
    damping: float = DEFAULT_DAMPING,
) -> tuple[np.ndarray, dict]:
    """Influence of each training example on the total validation loss (Koh & Liang 2017,
    restricted to the last linear layer theta = [W, b]):

        score_i = I_up,loss(z_i) = - g_val^T H^-1 g_i

    g_i = (p_i - y_i) kron [phi_i, 1] is the gradient of example i's cross-entropy, g_val the sum
    of the validation examples' gradients, H the exact Hessian of the training objective
    1/N sum_i CE_i + l2/2 |theta|^2 (last_layer_hessian + l2 I) plus `damping` times its mean
    diagonal (so that it is positive definite: softmax is invariant to adding one vector to every
    row of W, which leaves H singular). score_i is d(total val loss)/d(epsilon) when example i is
    upweighted by epsilon; removing it (epsilon = -1/N) changes the total val loss by about
    -score_i / N. So larger = more harmful: removing a positive-score image lowers the val loss.

    float64 throughout, Cholesky solve (the damping is raised tenfold until it succeeds): every
    score is finite. Returns (scores [N], details)."""
    import numpy as np

    weight = np.asarray(weight, dtype=np.float64)
    bias = np.asarray(bias, dtype=np.float64)
    theta = np.concatenate([weight, bias[:, None]], axis=1)  # C x (D+1)
    c, d1 = theta.shape
    z_train, z_val = _augmented(train_features), _augmented(val_features)
    y_train, y_val = np.asarray(train_labels, dtype=np.int64), np.asarray(val_labels, dtype=np.int64)
    p_train, p_val = softmax(z_train @ theta.T), softmax(z_val @ theta.T)
    r_train = p_train.copy()
    r_train[np.arange(len(y_train)), y_train] -= 1.0  # dCE/dlogits = p - onehot(y)
    r_val = p_val.copy()
    r_val[np.arange(len(y_val)), y_val] -= 1.0
    h = last_layer_hessian(train_features, p_train)
    mean_diag = float(np.mean(np.diag(h)))
    base = l2 + damping * mean_diag
    lam = base if base > 0 else 1e-8 * max(mean_diag, 1.0)
    g_val = (r_val.T @ z_val).reshape(-1)  # sum over val of (p - y) kron z
    eye = np.eye(len(h))
    for _ in range(12):
        try:
            chol = np.linalg.cholesky(h + lam * eye)
            break
        except np.linalg.LinAlgError:
            lam = lam * 10 if lam > 0 else 1e-8
    else:  # pragma: no cover - a damping of 1e12 x the mean diagonal always factors
        raise FakecifarError("the last layer's Hessian cannot be factored", "check the features for NaN or inf")
    s = np.linalg.solve(chol.T, np.linalg.solve(chol, g_val)).reshape(c, d1)  # H^-1 g_val
    scores = -np.einsum("nc,cd,nd->n", r_train, s, z_train)
    eps = 1e-12
    details = {
        "hessian": f"{len(h)}x{len(h)}",
        "features": int(d1 - 1),
        "l2": float(l2),
        "damping": float(lam),
        "damping_relative": float(damping),
        "train_loss": float(-np.mean(np.log(p_train[np.arange(len(y_train)), y_train] + eps))) if len(y_train) else 0.0,
        "val_loss": float(-np.mean(np.log(p_val[np.arange(len(y_val)), y_val] + eps))) if len(y_val) else 0.0,
        "val_images": int(len(y_val)),
    }
    return scores, details


@register(
    "influence",
    summary="influence on the validation loss through the last layer's exact Hessian",
    cost="a proxy training (--proxy-epochs over the data) unless --model; then one forward pass over train and "
    "val, N C^2 (D+1)^2 / 2 flops to form the Hessian and one Cholesky of C(D+1) rows",
    needs_val=True,
    uses_model=True,
)
def influence(req: ScoreRequest) -> Scores:
    import numpy as np

    assert req.val is not None and req.work_dir is not None and req.labels is not None
    cost: dict[str, Any] = {"models_trained": 0, "training_epochs": 0, "training_image_epochs": 0}
    path = req.model
    if path is None:
        work = req.work_dir / "influence"
        _work_key(work, {"method": "influence", **_run_key(req)})
        path = work / "proxy.pt"
        spent = train_proxy(req.data, path, req, "proxy")
        cost.update(models_trained=1, training_epochs=spent["epochs"], training_image_epochs=spent["image_epochs"])
    model, meta, device = load_scoring_model(path, req.data, req.device)
    req.say(f"influence: features of {len(req.data):,} training and {len(req.val):,} validation images")
    phi_train, logits_train = features_and_logits(model, meta, req.data, device, path=path)
    phi_val, _ = features_and_logits(model, meta, req.val, device, path=path)
    val_labels = req.val.read("labels").astype(np.int64)
    keep = val_labels >= 0
    weight = model.linear.weight.detach().cpu().double().numpy()
    bias = model.linear.bias.detach().cpu().double().numpy() if model.linear.bias is not None else np.zeros(len(weight))
    l2 = float(((meta.get("train") or {}).get("args") or {}).get("weight_decay") or 0.0)
    values, details = last_layer_influence(
        phi_train, req.labels, phi_val[keep], val_labels[keep], weight, bias, l2=l2, damping=req.damping
    )
    cost["forward_images"] = int(len(req.data) + len(req.val))
    cost["device"] = str(device)
    details.update(model=str(req.model) if req.model is not None else None, arch=meta.get("arch"))
    if req.model is None:
        details["proxy"] = req.proxy.resolved()  # trained here (and deleted with the work directory)
    return Scores("influence", values, logits_train.argmax(1).astype(np.int64), details, cost)


# ----------------------------------------------------------------------------- confident learning


def confident_learning(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Confident learning's label-issue rule (Northcutt, Jiang & Chuang 2021, JAIR), on
    out-of-sample probabilities `probs` [N, C] and given labels [N]:

        t_j = mean of p_j over the examples labelled j          (per-class threshold)
        flagged_i = p_{y_i} < t_{y_i} and p_k >= t_k for some k != y_i

    and the self-confidence margin m_i = max_{k != y_i} p_k - p_{y_i} (in [-1, 1]) to rank.
    `score = 2 * flagged + margin`: every flagged example ranks above every other one, each group
    by its margin (larger = more likely mislabelled = more harmful). Also returns
    `suggested` (the most probable class above its threshold, -1 where none) and `thresholds`."""
    import numpy as np

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n, c = p.shape
    rows = np.arange(n)
    thresholds = np.array([p[y == j, j].mean() if (y == j).any() else np.inf for j in range(c)])
    given = p[rows, y]
    above = p >= thresholds[None, :]
    above[rows, y] = False
    flagged = (given < thresholds[y]) & above.any(axis=1)
    others = p.copy()
    others[rows, y] = -np.inf
    margin = others.max(axis=1) - given if c > 1 else -given
    suggested = np.where(above.any(axis=1), np.where(above, p, -np.inf).argmax(axis=1), -1)
    return {
        "score": 2.0 * flagged + margin,
        "flagged": flagged,
        "margin": margin,
        "suggested": suggested,
        "thresholds": thresholds,
    }


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold 0..k-1 of each row: per class, rows in seeded random order dealt round-robin."""
    import numpy as np

    labels = np.asarray(labels)
    rng = np.random.default_rng((seed, 1729))
    fold = np.zeros(len(labels), np.int64)
    offset = 0
    for cls in np.unique(labels):
        rows = np.nonzero(labels == cls)[0]
        fold[rng.permutation(rows)] = (np.arange(len(rows)) + offset) % k
        offset += len(rows)  # classes smaller than k do not all start in fold 0
    return fold


def _write_subset(data: ShardSet, rows: np.ndarray, directory: Path) -> ShardSet:
    """The rows of `data` (sorted indices) with images and labels, as a temporary one-shard set."""
    import numpy as np

    from .shards import Shard, ShardSet, ShardWriter, producer

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fold.h5"
    path.unlink(missing_ok=True)
    with ShardWriter(path, classes=data.classes, image_size=data.image_size, producer=producer("dropout")) as w:
        for start, chunk in data.iter_chunks(("images", "labels")):
            stop = start + len(chunk["images"])
            lo, hi = np.searchsorted(rows, [start, stop])
            local = rows[lo:hi] - start
            if len(local):
                w.add_batch(chunk["images"][local], chunk["labels"][local])
    return ShardSet([Shard(path)])


def predict_probs(path: Path, data: ShardSet, rows: np.ndarray | None, device: str) -> np.ndarray:
    """Softmax probabilities (float64) of a checkpoint on `rows` of `data` (all rows: None)."""
    import numpy as np
    import torch

    from .loader import BatchLoader

    model, meta, dev = load_scoring_model(path, data, device)
    loader = BatchLoader(data, 512, mean=meta["mean"], std=meta["std"], device=dev, columns=(), indices=rows)
    out = []
    with torch.no_grad():
        for (x,) in loader:
            out.append(torch.softmax(model(x).float(), dim=1).cpu().double().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(data.classes)))


@register(
    "confident",
    summary="confident learning (Northcutt et al. 2021) on out-of-sample probabilities of k-fold proxies",
    cost="--folds proxies, each --proxy-epochs over (k-1)/k of the data, and one forward pass over the data; "
    "with --model (trained on other images) only the forward pass",
    uses_model=True,
    folds=True,
)
def confident(req: ScoreRequest) -> Scores:
    import numpy as np

    assert req.work_dir is not None and req.labels is not None
    labels = req.labels
    n = len(labels)
    cost: dict[str, Any] = {"models_trained": 0, "training_epochs": 0, "training_image_epochs": 0}
    details: dict[str, Any] = {}
    if req.model is not None:
        req.say(f"confident: probabilities of {req.model} on {n:,} images")
        probs = predict_probs(req.model, req.data, None, req.device)
        details.update(model=str(req.model), folds=None)
    else:
        k = req.folds
        work = req.work_dir / "confident"
        _work_key(work, {"method": "confident", "folds": k, **_run_key(req)})
        fold = stratified_folds(labels, k, req.seed)
        probs = np.zeros((n, len(req.data.classes)))
        for f in range(k):
            held = np.nonzero(fold == f)[0]
            saved = work / f"fold-{f}.npy"
            if saved.exists():
                part = np.load(saved, allow_pickle=False)
                if part.shape == (len(held), probs.shape[1]):
                    probs[held] = part
                    continue
            rest = np.nonzero(fold != f)[0]
            subset = _write_subset(req.data, rest, work / f"fold-{f}-data")
            try:
                spent = train_proxy(subset, work / f"fold-{f}.pt", req, f"fold {f + 1}/{k} proxy")
            finally:
                subset.close()
            cost["models_trained"] += 1
            cost["training_epochs"] += spent["epochs"]
            cost["training_image_epochs"] += spent["image_epochs"]
            part = predict_probs(work / f"fold-{f}.pt", req.data, held, req.device)
            np.save(saved, part, allow_pickle=False)
            shutil.rmtree(work / f"fold-{f}-data", ignore_errors=True)
            probs[held] = part
        details.update(folds=k, proxy=req.proxy.resolved())
    result = confident_learning(probs, labels)
    details.update(
        flagged=int(result["flagged"].sum()),
        thresholds=[float(t) if np.isfinite(t) else None for t in result["thresholds"]],
        out_of_sample_accuracy=float((probs.argmax(1) == labels).mean()) if n else 0.0,
    )
    cost["forward_images"] = int(n)
    return Scores("confident", result["score"], probs.argmax(1).astype(np.int64), details, cost)


# ----------------------------------------------------------------------------- training dynamics

# EL2N is an early-training score (Paul et al. 2021 take it at ~10% of training): the mean over
# the first half of the proxy's epochs.
EL2N_FRACTION = 0.5


def _proxy_records(req: ScoreRequest, kind: str) -> tuple[Path, Path, dict]:
    """Train (or reuse, or finish) the proxy of a training-dynamics method in the work directory,
    recording its `kind` ("dynamics": the per-row record; "snapshots": every epoch's weights).
    Returns (the proxy, the record, the cost)."""
    given = _record_given(req)
    if given is not None and given[0] == kind:
        return Path(), given[1], {"models_trained": 0, "training_epochs": 0, "record": str(given[1])}
    assert req.work_dir is not None
    work = req.work_dir / kind
    _work_key(work, {"method": kind, **_run_key(req)})
    path = work / "proxy.pt"
    record = work / ("dynamics.h5" if kind == "dynamics" else "snapshots")
    dynamics, snapshots = (record, None) if kind == "dynamics" else (None, record)
    spent = train_proxy(req.data, path, req, "proxy", dynamics=dynamics, snapshots=snapshots)
    if not _record_complete(req, kind, record, path):
        # A kill between the proxy's last save and its record's: train it again, whole.
        req.say(f"proxy: its {kind} record in {record} is incomplete; training it again")
        path.unlink(missing_ok=True)
        if record.is_dir():
            shutil.rmtree(record, ignore_errors=True)
        else:
            record.unlink(missing_ok=True)
        spent = train_proxy(req.data, path, req, "proxy", dynamics=dynamics, snapshots=snapshots)
    cost = {"models_trained": 1, "training_epochs": spent["epochs"], "training_image_epochs": spent["image_epochs"]}
    return path, record, cost


def _record_complete(req: ScoreRequest, kind: str, record: Path, proxy: Path) -> bool:
    """Whether the proxy's record covers every epoch it trained (and, for dynamics, these rows)."""
    from .checkpoint import load_checkpoint

    epochs = int((load_checkpoint(proxy)[1].get("train") or {}).get("epochs_done", 0))
    if kind == "snapshots":
        return record.is_dir() and len(list(record.glob("epoch-*.pt"))) >= epochs
    if not record.is_file():
        return False
    from .shards import row_sha256
    from .training.dynamics import read_dynamics

    d = read_dynamics(record)
    return int(d.meta.get("epochs", 0)) == epochs and bool((d.sha256 == row_sha256(req.data)).all())


def _dynamics_scores(req: ScoreRequest, method: str, values_of: Callable) -> Scores:
    import numpy as np

    from .training.dynamics import read_dynamics

    _, record, cost = _proxy_records(req, "dynamics")
    d = read_dynamics(record)
    values = np.asarray(values_of(d), dtype=np.float64)
    cost["extra_passes"] = 0  # recorded from the proxy's own training steps
    details: dict[str, Any] = {"epochs": int(d.margin.shape[0])}
    details.update({"record": str(req.dynamics)} if req.dynamics else {"proxy": req.proxy.resolved()})
    predicted = np.full(len(values), -1, np.int64)
    return Scores(method, values, predicted, details, cost)


@register(
    "aum",
    summary="area under the margin (Pleiss et al. 2020): a proxy's mean assigned-minus-largest-other logit over epochs",
    cost="one proxy training (--proxy-epochs), recorded from its own steps: no extra pass",
    trains_proxy=True,
)
def aum_scores(req: ScoreRequest) -> Scores:
    import numpy as np

    from .training.dynamics import aum

    def harm(d):
        a = aum(d)
        finite = a[np.isfinite(a)]
        return -np.where(np.isfinite(a), a, finite.max() if len(finite) else 0.0)  # low margin: harmful

    return _dynamics_scores(req, "aum", harm)


@register(
    "forgetting",
    summary="forgetting events (Toneva et al. 2019): correct -> wrong flips of a proxy's prediction between epochs",
    cost="one proxy training (--proxy-epochs), recorded from its own steps: no extra pass",
    trains_proxy=True,
)
def forgetting_scores(req: ScoreRequest) -> Scores:
    from .training.dynamics import forgetting

    return _dynamics_scores(req, "forgetting", forgetting)


@register(
    "el2n",
    summary="EL2N (Paul et al. 2021): a proxy's mean |softmax - onehot| over its first half of training",
    cost="one proxy training (--proxy-epochs), recorded from its own steps: no extra pass",
    trains_proxy=True,
)
def el2n_scores(req: ScoreRequest) -> Scores:
    import math

    from .training.dynamics import el2n

    return _dynamics_scores(req, "el2n", lambda d: el2n(d, max(1, math.ceil(EL2N_FRACTION * len(d.el2n)))))


@register(
    "tracin",
    summary="TracIn (Pruthi et al. 2020) through the last layer over every epoch's weights of a proxy: "
    "minus the lr-weighted sum of its gradient's dot product with the validation loss's",
    cost="one proxy training with a snapshot per epoch; then a forward pass over train and val per snapshot",
    needs_val=True,
    trains_proxy=True,
)
def tracin(req: ScoreRequest) -> Scores:
    import numpy as np

    assert req.val is not None and req.labels is not None
    _, snapshots, cost = _proxy_records(req, "snapshots")
    val_labels = req.val.read("labels").astype(np.int64)
    keep = val_labels >= 0
    values = np.zeros(len(req.data))
    files = sorted(snapshots.glob("epoch-*.pt"))
    if not files:
        raise FakecifarError(f"{snapshots}: the proxy left no snapshot", "rerun with --overwrite")
    for path in files:
        model, meta, device = load_scoring_model(path, req.data, req.device)
        lr = float((meta.get("train") or {}).get("lr") or 1.0)  # the lr of the epoch's end
        phi, logits = features_and_logits(model, meta, req.data, device, path=path)
        phi_val, logits_val = features_and_logits(model, meta, req.val, device, path=path)
        r = softmax(logits)
        r[np.arange(len(r)), req.labels] -= 1.0  # dCE/dlogits
        r_val = softmax(logits_val[keep])
        r_val[np.arange(len(r_val)), val_labels[keep]] -= 1.0
        g_val = r_val.T @ _augmented(phi_val[keep])  # C x (D+1): the summed validation gradient
        # A positive dot product: a step on this image lowered the validation loss (a proponent).
        values -= lr * np.einsum("nc,cd,nd->n", r, g_val, _augmented(phi))
    cost["snapshots"] = len(files)
    cost["forward_images"] = int(len(files) * (len(req.data) + len(req.val)))
    details: dict[str, Any] = {"snapshots": len(files)}
    details.update({"record": str(req.snapshots)} if req.snapshots else {"proxy": req.proxy.resolved()})
    return Scores("tracin", values, np.full(len(values), -1, np.int64), details, cost)


# ----------------------------------------------------------------------------- the control


@register("random", summary="seeded uniform scores: the control every experiment carries", cost="none")
def random_scores(req: ScoreRequest) -> Scores:
    import numpy as np

    values = np.random.default_rng((req.seed, 4711)).random(len(req.data))
    return Scores("random", values, None, {"seed": req.seed}, {"models_trained": 0, "training_epochs": 0})
