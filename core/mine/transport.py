"""One HTTP request, read completely under two caps: a total deadline (a server that drips
bytes forever is a timeout, not a hang) and a maximum response size (streamed, so a huge
or endless body never sits in memory). Every failure becomes a `TransportError` with a short
reason for the failure table and a one-line message."""

from __future__ import annotations

import http.client
import re
import threading
import time

import requests
import urllib3

from .. import __version__
from .adapters import Request, Response, redact_url

USER_AGENT = f"fakecifar/{__version__} (+https://github.com/fakecifar; mine)"
READ_CHUNK = 1 << 16


class TransportError(Exception):
    """The request got no complete response. `fatal`: retrying cannot help (bad URL, TLS)."""

    def __init__(self, reason: str, message: str, *, retryable: bool = True, fatal: bool = False):
        super().__init__(message)
        self.reason, self.message, self.retryable, self.fatal = reason, message, retryable, fatal


def short_reason(exc: BaseException) -> str:
    """'[Errno 111] Connection refused' out of requests' nested exception text."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if match:
        return match.group(0).strip()
    for needle in (
        "timed out",
        "Connection refused",
        "Connection reset",
        "Name or service not known",
        "IncompleteRead",
        "Remote end closed connection",
        "certificate verify failed",
    ):
        if needle.lower() in text.lower():
            return needle
    return type(exc).__name__


_local = threading.local()


def thread_session() -> requests.Session:
    """One Session per thread (requests' Session is not thread-safe); kept for keep-alive."""
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        session.headers["User-Agent"] = USER_AGENT
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _local.session = session
    return session


def close_thread_session() -> None:
    session = getattr(_local, "session", None)
    if session is not None:
        session.close()
        _local.session = None


def fetch(session: requests.Session, request: Request, headers: dict, *, timeout: float, max_bytes: int) -> Response:
    where = redact_url(request.url)
    start = time.monotonic()
    try:
        r = session.request(
            request.method,
            request.url,
            json=request.json,
            headers={**request.headers, **headers},
            timeout=(min(timeout, 30.0), timeout),
            stream=True,
            allow_redirects=False,
        )
    except requests.exceptions.SSLError as exc:
        raise TransportError(
            "tls", f"TLS error talking to {where}: {short_reason(exc)}", retryable=False, fatal=True
        ) from None
    except requests.exceptions.ConnectTimeout:
        raise TransportError("timeout", f"{where}: connection timed out") from None
    except requests.exceptions.ReadTimeout:
        raise TransportError("timeout", f"{where}: no answer within {timeout:g} s") from None
    except (
        requests.exceptions.InvalidURL,
        requests.exceptions.InvalidSchema,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidHeader,
    ) as exc:
        raise TransportError("bad_url", f"{where}: {short_reason(exc)}", retryable=False, fatal=True) from None
    except (requests.exceptions.RequestException, OSError) as exc:
        raise TransportError("connection", f"{where}: {short_reason(exc)}") from None
    try:
        length = r.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise TransportError(
                "too_large",
                f"{where}: response of {int(length):,} bytes exceeds the {max_bytes:,}-byte limit",
                retryable=False,
            )
        chunks, total = [], 0
        read1 = getattr(r.raw, "read1", None)
        while True:
            if time.monotonic() - start > timeout:
                raise TransportError("timeout", f"{where}: response not complete within {timeout:g} s")
            # read1 returns what has arrived, so the deadline is checked while a server drips.
            chunk = read1(READ_CHUNK, decode_content=True) if read1 else r.raw.read(8192, decode_content=True)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise TransportError(
                    "too_large", f"{where}: response exceeds the {max_bytes:,}-byte limit", retryable=False
                )
            chunks.append(chunk)
    except TransportError:
        raise
    except (urllib3.exceptions.ReadTimeoutError, requests.exceptions.ReadTimeout, TimeoutError):
        raise TransportError("timeout", f"{where}: no data for {timeout:g} s") from None
    except (
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.DecodeError,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ConnectionError,
        http.client.HTTPException,
    ) as exc:
        raise TransportError("truncated", f"{where}: response cut short ({short_reason(exc)})") from None
    except (requests.exceptions.RequestException, OSError) as exc:
        raise TransportError("connection", f"{where}: {short_reason(exc)}") from None
    finally:
        r.close()
    return Response(r.status_code, r.headers, b"".join(chunks), request.url)
