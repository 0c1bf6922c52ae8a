"""A classifier behind a small HTTP JSON API (`fakecifar serve`): the protocol of docs/serve.md.

    from fakecifar.evaluate import load_classifier
    from fakecifar.serve import QueryServer, classifier_model

    model = classifier_model(load_classifier("m.pt"))
    with QueryServer(model, mode="label", port=0, rate=5) as server:   # listening on return
        ...                                    # POST f"{server.url}/v1/predict"
        print(server.accounts())               # {"anonymous": {"images": ..., ...}}

Standard library only (http.server). Each connection has its own thread, at most
`max_connections` of them (more are answered 503); the model runs under one lock, one request
at a time. `stop()` (or leaving the `with`) closes the idle connections, lets the requests
being answered finish, and joins every thread it started.

Accounting: one account per API key (or one anonymous account without keys). A request is
charged exactly its N images when it is answered 200, and only then; a budget is checked (and
the images reserved, so concurrent requests cannot overdraw it) before the model runs. With a
usage file, the accounts are written to it atomically after every charged request, before the
answer is sent.

Request parsing and validation are pure functions (`parse_predict`, `decode_images`,
`parse_keys`) raising `RequestError` (status, code, message) or UsageError. Nothing here prints.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from . import __version__
from .answers import OutputMode, answer, parse_mode
from .errors import FakecifarError, OutputError, UsageError
from .mine.pacing import TokenBucket
from .outputs import utc_now, write_atomically
from .text import format_size

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PORT",
    "USAGE_FORMAT",
    "ApiKey",
    "Model",
    "QueryServer",
    "RequestError",
    "RequestLog",
    "classifier_model",
    "decode_images",
    "encode_images",
    "parse_keys",
    "parse_predict",
    "read_keys",
    "serve",
    "to_model_input",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_IDLE_TIMEOUT = 30.0  # seconds a connection may sit idle (or stall mid-request)
USAGE_FORMAT = "fakecifar-serve-usage"
ANONYMOUS = "anonymous"
# The part of an oversized body read (and discarded) after its 413, so that the client, still
# sending, reads the answer instead of a connection reset.
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 2.0
LAYOUTS = {"uint8": "NHWC", "float32": "NCHW"}
ENDPOINTS = {"/v1/health": "GET", "/v1/predict": "POST", "/v1/usage": "GET"}


# ----------------------------------------------------------------------------- errors


class RequestError(Exception):
    """A request the server answers with an error: HTTP `status`, protocol `code`, a message
    for the client, extra `headers`; `close` ends the connection after the answer (its body
    was not read); `drain` bytes of that body are read and dropped first."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
        drain: int = 0,
    ):
        super().__init__(message)
        self.status, self.code, self.message = int(status), code, message
        self.headers = dict(headers or {})
        self.close = close or drain > 0
        self.drain = drain  # bytes of the unread body to discard after the answer


def _bad_images(message: str) -> RequestError:
    return RequestError(400, "bad_images", message)


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


# ----------------------------------------------------------------------------- the wire format


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [0, 1], as `fakecifar eval` feeds a model."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2), dtype=np.float32) * (1 / 255.0)


def encode_images(images: np.ndarray) -> dict[str, Any]:
    """The `images` object of a request for uint8 [N, H, W, 3] or float32 [N, 3, H, W] images."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        dtype = "uint8"
    elif images.dtype == np.float32:
        dtype = "float32"
    else:
        raise UsageError(f"images must be uint8 NHWC or float32 NCHW, got {images.dtype}")
    data = np.ascontiguousarray(images, dtype=images.dtype.newbyteorder("<")).tobytes()
    return {
        "dtype": dtype,
        "layout": LAYOUTS[dtype],
        "shape": [int(s) for s in images.shape],
        "data": base64.b64encode(data).decode("ascii"),
    }


def decode_images(spec: Any, *, input_size: Sequence[int], max_batch: int) -> np.ndarray:
    """The `images` object of a request -> float32 [N, 3, H, W] in [0, 1] for the model.

    RequestError 400 `bad_images` for a wrong dtype, layout, shape, image size, base64 or byte
    count, NaN/inf or values outside [0, 1]; 413 `too_large` for more than `max_batch` images."""
    if not isinstance(spec, Mapping):
        raise RequestError(400, "bad_json", "'images' must be an object with dtype, layout, shape and data")
    dtype, layout, shape, data = (spec.get(k) for k in ("dtype", "layout", "shape", "data"))
    if dtype not in LAYOUTS:
        raise _bad_images(f"dtype {_short(dtype)}: use uint8 (layout NHWC) or float32 (layout NCHW)")
    if layout != LAYOUTS[dtype]:
        raise _bad_images(f"layout {_short(layout)} with dtype {dtype}: use {LAYOUTS[dtype]}")
    axes = "[N, H, W, 3]" if layout == "NHWC" else "[N, 3, H, W]"
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    ):
        raise _bad_images(f"shape must be 4 integers {axes}, got {_short(shape)}")
    n, h, w, c = shape if layout == "NHWC" else (shape[0], shape[2], shape[3], shape[1])
    if n < 1:
        raise _bad_images(f"shape {shape}: N must be at least 1")
    if n > max_batch:
        raise RequestError(413, "too_large", f"{n} images in one request; max_batch is {max_batch}")
    if c != 3:
        raise _bad_images(f"shape {shape} ({layout}): images must have 3 channels (RGB), not {c}")
    if (h, w) != tuple(input_size):
        raise _bad_images(
            f"shape {shape} ({layout}): the images are {format_size((h, w))}, "
            f"the model takes {format_size(input_size)} (HxW)"
        )
    if not isinstance(data, str):
        raise _bad_images("data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:  # binascii.Error, or characters outside ASCII
        raise _bad_images("data is not base64 (standard alphabet, padding required, no line breaks)") from None
    itemsize = 1 if dtype == "uint8" else 4
    need = n * h * w * c * itemsize
    if len(raw) != need:
        raise _bad_images(f"data holds {len(raw)} bytes; shape {shape} of {dtype} needs {need}")
    if dtype == "uint8":
        return to_model_input(np.frombuffer(raw, dtype=np.uint8).reshape(shape))
    values = np.frombuffer(raw, dtype="<f4").reshape(shape)
    if not np.isfinite(values).all():
        raise _bad_images("the images hold NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise _bad_images(f"float32 values must be in [0, 1], these span [{low:.6g}, {high:.6g}]")
    return values.astype(np.float32)  # a native, writable copy


def parse_predict(body: bytes, *, input_size: Sequence[int], max_batch: int) -> np.ndarray:
    """A /v1/predict body -> float32 [N, 3, H, W] in [0, 1]; RequestError for a bad one.
    Fields other than `images` are ignored (room for later versions)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
        raise RequestError(400, "bad_json", "the body is not JSON") from None
    if not isinstance(obj, dict) or "images" not in obj:
        raise RequestError(400, "bad_json", "the body must be a JSON object with an 'images' field")
    return decode_images(obj["images"], input_size=input_size, max_batch=max_batch)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- keys and accounts


@dataclass(frozen=True)
class ApiKey:
    """One line of a keys file. `name` ("key 3": its line number) is what logs and the usage
    file show; the secret itself is never shown (not even by repr)."""

    secret: bytes = field(repr=False)
    name: str
    budget: int | None = None


def parse_keys(text: str, *, source: str = "keys file", default_budget: int | None = None) -> list[ApiKey]:
    """Keys, one a line: `KEY [BUDGET]`; `#` starts a comment, blank lines are skipped. A key
    without its own budget gets `default_budget` (None: unlimited). Errors name the line, never
    the key."""
    keys: list[ApiKey] = []
    seen: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{source}, line {number}"
        if len(fields) > 2:
            raise UsageError(f"{where}: {len(fields)} fields", "each line is KEY or KEY BUDGET")
        secret = fields[0]
        if not all(33 <= ord(ch) <= 126 for ch in secret):
            raise UsageError(f"{where}: the key has characters outside printable ASCII")
        budget = default_budget
        if len(fields) == 2:
            if not fields[1].isdigit() or not fields[1].isascii():
                raise UsageError(f"{where}: the budget is not a whole number of images", "e.g. KEY 20000")
            budget = int(fields[1])
        encoded = secret.encode("ascii")
        if encoded in seen:
            raise UsageError(f"{where}: the same key as line {seen[encoded]}", "each key once")
        seen[encoded] = number
        keys.append(ApiKey(encoded, f"key {number}", budget))
    if not keys:
        raise UsageError(f"{source}: no keys in it", "one key a line, optionally followed by its budget")
    return keys


def read_keys(path: str | os.PathLike[str], default_budget: int | None = None) -> list[ApiKey]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the keys file {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: the keys file is not UTF-8 text") from None
    return parse_keys(text, source=str(path), default_budget=default_budget)


@dataclass
class _Account:
    name: str
    budget: int | None
    bucket: TokenBucket | None
    images: int = 0
    requests: int = 0
    reserved: int = 0  # images of requests being answered right now

    def usage(self) -> dict[str, Any]:
        remaining = None if self.budget is None else max(0, self.budget - self.images)
        return {"images": self.images, "requests": self.requests, "budget": self.budget, "remaining": remaining}


# ----------------------------------------------------------------------------- the model


@dataclass
class Model:
    """What the server needs of a classifier: logits for float32 [N, 3, H, W] in [0, 1]."""

    predict_logits: Callable[[np.ndarray], np.ndarray]
    classes: list[str]
    input_size: tuple[int, int]
    name: str = "model"


def classifier_model(clf: Any) -> Model:
    """A Model for what `fakecifar.evaluate.load_classifier` returns (.pt, .th or .onnx)."""
    if clf.onnx:
        onnx = clf.model

        def predict(x: np.ndarray) -> np.ndarray:
            return onnx.predict_logits(x, batch_size=max(1, len(x)))

    else:
        import torch

        from .attacks import normalized

        net = normalized(clf.model, clf.meta["mean"], clf.meta["std"])
        device = clf.device

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return net(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return Model(predict, list(clf.classes), (int(clf.input_size[0]), int(clf.input_size[1])), clf.arch)


# ----------------------------------------------------------------------------- the server


@dataclass(frozen=True)
class RequestLog:
    """One answered request, for the caller's log (never the key: `account` is its name)."""

    client: str
    method: str
    path: str
    status: int
    code: str | None  # the error code, None on success
    account: str | None
    images: int  # charged (0 unless status 200 on /v1/predict)
    seconds: float


class QueryServer:
    """The HTTP server of docs/serve.md around `model`. `start()` listens (the port is known
    from then on: `url`), `stop()` shuts down cleanly; also a context manager.

    `mode`: an output mode (fakecifar.answers). `keys`: ApiKey list (None: open, one anonymous
    account). `budget`: the anonymous account's budget without keys (keys carry their own).
    `rate`: /v1/predict requests per second per account (a one-token TokenBucket: consecutive
    requests at least 1/rate s apart). `usage_file`: the accounts, rewritten atomically after
    every charged request. `on_request(RequestLog)` and `on_error(message)` are called from the
    request threads (keep them quick; they must not raise)."""

    def __init__(
        self,
        model: Model,
        *,
        mode: str | OutputMode = "probs",
        keys: Sequence[ApiKey] | None = None,
        budget: int | None = None,
        rate: float | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_bytes: int = DEFAULT_MAX_BYTES,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        usage_file: str | os.PathLike[str] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        on_request: Callable[[RequestLog], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ):
        self.model = model
        self.mode = parse_mode(mode)
        if max_batch < 1:
            raise UsageError(f"--max-batch must be at least 1, got {max_batch}")
        if max_bytes < 1024:
            raise UsageError(f"--max-bytes must be at least 1024, got {max_bytes}")
        if budget is not None and budget < 0:
            raise UsageError(f"--budget must be 0 or more images, got {budget}")
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise UsageError(f"--rate must be a positive number of requests per second, got {rate}")
        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be 0-65535, got {port}", "0 picks a free port")
        if max_connections < 1 or not idle_timeout > 0:
            raise UsageError("max_connections must be at least 1 and idle_timeout positive")
        self.max_batch, self.max_bytes, self.rate = int(max_batch), int(max_bytes), rate
        self.host, self.port = host, int(port)
        self.usage_file = Path(usage_file) if usage_file is not None else None
        self.max_connections, self.idle_timeout = int(max_connections), float(idle_timeout)
        self.on_request, self.on_error = on_request, on_error
        self._keys = list(keys) if keys else []
        if self._keys:
            self._accounts = {k.name: _Account(k.name, k.budget, self._bucket()) for k in self._keys}
        else:
            self._accounts = {ANONYMOUS: _Account(ANONYMOUS, budget, self._bucket())}
        self._lock = threading.Lock()  # accounts, connections, stopping
        self._model_lock = threading.Lock()  # one forward pass at a time
        self._file_lock = threading.Lock()  # one usage-file writer at a time
        self._connections: dict[socket.socket, bool] = {}  # socket -> answering a request now
        self._stopping = False
        self._stopped = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.started = ""

    def _bucket(self) -> TokenBucket | None:
        return TokenBucket(self.rate, margin=0.0) if self.rate is not None else None

    # --------------------------------------------------------------------- life cycle

    @property
    def url(self) -> str:
        """The base URL (http://HOST:PORT), the actual port once started."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> QueryServer:
        """Listen and serve from a background thread; returns once connections are accepted."""
        if self._httpd is not None:
            raise RuntimeError("the server was already started")
        kind = _HTTPServer6 if ":" in self.host else _HTTPServer
        try:
            httpd = kind((self.host, self.port), _Handler, self)
        except socket.gaierror as exc:
            raise UsageError(f"--host {self.host!r}: not an address here ({exc.strerror})") from exc
        except OSError as exc:
            hint = "choose another --port, or --port 0 for a free one"
            raise FakecifarError(f"cannot listen on {self.url}: {exc.strerror or exc}", hint) from exc
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self.started = utc_now()
        try:
            self._write_usage()
        except BaseException:
            httpd.server_close()
            raise
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="fakecifar-serve", daemon=False
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop: refuse new requests, close idle connections, finish the requests in flight,
        join every thread, write the usage file a last time. Idempotent."""
        httpd = self._httpd
        if httpd is None or self._stopped.is_set():
            return
        with self._lock:
            self._stopping = True
            idle = [conn for conn, busy in self._connections.items() if not busy]
        for conn in idle:  # a thread waiting for a request (or mid-upload) wakes up and ends
            _shutdown_socket(conn)
        httpd.shutdown()  # the accept loop ends
        if self._thread is not None:
            self._thread.join()
        httpd.server_close()  # closes the listening socket and joins the connection threads
        self._stopped.set()
        try:
            self._write_usage()
        except FakecifarError as exc:
            self._report(f"usage file: {exc}")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped (True) or `timeout` seconds passed (False). Waits in short
        slices so the main thread still sees signals (Ctrl-C, SIGTERM) at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopped.is_set():
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                return False
            self._stopped.wait(left)
        return True

    def __enter__(self) -> QueryServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------------- accounts

    def accounts(self) -> dict[str, dict[str, Any]]:
        """Every account's usage: {name: {images, requests, budget, remaining}}."""
        with self._lock:
            return {name: a.usage() for name, a in self._accounts.items()}

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {
                "images": sum(a.images for a in self._accounts.values()),
                "requests": sum(a.requests for a in self._accounts.values()),
            }

    def usage_document(self) -> dict[str, Any]:
        """What the usage file holds."""
        return {
            "format": USAGE_FORMAT,
            "version": 1,
            "model": self.model.name,
            "output": str(self.mode),
            "url": self.url,
            "started": self.started,
            "updated": utc_now(),
            "total": self.totals(),
            "accounts": self.accounts(),
        }

    def _write_usage(self) -> None:
        if self.usage_file is None:
            return
        with self._file_lock:  # the snapshot is taken inside: a later write never holds older counts
            data = (json.dumps(self.usage_document(), indent=1) + "\n").encode()
            try:
                write_atomically(self.usage_file, lambda fh: fh.write(data))
            except OSError as exc:
                raise OutputError(f"cannot write the usage file {self.usage_file}: {exc.strerror or exc}") from exc

    def _authenticate(self, header: str | None) -> _Account:
        if not self._keys:
            return self._accounts[ANONYMOUS]
        unauthorized = {"WWW-Authenticate": 'Bearer realm="fakecifar"'}
        scheme, _, token = (header or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise RequestError(401, "unauthorized", "send a key: Authorization: Bearer KEY", headers=unauthorized)
        given = token.encode("latin-1", errors="replace")
        found = None
        for key in self._keys:  # compare with every key, in constant time: no early exit
            if hmac.compare_digest(key.secret, given) and found is None:
                found = key
        if found is None:
            raise RequestError(401, "unauthorized", "unknown key", headers=unauthorized)
        return self._accounts[found.name]

    def _reserve(self, account: _Account, n: int) -> None:
        with self._lock:
            if account.budget is not None:
                left = account.budget - account.images - account.reserved
                if n > left:
                    raise RequestError(
                        402,
                        "budget_exhausted",
                        f"{n} images asked, {max(0, left)} left of a budget of {account.budget}; nothing was charged",
                    )
            account.reserved += n

    def _release(self, account: _Account, n: int, *, charge: bool) -> dict[str, Any]:
        with self._lock:
            account.reserved -= n
            if charge:
                account.images += n
                account.requests += 1
            return account.usage()

    def _report(self, message: str) -> None:
        if self.on_error is not None:
            self.on_error(message)

    # --------------------------------------------------------------------- connections

    def _admit(self, conn: socket.socket) -> bool:
        with self._lock:
            if self._stopping or len(self._connections) >= self.max_connections:
                return False
            self._connections[conn] = False
            return True

    def _forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)

    def _begin(self, conn: socket.socket) -> bool:
        """A request was read: it is in flight now (False: the server is stopping)."""
        with self._lock:
            if self._stopping or conn not in self._connections:
                return False
            self._connections[conn] = True
            return True

    def _end(self, conn: socket.socket) -> None:
        with self._lock:
            if conn in self._connections:
                self._connections[conn] = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    # --------------------------------------------------------------------- endpoints

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model.name,
            "classes": list(self.model.classes),
            "input_size": list(self.model.input_size),
            "output": str(self.mode),
            "max_batch": self.max_batch,
            "max_bytes": self.max_bytes,
            "rate": self.rate,
            "keys": bool(self._keys),
        }

    def _predict(self, account: _Account, body: bytes) -> tuple[dict[str, Any], int]:
        if account.bucket is not None:
            wait = account.bucket.try_take()
            if wait > 0:
                raise RequestError(
                    429,
                    "rate_limited",
                    f"more than {self.rate:g} requests per second; retry in {wait:.3f} s",
                    headers={
                        "Retry-After": str(max(1, math.ceil(wait))),
                        "Retry-After-Ms": str(math.ceil(wait * 1000)),
                    },
                )
        x = parse_predict(body, input_size=self.model.input_size, max_batch=self.max_batch)
        n = len(x)
        self._reserve(account, n)
        charged = False
        try:
            with self._model_lock:
                logits = np.asarray(self.model.predict_logits(x), dtype=np.float32)
            if logits.shape != (n, len(self.model.classes)):
                raise RuntimeError(f"the model answered shape {list(logits.shape)} for {n} images")
            if not np.isfinite(logits).all():
                raise RequestError(500, "internal", "the model's outputs are NaN or infinite; nothing was charged")
            fields = answer(logits, self.mode)
            usage = self._release(account, n, charge=True)
            charged = True
        finally:
            if not charged:
                self._release(account, n, charge=False)
        try:
            self._write_usage()
        except FakecifarError as exc:  # the answer stands; the in-memory count is exact
            self._report(str(exc))
        return {"n": n, "output": str(self.mode), **fields, "usage": usage}, n


@contextmanager
def serve(model: Model, **options: Any) -> Iterator[QueryServer]:
    """`with serve(model, port=0) as server:` a started QueryServer, stopped on the way out."""
    server = QueryServer(model, **options).start()
    try:
        yield server
    finally:
        server.stop()


def _shutdown_socket(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# ----------------------------------------------------------------------------- http.server glue


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # threads are joined by server_close (block_on_close): none leaks
    block_on_close = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: QueryServer):
        self.owner = owner
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn): slow where DNS is not there.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.owner._admit(request):
            self._refuse(request)
            return
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket) -> None:
        """503 on a connection beyond max_connections (or arriving while stopping)."""
        why = "the server is stopping" if self.owner.stopping else "too many connections; retry later"
        body = json.dumps(error_body("unavailable", why)).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass
        TCPServer.shutdown_request(self, request)

    def shutdown_request(self, request: Any) -> None:
        self.owner._forget(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client that went away
            return
        self.owner._report(f"internal error in a connection: {type(exc).__name__}: {exc}")


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _ClientGone(Exception):
    """The client closed the connection (or stalled past the idle timeout) mid-request."""


_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    411: "length_required",
    413: "too_large",
    414: "too_large",
    431: "too_large",
    501: "not_implemented",
    505: "bad_request",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client sends many requests on one connection
    server: _HTTPServer

    def version_string(self) -> str:
        return f"fakecifar-serve/{__version__}"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.owner.idle_timeout)  # idle or stalled: closed
        # Headers and body go out as two writes: without this, Nagle's algorithm holds the
        # body until the client's delayed ACK (40 ms a request on a kept-alive connection).
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # our one line per request goes through on_request

    # The protocol's methods, and 405 for the other common ones.
    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line or headers, an unknown method) in
        the protocol's JSON."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        if self.request_version == "HTTP/0.9":  # a request line too broken to have a version
            self.request_version = "HTTP/1.0"  # still gets a status line and headers
        self._send(code, error_body(_ERROR_CODES.get(code, "bad_request"), message or phrase), close=True)

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue`: an oversized body is refused before the client sends it."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        limit = self.server.owner.max_bytes
        if length > limit:
            self._send(413, error_body("too_large", _too_many_bytes(length, limit)), close=True)
            return False
        return super().handle_expect_100()

    # ----------------------------------------------------------------- one request

    def _dispatch(self) -> None:
        owner = self.server.owner
        start = time.perf_counter()
        path = urlsplit(self.path).path
        account: str | None = None
        images = 0
        in_flight = False
        try:
            try:
                body = self._read_body(required=self.command == "POST")
                in_flight = owner._begin(self.request)
                if not in_flight:
                    raise RequestError(503, "unavailable", "the server is stopping", close=True)
                payload, account, images = self._answer(path, body)
                error = None
            except RequestError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - a bug answers 500 and the server goes on
                owner._report(f"internal error on {self.command} {_short(path)}: {type(exc).__name__}: {exc}")
                error = RequestError(500, "internal", f"{type(exc).__name__}: {exc}")
            if error is None:
                self._send(200, payload)
            else:
                self._send(error.status, error_body(error.code, error.message), error.headers, close=error.close)
                if error.drain:
                    self._drain(error.drain)
            status, code = (200, None) if error is None else (error.status, error.code)
        except (_ClientGone, OSError):  # it hung up (or stalled): nobody to answer
            status, code = 499, "client_gone"
            self.close_connection = True
        finally:
            if in_flight:
                owner._end(self.request)
            if owner.stopping:
                self.close_connection = True
        if owner.on_request is not None:
            client = str(self.client_address[0]) if self.client_address else "?"
            elapsed = time.perf_counter() - start
            owner.on_request(RequestLog(client, str(self.command), path, status, code, account, images, elapsed))

    def _answer(self, path: str, body: bytes) -> tuple[dict[str, Any], str | None, int]:
        """(200 body, account name, images charged) or RequestError."""
        owner = self.server.owner
        expected = ENDPOINTS.get(path)
        if expected is None:
            raise RequestError(404, "not_found", f"no endpoint {_short(path)}; see GET /v1/health")
        if self.command != expected:
            raise RequestError(405, "method_not_allowed", f"{path} takes {expected}", headers={"Allow": expected})
        if path == "/v1/health":
            return owner.health(), None, 0
        account = owner._authenticate(self.headers.get("Authorization"))
        if path == "/v1/usage":
            with owner._lock:
                return account.usage(), account.name, 0
        payload, images = owner._predict(account, body)
        return payload, account.name, images

    def _read_body(self, *, required: bool) -> bytes:
        limit = self.server.owner.max_bytes
        if self.headers.get("Transfer-Encoding") is not None:
            raise RequestError(
                411, "length_required", "chunked bodies are not accepted: send Content-Length", close=True
            )
        values = self.headers.get_all("Content-Length") or []
        if not values:
            if required:
                raise RequestError(411, "length_required", "send the body with a Content-Length header", close=True)
            return b""
        text = values[0].strip()
        if len(set(values)) > 1 or not (text.isdigit() and text.isascii()):
            raise RequestError(400, "bad_request", "Content-Length is not one whole number", close=True)
        length = int(text)
        if length > limit:
            raise RequestError(413, "too_large", _too_many_bytes(length, limit), drain=length)
        try:
            data = self.rfile.read(length)
        except OSError as exc:  # a timeout, or the connection reset
            raise _ClientGone() from exc
        if len(data) != length:
            raise _ClientGone()
        return data

    def _send(
        self, status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None, *, close: bool = False
    ) -> None:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close or self.server.owner.stopping:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _drain(self, length: int) -> None:
        """Read and drop (part of) a refused body, so the client gets to read its 413."""
        deadline = time.monotonic() + DRAIN_SECONDS
        left = min(length, DRAIN_BYTES)
        try:
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass


def _too_many_bytes(length: int, limit: int) -> str:
    return f"the body is {length} bytes; max_bytes is {limit}"
