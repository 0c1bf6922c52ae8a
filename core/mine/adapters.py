"""Text-to-image protocols: one small adapter class per API, found by name in `ADAPTERS`.

An adapter only speaks the protocol: it builds the HTTP request for one prompt, turns a 2xx
response into image bytes (with seeds, model and request id where the API says them), and
classifies any other response as retry / skip / fatal. Pacing, retries, decoding, storage
and quotas are the miner's (see miner.py), so adding an API is a class of ~40 lines:

    @register
    class MyApi(Adapter):
        name = "myapi"
        default_url = "https://api.example.com"
        def build(self, job): return Request("POST", f"{self.base}/gen", {"prompt": job.prompt})
        def parse(self, response): return [Generated(b) for b in ...]

Nothing here ever formats the API key into a message, a repr or provenance: it lives in a
`Secret` and only reaches the wire in `auth_headers()`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

from ..errors import FakecifarError, UsageError
from .pacing import ratelimit_pause, retry_after


class ApiError(FakecifarError):
    """The API refused in a way retrying cannot fix (bad key, quota, bad request, block)."""


class Secret:
    """An API key that never shows itself in a repr, a str, a log or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: str) -> str:
        """Remove the key from text that came back from a server (some echo it)."""
        return text.replace(self._value, "***") if self._value else text

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a Secret cannot be pickled")


def redact_url(url: str) -> str:
    """Drop user:password@ and the query string from a URL before it is logged or stored."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ApiOptions:
    """Generation parameters from the command line; each adapter uses those its API has."""

    model: str | None = None
    size: tuple[int, int] | None = None  # (height, width) asked of the API
    batch: int | None = None  # images per request where the API lets the client choose
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    negative_prompt: str | None = None


@dataclass(frozen=True)
class Job:
    """One request's worth of work: a prompt for one class."""

    label: int
    prompt: str
    count: int  # images wanted (the reservation)
    seed: int  # a client-drawn seed, sent where the API takes one
    number: int  # the job's serial number in this run


@dataclass
class Request:
    method: str
    url: str
    json: dict | None = None
    headers: dict = field(default_factory=dict)


@dataclass
class Response:
    """A fully read HTTP response. `headers` is case-insensitive."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str

    @property
    def content_type(self) -> str:
        return (self.headers.get("content-type") or "").split(";")[0].strip().lower()

    def is_html(self) -> bool:
        head = self.body[:256].lstrip().lower()
        return self.content_type in ("text/html", "application/xhtml+xml") or head.startswith((b"<!doctype", b"<html"))

    def json(self):
        return json.loads(self.body)


@dataclass
class Generated:
    """One image as the API sent it (still encoded) with what the API said about it."""

    data: bytes | None  # None: the API sent something that is not an image (see error)
    seed: int = -1
    model: str | None = None
    request_id: str | None = None
    extra: dict = field(default_factory=dict)  # e.g. OpenAI's revised_prompt
    error: str | None = None


@dataclass
class Verdict:
    """What to do with a non-2xx response (or an unusable 2xx)."""

    action: str  # "retry" | "skip" | "fatal"
    reason: str  # short key for the failure table: "http_503", "rate_limited", ...
    message: str = ""
    hint: str | None = None
    wait: float | None = None  # the server's own wait hint, seconds
    throttle: bool = False  # a rate limit: slow the whole client down (AIMD)


class BadResponse(Exception):
    """A 2xx response that cannot be used; carries its verdict."""

    def __init__(self, verdict: Verdict):
        super().__init__(verdict.message)
        self.verdict = verdict


# --------------------------------------------------------------------------- base


RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})


def one_line(text: str, limit: int = 200) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def html_title(body: bytes) -> str:
    match = re.search(rb"<title[^>]*>(.*?)</title>", body[:65536], re.I | re.S)
    return one_line(match.group(1).decode("utf-8", "replace"), 80) if match else ""


def decode_b64(text, what: str) -> bytes:
    """Base64 (with or without newlines, data: URL prefix allowed) -> bytes, strictly."""
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = re.sub(r"\s+", "", text)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what} is not valid base64 ({exc})") from None


class Adapter:
    """Base class: defaults for pacing, key handling and response classification."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    default_url: ClassVar[str] = ""
    default_rate: ClassVar[float | None] = 1.0  # requests per second
    default_concurrency: ClassVar[int] = 4
    default_timeout: ClassVar[float] = 120.0
    key_env: ClassVar[str | None] = None  # default environment variable of the key
    needs_key: ClassVar[bool] = False
    images_fixed: ClassVar[int | None] = None  # images per call when the API decides

    def __init__(self, base_url: str | None, options: ApiOptions, key: Secret | None = None):
        base = (base_url or self.default_url).rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--url {redact_url(base)!r} is not an http(s) URL", "e.g. --url http://127.0.0.1:7860")
        self.base = base
        self.options = options
        self._key = key
        if self.needs_key and not key:
            var = self.key_env or "the key's variable"
            raise UsageError(
                f"the {self.name} API needs a key", f"set {var} or pass --api-key-env VAR / --api-key-file PATH"
            )
        self.validate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.base)!r})"

    # ---- to override
    def validate(self) -> None:
        """Reject options the API cannot take (raise UsageError)."""

    def images_per_call(self) -> int:
        return self.images_fixed or max(1, self.options.batch or 1)

    def model_name(self) -> str | None:
        return self.options.model

    def build(self, job: Job) -> Request:
        raise NotImplementedError

    def parse(self, response: Response, job: Job) -> list[Generated]:
        raise NotImplementedError

    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {self._key.reveal()}"} if self._key else {}

    def error_text(self, response: Response) -> str:
        """The server's own error message, from whichever JSON shape it uses."""
        if response.is_html():
            title = html_title(response.body)
            return f"an HTML page{f' ({title!r})' if title else ''} instead of JSON"
        try:
            payload = response.json()
        except (ValueError, UnicodeDecodeError):
            return one_line(response.body[:300].decode("utf-8", "replace")) or "(empty body)"
        message = None
        if isinstance(payload, dict):
            err = payload.get("error")
            if isinstance(err, dict):
                message = err.get("message") or err.get("code") or err.get("type")
            elif isinstance(err, str):
                message = err
            message = message or payload.get("detail") or payload.get("message") or payload.get("errors")
        text = message if isinstance(message, str) else json.dumps(message if message is not None else payload)
        return one_line(text)

    def classify(self, response: Response) -> Verdict:
        """The default reading of a non-2xx status; adapters refine it."""
        status = response.status
        text = self.scrub(self.error_text(response))
        blocked = response.is_html() and _looks_like_cloudflare(response)
        if status == 429:
            return Verdict(
                "retry", "rate_limited", f"HTTP 429: {text}", wait=retry_after(response.headers), throttle=True
            )
        if status in RETRY_STATUSES:
            return Verdict("retry", f"http_{status}", f"HTTP {status}: {text}", wait=retry_after(response.headers))
        if blocked:
            return Verdict(
                "fatal",
                f"http_{status}",
                f"blocked by Cloudflare at {redact_url(response.url)}: HTTP {status} with {text}",
                "the site refuses automated clients from this address; use the official API or another network",
            )
        if status in (401, 403):
            return Verdict(
                "fatal",
                f"http_{status}",
                f"the {self.name} API refused the request: HTTP {status}: {text}",
                f"check the key ({self.key_env or '--api-key-env'}) and its permissions"
                if self.key_env or self._key
                else "check --url and the server's access settings",
            )
        if status in (404, 405):
            return Verdict(
                "fatal",
                f"http_{status}",
                f"{redact_url(response.url)}: HTTP {status}: {text}",
                f"is --url the base of a {self.name} API? ({self.summary})",
            )
        if 300 <= status < 400:
            where = redact_url(response.headers.get("location", "?"))
            return Verdict(
                "fatal",
                f"http_{status}",
                f"{redact_url(response.url)} redirects to {where}",
                "pass the final address with --url",
            )
        if status == 400 or status == 422:
            return Verdict(
                "fatal",
                f"http_{status}",
                f"the {self.name} API rejected the request: HTTP {status}: {text}",
                "check --model, --size, --batch and the other generation options",
            )
        return Verdict("fatal", f"http_{status}", f"the {self.name} API answered HTTP {status}: {text}")

    def pause_hint(self, response: Response) -> float | None:
        """Seconds every worker should hold off after this response (any status)."""
        return ratelimit_pause(response.headers)

    def scrub(self, text: str) -> str:
        return self._key.scrub(text) if self._key else text

    # ---- helpers for subclasses
    def json_body(self, response: Response) -> dict:
        if response.is_html():
            raise BadResponse(
                Verdict(
                    "fatal",
                    "html",
                    f"{redact_url(response.url)} sent {self.error_text(response)}",
                    "a Cloudflare page or a web UI, not the API: check --url"
                    if not _looks_like_cloudflare(response)
                    else "the site refuses automated clients from this address",
                )
            )
        try:
            payload = response.json()
        except (ValueError, UnicodeDecodeError):
            raise BadResponse(
                Verdict(
                    "skip",
                    "bad_json",
                    f"{redact_url(response.url)} sent a body that is not JSON "
                    f"({one_line(response.body[:80].decode('utf-8', 'replace'))!r})",
                )
            ) from None
        if not isinstance(payload, dict):
            raise BadResponse(
                Verdict("skip", "bad_json", f"{redact_url(response.url)} sent JSON that is not an object")
            )
        return payload


def _looks_like_cloudflare(response: Response) -> bool:
    server = (response.headers.get("server") or "").lower()
    return "cloudflare" in server or "cf-ray" in response.headers or b"cloudflare" in response.body[:65536].lower()


ADAPTERS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS[cls.name] = cls
    return cls


def adapter_class(name: str) -> type[Adapter]:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise UsageError(f"unknown --api {name!r}", f"choose one of: {', '.join(sorted(ADAPTERS))}") from None


def _b64_images(payload_images, request_id: str | None, model: str | None, seeds=()) -> list[Generated]:
    out = []
    for i, item in enumerate(payload_images):
        seed = int(seeds[i]) if i < len(seeds) and isinstance(seeds[i], (int, float)) else -1
        try:
            out.append(Generated(decode_b64(item, f"image {i}"), seed=seed, model=model, request_id=request_id))
        except ValueError as exc:
            out.append(Generated(None, seed=seed, model=model, request_id=request_id, error=str(exc)))
    return out


def _request_id(response: Response) -> str | None:
    for key in ("x-request-id", "request-id", "cf-ray", "x-amzn-requestid"):
        if response.headers.get(key):
            return response.headers[key][:128]
    return None


# --------------------------------------------------------------------------- protocols


@register
class Craiyon(Adapter):
    name = "craiyon"
    summary = "Craiyon v1: POST {base}/generate {prompt} -> {images: [base64]}, 9 per call"
    default_url = "https://backend.craiyon.com"
    default_rate = 3.3
    default_concurrency = 16  # calls take ~a minute: many in flight to reach the rate
    default_timeout = 300.0
    images_fixed = 9

    def model_name(self) -> str:
        return "craiyon-v1"

    def validate(self) -> None:
        o = self.options
        unused = [
            n
            for n, v in (
                ("--model", o.model),
                ("--size", o.size),
                ("--steps", o.steps),
                ("--cfg-scale", o.cfg_scale),
                ("--sampler", o.sampler),
            )
            if v is not None
        ]
        if unused:
            raise UsageError(f"the craiyon API has no {', '.join(unused)}", "drop the option(s)")
        if o.batch not in (None, 9):
            raise UsageError("craiyon always returns 9 images per call", "drop --batch")

    def build(self, job: Job) -> Request:
        return Request("POST", f"{self.base}/generate", {"prompt": job.prompt})

    def auth_headers(self) -> dict:
        return {}

    def parse(self, response: Response, job: Job) -> list[Generated]:
        payload = self.json_body(response)
        images = payload.get("images")
        if not isinstance(images, list):
            raise BadResponse(Verdict("skip", "bad_json", "craiyon response has no 'images' list"))
        return _b64_images(images, _request_id(response), self.model_name())


@register
class A1111(Adapter):
    name = "a1111"
    summary = "AUTOMATIC1111 SD WebUI / SD.Next: POST {base}/sdapi/v1/txt2img"
    default_url = "http://127.0.0.1:7860"
    default_rate = None  # a local GPU: the concurrency of 1 is the limit
    default_concurrency = 1
    default_timeout = 900.0
    key_env = "A1111_API_AUTH"  # optional; "user:password" for --api-auth, else a bearer token

    def auth_headers(self) -> dict:
        if not self._key:
            return {}
        value = self._key.reveal()
        if ":" in value:
            return {"Authorization": "Basic " + base64.b64encode(value.encode()).decode()}
        return {"Authorization": f"Bearer {value}"}

    def build(self, job: Job) -> Request:
        o = self.options
        h, w = o.size or (512, 512)
        body = {
            "prompt": job.prompt,
            "negative_prompt": o.negative_prompt or "",
            "seed": job.seed,
            "steps": o.steps or 20,
            "width": w,
            "height": h,
            "batch_size": self.images_per_call(),
            "n_iter": 1,
            "cfg_scale": o.cfg_scale if o.cfg_scale is not None else 7.0,
            "sampler_name": o.sampler or "Euler a",
            "send_images": True,
            "save_images": False,
        }
        if o.model:
            body["override_settings"] = {"sd_model_checkpoint": o.model}
            body["override_settings_restore_afterwards"] = True
        return Request("POST", f"{self.base}/sdapi/v1/txt2img", body)

    def parse(self, response: Response, job: Job) -> list[Generated]:
        payload = self.json_body(response)
        images = payload.get("images")
        if not isinstance(images, list):
            raise BadResponse(Verdict("skip", "bad_json", "txt2img response has no 'images' list"))
        info = payload.get("info")
        if isinstance(info, str):  # A1111 sends info as a JSON *string*
            try:
                info = json.loads(info)
            except ValueError:
                info = {}
        info = info if isinstance(info, dict) else {}
        seeds = info.get("all_seeds") or []
        if not isinstance(seeds, list):
            seeds = []
        if not seeds and isinstance(info.get("seed"), int):
            seeds = [info["seed"] + i for i in range(len(images))]
        # With batch_size > 1 the WebUI may put a grid of the batch first.
        first = info.get("index_of_first_image")
        if not isinstance(first, int) or not 0 <= first <= len(images):
            first = 1 if seeds and len(images) == len(seeds) + 1 else 0
        model = info.get("sd_model_name") or self.options.model
        return _b64_images(images[first:], _request_id(response), model if isinstance(model, str) else None, seeds)


@register
class OpenAI(Adapter):
    name = "openai"
    summary = "OpenAI and compatible servers: POST {base}/v1/images/generations"
    default_url = "https://api.openai.com"
    default_rate = 0.5
    default_concurrency = 4
    default_timeout = 180.0
    key_env = "OPENAI_API_KEY"
    needs_key = True

    def __init__(self, base_url, options, key=None):
        if base_url and base_url.rstrip("/").endswith("/v1"):
            base_url = base_url.rstrip("/")[:-3]
        super().__init__(base_url, options, key)

    def model_name(self) -> str:
        return self.options.model or "dall-e-2"

    def validate(self) -> None:
        o = self.options
        unused = [
            n
            for n, v in (
                ("--steps", o.steps),
                ("--cfg-scale", o.cfg_scale),
                ("--sampler", o.sampler),
                ("--negative-prompt", o.negative_prompt),
            )
            if v is not None
        ]
        if unused:
            raise UsageError(f"the openai API has no {', '.join(unused)}", "drop the option(s)")
        if self.model_name() == "dall-e-3" and (o.batch or 1) != 1:
            raise UsageError("dall-e-3 makes one image per request", "drop --batch")
        if not 1 <= (o.batch or 1) <= 10:
            raise UsageError("--batch must be 1..10 for the openai API")

    def build(self, job: Job) -> Request:
        h, w = self.options.size or ((256, 256) if self.model_name() == "dall-e-2" else (1024, 1024))
        body = {"model": self.model_name(), "prompt": job.prompt, "n": self.images_per_call(), "size": f"{w}x{h}"}
        if not self.model_name().startswith("gpt-image"):  # gpt-image-* always answers base64
            body["response_format"] = "b64_json"
        return Request("POST", f"{self.base}/v1/images/generations", body)

    def parse(self, response: Response, job: Job) -> list[Generated]:
        payload = self.json_body(response)
        data = payload.get("data")
        if not isinstance(data, list):
            raise BadResponse(Verdict("skip", "bad_json", "images response has no 'data' list"))
        rid = _request_id(response)
        out = []
        for i, item in enumerate(data):
            item = item if isinstance(item, dict) else {}
            extra = {"revised_prompt": item["revised_prompt"]} if isinstance(item.get("revised_prompt"), str) else {}
            try:
                out.append(
                    Generated(
                        decode_b64(item.get("b64_json"), f"data[{i}].b64_json"),
                        model=self.model_name(),
                        request_id=rid,
                        extra=extra,
                    )
                )
            except ValueError as exc:
                out.append(Generated(None, model=self.model_name(), request_id=rid, error=str(exc)))
        return out

    def _error(self, response: Response) -> dict:
        try:
            payload = response.json()
        except (ValueError, UnicodeDecodeError):
            return {}
        err = payload.get("error") if isinstance(payload, dict) else None
        return err if isinstance(err, dict) else {}

    def classify(self, response: Response) -> Verdict:
        err = self._error(response)
        code = err.get("code") or err.get("type") or ""
        message = self.scrub(one_line(str(err.get("message") or code)))
        if code in ("insufficient_quota", "billing_hard_limit_reached", "billing_not_active"):
            return Verdict(
                "fatal",
                "quota",
                f"the openai API says the quota is exhausted ({code}): {message}",
                "check the account's plan and billing; rerun once it is fixed",
            )
        if response.status == 400 and code == "content_policy_violation":
            return Verdict("skip", "content_policy", f"prompt refused by the content policy: {message}")
        if response.status == 401:
            return Verdict(
                "fatal",
                "http_401",
                f"the openai API refused the key: {message or 'HTTP 401'}",
                f"check {self.key_env} (or --api-key-env / --api-key-file)",
            )
        return super().classify(response)


@register
class HuggingFace(Adapter):
    name = "hf"
    summary = "Hugging Face Inference API: POST {base}/models/{model} -> image bytes"
    default_url = "https://api-inference.huggingface.co"
    default_rate = 1.0
    default_concurrency = 2
    default_timeout = 300.0
    key_env = "HF_TOKEN"
    needs_key = False  # public models answer anonymous calls (slowly, with a small quota)
    images_fixed = 1

    def model_name(self) -> str:
        return self.options.model or "stabilityai/stable-diffusion-xl-base-1.0"

    def validate(self) -> None:
        if self.options.batch not in (None, 1):
            raise UsageError("the hf API makes one image per request", "drop --batch")
        if self.options.sampler is not None:
            raise UsageError("the hf API has no --sampler", "drop the option")

    def build(self, job: Job) -> Request:
        o = self.options
        params: dict = {"seed": job.seed}
        if o.negative_prompt:
            params["negative_prompt"] = o.negative_prompt
        if o.steps is not None:
            params["num_inference_steps"] = o.steps
        if o.cfg_scale is not None:
            params["guidance_scale"] = o.cfg_scale
        if o.size is not None:
            params["height"], params["width"] = o.size
        return Request(
            "POST",
            f"{self.base}/models/{self.model_name()}",
            {"inputs": job.prompt, "parameters": params},
            headers={"Accept": "image/png"},
        )

    def parse(self, response: Response, job: Job) -> list[Generated]:
        if response.content_type == "application/json" or response.is_html():
            if response.is_html():
                self.json_body(response)  # raises the HTML verdict
            raise BadResponse(
                Verdict(
                    "skip",
                    "bad_response",
                    f"hf answered JSON instead of an image: {self.scrub(self.error_text(response))}",
                )
            )
        return [Generated(response.body, seed=job.seed, model=self.model_name(), request_id=_request_id(response))]

    def classify(self, response: Response) -> Verdict:
        if response.status == 503 and not response.is_html():
            try:
                payload = response.json()
            except (ValueError, UnicodeDecodeError):
                payload = None
            if isinstance(payload, dict) and "estimated_time" in payload:
                try:
                    wait = max(0.0, float(payload["estimated_time"]))
                except (TypeError, ValueError):
                    wait = None
                return Verdict("retry", "model_loading", f"model {self.model_name()} is loading", wait=wait)
        return super().classify(response)
