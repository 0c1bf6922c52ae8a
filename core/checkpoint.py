"""Portable checkpoints: `.pt` for PyTorch, `.onnx` for onnxruntime-only inference.

A `.pt` checkpoint is a plain dict (tensors, strings, numbers, lists) so that it can always be
read with `torch.load(weights_only=True)`: a checkpoint from the internet must not run code.

    {"format": "fakecifar-checkpoint", "version": 1, "arch": "resnet20", "arch_kwargs": {},
     "classes": [...], "mean": [r, g, b], "std": [r, g, b], "input_size": [H, W],
     "state_dict": {...}, "train": {...metrics, args}}

The `.onnx` export takes float32 [N, 3, H, W] images in [0, 1] as input `image` (normalization
is baked in) and returns `logits`; classes/mean/std/arch/input_size are JSON strings in its
metadata_props. `OnnxClassifier` runs it on onnxruntime alone.

Foreign state dicts (e.g. the ResNet-CIFAR `.th` files: {"state_dict": {"module.conv1...": ...}})
load when the architecture is named: `load_checkpoint(path, arch="resnet56")`.

This module does not import torch (or onnx) until a function needs it, so the ONNX-only paths
(`detect`, `eval` on an .onnx) stay light.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BadCheckpointError, BadImageError, UsageError
from .outputs import write_atomically
from .text import format_classes, format_size

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

__all__ = [
    "CIFAR10_CLASSES",
    "FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OnnxClassifier",
    "VERSION",
    "export_onnx",
    "is_onnx",
    "load_checkpoint",
    "load_onnx",
    "read_onnx_meta",
    "save_checkpoint",
]

FORMAT = "fakecifar-checkpoint"
VERSION = 1
ONNX_FORMAT = "fakecifar-onnx"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The normalization the pretrained ResNet-CIFAR files were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Where foreign files keep their state dict; a bare state dict is accepted too.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Prefixes added by DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Images in one call from which an optimized onnxruntime session repays its longer open
# (measured on CPU: ~0.05 s more to open, a few ms less per small batch).
_OPTIMIZE_FROM_IMAGES = 32
_ONNX_META_KEYS = ("format", "version", "arch", "arch_kwargs", "classes", "mean", "std", "input_size", "train")


def is_onnx(path: str | os.PathLike[str]) -> bool:
    """True if `path` names an ONNX model (by suffix), which only OnnxClassifier can run."""
    return Path(path).suffix.lower() == ".onnx"


# ----------------------------------------------------------------------------- metadata


def _plain(obj: Any) -> Any:
    """`obj` as JSON-able builtins, so that weights_only loading and ONNX metadata accept it."""

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):  # numpy/torch scalars and arrays
            return o.tolist()
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=str)
        if hasattr(o, "__dict__") and not isinstance(o, type):  # argparse.Namespace and friends
            return vars(o)
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def _size2(input_size: int | Sequence[int]) -> list[int]:
    size = [input_size, input_size] if isinstance(input_size, int) else list(input_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise UsageError(f"input_size must be a positive int or (height, width), got {input_size!r}")
    return size


def _validated_meta(
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any] | None,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    input_size: int | Sequence[int],
) -> dict[str, Any]:
    if isinstance(classes, (str, bytes)):
        raise UsageError(f"classes must be a list of names, got the string {classes!r}")
    classes = [str(c) for c in classes]
    if not classes:
        raise UsageError("a checkpoint needs at least one class name")
    if len(set(classes)) != len(classes):
        raise UsageError(f"duplicate class names: {format_classes(classes)}")
    mean_l, std_l = [float(m) for m in mean], [float(s) for s in std]
    if len(mean_l) != 3 or len(std_l) != 3:
        raise UsageError(f"mean and std need 3 values (RGB), got {mean_l} and {std_l}")
    if not all(math.isfinite(s) and s > 0 for s in std_l) or not all(math.isfinite(m) for m in mean_l):
        raise UsageError(f"std must be positive and mean finite, got mean {mean_l} std {std_l}")
    return {
        "arch": str(arch),
        "arch_kwargs": _plain(dict(arch_kwargs or {})),
        "classes": classes,
        "mean": mean_l,
        "std": std_l,
        "input_size": _size2(input_size),
    }


# ----------------------------------------------------------------------------- .pt


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DataParallel/DDP or torch.compile wrappers."""
    import torch

    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any] | None = None,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    input_size: int | Sequence[int],
    train: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as a fakecifar `.pt` checkpoint, atomically. Returns the path written.

    `train` (metrics, arguments, ...) is stored as JSON-like data; anything else becomes a string.
    `extra` adds top-level entries (tensors allowed, e.g. `fakecifar train`'s `resume` state with
    optimizer buffers); they must be weights_only-loadable and cannot replace a format key.
    A reparameterized model (`model.deploy` true) is recorded with `deploy=True` so it reloads fused.
    """
    import torch

    from .models import resolve_name

    path = Path(path)
    model = _unwrap(model)
    meta = _validated_meta(
        arch=resolve_name(arch), arch_kwargs=arch_kwargs, classes=classes, mean=mean, std=std, input_size=input_size
    )
    if getattr(model, "deploy", False):
        meta["arch_kwargs"]["deploy"] = True
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, **meta, "state_dict": state, "train": _plain(dict(train or {}))}
    clash = sorted(set(extra or {}) & set(payload))
    if clash:
        raise UsageError(f"save_checkpoint: extra entries {clash} would replace format keys")
    payload.update(extra or {})
    return write_atomically(path, writer=lambda fh: torch.save(payload, fh))


MODEL_KINDS = "a fakecifar .pt, a foreign state dict (.pt/.th, with --arch) or an .onnx model"
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_IMAGE_MAGICS = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def _not_a_model(path: Path, *, onnx: bool = False) -> str | None:
    """What `path` is, when its first bytes show it is no model at all (text, a shard, an image,
    random bytes), so it is refused as "not a model file" rather than with the loader's error.
    A .pt must be a zip (torch >= 1.6) or a pickle stream (older torch, .th files); an .onnx is
    protobuf, which has no signature, so only the recognizable non-models are named there."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None  # unreadable: the loader's error names the reason
    if not head:
        return "an empty file"
    if head.startswith(_HDF5_MAGIC):
        return "an HDF5 file, perhaps a shard"
    if head.startswith(_IMAGE_MAGICS):
        return "an image"
    if _is_text(head):
        return "text"
    if head.startswith(_ZIP_MAGIC):
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                if not any(n.endswith("data.pkl") for n in archive.namelist()):
                    return "a zip archive without a PyTorch checkpoint in it"
        except (zipfile.BadZipFile, OSError):
            pass  # a truncated checkpoint: the loader's error says so
        return None
    is_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    return None if onnx or is_pickle else "neither the zip nor the pickle stream PyTorch writes"


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a character cut at the end of the 4 KiB read is fine
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r" for c in text)


def _refuse_non_model(path: Path, *, onnx: bool = False) -> None:
    kind = _not_a_model(path, onnx=onnx)
    if kind:
        raise BadCheckpointError(f"{path}: not a model file", f"it is {kind}; expected {MODEL_KINDS}")


def _refuse_non_onnx(path: Path) -> None:
    """After an ONNX load failed: a file that does not even start as a model's protobuf does
    (field 1, ir_version: byte 0x08, which every exporter writes first) is not a model file."""
    try:
        with open(path, "rb") as fh:
            first = fh.read(1)
    except OSError:
        return
    if first != b"\x08":
        raise BadCheckpointError(
            f"{path}: not a model file", f"it does not start as an ONNX model does; expected {MODEL_KINDS}"
        )


def _torch_load(path: Path, map_location: Any) -> Any:
    import pickle

    import torch

    if not path.is_file():
        raise BadCheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    _refuse_non_model(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")  # noise on non-torch pickles
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise BadCheckpointError(
            f"{path}: refused to load: the file holds Python objects, not just tensors{what}",
            "loading it could run arbitrary code; re-save only the state_dict from a trusted copy",
        ) from exc
    except Exception as exc:  # zip/pickle/EOF errors of a damaged or non-torch file
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise BadCheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first_line})",
            "the file is truncated, corrupt or not a checkpoint",
        ) from exc


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _find_foreign_state_dict(obj: Any) -> tuple[dict[str, Any] | None, str]:
    """(state dict, where it was) in a foreign checkpoint, or (None, description of the layout)."""
    if _is_state_dict(obj):
        return _strip_prefixes(obj), "bare state_dict"
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return _strip_prefixes(obj[key]), f"{key!r} entry"
        keys = ", ".join(map(repr, list(obj)[:8]))
        return None, f"a dict with keys {keys}" if keys else "an empty dict"
    return None, f"a {type(obj).__name__}"


def _guess_arch(state: Mapping[str, Any]) -> list[str]:
    """Registered architectures whose parameter names and shapes match `state` (any class count)."""
    import torch

    from .models import MODELS

    fits = []
    for name, spec in MODELS.items():
        try:
            with torch.device("meta"):
                ref = spec.builder(num_classes=1).state_dict()
        except (TypeError, ValueError, RuntimeError, NotImplementedError):
            continue  # a model that cannot be built without data (pca-logreg) is no candidate
        if {k for k in ref if not _optional(k)} == {k for k in state if not _optional(k)} and all(
            tuple(ref[k].shape)[1:] == tuple(state[k].shape)[1:] for k in ref if k in state and state[k].dim() > 1
        ):
            fits.append(name)
    return fits


def _classifier_outputs(model: nn.Module, state: Mapping[str, Any]) -> int | None:
    """How many classes `state` was trained for: the rows of the model's last Linear layer."""
    import torch

    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    weight = state.get(f"{last}.weight") if last is not None else None
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def _optional(key: str) -> bool:
    """BatchNorm's step counter: absent from files written before torch 0.4.1, unused in eval."""
    return key.endswith("num_batches_tracked")


def _load_state(model: nn.Module, state: Mapping[str, Any], arch: str, path: Path) -> None:
    """Load `state` into `model`, or BadCheckpointError naming the mismatching keys."""
    expected = model.state_dict()
    state = {**{k: v for k, v in expected.items() if _optional(k)}, **state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or reshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)):
            if items:
                more = f", ... {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{more})")
        guesses = [g for g in _guess_arch(state) if g != arch]
        hint = (
            f"the weights fit --arch {' or '.join(guesses)}"
            if guesses
            else "is --arch the architecture these weights were trained with?"
        )
        raise BadCheckpointError(f"{path}: weights do not fit {arch}: " + "; ".join(parts), hint)
    model.load_state_dict(state, strict=True)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    map_location: Any = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from a fakecifar `.pt` or a foreign state dict.

    Always loads with `weights_only=True`. `arch` is required for foreign files (e.g. the
    ResNet-CIFAR `.th` files, which get the CIFAR-10 classes and their ImageNet mean/std) and,
    when given for a fakecifar checkpoint, must agree with the stored architecture.
    The metadata has the keys of the format (less state_dict) plus `path`.
    """
    import torch

    from .models import build_model, resolve_name

    path = Path(path)
    if is_onnx(path):
        raise BadCheckpointError(
            f"{path}: an ONNX model cannot be loaded into PyTorch", "run it with OnnxClassifier (onnxruntime)"
        )
    try:
        want = resolve_name(arch) if arch is not None else None
    except UsageError as exc:
        raise UsageError(f"--arch: {exc.message}", exc.hint) from exc
    obj = _torch_load(path, map_location)

    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise BadCheckpointError(
                f"{path}: checkpoint version {version!r} is newer than this fakecifar reads ({VERSION})",
                "upgrade fakecifar",
            )
        missing_fields = [k for k in ("arch", "classes", "mean", "std", "input_size", "state_dict") if k not in obj]
        if missing_fields:
            raise BadCheckpointError(f"{path}: damaged checkpoint: no {', '.join(missing_fields)}", "re-create it")
        try:
            stored = resolve_name(str(obj["arch"]))
        except UsageError as exc:
            raise BadCheckpointError(
                f"{path}: unknown architecture {obj['arch']!r} in checkpoint",
                "it was written by a newer fakecifar or another tool",
            ) from exc
        if want is not None and want != stored:
            raise BadCheckpointError(
                f"{path}: checkpoint is a {stored}, but --arch {want} was given", f"drop --arch or pass --arch {stored}"
            )
        try:
            meta = _validated_meta(
                arch=stored,
                arch_kwargs=obj.get("arch_kwargs"),
                classes=obj["classes"],
                mean=obj["mean"],
                std=obj["std"],
                input_size=obj["input_size"],
            )
        except (UsageError, TypeError, ValueError) as exc:
            raise BadCheckpointError(f"{path}: damaged checkpoint metadata: {exc}", "re-create it") from exc
        meta = {"format": FORMAT, "version": version, **meta, "train": dict(obj.get("train") or {})}
        state = obj["state_dict"]
        if not _is_state_dict(state):
            raise BadCheckpointError(f"{path}: damaged checkpoint: state_dict is not a dict of tensors", "re-create it")
    else:
        state, where = _find_foreign_state_dict(obj)
        if state is None:
            raise BadCheckpointError(
                f"{path}: unknown checkpoint layout ({where}; no state_dict of tensors found)",
                "expected a fakecifar .pt, a state_dict, or a dict with a 'state_dict' entry",
            )
        if want is None:
            guesses = _guess_arch(state)
            raise BadCheckpointError(
                f"{path}: not a fakecifar checkpoint ({where} without metadata); its architecture must be given",
                f"pass --arch {' or '.join(guesses)}" if guesses else "pass --arch NAME",
            )
        stored = want
        # Scalars beside the weights (best_prec1, epoch, ...) are the only training record there is.
        extras = (
            {k: _plain(v) for k, v in obj.items() if isinstance(v, (int, float, str, bool))}
            if isinstance(obj, Mapping) and not _is_state_dict(obj)
            else {}
        )
        meta = {
            "format": "foreign",
            "version": None,
            "arch": stored,
            "arch_kwargs": {},
            "classes": None,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "input_size": [32, 32],
            "train": extras,
        }

    try:
        num_classes = len(meta["classes"]) if meta["classes"] else 10
        model = build_model(stored, num_classes, **meta["arch_kwargs"])
    except UsageError as exc:
        raise BadCheckpointError(
            f"{path}: cannot build {stored}: {exc}", "the checkpoint's arch_kwargs are not valid"
        ) from exc
    if meta["classes"] is None:  # foreign: size the head from the weights, CIFAR-10 names when 10
        outputs = _classifier_outputs(model, state)
        if outputs is not None and outputs != num_classes:
            model = build_model(stored, outputs)
            num_classes = outputs
        meta["classes"] = list(CIFAR10_CLASSES) if num_classes == 10 else [f"class{i}" for i in range(num_classes)]
    _load_state(model, state, stored, path)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    meta["path"] = str(path)
    return model, meta


# ----------------------------------------------------------------------------- .onnx


def export_onnx(
    model: nn.Module,
    meta: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
) -> Path:
    """Export `model` with normalization baked in: input `image` float32 [N,3,H,W] in [0,1].

    `meta` needs arch, classes, mean, std, input_size (as load_checkpoint returns them). RepVGG
    branches are fused first (a copy; same outputs, faster). Written atomically; returns the path.
    """
    import copy
    import io

    import onnx
    import torch

    from .models import reparameterize

    path = Path(path)
    absent = [k for k in ("arch", "classes", "mean", "std", "input_size") if k not in meta]
    if absent:
        raise UsageError(f"export_onnx: meta lacks {', '.join(absent)}", "pass the meta load_checkpoint returns")
    clean = _validated_meta(
        arch=meta["arch"],
        arch_kwargs=meta.get("arch_kwargs"),
        classes=meta["classes"],
        mean=meta["mean"],
        std=meta["std"],
        input_size=meta["input_size"],
    )
    net = reparameterize(copy.deepcopy(_unwrap(model)).float().cpu().eval())
    if getattr(net, "deploy", False):
        clean["arch_kwargs"]["deploy"] = True
    wrapped = _normalizing_wrapper(net, clean["mean"], clean["std"])
    h, w = clean["input_size"]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy exporter deprecation and tracer chatter
        # The TorchScript exporter needs no extra packages (the dynamo one needs onnxscript).
        torch.onnx.export(
            wrapped,
            (torch.rand(1, 3, h, w),),
            buffer,  # type: ignore[arg-type]  # torch annotates f as a path; the TorchScript exporter takes a file too
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name = "fakecifar"
    proto.doc_string = f"{clean['arch']} classifier; input float32 RGB in [0,1], NCHW"
    props = {
        "format": ONNX_FORMAT,
        "version": VERSION,
        **clean,
        "train": _without_timings(_plain(dict(meta.get("train") or {}))),
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    blob = proto.SerializeToString()
    return write_atomically(path, lambda fh: fh.write(blob))


TIMING_KEYS = frozenset({"images_per_s", "time_s", "elapsed_s"})


def _without_timings(obj: Any) -> Any:
    """Training metadata minus wall-clock figures: the same weights export to the same bytes."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _normalizing_wrapper(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """`model` applied to (x - mean) / std: the ONNX file then takes plain [0, 1] pixels."""
    import torch

    class Normalized(torch.nn.Module):
        mean: torch.Tensor  # buffers, declared so that type checkers know them
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.model((image - self.mean) / self.std)

    return Normalized().eval()


def _parse_onnx_meta(props: Mapping[str, str], path: Path) -> dict[str, Any]:
    def value(key: str) -> Any:
        raw = props[key]
        try:
            return json.loads(raw)
        except ValueError:
            return raw  # tolerate plain strings written by other tools

    if "classes" not in props:
        raise BadCheckpointError(
            f"{path}: ONNX model has no 'classes' metadata (not exported by fakecifar)",
            "export it with `fakecifar train` or fakecifar.checkpoint.export_onnx",
        )
    meta = {k: value(k) for k in _ONNX_META_KEYS if k in props}
    try:
        clean = _validated_meta(
            arch=meta.get("arch", "unknown"),
            arch_kwargs=meta.get("arch_kwargs"),
            classes=meta["classes"],
            mean=meta.get("mean", (0.0, 0.0, 0.0)),
            std=meta.get("std", (1.0, 1.0, 1.0)),
            input_size=meta.get("input_size", 32),
        )
    except (UsageError, TypeError, ValueError) as exc:
        raise BadCheckpointError(f"{path}: bad fakecifar metadata in ONNX model: {exc}", "re-export it") from exc
    return {
        "format": meta.get("format", ONNX_FORMAT),
        "version": meta.get("version", VERSION),
        **clean,
        "train": meta.get("train") or {},
        "path": str(path),
    }


def read_onnx_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a fakecifar ONNX model (arch, arch_kwargs, classes, mean, std, input_size, train)."""
    return load_onnx(path)[1]


def load_onnx(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A fakecifar ONNX model's graph (onnx's protobuf, weights included) and its metadata."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadCheckpointError(f"{path}: no such file")
    _refuse_non_model(path, onnx=True)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        _refuse_non_onnx(path)
        raise BadCheckpointError(
            f"{path}: not a readable ONNX model ({type(exc).__name__})", "the file is truncated, corrupt or not ONNX"
        ) from exc
    return proto, _parse_onnx_meta({p.key: p.value for p in proto.metadata_props}, path)


class OnnxClassifier:
    """A fakecifar ONNX model on onnxruntime (CPU): no torch needed.

    clf = OnnxClassifier("model.onnx")
    logits = clf.predict_logits(images)   # float32 [N, 3, H, W] in [0, 1]
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise BadCheckpointError(f"{self.path}: no such file")
        _refuse_non_model(self.path, onnx=True)
        self._threads = threads or os.cpu_count() or 1
        self._optimized = False
        try:
            self.session = self._open(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        except Exception as exc:
            _refuse_non_onnx(self.path)
            raise BadCheckpointError(
                f"{self.path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})",
                "the file is truncated, corrupt or not ONNX",
            ) from exc
        self.meta = _parse_onnx_meta(self.session.get_modelmeta().custom_metadata_map, self.path)
        inputs = [i.name for i in self.session.get_inputs()]
        if "image" not in inputs:
            raise BadCheckpointError(f"{self.path}: ONNX model has no input 'image' (inputs: {inputs})", "re-export it")
        self.classes: list[str] = self.meta["classes"]
        height, width = self.meta["input_size"]
        self.input_size: tuple[int, int] = (height, width)
        self.arch: str = self.meta["arch"]

    def _open(self, level: Any) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.log_severity_level = 3  # errors only: ort's warnings are not for our users
        options.graph_optimization_level = level
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def _optimize_for(self, n: int) -> None:
        """Graph optimization (fusions, folding the fp16 weights' casts) roughly halves a small
        model's per-image time but doubles the time to open it, which is most of a one-image
        `detect`: the model opens unoptimized and is reopened optimized, once, when a call
        brings enough images to repay it."""
        if self._optimized or n < _OPTIMIZE_FROM_IMAGES:
            return
        import onnxruntime as ort

        self.session = self._open(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self._optimized = True

    def predict_logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """float32 logits [N, K] for images float [N, 3, H, W] in [0, 1], in batches."""
        images = np.asarray(images)
        h, w = self.input_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise BadImageError(f"expected images as [N, 3, H, W], got shape {list(images.shape)}")
        if images.shape[2:] != (h, w):
            raise BadImageError(
                f"{self.path} takes {format_size((h, w))} images, got {format_size(images.shape[2:])}",
                "resize them first (fakecifar resize)",
            )
        if not np.issubdtype(images.dtype, np.floating):
            raise BadImageError(f"expected float images in [0, 1], got {images.dtype}", "divide uint8 pixels by 255")
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        self._optimize_for(len(images))
        out = [
            self.session.run(["logits"], {"image": np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)})[
                0
            ]
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out).astype(np.float32, copy=False)

    def predict_proba(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Softmax probabilities [N, K]."""
        logits = self.predict_logits(images, batch_size).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, arch={self.arch!r}, classes={len(self.classes)})"
