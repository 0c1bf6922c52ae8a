"""Evaluate classifiers (fakecifar `.pt`, foreign `.th` with an arch, or `.onnx`) on shards.

    from fakecifar.evaluate import load_classifier, evaluate
    clf = load_classifier("model.onnx")                  # onnxruntime only: torch is not imported
    result = evaluate(clf, open_shards(["val/"]))        # metrics dict (see fakecifar.metrics)

What a model predicts is given by its class list; what a dataset holds is given by a *target*:
`class` (the shard's labels), `origin` (real/fake from the `origin` column) or `origin+class`
(2K classes named "real/cat", "fake/cat", ...). `auto` picks origin or origin+class when the
model's classes are exactly those names, else class. The model's and the dataset's class lists
must then agree exactly, or, with `map_classes`, are matched by name.

This module imports torch only on the torch paths; metrics are numpy (fakecifar.metrics).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import is_onnx
from .errors import BadCheckpointError, UsageError
from .metrics import classification_metrics
from .shards import ORIGIN_NAMES, ShardSet
from .text import format_classes, format_size

TARGETS = ("auto", "class", "origin", "origin+class")
MODEL_SUFFIXES = (".pt", ".pth", ".th", ".onnx", ".ckpt", ".bin", ".tar")


# ----------------------------------------------------------------------------- targets


def target_classes(classes: Sequence[str], target: str) -> list[str]:
    """Class names of `target` for a dataset whose label names are `classes`."""
    if target == "class":
        return list(classes)
    if target == "origin":
        return list(ORIGIN_NAMES)
    if target == "origin+class":
        return [f"{o}/{c}" for o in ORIGIN_NAMES for c in classes]
    raise UsageError(f"unknown --target {target!r}", "use class, origin or origin+class")


def needed_columns(target: str) -> tuple[str, ...]:
    return {"class": ("labels",), "origin": ("origin",), "origin+class": ("labels", "origin")}[target]


def check_target(data: ShardSet, target: str) -> None:
    """UsageError naming the first shard that lacks a column the target needs."""
    if target not in TARGETS[1:]:
        raise UsageError(f"unknown --target {target!r}", "use class, origin or origin+class")
    for column in needed_columns(target):
        if column not in data.columns:
            where = next((s.path for s in data.shards if column not in s.columns), data.paths[0])
            raise UsageError(
                f"{where}: has no {column!r} column, needed by --target {target}",
                "import with --origin real|fake, or from CIFAKE REAL/FAKE folders"
                if column == "origin"
                else "give labelled shards",
            )


def make_targets(labels: np.ndarray | None, origin: np.ndarray | None, num_classes: int, target: str) -> np.ndarray:
    """int64 target per image, -1 where there is none (unlabelled, unknown origin)."""
    if target == "class":
        return np.asarray(labels, dtype=np.int64)
    o = np.asarray(origin, dtype=np.int64)
    o = np.where((o >= 0) & (o < len(ORIGIN_NAMES)), o, -1)
    if target == "origin":
        return o
    lab = np.asarray(labels, dtype=np.int64)
    return np.where((o >= 0) & (lab >= 0), o * num_classes + lab, -1)


def dataset_targets(data: ShardSet, target: str) -> np.ndarray:
    """The targets of every image in `data` (reads only the small columns)."""
    check_target(data, target)
    cols = {name: data.read(name) for name in needed_columns(target)}
    return make_targets(cols.get("labels"), cols.get("origin"), len(data.classes), target)


def auto_target(model_classes: Sequence[str], data_classes: Sequence[str]) -> str:
    """The target a model with these classes was trained for, guessed from the names."""
    if list(model_classes) == list(ORIGIN_NAMES):
        return "origin"
    if list(model_classes) == target_classes(data_classes, "origin+class"):
        return "origin+class"
    if all("/" in c and c.split("/", 1)[0] in ORIGIN_NAMES for c in model_classes):
        return "origin+class"
    return "class"


def class_mapping(
    model_classes: Sequence[str], data_classes: Sequence[str], *, map_classes: bool, model_name: str, data_name: str
) -> np.ndarray:
    """Index in the model's outputs of each dataset class (-1: the model lacks it).

    Without `map_classes` the lists must be identical; otherwise the error names both."""
    model_classes, data_classes = list(model_classes), list(data_classes)
    if model_classes == data_classes:
        return np.arange(len(data_classes))
    if not map_classes:
        same = set(model_classes) == set(data_classes)
        raise BadCheckpointError(
            f"{model_name}: model classes {format_classes(model_classes)} differ from {data_name}'s "
            f"{format_classes(data_classes)}",
            "same names in another order: pass --map-classes"
            if same
            else "pass --map-classes to match classes by name, or --target origin for a real/fake model",
        )
    index = {name: i for i, name in enumerate(model_classes)}
    mapping = np.array([index.get(name, -1) for name in data_classes], dtype=np.int64)
    if (mapping < 0).all():
        raise BadCheckpointError(
            f"{model_name}: no class of {data_name} {format_classes(data_classes)} is among "
            f"the model's {format_classes(model_classes)}",
            "--map-classes matches classes by name",
        )
    return mapping


# ----------------------------------------------------------------------------- devices


def resolve_device(spec: str | None = "auto"):
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N' -> torch.device; UsageError if absent."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device {spec!r} is not a device", "use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA device here", "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported", "use auto, cpu, cuda or cuda:N")
    return device


# ----------------------------------------------------------------------------- classifiers


@dataclass
class Classifier:
    """A loaded model: `.classes`, `.meta`, `.name`; `.onnx` tells which runtime runs it."""

    path: Path
    classes: list[str]
    meta: dict[str, Any]
    onnx: bool
    model: Any = None  # torch nn.Module in eval mode on `device` (torch) or OnnxClassifier
    device: Any = None
    name: str = ""
    input_size: tuple[int, int] = (32, 32)

    @property
    def arch(self) -> str:
        return str(self.meta.get("arch", "?"))


def looks_like_model(path: str | os.PathLike) -> bool:
    """True for names that are models (by suffix), False for shards, directories and globs."""
    p = Path(str(path))
    if p.is_dir() or p.suffix == ".h5" or any(ch in str(path) for ch in "*?["):
        return False
    return p.suffix.lower() in MODEL_SUFFIXES or (p.is_file() and p.suffix.lower() != ".h5")


def load_classifier(
    path: str | os.PathLike, *, arch: str | None = None, device: str = "auto", threads: int | None = None
) -> Classifier:
    """Load a `.pt`/`.th` (torch; `arch` is used when the file itself does not name one, "auto"
    picks the one architecture that fits) or an `.onnx` (onnxruntime only: torch is never
    imported on this path). `threads` sets torch's or onnxruntime's CPU threads."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if is_onnx(path):
        from .checkpoint import OnnxClassifier

        clf = OnnxClassifier(path, threads=threads)
        return Classifier(
            path, list(clf.classes), dict(clf.meta), True, clf, None, path.name, (clf.input_size[0], clf.input_size[1])
        )
    from .checkpoint import load_checkpoint

    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    dev = resolve_device(device)
    try:
        model, meta = load_checkpoint(path, map_location=dev)
    except BadCheckpointError as first:
        if arch is None:
            raise
        if arch == "auto":
            arch = guess_arch(path)
            if arch is None:
                raise
        try:
            model, meta = load_checkpoint(path, arch=arch, map_location=dev)
        except BadCheckpointError as exc:
            if "but --arch" in exc.message:  # a fakecifar checkpoint of another arch: first error says why
                raise first from exc
            raise
    model.eval()
    h, w = meta.get("input_size", [32, 32])
    return Classifier(path, list(meta["classes"]), meta, False, model, dev, path.name, (int(h), int(w)))


def guess_arch(path: str | os.PathLike) -> str | None:
    """The one registered architecture whose parameter names and shapes fit a foreign state
    dict (None if none or several fit): what `--arch auto` uses."""
    from .checkpoint import _find_foreign_state_dict, _guess_arch, _torch_load

    state, _ = _find_foreign_state_dict(_torch_load(Path(path), "cpu"))
    fits = _guess_arch(state) if state is not None else []
    return fits[0] if len(fits) == 1 else None


# ----------------------------------------------------------------------------- prediction


def _numpy_batches(data: ShardSet, indices: np.ndarray, batch_size: int):
    """float32 [B, 3, H, W] in [0, 1] for the rows `indices` (sorted), in order; numpy only."""
    pos = 0
    for start, chunk in data.iter_chunks(("images",)):
        images = chunk["images"]
        stop = start + len(images)
        take = indices[pos : np.searchsorted(indices, stop, side="left")]
        pos += len(take)
        if not len(take):
            continue
        sel = images[take - start]
        for i in range(0, len(sel), batch_size):
            yield np.ascontiguousarray(sel[i : i + batch_size].transpose(0, 3, 1, 2), dtype=np.float32) * (1 / 255.0)


def predict_onnx(
    clf: Classifier,
    data: ShardSet,
    indices: np.ndarray,
    *,
    batch_size: int = 256,
    tta: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    out = []
    for x in _numpy_batches(data, indices, batch_size):
        logits = clf.model.predict_logits(x, batch_size)
        if tta:
            logits = (logits + clf.model.predict_logits(np.ascontiguousarray(x[..., ::-1]), batch_size)) / 2
        out.append(logits)
        if on_progress:
            on_progress(len(x))
    return np.concatenate(out) if out else np.zeros((0, len(clf.classes)), np.float32)


def predict_torch(
    clf: Classifier,
    data: ShardSet,
    indices: np.ndarray,
    *,
    batch_size: int = 256,
    tta: bool = False,
    attack: str | None = None,
    eps: Sequence[float] = (),
    steps: int = 20,
    targets: np.ndarray | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[float | None, np.ndarray]:
    """Logits on clean images (key None) and, with an attack, on adversarial ones per eps."""
    import torch

    from .attacks import normalized, pgd_l2
    from .loader import BatchLoader

    net = normalized(clf.model, clf.meta["mean"], clf.meta["std"])
    loader = BatchLoader(data, batch_size, shuffle=False, device=clf.device, indices=indices, columns=())
    radii = [e for e in eps if e > 0] if attack else []
    assert targets is not None or not radii, "an attack needs the targets"
    outs: dict[float | None, list] = {None: [], **{e: [] for e in radii}}
    pos = 0

    def run(x):
        logits = net(x)
        if tta:
            logits = (logits + net(x.flip(-1))) / 2
        return logits.float().cpu().numpy()

    for (x,) in loader:
        with torch.no_grad():
            outs[None].append(run(x))
        if radii and targets is not None:
            y = torch.as_tensor(targets[pos : pos + len(x)], device=x.device)
            for e in radii:
                adv = pgd_l2(net, x, y, eps=e, steps=steps)
                with torch.no_grad():
                    outs[e].append(run(adv))
        pos += len(x)
        if on_progress:
            on_progress(len(x))
    k = len(clf.classes)
    return {key: (np.concatenate(v) if v else np.zeros((0, k), np.float32)) for key, v in outs.items()}


def evaluate(
    clf: Classifier,
    data: ShardSet,
    *,
    target: str = "auto",
    map_classes: bool = False,
    batch_size: int = 256,
    tta: bool = False,
    attack: str | None = None,
    eps: Sequence[float] = (),
    steps: int = 20,
    data_name: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Metrics of `clf` on `data` (see fakecifar.metrics.classification_metrics), plus
    `model`, `dataset`, `target`, `skipped` (images without a target the model knows) and,
    with an attack, `robust` {eps: top-1 accuracy}."""
    data_name = data_name or (str(data.paths[0].parent) if len(data.paths) > 1 else str(data.paths[0]))
    # Foreign files do not record an input size; every zoo model pools globally, so any size runs.
    if data.image_size != tuple(clf.input_size) and clf.meta.get("format") != "foreign":
        raise UsageError(
            f"{clf.path} takes {format_size(clf.input_size)} images, {data_name} has {format_size(data.image_size)}",
            "run `fakecifar resize` first",
        )
    if attack is not None:
        if attack not in ("pgd-l2",):
            raise UsageError(f"unknown --attack {attack!r}", "available: pgd-l2")
        if clf.onnx:
            raise UsageError(
                f"{clf.path}: attacks need gradients, which an .onnx model does not give",
                "attack the .pt checkpoint instead",
            )
        if steps < 1:
            raise UsageError(f"--steps must be at least 1, got {steps}")
    if target == "auto":
        target = auto_target(clf.classes, data.classes)
    names = target_classes(data.classes, target)
    raw = dataset_targets(data, target)
    mapping = class_mapping(clf.classes, names, map_classes=map_classes, model_name=str(clf.path), data_name=data_name)
    mapped = np.where(raw >= 0, mapping[np.clip(raw, 0, None)], -1)
    indices = np.nonzero(mapped >= 0)[0]
    if not len(indices):
        raise UsageError(
            f"{data_name}: no image has a {target} target the model knows", "unlabelled shards cannot be evaluated"
        )
    targets = mapped[indices]
    logits: dict[float | None, np.ndarray]
    if clf.onnx:
        logits = {None: predict_onnx(clf, data, indices, batch_size=batch_size, tta=tta, on_progress=on_progress)}
    else:
        logits = predict_torch(
            clf,
            data,
            indices,
            batch_size=batch_size,
            tta=tta,
            attack=attack,
            eps=eps,
            steps=steps,
            targets=targets,
            on_progress=on_progress,
        )
    result = classification_metrics(logits[None], targets, clf.classes)
    result.update(
        {
            "model": str(clf.path),
            "arch": clf.arch,
            "dataset": data_name,
            "target": target,
            "skipped": int(len(data) - len(indices)),
            "tta": tta,
            "runtime": "onnxruntime" if clf.onnx else "torch",
        }
    )
    if attack:
        robust = {}
        for e in eps:
            if e > 0:
                robust[str(e)] = float((logits[e].argmax(1) == targets).mean())
            else:
                robust[str(e)] = result["top1"]
        result.update({"attack": attack, "steps": steps, "robust": robust})
    result["_predictions"] = logits[None].argmax(1) if len(targets) else np.zeros(0, np.int64)
    result["_targets"] = targets
    return result
