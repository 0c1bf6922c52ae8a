"""Teachers and victims behind one interface: a local torch model (`.pt`, or a foreign `.th` with
an `arch`; white-box), a local `.onnx` (black-box) or a remote `http(s)://` URL speaking the
`fakecifar serve` protocol (docs/serve.md; black-box).

    from fakecifar.teachers import open_teacher
    teacher = open_teacher("victim.pt", mode="probs:2")          # or "victim.onnx", "http://host:8000"
    answers = teacher.query(images)     # float32 [N, 3, H, W] in [0, 1] (numpy or torch CPU tensor)
    answers.log_probs, answers.labels   # fakecifar.answers.Answers, in the teacher's output mode
    teacher.module                      # torch teachers only: the nn.Module (eval, takes [0, 1])

Every teacher answers in an output mode (fakecifar.answers): a local teacher in mode M answers
exactly what `fakecifar serve` of the same model answers in mode M (`Answers.from_logits`; a
torch teacher opened with `fast=True` answers to within float rounding: TorchTeacher). A
remote teacher answers in the server's mode or in one derived from it (label from anything,
anything from logits, top-k or rounded probabilities from unrounded probabilities, top-k from a
wider top-k); asking for more than the server gives is a usage error.

`Teacher.query` counts nothing. Metered queries go through `fakecifar.ledger.QueryLedger.ask`,
which hands the teacher a `Meter`: the teacher reports every attempt it makes (and what it
costs, as far as it knows) and every figure of the server's account it sees; the ledger turns
those into exact counters. The rules (docs/teachers.md):

- a local teacher charges exactly the images it answers;
- a remote `200` with a usable answer is charged N images (the protocol's rule); every other
  status is free; a `200` whose body cannot be used is charged when it carries the server's
  `usage` (it came from the server) and *uncertain* otherwise (a proxy's page may never have
  reached the server); a connection refused is free; a cut connection is uncertain. A timeout
  is *late*: the server may still be computing the answer and charge it when done. Uncertain
  and late images count against the budget until a figure of the server's account (`usage`
  in a later `200`, or `GET /v1/usage`) shows what was charged; a late attempt the figures do
  not show charged stays pending until `charge_window` (2 x timeout) after it began.

A teacher file is loaded only through fakecifar.checkpoint's safe loaders
(`torch.load(weights_only=True)`): a pickle that would build Python objects (and could run
code) is refused before anything in it is executed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .answers import Answers, OutputMode, parse_mode
from .errors import BadImageError, FakecifarError, UsageError
from .text import format_classes, format_size

if TYPE_CHECKING:
    from torch import nn

    from .evaluate import Classifier

__all__ = [
    "ANSWERED",
    "CHARGED",
    "FREE",
    "LATE",
    "UNCERTAIN",
    "BadTeacherError",
    "BudgetExhausted",
    "Meter",
    "Teacher",
    "TeacherError",
    "as_batch",
    "concat_answers",
    "derivable",
    "image_keys",
    "open_teacher",
]

DEFAULT_TIMEOUT = 60.0  # seconds for one HTTP request, response included
DEFAULT_RETRIES = 5  # retries after the first attempt (connection errors, 429, 5xx, unusable 200s)
DEFAULT_BACKOFF = 0.5  # full-jitter exponential backoff base, seconds
DEFAULT_BATCH = 256  # images per attempt of a local teacher (one ledger transaction)
CACHE_PIXELS = 32 * 32 * 32  # a torch teacher's CPU forward pass: images x pixels per sub-batch
HEALTH_BYTES = 1 << 20  # size cap on /v1/health and /v1/usage responses

# What one attempt cost, as far as the teacher knows (see the module docstring).
ANSWERED = "answered"  # charged, and the answer is used
CHARGED = "charged"  # charged, but the answer could not be used (lost)
FREE = "free"  # not charged
UNCERTAIN = "uncertain"  # may or may not have been charged; the exchange is over (a figure settles it)
LATE = "late"  # the client stopped waiting (a timeout): the server may charge it later still


# ----------------------------------------------------------------------------- errors


class TeacherError(FakecifarError):
    """A teacher gave no usable answer: a remote one down, too slow, or answering garbage after
    every retry (exit 1). The message names the URL."""


class BadTeacherError(UsageError):
    """The teacher cannot be used as asked (exit 2): not a teacher, an output mode the server
    does not give, a key the server refuses, images of the wrong size."""


class BudgetExhausted(FakecifarError):
    """A query would exceed the budget (exit 1 if it reaches the CLI; distill stops cleanly on
    it). `source` is "ledger" (the run's --queries) or "server" (the key's budget, HTTP 402);
    nothing of the refused batch was sent (ledger) or charged (server)."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        source: str = "ledger",
        budget: int | None = None,
        spent: int | None = None,
        needed: int | None = None,
    ):
        super().__init__(message, hint)
        self.source, self.budget, self.spent, self.needed = source, budget, spent, needed


# ----------------------------------------------------------------------------- metering


class Meter:
    """What a teacher tells about its attempts. This base counts nothing (`Teacher.query`);
    the ledger's meter persists an intent before each attempt and the outcome after it."""

    def before_attempt(self, teacher: Teacher, n: int) -> None:
        """Called before `n` images are sent; may raise BudgetExhausted (nothing is sent)."""

    def after_attempt(self, n: int, outcome: str, figure: int | None = None) -> None:
        """`outcome` of that attempt (ANSWERED, CHARGED, FREE, UNCERTAIN, LATE); `figure`: the
        server's account (images charged to the key, this attempt included) if it said."""

    def figure(self, images: int) -> None:
        """A figure of the server's account seen outside an attempt (GET /v1/usage)."""


NO_METER = Meter()


# ----------------------------------------------------------------------------- images


def as_batch(images: Any, input_size: Sequence[int] | None, *, name: str = "teacher") -> np.ndarray:
    """float32 C-contiguous [N, 3, H, W] in [0, 1] from a numpy array or a torch tensor (any
    device: it is copied to the CPU); BadImageError for anything else. `input_size` None: any."""
    if hasattr(images, "detach") and hasattr(images, "cpu"):
        images = images.detach().cpu().numpy()
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[1] != 3:
        raise BadImageError(f"{name}: expected images as [N, 3, H, W], got shape {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise BadImageError(f"{name}: expected float images in [0, 1], got {array.dtype}", "divide uint8 pixels by 255")
    if input_size is not None and tuple(array.shape[2:]) != tuple(input_size):
        raise BadImageError(
            f"{name} takes {format_size(tuple(input_size))} images, got {format_size(array.shape[2:])}",
            "resize them first (fakecifar resize)",
        )
    array = np.ascontiguousarray(array, dtype=np.float32)
    # min and max are NaN when any value is, and +-inf fails the range: one test for all three
    if array.size and not (array.min() >= 0.0 and array.max() <= 1.0):
        raise BadImageError(f"{name}: images must be finite and in [0, 1]", "denormalize the batch first")
    return array


def image_keys(images: np.ndarray) -> list[bytes]:
    """sha256 of each image's exact float32 bytes: the key of the answer cache (hashed in
    place: each image of a C-contiguous float32 batch is one contiguous buffer)."""
    batch = np.ascontiguousarray(images, dtype=np.float32)
    sha256 = hashlib.sha256
    return [sha256(image.data).digest() for image in batch]


def concat_answers(parts: Sequence[Answers], mode: OutputMode, num_classes: int) -> Answers:
    """Answers of several batches (all in `mode`) as one."""
    if not parts:
        empty = np.zeros((0, num_classes), np.float32)
        soft = None if mode.kind == "label" else empty
        return Answers(mode, np.zeros(0, np.int64), soft, empty if mode.kind == "logits" else None)
    if len(parts) == 1:
        return parts[0]
    labels = np.concatenate([p.labels for p in parts])
    log_probs = None if parts[0].log_probs is None else np.concatenate([p.log_probs for p in parts])
    logits = None if parts[0].logits is None else np.concatenate([p.logits for p in parts])
    return Answers(mode, labels, log_probs, logits)


# ----------------------------------------------------------------------------- output modes


def derivable(server: OutputMode, wanted: OutputMode) -> bool:
    """Can a client asking `wanted` be answered from what a server in mode `server` sends?"""
    if wanted == server or wanted.kind == "label" or server.kind == "logits":
        return True
    if server.kind == "probs" and server.decimals is None:
        return wanted.kind in ("probs", "topk")
    if server.kind == "topk" and wanted.kind == "topk":
        return int(wanted.k or 1) <= int(server.k or 1)
    return False


def _derive(body: Mapping[str, Any], server: OutputMode, wanted: OutputMode, num_classes: int) -> Answers:
    """The answers in `wanted` from a (validated) body in the server's mode."""
    if wanted == server:
        return Answers.from_wire(body, wanted, num_classes)
    if server.kind == "logits":
        return Answers.from_logits(np.asarray(body["logits"], dtype=np.float32), wanted)
    if wanted.kind == "label":
        return Answers(wanted, Answers.from_wire(body, server, num_classes).labels, None)
    derived: dict[str, Any]
    if server.kind == "probs":
        probs = np.asarray(body["probs"], dtype=np.float64)
        if wanted.kind == "probs":
            rounded = probs if wanted.decimals is None else np.round(probs, wanted.decimals)
            derived = {"probs": rounded.astype(np.float32).tolist()}
        else:
            k = min(int(wanted.k or 1), num_classes)
            top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            derived = {"topk": {"indices": top.tolist(), "probs": np.take_along_axis(probs, top, axis=1).tolist()}}
    else:  # topk:K -> topk:k, k <= K
        k = min(int(wanted.k or 1), num_classes)
        derived = {
            "topk": {
                "indices": [r[:k] for r in body["topk"]["indices"]],
                "probs": [r[:k] for r in body["topk"]["probs"]],
            }
        }
    return Answers.from_wire(derived, wanted, num_classes)


# ----------------------------------------------------------------------------- the interface


class Teacher:
    """A model that answers queries in an output mode. Subclasses: TorchTeacher, OnnxTeacher,
    RemoteTeacher; make them with `open_teacher`."""

    kind: str = ""  # "torch" | "onnx" | "remote"
    white_box: bool = False
    server_metered: bool = False  # does a server keep its own account of what it charged?
    # Seconds after an attempt starts within which a server may still charge it (LATE attempts)
    charge_window: float = 0.0
    module: nn.Module | None = None  # torch teachers: the network, eval mode, normalization included

    def __init__(self, name: str, classes: Sequence[str], input_size: Sequence[int], mode: OutputMode, max_batch: int):
        self.name = name
        self.classes: list[str] = [str(c) for c in classes]
        self.input_size: tuple[int, int] = (int(input_size[0]), int(input_size[1]))
        self.mode = mode
        self.max_batch = max(1, int(max_batch))  # images per attempt (one forward pass / request)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        """JSON-able description for reports and the ledger (kind, path or URL, sha256, ...)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "white_box": self.white_box,
            "classes": self.classes,
            "input_size": list(self.input_size),
            "mode": str(self.mode),
        }

    def identity(self) -> dict[str, Any]:
        """What makes two opened teachers the same teacher (a ledger refuses another one). The
        output mode is not part of it: a ledger counts and caches per mode."""
        d = self.describe()
        return {k: d[k] for k in ("kind", "classes", "input_size")}

    def query(self, images: Any) -> Answers:
        """Answers for images float32 [N, 3, H, W] in [0, 1], unmetered (use a QueryLedger to
        meter, budget and cache)."""
        batch = as_batch(images, self.input_size, name=self.name)
        parts = [self.send(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return concat_answers(parts, self.mode, self.num_classes)

    def send(self, images: np.ndarray, meter: Meter = NO_METER) -> Answers:
        """One batch (validated by `as_batch`, at most `max_batch` images), reported to `meter`."""
        raise NotImplementedError

    def account(self) -> int | None:
        """The images the server has charged to this client's key (GET /v1/usage), or None
        when there is no server or it cannot say now. Local teachers: None."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, mode={str(self.mode)!r}, classes={self.num_classes})"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _LocalTeacher(Teacher):
    def __init__(self, clf: Classifier, mode: OutputMode, batch_size: int):
        super().__init__(str(clf.path), clf.classes, clf.input_size, mode, batch_size)
        self.path = Path(clf.path).resolve()
        self.sha256 = _sha256_file(self.path)
        self.arch = clf.arch
        self.clf = clf

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "sha256": self.sha256, "arch": self.arch}

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "sha256": self.sha256}

    def _logits(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def send(self, images: np.ndarray, meter: Meter = NO_METER) -> Answers:
        n = len(images)
        meter.before_attempt(self, n)
        try:
            answers = Answers.from_logits(self._logits(images), self.mode)
        except Exception:  # a failed forward pass charges nothing; Ctrl-C leaves the attempt open
            meter.after_attempt(n, FREE)
            raise
        meter.after_attempt(n, ANSWERED)
        return answers


class TorchTeacher(_LocalTeacher):
    """A `.pt`/`.th` on torch: white-box. `module` takes [0, 1] images (normalization inside).

    The forward pass is the one `fakecifar serve` makes (`torch.inference_mode`, NCHW, fp32):
    bit for bit the same answers. On a CPU it runs in sub-batches of `forward_batch` images
    (32 of 32x32; at least 16), split evenly, whose activations stay in the CPU's caches: ~1.8x
    faster for a resnet56 than one pass over 256 images, and the same numbers, bit for bit
    (a convolution's arithmetic for one image does not depend on how many share its pass, from
    a few images on: checked for the fakecifar architectures, batches of 4 to 256; only a lone
    image, or two or three through lenet5's linear layers, take other kernels, and a sub-batch is
    that small only when the whole batch is). `fast=True` answers from an inference copy instead: each
    BatchNorm folded into the convolution before it (torch.fx) and the weights NHWC, for
    oneDNN's channels-last kernels (`module` is made NHWC too, so white-box forwards get that
    part; its BatchNorms stay). Still fp32, but summed in another order: logits within ~1e-5 of
    the exact pass (resnet56 on the bench: max difference 4e-6, top-1 the same on 100% of 256
    images), so no longer bit-identical to `fakecifar serve`; the forward pass is ~1.2-1.6x
    faster on the bench CPU (AVX2, no fast bf16). The copy is checked against `module` on a
    probe batch when the teacher is opened; a model fx cannot trace, or whose folded copy
    answers otherwise, keeps `module` (NHWC) for its answers."""

    kind = "torch"
    white_box = True

    def __init__(self, clf: Classifier, mode: OutputMode, batch_size: int = DEFAULT_BATCH, *, fast: bool = False):
        import torch

        from .attacks import normalized

        super().__init__(clf, mode, batch_size)
        self.device = clf.device
        self.fast = bool(fast)
        module = normalized(clf.model, clf.meta["mean"], clf.meta["std"])
        if self.fast:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self._net = fold_batchnorm(module, self.input_size, self.device) if self.fast else module
        h, w = self.input_size
        on_cpu = torch.device(self.device).type == "cpu"
        self.forward_batch = max(16, CACHE_PIXELS // max(1, h * w)) if on_cpu else self.max_batch

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        return {**d, "fast": True} if self.fast else d

    def _logits(self, images: np.ndarray) -> np.ndarray:
        import torch

        assert self.module is not None
        self.module.eval()
        with torch.inference_mode():  # what `fakecifar serve` does; the same numbers as no_grad
            x = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)
            parts = -(-len(x) // self.forward_batch)  # even sub-batches: none much smaller than the rest
            out = [self._net(part) for part in torch.tensor_split(x, parts)] if parts > 1 else [self._net(x)]
            return torch.cat(out).float().cpu().numpy()


def fold_batchnorm(module: nn.Module, input_size: tuple[int, int], device: Any) -> nn.Module:
    """An inference copy of `module` (eval) with each BatchNorm folded into the convolution
    before it, NHWC; `module` itself when fx cannot trace it or the copy's answers on a probe
    batch differ from its own beyond float rounding (or in top-1)."""
    import torch
    from torch.fx.experimental.optimization import fuse

    module.eval()
    try:
        net = fuse(module).to(memory_format=torch.channels_last)  # a copy: `module` is untouched
    except Exception:  # noqa: BLE001 - fx refuses many models (data-dependent control flow): keep it
        return module
    probe = torch.rand((8, 3, *input_size), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        want, got = module(probe).float(), net(probe).float()
    scale = max(float(want.abs().max()), 1.0)
    close = want.shape == got.shape and float((want - got).abs().max()) <= 1e-4 * scale
    return net if close and torch.equal(want.argmax(1), got.argmax(1)) else module


class OnnxTeacher(_LocalTeacher):
    """An `.onnx` on onnxruntime: black-box (no gradients)."""

    kind = "onnx"

    def _logits(self, images: np.ndarray) -> np.ndarray:
        return self.clf.model.predict_logits(images, self.max_batch)


# ----------------------------------------------------------------------------- remote


class _Unfit(Exception):
    """A 200 whose body cannot be used; `figure` is the server's account if the body said it."""

    def __init__(self, message: str, figure: int | None = None):
        super().__init__(message)
        self.message, self.figure = message, figure


def _figure(usage: Any) -> int | None:
    if isinstance(usage, Mapping):
        images = usage.get("images")
        if isinstance(images, int) and not isinstance(images, bool) and images >= 0:
            return images
    return None


class RemoteTeacher(Teacher):
    """A `fakecifar serve` endpoint (or anything speaking docs/serve.md): black-box, metered by
    the server. Retries connection errors, timeouts, 429 (honouring Retry-After) and 5xx with
    full-jitter exponential backoff, and unusable 200s; then TeacherError naming the URL."""

    kind = "remote"
    server_metered = True

    def __init__(
        self,
        url: str,
        *,
        mode: str | OutputMode | None = None,
        api_key: Any = None,
        api_key_env: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_wait: float | None = None,
        rng: random.Random | None = None,
    ):
        import requests

        from . import __version__
        from .mine.adapters import Secret, redact_url
        from .mine.pacing import MAX_HONOURED_WAIT

        base = url.strip().rstrip("/")
        for suffix in ("/v1/predict", "/v1/health", "/v1/usage", "/v1"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        self.base = base
        self.url = redact_url(base)  # what messages, reports and the ledger show
        if api_key_env and api_key is None:
            value = os.environ.get(api_key_env)
            if not value:
                raise BadTeacherError(
                    f"the environment variable {api_key_env} (the teacher's API key) is not set",
                    f"export {api_key_env}=KEY",
                )
            api_key = value
        self._key = api_key if isinstance(api_key, Secret) or api_key is None else Secret(str(api_key))
        self._key_env = api_key_env
        if not timeout > 0 or retries < 0 or backoff < 0:
            raise UsageError("timeout must be positive, retries and backoff non-negative")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        # A server still computing when the client gave up charges when it finishes: allow it as
        # long again as the client waited before a figure may call the attempt free.
        self.charge_window = 2.0 * self.timeout
        self.max_wait = MAX_HONOURED_WAIT if max_wait is None else float(max_wait)
        self._rng = rng or random.Random()
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"fakecifar/{__version__} (teacher)"
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests made, health and usage included

        health = self._get_json("/v1/health", what="health", auth=False)
        self.health = health
        classes, size, server_mode, max_batch, max_bytes = self._read_health(health)
        self.server_mode = server_mode
        wanted = server_mode if mode is None else parse_mode(mode)
        if not derivable(server_mode, wanted):
            raise BadTeacherError(
                f"{self.url} answers {server_mode}; {wanted} cannot be derived from that",
                f"ask for {server_mode} or less (label always works), or serve the model with --output {wanted}",
            )
        self.max_bytes = max_bytes
        h, w = size
        per_image = 4 * ((3 * h * w * 4 + 2) // 3)  # base64 of one float32 image
        fit = (max_bytes - 512) // per_image
        if fit < 1:
            raise BadTeacherError(f"{self.url}: max_bytes {max_bytes:,} cannot hold one {format_size(size)} image")
        super().__init__(self.url, classes, size, wanted, min(max_batch, fit))
        self.model_name = str(health.get("model") or "?")

    # ---- description
    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url, "model": self.model_name, "server_output": str(self.server_mode)}

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "url": self.url, "model": self.model_name}

    # ---- HTTP
    def _headers(self, auth: bool = True) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key.reveal()}"} if auth and self._key else {}

    def _scrub(self, text: str) -> str:
        return self._key.scrub(text) if self._key else text

    def _fetch(self, method: str, path: str, payload: dict | None, max_bytes: int, auth: bool = True):
        from .mine.adapters import Request
        from .mine.transport import fetch

        with self._lock:
            self.requests += 1
        return fetch(
            self._session,
            Request(method, self.base + path, payload),
            self._headers(auth),
            timeout=self.timeout,
            max_bytes=max_bytes,
        )

    def _error_text(self, response: Any) -> str:
        from .mine.adapters import html_title, one_line

        if response.is_html():
            title = html_title(response.body)
            return f"an HTML page{f' ({title!r})' if title else ''} instead of JSON"
        try:
            payload = json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            return one_line(response.body[:200].decode("utf-8", "replace")) or "(empty body)"
        err = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(err, dict) and (err.get("message") or err.get("code")):
            return self._scrub(one_line(str(err.get("message") or err.get("code"))))
        return self._scrub(one_line(json.dumps(payload)[:200]))

    def _wait_for(self, attempt: int, hint: float | None, last: str) -> None:
        from .mine.pacing import backoff_delay

        if hint is not None and hint > self.max_wait:
            raise TeacherError(
                f"{self.url} asks to wait {hint:.0f} s before retrying ({last})", "stopping; rerun later (--resume)"
            )
        wait = hint + self._rng.uniform(0.0, 0.1 * min(self.backoff, 1.0)) if hint is not None else None
        time.sleep(wait if wait is not None else backoff_delay(attempt, self.backoff, rng=self._rng))

    def _get_json(self, path: str, *, what: str, auth: bool = True, retries: int | None = None) -> dict:
        """GET a small JSON object, retrying as `send` does; TeacherError naming the URL."""
        from .mine.adapters import RETRY_STATUSES
        from .mine.pacing import retry_after
        from .mine.transport import TransportError

        retries = self.retries if retries is None else retries
        hint = "is the server running (fakecifar serve MODEL)? check the URL"
        for attempt in range(retries + 1):
            wait: float | None = None
            try:
                response = self._fetch("GET", path, None, HEALTH_BYTES, auth)
            except TransportError as exc:
                last = exc.message
                if exc.fatal:
                    raise TeacherError(f"{self.url}: {last}", hint) from None
            else:
                if response.status == 200:
                    try:
                        body = json.loads(response.body)
                    except (ValueError, UnicodeDecodeError):
                        body = None
                    if isinstance(body, dict):
                        return body
                    last = f"{what}: {self._error_text(response)}"
                else:
                    last = f"{what}: HTTP {response.status}: {self._error_text(response)}"
                    if response.status in (401, 403):
                        raise self._auth_error(response)
                    if response.status not in RETRY_STATUSES:
                        raise TeacherError(
                            f"{self.url}{path}: {last}", "is the URL the base of a fakecifar serve endpoint?"
                        )
                    wait = retry_after(response.headers)
            if attempt < retries:
                self._wait_for(attempt, wait, last)
        raise TeacherError(f"{self.url}: no usable answer after {retries + 1} attempts ({last})", hint)

    def _auth_error(self, response: Any) -> BadTeacherError:
        where = f"the key in ${self._key_env}" if self._key_env else "the API key"
        return BadTeacherError(
            f"{self.url} refused the request: HTTP {response.status}: {self._error_text(response)}",
            f"check {where}" if self._key else "the server wants a key: pass it through an environment variable",
        )

    def _read_health(self, health: Mapping[str, Any]) -> tuple[list[str], tuple[int, int], OutputMode, int, int]:
        def bad(what: str) -> BadTeacherError:
            return BadTeacherError(
                f"{self.url}/v1/health: {what}", "is the URL a fakecifar serve endpoint (docs/serve.md)?"
            )

        classes = health.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise bad("no list of class names")
        size = health.get("input_size")
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise bad(f"input_size {size!r} is not [H, W]")
        try:
            server_mode = parse_mode(str(health.get("output")))
        except UsageError:
            raise bad(f"unknown output mode {health.get('output')!r}") from None
        max_batch, max_bytes = health.get("max_batch", 256), health.get("max_bytes", 16 << 20)
        if not isinstance(max_batch, int) or max_batch < 1 or not isinstance(max_bytes, int) or max_bytes < 1:
            raise bad("max_batch and max_bytes must be positive integers")
        return list(classes), (size[0], size[1]), server_mode, max_batch, max_bytes

    def _parse(self, response: Any, n: int) -> tuple[Answers, int | None]:
        """(answers, account figure) of a 200, or _Unfit."""
        if response.is_html():
            raise _Unfit(self._error_text(response))
        try:
            body = json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            raise _Unfit(f"a body that is not JSON ({self._error_text(response)!r})") from None
        if not isinstance(body, dict):
            raise _Unfit("JSON that is not an object")
        figure = _figure(body.get("usage"))
        output = body.get("output")
        if output is not None and str(output) != str(self.server_mode):
            raise _Unfit(f"answers in mode {output!r}, not the {self.server_mode} its health announced", figure)
        try:
            checked = Answers.from_wire(body, self.server_mode, self.num_classes)
            if len(checked) != n or body.get("n", n) != n:
                raise ValueError(f"{len(checked)} answers for {n} images")
            answers = _derive(body, self.server_mode, self.mode, self.num_classes)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise _Unfit(f"an answer that does not fit: {exc}", figure) from None
        return answers, figure

    def send(self, images: np.ndarray, meter: Meter = NO_METER) -> Answers:
        from .mine.adapters import RETRY_STATUSES
        from .mine.pacing import retry_after
        from .mine.transport import TransportError

        n = len(images)
        payload = {
            "images": {
                "dtype": "float32",
                "layout": "NCHW",
                "shape": list(images.shape),
                "data": base64.b64encode(np.ascontiguousarray(images, dtype="<f4").tobytes()).decode("ascii"),
            }
        }
        cap = (1 << 20) + n * self.num_classes * 64
        unresolved = False  # an uncertain attempt with no account figure after it
        last = ""
        for attempt in range(self.retries + 1):
            meter.before_attempt(self, n)
            wait: float | None = None
            try:
                response = self._fetch("POST", "/v1/predict", payload, cap)
            except TransportError as exc:
                refused = exc.reason == "connection" and any(
                    s in exc.message.lower() for s in ("refused", "name or service", "nodename", "no route")
                )
                reached = not (refused or exc.fatal or exc.reason == "bad_url")
                meter.after_attempt(n, (LATE if exc.reason == "timeout" else UNCERTAIN) if reached else FREE)
                unresolved = unresolved or reached
                last = self._scrub(exc.message)
                if exc.fatal or exc.reason == "too_large":
                    self._settle(meter, unresolved)
                    raise TeacherError(f"{self.url}: {last}", "check the URL") from None
            else:
                if response.status == 200:
                    try:
                        answers, figure = self._parse(response, n)
                    except _Unfit as bad:
                        charged = bad.figure is not None
                        meter.after_attempt(n, CHARGED if charged else UNCERTAIN, bad.figure)
                        unresolved = not charged  # a figure settles every attempt before it
                        last = f"HTTP 200 with {bad.message}"
                    else:
                        meter.after_attempt(n, ANSWERED, figure)
                        if unresolved and figure is None:
                            self._settle(meter, unresolved)
                        return answers
                else:
                    meter.after_attempt(n, FREE)
                    text = self._error_text(response)
                    last = f"HTTP {response.status}: {text}"
                    if response.status == 402:
                        self._settle(meter, unresolved)
                        raise BudgetExhausted(
                            f"{self.url}: the server's budget for this key is spent ({text})",
                            "ask the server's operator for more, or use another key",
                            source="server",
                            needed=n,
                        )
                    if response.status in (401, 403):
                        self._settle(meter, unresolved)
                        raise self._auth_error(response)
                    if response.status not in RETRY_STATUSES:
                        self._settle(meter, unresolved)
                        raise TeacherError(
                            f"{self.url}/v1/predict refused the request: {last}",
                            "a client/server mismatch: is the server a fakecifar serve of the same protocol?",
                        )
                    wait = retry_after(response.headers)
            if attempt < self.retries:
                try:
                    self._wait_for(attempt, wait, last)
                except TeacherError:
                    self._settle(meter, unresolved)
                    raise
        self._settle(meter, unresolved)
        raise TeacherError(
            f"{self.url}: no usable answer after {self.retries + 1} attempts (last: {last})",
            "is the server up and healthy? rerun later; the query ledger keeps what was answered",
        )

    def _settle(self, meter: Meter, unresolved: bool) -> None:
        """After a failed call with uncertain attempts: ask the server what it charged."""
        if unresolved:
            figure = self.account()
            if figure is not None:
                meter.figure(figure)

    def account(self) -> int | None:
        try:
            body = self._get_json("/v1/usage", what="usage", retries=1)
        except FakecifarError:
            return None
        return _figure(body)

    def close(self) -> None:
        self._session.close()


# ----------------------------------------------------------------------------- opening


def _is_url(spec: str) -> bool:
    return spec.lower().startswith(("http://", "https://"))


def open_teacher(
    spec: str | os.PathLike[str],
    *,
    mode: str | OutputMode | None = None,
    arch: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    api_key: Any = None,
    api_key_env: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    fast: bool = False,
) -> Teacher:
    """A teacher from a `.pt`/`.th` (torch; `arch` for foreign state dicts, "auto" to guess),
    an `.onnx` (onnxruntime) or an `http(s)://` URL of a `fakecifar serve` endpoint.

    `mode` (fakecifar.answers.parse_mode): local teachers default to logits; a remote one to the
    server's own mode, and a mode that cannot be derived from it is a BadTeacherError. The key
    of a remote teacher is `api_key` (a value; wrapped in a Secret, never logged) or read from
    the environment variable named `api_key_env`. `timeout` (seconds per request), `retries`
    and `backoff` (full-jitter base, seconds) apply to remote teachers. `fast`: torch teachers
    only, the faster pass (TorchTeacher: not bit-identical to `fakecifar serve`)."""
    text = os.fspath(spec)
    if _is_url(text):
        return RemoteTeacher(
            text,
            mode=mode,
            api_key=api_key,
            api_key_env=api_key_env,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
        )
    if "://" in text:
        raise BadTeacherError(f"teacher {text!r}: only http:// and https:// URLs are teachers", "or give a model file")
    if batch_size < 1:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    from .evaluate import load_classifier

    wanted = parse_mode(mode or "logits")
    clf = load_classifier(text, arch=arch, device=device, threads=threads)
    if not clf.classes:
        raise BadTeacherError(f"{text}: the model names no classes")
    if clf.onnx:
        return OnnxTeacher(clf, wanted, batch_size)
    return TorchTeacher(clf, wanted, batch_size, fast=fast)


def describe_line(teacher: Teacher) -> str:
    """One line for reports: 'resnet20 m.pt (torch, white-box, sha256 1a2b3c4d), logits, 3 classes'."""
    d = teacher.describe()
    where = d.get("url") or Path(str(d.get("path", teacher.name))).name
    extra = [d["kind"], "white-box" if d["white_box"] else "black-box"]
    if d.get("sha256"):
        extra.append(f"sha256 {d['sha256'][:12]}")
    if d.get("server_output") and d["server_output"] != d["mode"]:
        extra.append(f"server answers {d['server_output']}")
    return f"{where} ({', '.join(extra)}), mode {d['mode']}, {format_classes(d['classes'])}"
