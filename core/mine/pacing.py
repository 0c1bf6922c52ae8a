"""Pacing for API clients: a one-token bucket on request starts, AIMD rate control, full-jitter
exponential backoff, and the servers' wait hints (Retry-After and friends).

Everything takes an injectable clock so the behaviour is tested without sleeping.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

# A wait hint longer than this is not waited out inside a run: the run stops and says so
# (a cron job comes back later; a daily quota is not a reason to hold a process for hours).
MAX_HONOURED_WAIT = 300.0


# Starts are spaced this much wider than 1/rate. A server counts *arrivals*, and a request can
# reach it a few ms later than the one sent after it (a late thread wake-up, the GIL, the
# network): at exactly 1/rate apart, one such delay puts rate+1 arrivals in one of the
# server's windows and earns a 429, which halves the rate. 2% is 20 ms of slack per second.
PACING_MARGIN = 0.02


class TokenBucket:
    """Request starts at `rate` per second at most, one token deep: every start waits until
    `(1 + margin) / rate` seconds after the start before it.

    So any n+1 starts span at least n/rate seconds, and no window of W seconds -- counted the
    way rate limiters count, over (now - W, now] -- ever holds more than rate*W starts: R in
    any second for `--rate R`, 200 in any minute at 200/60 per second. Nothing accrues while
    idle (a bucket deeper than one token would let rate+1 or more starts into one window).

    `rate=None` (or inf) means unlimited. `pause_until(t)` holds every caller until the
    monotonic time t (a server's Retry-After applies to the whole client, not one thread).
    The rate may be changed at any time (AIMD does); the next start is then spaced at the new
    rate from the last one.
    """

    def __init__(
        self, rate: float | None, clock: Callable[[], float] = time.monotonic, *, margin: float = PACING_MARGIN
    ):
        self._clock = clock
        self._lock = threading.Lock()
        self._rate = self._checked(rate)
        if not margin >= 0:
            raise ValueError("margin must be >= 0")
        self.margin = float(margin)
        # Next start no earlier than the last one plus the interval: one comparison of times,
        # no token arithmetic accumulating rounding errors.
        self._last_start = -math.inf
        self._paused_until = -math.inf
        self._starts: deque[float] = deque(maxlen=32)

    @staticmethod
    def _checked(rate: float | None) -> float:
        value = math.inf if rate is None else float(rate)
        if not value > 0:
            raise ValueError("rate must be positive")
        return value

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        value = self._checked(value)
        with self._lock:
            self._rate = value

    @property
    def interval(self) -> float:
        """Seconds between two starts (0.0 when unlimited)."""
        return 0.0 if math.isinf(self._rate) else (1.0 + self.margin) / self._rate

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def pause_until(self, when: float) -> None:
        with self._lock:
            if when > self._paused_until:
                self._paused_until = when

    def try_take(self) -> float:
        """Start now if allowed (returns 0.0), else return the seconds to wait."""
        with self._lock:
            now = self._clock()
            ready = max(self._paused_until, self._last_start + self.interval)
            if now < ready:
                return ready - now
            self._last_start = now
            self._starts.append(now)
            return 0.0

    def observed_rate(self) -> float | None:
        """Request starts per second actually taken lately (the last 32 at most)."""
        with self._lock:
            if len(self._starts) < 2:
                return None
            span = self._starts[-1] - self._starts[0]
            return (len(self._starts) - 1) / span if span > 0 else None

    def acquire(self, wait: Callable[[float], bool]) -> bool:
        """Block until a start is taken. `wait(seconds)` sleeps and returns False to give up
        (e.g. `threading.Event().wait` inverted: stop requested). Waits in short slices so a
        rate change or a pause is seen promptly."""
        while True:
            delay = self.try_take()
            if delay <= 0.0:
                return True
            if not wait(min(delay, 0.25)):
                return False


class Aimd:
    """Additive-increase / multiplicative-decrease of a bucket's rate, never above `max_rate`.

    A 429 cuts the rate by `decrease` once per "window": 429s for requests sent before the
    last cut are the same congestion event and are not counted twice. Each success adds
    `increase * max_rate`; close to the rate of the last cut the step is ten times smaller,
    so the rate lingers just under the server's limit instead of sawing down to half of it.
    """

    def __init__(
        self,
        bucket: TokenBucket,
        max_rate: float | None,
        *,
        decrease: float = 0.5,
        increase: float = 0.02,
        min_rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.bucket = bucket
        self.max_rate = math.inf if max_rate is None else float(max_rate)
        self.decrease, self.increase = decrease, increase
        self.min_rate = 0.01 if min_rate is None else min_rate  # one request per 100 s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_cut = -math.inf
        self.ceiling: float | None = None  # the rate at the last cut
        self.cuts = 0

    def on_throttle(self, sent_at: float) -> bool:
        """A 429 for a request started at `sent_at`. Returns True if the rate was cut."""
        with self._lock:
            if sent_at < self._last_cut:
                return False
            # Cut from what actually went out: the configured rate may be far above what the
            # concurrency and latency let through (or unlimited).
            rate = self.bucket.rate
            observed = self.bucket.observed_rate()
            if observed is not None:
                rate = min(rate, observed)
            if math.isinf(rate):
                return False  # unlimited and nothing measured yet: the backoff alone must do
            self.ceiling = rate
            self.bucket.rate = max(self.min_rate, rate * self.decrease)
            self._last_cut = self._clock()
            self.cuts += 1
            return True

    def on_success(self) -> None:
        with self._lock:
            rate = self.bucket.rate
            if math.isinf(rate) or rate >= self.max_rate:
                return
            top = self.max_rate if not math.isinf(self.max_rate) else (self.ceiling or rate) * 2
            step = self.increase * top
            if self.ceiling is not None and rate >= 0.85 * self.ceiling:
                step *= 0.1
            self.bucket.rate = min(self.max_rate, rate + step)


def backoff_delay(attempt: int, base: float, cap: float = 60.0, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    uniform = rng.uniform if rng is not None else random.uniform
    return uniform(0.0, min(cap, base * (2.0**attempt)))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """'1.5' / '20ms' / '6m0s' / '1h2m3.5s' -> seconds; None when absent or unparseable."""
    if text is None:
        return None
    text = str(text).strip().lower()
    if not text:
        return None
    try:
        value = float(text)
        return value if value >= 0 and math.isfinite(value) else None
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            return None
        number, unit = float(match.group(1)), match.group(2)
        total += number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The server's explicit wait in seconds: `retry-after-ms` (OpenAI), `Retry-After` as
    seconds or an HTTP date. `headers` must be case-insensitive (requests' are)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        seconds = parse_duration(ms)
        if seconds is not None:
            return seconds / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def ratelimit_pause(headers: Mapping[str, str]) -> float | None:
    """Seconds until the request budget refills when `x-ratelimit-remaining-requests` says 0
    (OpenAI-style headers, also used by many gateways); None otherwise."""
    remaining = headers.get("x-ratelimit-remaining-requests")
    if remaining is None:
        return None
    try:
        if float(remaining) > 0:
            return None
    except ValueError:
        return None
    return parse_duration(headers.get("x-ratelimit-reset-requests")) or 1.0
