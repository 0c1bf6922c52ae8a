"""A loopback text-to-image server for testing and benchmarking `fakecifar mine`.

It speaks the four protocols as the real services do (request validation included, so a
client that sends the wrong fields gets a 400 as it would in production):

    craiyon  POST /generate                {"prompt"} -> {"images": [base64 with newlines]} x9
    a1111    POST /sdapi/v1/txt2img        -> {"images", "parameters", "info": "<JSON string>"}
    openai   POST /v1/images/generations   -> {"created", "data": [{"b64_json"}]}, Bearer key,
                                              x-ratelimit-* headers, OpenAI error objects
    hf       POST /models/<owner>/<name>   -> raw PNG bytes; 503 {"estimated_time"} while loading

Knobs (all mutable while it runs): latency, images per call, image size and format, a hard
rate limit (429 above it, with or without Retry-After: a token bucket with a second of burst,
or a strict sliding window of 1 s), an API key, and a list
of faults consumed one per request: "500" "502" "503" "504" "524" "408" "429" "429-nora"
"html403" "html503" "html200" "truncated" "slow" "reset" "badb64" "allbad" "badjson" "empty"
"quota" "401" "400" "loading" "huge". Every image it serves successfully is unique (unless
asked for duplicates) and its pixel sha256 is recorded, so a client can be checked for lost
and duplicated images.

Standalone (used by bench/bench_mine.py):
    python tests/mine_server.py --api craiyon --latency 2 --images 9 --rate-limit 5 [--limiter window]
prints its base URL on stdout; GET /_stats returns the counters as JSON.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

CLOUDFLARE_HTML = b"""<!DOCTYPE html>
<html lang="en-US"><head><title>Attention Required! | Cloudflare</title></head>
<body><h1>Sorry, you have been blocked</h1><p>You are unable to access craiyon.com</p>
<p>Cloudflare Ray ID: 7d1f2a3b4c5d6e7f</p></body></html>
"""
WEBUI_HTML = b"<!DOCTYPE html><html><head><title>Stable Diffusion</title></head><body>gradio</body></html>"


@dataclass
class ServerConfig:
    api: str = "craiyon"
    latency: float = 0.0
    images: int | None = None  # per call; None: the protocol's (craiyon 9, a1111 batch_size, openai n, hf 1)
    size: int = 16  # side of the images when the request does not say
    alt_size: int | None = None  # craiyon: every second call answers images of this side instead
    fmt: str | None = None  # jpeg | png | webp; None: craiyon jpeg, others png
    rate_limit: float | None = None  # requests/s (see limiter)
    # "bucket": token bucket with a burst of max(1, rate); "window": at most rate_limit requests
    # in any 1 s sliding window (those that arrived after now - 1 s), the strictest common kind
    limiter: str = "bucket"
    retry_after: str | None = None  # Retry-After value on rate-limit 429s (None: no header)
    retry_after_ms: str | None = None  # retry-after-ms value (OpenAI style)
    api_key: str | None = None  # required Bearer key (openai/hf); a1111 takes "user:pass" as Basic
    faults: list[str] = field(default_factory=list)
    slow_seconds: float = 2.0
    duplicates: bool = False  # every second image repeats the one before, pixel for pixel
    near_duplicates: bool = False  # every second image is the one before plus slight noise
    grid: bool = True  # a1111: a grid image first when the batch has several images
    model: str = "v1-5-pruned-emaonly"


class _Bucket:
    def __init__(self, rate: float):
        self.rate, self.burst = rate, max(1.0, rate)
        self.tokens, self.last = self.burst, time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False


class SlidingWindow:
    """At most `limit` accepted requests with an arrival time in (now - window, now]: a
    sliding log, as strict gateways keep one. Refused requests do not count against it."""

    def __init__(self, rate: float, window: float = 1.0):
        if rate * window < 1 or rate * window != int(rate * window):
            raise ValueError(f"a sliding window needs a whole number of requests per window, got {rate * window}")
        self.rate, self.window, self.limit = rate, window, int(rate * window)
        self.accepted: deque[float] = deque()
        self.lock = threading.Lock()

    def take(self, now: float | None = None) -> bool:
        with self.lock:
            now = time.monotonic() if now is None else now
            while self.accepted and self.accepted[0] <= now - self.window:
                self.accepted.popleft()
            if len(self.accepted) >= self.limit:
                return False
            self.accepted.append(now)
            return True


def _limiter(kind: str, rate: float | None):
    if not rate:
        return None
    if kind == "bucket":
        return _Bucket(rate)
    if kind == "window":
        return SlidingWindow(rate)
    raise ValueError(f"unknown limiter {kind!r}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many clients connect at once when a run starts

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # a client hanging up is no news


class MineServer:
    """`with MineServer(ServerConfig(api="openai")) as srv: srv.url ...`"""

    def __init__(self, config: ServerConfig | None = None, port: int = 0):
        self.config = config or ServerConfig()
        self.lock = threading.Lock()
        self.requests = 0
        self.by_status: dict[int, int] = {}
        self.faults_served: list[str] = []
        self.bodies: list[dict] = []  # the JSON bodies received (by the generation endpoint)
        self.auth: list[str | None] = []
        self.served: list[str] = []  # hex sha256 of the pixels of every image served with a 2xx
        self.image_counter = 0
        self.calls = 0  # generation calls answered normally
        self.ok_times: list[float] = []  # when each successful answer was sent (monotonic)
        self.arrivals: list[float] = []  # when each generation request arrived (monotonic), 429s included
        self._rate_limiter = _limiter(self.config.limiter, self.config.rate_limit)
        handler = type("Handler", (_Handler,), {"srv": self})
        self.httpd = _Server(("127.0.0.1", port), handler)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def set_rate_limit(self, rate: float | None, limiter: str | None = None) -> None:
        self.config.rate_limit = rate
        self.config.limiter = limiter or self.config.limiter
        self._rate_limiter = _limiter(self.config.limiter, rate)

    def start(self) -> MineServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> MineServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict:
        with self.lock:
            return {
                "requests": self.requests,
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "served": len(self.served),
                "served_unique": len(set(self.served)),
                "faults": list(self.faults_served),
                "served_sha": list(self.served),
                "ok_times": list(self.ok_times),
                "arrivals": list(self.arrivals),
            }

    # ------------------------------------------------------------------ images

    def _next_fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            self.arrivals.append(time.monotonic())
            fault = self.config.faults.pop(0) if self.config.faults else None
            if fault:
                self.faults_served.append(fault)
            return fault

    def make_images(self, n: int, height: int, width: int, fmt: str) -> list[tuple[bytes, str]]:
        """n unique images, encoded, with the sha256 of the pixels a decoder will see."""
        cfg = self.config
        out = []
        with self.lock:
            first = self.image_counter
            self.image_counter += n
        for k in range(first, first + n):
            if cfg.duplicates or cfg.near_duplicates:
                rng = np.random.default_rng(k // 2)
                small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                img = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
                if cfg.near_duplicates and k % 2:
                    noise = np.random.default_rng(10**9 + k).integers(-2, 3, img.shape)
                    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            else:
                img = np.random.default_rng(k).integers(0, 256, (height, width, 3), dtype=np.uint8)
            buf = io.BytesIO()
            pil = Image.fromarray(img)
            if fmt == "jpeg":
                pil.save(buf, "JPEG", quality=90)
            elif fmt == "webp":
                pil.save(buf, "WEBP", lossless=True)
            else:
                pil.save(buf, "PNG")
            data = buf.getvalue()
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            out.append((data, hashlib.sha256(pixels.tobytes()).hexdigest()))
        return out

    def record_served(self, shas: list[str]) -> None:
        now = time.monotonic()
        with self.lock:
            self.served.extend(shas)
            self.ok_times.append(now)


class _Handler(BaseHTTPRequestHandler):
    srv: MineServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    # ------------------------------------------------------------------ plumbing

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        with self.srv.lock:
            self.srv.by_status[status] = self.srv.by_status.get(status, 0) + 1
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", f"req_{random.getrandbits(48):012x}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        api = self.srv.config.api
        obj: dict[str, object]
        if api == "openai":
            obj = {"error": {"message": message, "type": code or "invalid_request_error", "param": None, "code": code}}
        elif api == "a1111":
            obj = {"error": "HTTPException", "detail": message, "body": "", "errors": ""}
        else:
            obj = {"error": message}
        self._json(status, obj, headers)

    def do_GET(self):  # noqa: N802
        if self.path == "/_stats":
            self._json(200, self.srv.stats())
        else:
            self._send(404, b'{"detail":"Not Found"}')

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        cfg = self.srv.config
        fault = self.srv._next_fault()
        self._fault_now = fault  # for the faults that alter a normal answer (badb64, allbad)
        if self.srv._rate_limiter is not None and not fault and not self.srv._rate_limiter.take():
            headers = {}
            if cfg.retry_after is not None:
                headers["Retry-After"] = cfg.retry_after
            if cfg.retry_after_ms is not None:
                headers["retry-after-ms"] = cfg.retry_after_ms
            if cfg.api == "openai":
                headers.update(
                    {
                        "x-ratelimit-limit-requests": "60",
                        "x-ratelimit-remaining-requests": "0",
                        "x-ratelimit-reset-requests": "20ms",
                    }
                )
            self._error(429, "Rate limit reached for requests", "rate_limit_exceeded", headers)
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._error(400, "request body is not JSON")
            return
        route = {"craiyon": "/generate", "a1111": "/sdapi/v1/txt2img", "openai": "/v1/images/generations"}.get(cfg.api)
        if cfg.api == "hf":
            if not self.path.startswith("/models/") or len(self.path.split("/")) < 4:
                self._json(404, {"error": "Model not found"})
                return
        elif self.path != route:
            self._json(404, {"detail": "Not Found"})
            return
        with self.srv.lock:
            self.srv.bodies.append(body if isinstance(body, dict) else {"_raw": body})
            self.srv.auth.append(self.headers.get("Authorization"))
        if cfg.latency:
            time.sleep(cfg.latency)
        if fault and self._fault(fault):
            return
        if cfg.api_key is not None and not self._authorized():
            return
        getattr(self, f"_api_{cfg.api}")(body)

    def _authorized(self) -> bool:
        cfg = self.srv.config
        given = self.headers.get("Authorization") or ""
        if cfg.api == "a1111":
            expected = "Basic " + base64.b64encode((cfg.api_key or "").encode()).decode()
        else:
            expected = f"Bearer {cfg.api_key}"
        if given == expected:
            return True
        # Like some real servers, echo what was sent: the client must scrub it.
        self._error(401, f"Incorrect API key provided: {given.removeprefix('Bearer ')}.", "invalid_api_key")
        return False

    def _fault(self, fault: str) -> bool:
        """Serve a fault; False for faults that alter a normal answer instead (badb64...)."""
        cfg = self.srv.config
        if fault in ("500", "502", "503", "504", "524", "408"):
            self._error(int(fault), f"simulated HTTP {fault}")
        elif fault == "429":
            headers = {"Retry-After": cfg.retry_after or "0"}
            self._error(429, "Too many requests", "rate_limit_exceeded", headers)
        elif fault == "429-nora":
            self._error(429, "Too many requests", "rate_limit_exceeded")
        elif fault in ("html403", "html503"):
            self._send(
                int(fault[4:]),
                CLOUDFLARE_HTML,
                "text/html; charset=UTF-8",
                {"Server": "cloudflare", "CF-RAY": "7d1f2a3b4c5d6e7f-FRA"},
            )
        elif fault == "html200":
            self._send(200, WEBUI_HTML, "text/html; charset=utf-8")
        elif fault == "badjson":
            self._send(200, b'{"images": ["abc', "application/json")
        elif fault == "quota":
            self._error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
            )
        elif fault == "401":
            self._error(401, "Invalid authentication", "invalid_api_key")
        elif fault == "400":
            self._error(400, "Invalid value for 'size'", "invalid_value")
        elif fault == "loading":
            self._json(503, {"error": "Model is currently loading", "estimated_time": 0.05})
        elif fault == "truncated":
            body = json.dumps({"images": ["A" * 4000]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body) + 5000))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif fault == "reset":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif fault == "slow":
            body = b" " * 4096 + b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            step = cfg.slow_seconds / 40
            try:
                for i in range(40):
                    self.wfile.write(body[i * 100 : (i + 1) * 100])
                    self.wfile.flush()
                    time.sleep(step)
                self.wfile.write(body[4000:])
            except OSError:
                pass
            self.close_connection = True
        elif fault == "empty":
            self._json(200, {"images": [], "data": []})
        elif fault == "huge":
            self._send(200, b"{" + b" " * (3 << 20) + b"}")
        else:
            return False
        return True

    # ------------------------------------------------------------------ protocols

    def _images(self, n: int, height: int, width: int, default_fmt: str) -> list[tuple[bytes, str]]:
        cfg = self.srv.config
        return self.srv.make_images(n, height, width, cfg.fmt or default_fmt)

    def _finish_images(self, encoded: list[tuple[bytes, str]], bad: list[int]) -> None:
        self.srv.record_served([sha for i, (_, sha) in enumerate(encoded) if i not in bad])

    def _api_craiyon(self, body) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
            self._error(422, "field 'prompt' required")
            return
        cfg = self.srv.config
        with self.srv.lock:
            self.srv.calls += 1
            side = cfg.alt_size if cfg.alt_size and self.srv.calls % 2 == 0 else cfg.size
        encoded = self._images(cfg.images or 9, side, side, "jpeg")
        bad = self._pending_bad(len(encoded))
        images = []
        for i, (data, _) in enumerate(encoded):
            text = base64.encodebytes(data).decode()  # with newlines, as Craiyon v1 sends them
            images.append("%%% not base64 %%%" if i in bad else text)
        self._finish_images(encoded, bad)
        self._json(200, {"images": images, "version": "hk4JLDgjEEWf"})

    def _api_a1111(self, body) -> None:
        spec: dict[str, type | tuple[type, ...]] = {
            "prompt": str,
            "negative_prompt": str,
            "seed": int,
            "steps": int,
            "width": int,
            "height": int,
            "batch_size": int,
            "n_iter": int,
            "cfg_scale": (int, float),
            "sampler_name": str,
        }
        if not isinstance(body, dict):
            self._error(422, "body must be an object")
            return
        for name, kind in spec.items():
            if name in body and not isinstance(body[name], kind):
                self._error(422, f"field {name!r} has the wrong type")
                return
        if not isinstance(body.get("prompt"), str):
            self._error(422, "field 'prompt' required")
            return
        cfg = self.srv.config
        n = cfg.images or body.get("batch_size", 1) * body.get("n_iter", 1)
        w, h = body.get("width", 512), body.get("height", 512)
        seed = body.get("seed", -1)
        if seed == -1:
            seed = random.randrange(2**32)
        encoded = self._images(n, h, w, "png")
        bad = self._pending_bad(n)
        images = [base64.b64encode(d).decode() if i not in bad else "@@@" for i, (d, _) in enumerate(encoded)]
        first = 0
        if cfg.grid and n > 1:
            grid = self.srv.make_images(1, h, w * n, "png")[0][0]
            images.insert(0, base64.b64encode(grid).decode())
            first = 1
        info = {
            "prompt": body["prompt"],
            "all_prompts": [body["prompt"]] * n,
            "seed": seed,
            "all_seeds": [seed + i for i in range(n)],
            "sd_model_name": cfg.model,
            "sd_model_hash": "6ce0161689",
            "index_of_first_image": first,
            "width": w,
            "height": h,
        }
        self._finish_images(encoded, bad)
        self._json(200, {"images": images, "parameters": body, "info": json.dumps(info)})

    def _api_openai(self, body) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            self._error(400, "'prompt' is a required property")
            return
        model = body.get("model", "dall-e-2")
        n = body.get("n", 1)
        size = body.get("size", "1024x1024")
        if not isinstance(n, int) or not 1 <= n <= 10 or (model == "dall-e-3" and n != 1):
            self._error(400, f"Invalid 'n': {n}", "invalid_value")
            return
        if body.get("response_format", "url") != "b64_json":
            self._error(400, "this test server only answers response_format=b64_json", "invalid_value")
            return
        try:
            w, h = (int(x) for x in size.split("x"))
        except (AttributeError, ValueError):
            self._error(400, f"Invalid 'size': {size!r}", "invalid_value")
            return
        cfg = self.srv.config
        encoded = self._images(cfg.images or n, h, w, "png")
        bad = self._pending_bad(len(encoded))
        data = [
            {
                "b64_json": base64.b64encode(d).decode() if i not in bad else "!!!",
                **({"revised_prompt": body["prompt"] + ", photo"} if model == "dall-e-3" else {}),
            }
            for i, (d, _) in enumerate(encoded)
        ]
        self._finish_images(encoded, bad)
        self._json(
            200,
            {"created": int(time.time()), "data": data},
            {
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "499",
                "x-ratelimit-reset-requests": "120ms",
            },
        )

    def _api_hf(self, body) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            self._json(400, {"error": "inputs must be a string"})
            return
        params = body.get("parameters") or {}
        cfg = self.srv.config
        h, w = params.get("height", cfg.size), params.get("width", cfg.size)
        ((data, sha),) = self._images(1, h, w, "png")
        if self._pending_bad(1):
            self._send(200, b"\x89PNG garbage", "image/png")
            return
        self.srv.record_served([sha])
        self._send(200, data, "image/png")

    def _pending_bad(self, n: int) -> list[int]:
        fault = getattr(self, "_fault_now", None)
        if fault == "badb64":
            return [0]
        if fault == "allbad":
            return list(range(n))
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="craiyon", choices=["craiyon", "a1111", "openai", "hf"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--format", dest="fmt", default=None)
    parser.add_argument("--rate-limit", type=float, default=None)
    parser.add_argument("--limiter", default="bucket", choices=["bucket", "window"])
    parser.add_argument("--retry-after", default=None)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    config = ServerConfig(
        api=args.api,
        latency=args.latency,
        images=args.images,
        size=args.size,
        fmt=args.fmt,
        rate_limit=args.rate_limit,
        limiter=args.limiter,
        retry_after=args.retry_after,
        api_key=args.api_key,
    )
    server = MineServer(config, port=args.port)
    print(server.url, flush=True)
    try:
        server.httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- test helpers


def folder_contents(folder) -> dict:
    """Every finished shard in FOLDER opened and checked: labels per class, sha256s, paths."""
    from pathlib import Path

    from fakecifar.shards import Shard, pixel_sha256

    folder = Path(folder)
    shards = [Shard(p) for p in sorted(folder.glob("*.h5"))]
    labels: list = []
    shas: list = []
    classes = None
    for shard in shards:
        classes = shard.classes
        labels.extend(shard.read("labels").tolist())
        stored = shard.read("sha256")
        assert (stored == pixel_sha256(shard.read("images"))).all(), f"{shard.path}: sha256 column is wrong"
        shas.extend(bytes(s).ljust(32, b"\0").hex() for s in stored)  # numpy strips trailing NULs
        shard.close()
    counts = {name: labels.count(i) for i, name in enumerate(classes or [])}
    return {
        "shards": [s.path for s in shards],
        "counts": counts,
        "sha": shas,
        "n": len(labels),
        "partials": sorted(folder.glob("*.partial")),
    }
