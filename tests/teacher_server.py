"""Test fixtures for teachers, shared by test_teachers.py, test_ledger.py and test_distill.py:
tiny real models saved as .pt/.th/.onnx, and `ProtocolServer`, a stdlib HTTP server that speaks
docs/serve.md with a real model behind it, keeps the per-key account the way the protocol says
(only a 200 with an answer is charged, exactly N images), and serves faults on demand (500,
HTML, 429 with Retry-After, garbage, wrong shapes, cut connections, slowness, late charges):
the failure modes of a real deployment are test fixtures. The happy path is also tested
against the real `fakecifar serve` (core/serve.py)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fakecifar.answers import Answers, answer, parse_mode
from fakecifar.checkpoint import export_onnx, save_checkpoint
from fakecifar.models import build_model
from fakecifar.teachers import (
    Teacher,
    open_teacher,
)

CLASSES = ["cat", "dog", "frog", "ship"]
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.22, 0.2)
SIZE = 16
MODES = ["logits", "probs", "probs:2", "topk:2", "label"]
FAST: dict[str, Any] = {"retries": 3, "backoff": 0.01, "timeout": 5.0}  # remote options that keep failing tests quick


def calibrated(name: str, num_classes: int, seed: int = 0) -> nn.Module:
    """A random model whose BN statistics come from data, so its answers vary between images."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, SIZE, SIZE) * 4 - 2)
    return model.eval()


def images(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


@dataclass
class Models:
    model: nn.Module  # the network, without normalization
    pt: Path
    onnx: Path
    th: Path  # a foreign state dict (DataParallel prefixes) of a 10-class model
    th_model: nn.Module


def build_models(root: Path) -> Models:
    """The victims: a 4-class resnet20 as .pt and .onnx, and a foreign 10-class .th."""
    model = calibrated("resnet20", len(CLASSES))
    pt = save_checkpoint(
        root / "victim.pt", model, arch="resnet20", classes=CLASSES, mean=MEAN, std=STD, input_size=SIZE
    )
    meta = {"arch": "resnet20", "classes": CLASSES, "mean": MEAN, "std": STD, "input_size": [SIZE, SIZE]}
    onnx = export_onnx(model, meta, root / "victim.onnx")
    th_model = calibrated("resnet20", 10, seed=1)
    th = root / "resnet20-foreign.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in th_model.state_dict().items()}, "best_prec1": 91.2}, th)
    return Models(model, pt, onnx, th, th_model)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("teachers"))


def reference_logits(model: nn.Module, x: np.ndarray, mean: Any = MEAN, std: Any = STD) -> np.ndarray:
    t = torch.from_numpy(x)
    t = (t - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(t).numpy()


def same_answers(a: Answers, b: Answers) -> None:
    assert str(a.mode) == str(b.mode)
    np.testing.assert_array_equal(a.labels, b.labels)
    if b.log_probs is None:
        assert a.log_probs is None
    else:
        assert a.log_probs is not None
        np.testing.assert_array_equal(a.log_probs, b.log_probs)
    if b.logits is not None:
        assert a.logits is not None
        np.testing.assert_array_equal(a.logits, b.logits)


# ----------------------------------------------------------------------------- the server


@dataclass
class ServerConfig:
    mode: str = "logits"
    max_batch: int = 64
    max_bytes: int = 16 << 20
    keys: dict[str, int | None] | None = None  # key -> budget (None: unlimited); None: open server
    faults: list[str] = field(default_factory=list)  # consumed one per /v1/predict request
    slow_seconds: float = 2.0
    retry_after: str = "0.2"


class ProtocolServer:
    """docs/serve.md on 127.0.0.1 with `teacher` (a local Teacher) answering. Faults, one per
    predict request: "500", "503html" (an HTML error page), "429" (with Retry-After), "html"
    (a 200 HTML page from a 'proxy': not charged), "garbage" (a 200 that is not JSON: not
    charged), "garbage-charged" (charged, then a body cut to garbage), "shape" (charged, answers
    of the wrong shape, usage included), "count" (charged, one answer short), "slow" (charged,
    then the answer comes after `slow_seconds`), "late" (`slow_seconds` of work, then charged
    and answered), "late500" (`slow_seconds` of work, then a 500), "reset" (the connection
    closed unanswered, not charged), "reset-charged" (charged, then the connection closed)."""

    def __init__(self, teacher: Teacher, config: ServerConfig | None = None):
        self.teacher = teacher
        self.config = config or ServerConfig()
        self.mode = parse_mode(self.config.mode)
        self.lock = threading.RLock()
        self.accounts: dict[str, dict[str, int]] = {}
        self.predict_requests = 0
        self.statuses: list[int] = []
        self.received: list[str] = []  # sha of every image in every predict request
        self.connections: list[socket.socket] = []
        handler = type("Handler", (_Handler,), {"srv": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ProtocolServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop as a dying server does: kept-alive connections are cut too."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> ProtocolServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def account(self, key: str = "anonymous") -> dict[str, int]:
        with self.lock:
            return dict(self.accounts.get(key, {"images": 0, "requests": 0}))

    def charged(self, key: str = "anonymous") -> int:
        return self.account(key)["images"]

    def usage(self, key: str) -> dict[str, Any]:
        acc = self.accounts.setdefault(key, {"images": 0, "requests": 0})
        budget = (self.config.keys or {}).get(key)
        remaining = None if budget is None else budget - acc["images"]
        return {"images": acc["images"], "requests": acc["requests"], "budget": budget, "remaining": remaining}


class _Handler(BaseHTTPRequestHandler):
    srv: ProtocolServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.srv.lock:
            self.srv.connections.append(self.connection)

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        with self.srv.lock:
            self.srv.statuses.append(status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _error(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        self._json(status, {"error": {"code": code, "message": message}}, headers)

    def _key(self) -> str | None:
        keys = self.srv.config.keys
        if keys is None:
            return "anonymous"
        auth = self.headers.get("Authorization") or ""
        key = auth[7:] if auth.startswith("Bearer ") else None
        return key if key in keys else None

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.srv
        if self.path == "/v1/health":
            t = srv.teacher
            self._json(
                200,
                {
                    "status": "ok",
                    "model": "resnet20",
                    "classes": t.classes,
                    "input_size": list(t.input_size),
                    "output": str(srv.mode),
                    "max_batch": srv.config.max_batch,
                    "max_bytes": srv.config.max_bytes,
                },
            )
        elif self.path == "/v1/usage":
            key = self._key()
            if key is None:
                self._error(401, "unauthorized", "missing or unknown key")
                return
            with srv.lock:
                usage = srv.usage(key)
            self._json(200, usage)
        else:
            self._error(404, "not_found", self.path)

    def do_POST(self) -> None:  # noqa: N802
        srv = self.srv
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path != "/v1/predict":
            self._error(404, "not_found", self.path)
            return
        key = self._key()
        if key is None:
            self._error(401, "unauthorized", "missing or unknown key")
            return
        try:
            spec = json.loads(raw)["images"]
            data = base64.b64decode(spec["data"], validate=True)
            if spec["dtype"] == "float32" and spec["layout"] == "NCHW":
                x = np.frombuffer(data, dtype="<f4").reshape(spec["shape"])
            elif spec["dtype"] == "uint8" and spec["layout"] == "NHWC":
                x = np.frombuffer(data, dtype=np.uint8).reshape(spec["shape"]).transpose(0, 3, 1, 2) / np.float32(255)
            else:
                raise ValueError("dtype/layout")
            if x.shape[1:] != (3, *srv.teacher.input_size) or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
                raise ValueError("shape or range")
        except (KeyError, ValueError, TypeError) as exc:
            self._error(400, "bad_images", str(exc))
            return
        n = len(x)
        if n > srv.config.max_batch:
            self._error(413, "too_large", f"{n} images > {srv.config.max_batch}")
            return
        import hashlib

        with srv.lock:
            srv.predict_requests += 1
            srv.received.extend(hashlib.sha256(img.tobytes()).hexdigest() for img in x)
            fault = srv.config.faults.pop(0) if srv.config.faults else None
        if fault == "500":
            self._error(500, "internal", "boom")
            return
        if fault == "503html":
            self._send(503, b"<html><head><title>503 Service Unavailable</title></head></html>", "text/html")
            return
        if fault == "429":
            self._error(429, "rate_limited", "slow down", {"Retry-After": srv.config.retry_after})
            return
        if fault == "html":
            self._send(200, b"<!DOCTYPE html><html><head><title>Portal login</title></head></html>", "text/html")
            return
        if fault == "garbage":
            self._send(200, b"}{ this is not json")
            return
        if fault == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in ("late", "late500"):  # a long computation, after which ...
            time.sleep(srv.config.slow_seconds)
            if fault == "late500":  # ... it fails: nothing charged
                self._error(500, "internal", "the model failed")
                return
            # ... it is charged, as a 200 is, though the client stopped waiting long ago
        with srv.lock:
            usage = srv.usage(key)
            if usage["remaining"] is not None and usage["remaining"] < n:
                self._error(402, "budget_exhausted", f"{n} images > {usage['remaining']} remaining")
                return
            acc = srv.accounts[key]
            acc["images"] += n  # only a 200 is charged, exactly N images
            acc["requests"] += 1
            usage = srv.usage(key)
        logits = srv.teacher._logits(np.ascontiguousarray(x, dtype=np.float32))  # type: ignore[attr-defined]
        body: dict[str, Any] = {"n": n, "output": str(srv.mode), **answer(logits, srv.mode), "usage": usage}
        if fault == "shape":
            body = {**body, **answer(np.concatenate([logits, logits[:, :1]], axis=1), srv.mode)}
        if fault == "count":
            body = {**body, **answer(logits[:-1], srv.mode), "n": n - 1}
        if fault == "garbage-charged":
            self._send(200, json.dumps(body).encode()[:-40])
            return
        if fault == "reset-charged":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "slow":
            time.sleep(srv.config.slow_seconds)
        try:
            self._json(200, body)
        except (BrokenPipeError, ConnectionResetError):
            pass


def serving(models: Models) -> Iterator[Callable[..., ProtocolServer]]:
    """`start(mode=..., faults=[...], keys=...)` starts a ProtocolServer over the .pt victim;
    all are stopped when the generator is closed (the body of the `serve` fixtures)."""
    started: list[ProtocolServer] = []
    local = open_teacher(models.pt, device="cpu")

    def start(**config: Any) -> ProtocolServer:
        srv = ProtocolServer(local, ServerConfig(**config)).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def serve(models: Models) -> Iterator[Callable[..., ProtocolServer]]:
    yield from serving(models)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def real_serve(models: Models) -> Iterator[Callable[..., Any]]:
    """`real_serve(mode=..., keys=..., rate=...)`: fakecifar.serve.QueryServer over the .pt victim."""
    from fakecifar.evaluate import load_classifier
    from fakecifar.serve import QueryServer, classifier_model

    model = classifier_model(load_classifier(models.pt, device="cpu"))
    started: list[Any] = []

    def start(**options: Any) -> Any:
        server = QueryServer(model, port=0, host="127.0.0.1", **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
