"""The miner: worker threads that call a text-to-image API, and one main thread that keeps
the books and writes the shards.

    worker threads (--concurrency)                     main thread
    reserve quota (state.reserve, shared lock) ->
    pacer (--rate, AIMD on 429) ->
    HTTP request (Session per thread, capped) ->
    retry 408/429/5xx/network with full-jitter
    backoff or the server's Retry-After ->
    decode + verify + sha256 + pHash        --queue-->  drop duplicates, keep the quota exact,
                                                        append to the open shard, finish it
                                                        atomically, print its path

Only the main thread touches HDF5. A run ends when no class has room left and nothing is in
flight, when --max-requests / --max-minutes is reached (in-flight requests are waited for:
their images are paid for), on a fatal answer (bad key, quota, 400, Cloudflare block), when
--max-failures requests in a row brought no new image, or on Ctrl-C / SIGTERM. In every case
the open shard is finished with what it holds, so nothing fetched is lost.
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadImageError, FakecifarError, UsageError
from ..images import MAX_PIXELS, decode_image
from ..shards import ORIGIN_FAKE, ShardSeriesWriter, pixel_sha256, producer, utc_now
from .adapters import (
    Adapter,
    ApiError,
    ApiOptions,
    BadResponse,
    Generated,
    Job,
    Secret,
    Verdict,
    adapter_class,
    redact_url,
)
from .pacing import MAX_HONOURED_WAIT, Aimd, TokenBucket, backoff_delay
from .phash import hamming, phash
from .state import MineState, digest32
from .transport import TransportError, close_thread_session, fetch, thread_session

DEFAULT_PROMPT = "a photo of a {class}"


class MineInterrupted(FakecifarError):
    """Ctrl-C or SIGTERM ended the run (after the open shard was finished): exit 128 + the
    signal, 130 or 143, as shells and schedulers expect."""

    def __init__(self, message: str, hint: str | None = None, signum: int = signal.SIGINT):
        super().__init__(message, hint)
        self.exit_code = 128 + int(signum)


DEFAULT_MAX_BYTES = 64 << 20


@dataclass
class MineConfig:
    api: str
    out_dir: Path
    per_class: int
    classes: list[str]
    prompts: Sequence[str] = (DEFAULT_PROMPT,)
    url: str | None = None
    options: ApiOptions = field(default_factory=ApiOptions)
    rate: float | None = None  # requests/s; None: the API's default; math.inf: unlimited
    concurrency: int | None = None  # None: the API's default
    timeout: float | None = None  # seconds per request; None: the API's default
    retries: int = 5
    backoff: float = 1.0  # base of the exponential backoff, seconds
    max_requests: int | None = None
    max_minutes: float | None = None
    shard_size: int = 500
    dedup_phash: int | None = None
    worker: str = "main"
    api_key: Secret | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = MAX_PIXELS
    max_failures: int = 20
    seed: int | None = None

    def __repr__(self) -> str:  # the key is a Secret anyway; keep reprs short
        return f"MineConfig(api={self.api!r}, out_dir={str(self.out_dir)!r}, per_class={self.per_class})"


def check_config(config: MineConfig) -> None:
    """Usage errors, before anything touches the network or the folder."""
    if not config.classes:
        raise UsageError("no classes to mine", "pass --classes")
    if config.per_class < 1:
        raise UsageError(f"--per-class must be at least 1, got {config.per_class}")
    if not config.prompts:
        raise UsageError("no --prompt template")
    for template in config.prompts:
        if not template.strip():
            raise UsageError("empty --prompt template")
        if "{class}" not in template and len(config.classes) > 1:
            raise UsageError(
                f"--prompt {template!r} has no {{class}}, so every class would get the same prompt",
                "put {class} where the class name goes, or mine a single class with --classes NAME",
            )
    checks = [
        ("--shard-size", config.shard_size, 1),
        ("--retries", config.retries, 0),
        ("--max-failures", config.max_failures, 1),
        ("--max-bytes", config.max_bytes, 1024),
    ]
    for name, value, low in checks:
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    for name, amount in (
        ("--rate", config.rate),
        ("--timeout", config.timeout),
        ("--max-minutes", config.max_minutes),
        ("--backoff", config.backoff),
    ):
        if amount is not None and not amount > 0:
            raise UsageError(f"{name} must be positive, got {amount}")
    if config.concurrency is not None and not 1 <= config.concurrency <= 256:
        raise UsageError(f"--concurrency must be 1..256, got {config.concurrency}")
    if config.max_requests is not None and config.max_requests < 1:
        raise UsageError(f"--max-requests must be at least 1, got {config.max_requests}")
    if config.dedup_phash is not None and not 0 <= config.dedup_phash <= 32:
        raise UsageError(f"--dedup-phash must be 0..32 bits, got {config.dedup_phash}")


def prompt_for(template: str, name: str) -> str:
    return template.replace("{class}", name)


@dataclass
class MineReport:
    """What a run did. `to_dict()` is the --json line; `exception` is re-raised by `check()`."""

    api: str
    url: str
    out_dir: str
    worker: str
    run: str
    requests: int = 0  # HTTP requests sent, retries included
    ok_requests: int = 0
    images_received: int = 0
    images: int = 0  # stored
    duplicates: int = 0
    near_duplicates: int = 0
    surplus: int = 0  # over the quota (e.g. 9 images back when 3 were missing)
    bad_images: int = 0
    rate_limited: int = 0  # 429 answers
    retries: int = 0
    failed_requests: int = 0  # requests given up on (retries exhausted, skipped)
    failures: Counter = field(default_factory=Counter)  # reason -> count, every failed attempt
    latency_sum: float = 0.0
    elapsed: float = 0.0
    start_rate: float = math.inf
    final_rate: float = math.inf
    shards: list[Path] = field(default_factory=list)
    per_class: dict = field(default_factory=dict)  # images per class in the folder at the end
    missing: int = 0  # images the folder still lacks to reach the quota
    others: list[str] = field(default_factory=list)  # other live workers at the end
    stop: str = "done"  # done | nothing-to-do | claimed | max-requests | max-minutes | interrupted | error
    error: str | None = None
    last_failure: str | None = None  # the message of the last failed attempt
    removed_partials: int = 0
    signum: int = int(signal.SIGINT)  # what interrupted the run, if it was
    exception: BaseException | None = field(default=None, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def mean_latency(self) -> float | None:
        return self.latency_sum / self.ok_requests if self.ok_requests else None

    def to_dict(self) -> dict:
        rate = lambda r: None if math.isinf(r) else round(r, 4)  # noqa: E731
        return {
            "api": self.api,
            "url": self.url,
            "out_dir": self.out_dir,
            "worker": self.worker,
            "run": self.run,
            "stop": self.stop,
            "error": self.error,
            "requests": self.requests,
            "ok_requests": self.ok_requests,
            "images": self.images,
            "images_received": self.images_received,
            "duplicates": self.duplicates,
            "near_duplicates": self.near_duplicates,
            "surplus": self.surplus,
            "bad_images": self.bad_images,
            "rate_limited": self.rate_limited,
            "retries": self.retries,
            "failed_requests": self.failed_requests,
            "failures": dict(sorted(self.failures.items())),
            "elapsed_s": round(self.elapsed, 3),
            "images_per_s": round(self.images_per_s, 3),
            "mean_latency_s": None if self.mean_latency is None else round(self.mean_latency, 4),
            "start_rate": rate(self.start_rate),
            "final_rate": rate(self.final_rate),
            "shards": [str(p) for p in self.shards],
            "per_class": self.per_class,
            "missing": self.missing,
            "other_workers": self.others,
            "removed_partials": self.removed_partials,
            "last_failure": self.last_failure,
        }

    def check(self) -> MineReport:
        """Raise what ended the run early: the fatal error, or MineInterrupted."""
        if self.exception is not None:
            raise self.exception
        if self.stop == "interrupted":
            raise MineInterrupted(
                _signal_word(self.signum),
                f"{self.missing} images still missing; rerun the same command to continue",
                signum=self.signum,
            )
        return self


@dataclass
class _Item:
    image: np.ndarray
    sha: bytes
    phash: int
    gen: Generated
    time: str


@dataclass
class _Outcome:
    job: Job
    items: list[_Item] = field(default_factory=list)
    failed: str | None = None  # reason, when the request was given up on
    stopped: bool = False


class Miner:
    """Use as a context manager: `prepare()` takes the lock and reads the folder (returns the
    number of images missing), `run()` mines and returns a `MineReport`."""

    def __init__(
        self,
        config: MineConfig,
        *,
        on_shard: Callable[[Path], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
        on_message: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        check_config(config)
        self.config = config
        self.adapter: Adapter = adapter_class(config.api)(config.url, config.options, config.api_key)
        self.on_shard, self.on_progress = on_shard, on_progress
        self.on_message = on_message or (lambda _m: None)
        self._clock = clock
        a = self.adapter
        rate = a.default_rate if config.rate is None else config.rate
        rate = None if rate is None or math.isinf(rate) else rate
        self.bucket = TokenBucket(rate, clock=clock)
        self.aimd = Aimd(self.bucket, rate, clock=clock)
        self.concurrency = config.concurrency or a.default_concurrency
        self.timeout = config.timeout or a.default_timeout
        self.per_call = a.images_per_call()
        self.state = MineState(
            config.out_dir, config.classes, config.per_class, config.worker, phash=config.dedup_phash is not None
        )
        self.report = MineReport(
            api=a.name,
            url=redact_url(a.base),
            out_dir=str(config.out_dir),
            worker=config.worker,
            run=self.state.run,
            start_rate=self.bucket.rate,
        )
        self._rng = random.Random(config.seed)
        self._seed_rng: random.Random | None = None
        self._lock = threading.Lock()  # report counters touched by worker threads
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._stopping = False
        self._interrupt_requested = False
        self._inflight = 0
        self._jobs = 0
        self._sent = 0
        self._deadline: float | None = None
        self._results: queue.Queue[_Outcome | None] = queue.Queue()
        self._templates = [0] * len(config.classes)
        self._series: dict[tuple[int, int], ShardSeriesWriter] = {}
        self._empty_streak = 0
        self._opened = False

    # ------------------------------------------------------------------ setup

    def prepare(self) -> int:
        """Take the worker lock, clean up, count what the folder holds. Returns images missing."""
        if not self._opened:
            self.state.open()
            self._opened = True
            self.report.removed_partials = len(self.state.removed_partials)
            if self.state.removed_partials:
                self.on_message(f"removed {len(self.state.removed_partials)} unfinished shard(s) left by a killed run")
            # Seeds differ on every resume (the folder's size enters) but repeat with --seed.
            base = self.config.seed if self.config.seed is not None else random.SystemRandom().randrange(2**62)
            self._seed_rng = random.Random(f"{base}:{self.config.worker}:{int(self.state.finished.sum())}")
        return int(self.state.missing().sum())

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Ask the run to stop soon and finish its open shard. Safe in a signal handler: it
        takes no lock (the main loop does the rest within 0.2 s)."""
        self.report.signum = int(signum)
        self._interrupt_requested = True
        self._stop.set()

    @property
    def interrupting(self) -> bool:
        return self._interrupt_requested

    def close(self) -> None:
        self.state.close()
        self._opened = False

    def __enter__(self) -> Miner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _provenance(self) -> list:
        c, o = self.config, self.config.options
        options = {
            k: v
            for k, v in (
                ("size", list(o.size) if o.size else None),
                ("batch", o.batch),
                ("steps", o.steps),
                ("cfg_scale", o.cfg_scale),
                ("sampler", o.sampler),
            )
            if v is not None
        }
        return [
            {
                "step": "mine",
                "api": self.adapter.name,
                "url": redact_url(self.adapter.base),
                "model": self.adapter.model_name(),
                "prompts": list(c.prompts),
                "negative_prompt": o.negative_prompt,
                "options": options,
                "per_class": c.per_class,
                "worker": c.worker,
                "run": self.state.run,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": utc_now(),
            }
        ]

    # ------------------------------------------------------------------ run

    def run(self) -> MineReport:
        missing = self.prepare()
        report = self.report
        started = self._clock()
        if self.config.max_minutes is not None:
            self._deadline = started + self.config.max_minutes * 60.0
        if missing == 0 or not self.state.remaining().any():
            report.stop = "nothing-to-do" if missing == 0 else "claimed"
            self._finish(started)
            return report
        if self._interrupt_requested:
            self._halt("interrupted")
            self._finish(started)
            return report
        main_failed = False
        threads = [
            threading.Thread(target=self._worker, name=f"mine-{i}", daemon=True) for i in range(self.concurrency)
        ]
        for t in threads:
            t.start()
        try:
            while True:
                try:
                    outcome = self._results.get(timeout=0.2)
                except queue.Empty:
                    outcome = None
                if outcome is not None:
                    self._process(outcome)
                if self._interrupt_requested:
                    self._halt("interrupted")
                if self._deadline is not None and self._clock() >= self._deadline:
                    self._halt("max-minutes")
                if not any(t.is_alive() for t in threads) and self._results.empty():
                    break
                if (report.exception is not None or report.stop == "interrupted") and self._results.empty():
                    break  # fatal or interrupted: do not wait for requests in flight
        except KeyboardInterrupt:
            # A KeyboardInterrupt can land anywhere, even inside HDF5: drop the open shard.
            self._halt("interrupted")
            report.exception = MineInterrupted(
                "interrupted", "the unfinished shard was dropped; rerun the same command to continue"
            )
            main_failed = True
        except BaseException as exc:
            # Raised in this thread, possibly while writing: the open shard cannot be trusted.
            self._halt("error")
            report.exception = exc
            main_failed = True
            raise
        finally:
            self._halt(report.stop if self._stopping else "done")
            self._close_series(failed=main_failed)
        self._finish(started)
        return report

    def _finish(self, started: float) -> None:
        report = self.report
        report.elapsed = self._clock() - started
        report.final_rate = self.bucket.rate
        try:
            self.state.sync()
        except FakecifarError:
            pass
        report.per_class = self.state.counts()
        report.missing = int(self.state.missing().sum())
        report.others = list(self.state.other_workers)
        if report.stop == "done" and report.missing > 0:
            report.stop = "claimed"  # the rest is reserved by other live workers
        elif report.stop in ("max-requests", "max-minutes") and report.missing == 0:
            report.stop = "done"  # the bound and the quota were reached together
        if report.exception is not None:
            report.stop = "error" if report.stop not in ("interrupted",) else report.stop
            report.error = str(report.exception)

    def _halt(self, reason: str) -> None:
        with self._cv:
            if not self._stopping:
                self._stopping = True
                self.report.stop = reason
            self._stop.set()
            self._cv.notify_all()

    def _fail(self, exc: BaseException) -> None:
        """A fatal condition seen by a worker thread: stop everything, report it."""
        with self._lock:
            if self.report.exception is None:
                self.report.exception = exc
        self._halt("error")

    # ------------------------------------------------------------------ worker threads

    def _worker(self) -> None:
        session = thread_session()
        try:
            while True:
                job = self._next_job()
                if job is None:
                    return
                self._results.put(self._perform(session, job))
        except BaseException as exc:  # noqa: BLE001 - a state error or a bug: stop the run with it
            self._fail(exc)
        finally:
            close_thread_session()

    def _next_job(self) -> Job | None:
        c = self.config
        with self._cv:
            while True:
                if self._stopping:
                    return None
                if c.max_requests is not None and self._sent >= c.max_requests:
                    self._halt("max-requests")
                    return None
                got = self.state.reserve(self.per_call)
                if got is not None:
                    label, count = got
                    self._inflight += 1
                    self._jobs += 1
                    template = c.prompts[self._templates[label] % len(c.prompts)]
                    self._templates[label] += 1
                    assert self._seed_rng is not None  # prepare() made it before any job
                    seed = self._seed_rng.randrange(2**31 - 1 - 64)
                    return Job(label, prompt_for(template, c.classes[label]), count, seed, self._jobs)
                if self._inflight == 0:
                    self._cv.notify_all()
                    return None  # nothing left to reserve and nothing in flight: done
                # Requests in flight may fail and give their reservation back: wait, then look
                # again (also at the folder: another worker may have died).
                self._cv.wait(timeout=1.0)

    def _wait(self, seconds: float) -> bool:
        """Sleep unless stopped (never past --max-minutes); False when the run is stopping."""
        if self._deadline is not None:
            seconds = min(seconds, max(0.0, self._deadline - self._clock()) + 0.01)
        if seconds > 0:
            self._stop.wait(seconds)
        return not self._stop.is_set()

    def _take_request(self) -> bool:
        """Count one request against --max-requests and --max-minutes, or refuse."""
        c = self.config
        with self._cv:
            if self._stopping:
                return False
            if self._past_deadline():
                return False
            if c.max_requests is not None and self._sent >= c.max_requests:
                self._halt("max-requests")
                return False
            self._sent += 1
        return True

    def _past_deadline(self) -> bool:
        if self._deadline is not None and self._clock() >= self._deadline:
            self._halt("max-minutes")
            return True
        return False

    def _count(self, reason: str, message: str | None = None) -> None:
        with self._lock:
            self.report.failures[reason] += 1
            if message:
                self.report.last_failure = self.adapter.scrub(message)

    def _perform(self, session, job: Job) -> _Outcome:
        a, c = self.adapter, self.config
        request = a.build(job)
        headers = a.auth_headers()
        attempt = 0
        while True:
            # Counted first, paced last: whatever may block (_cv is held by a thread reserving
            # under the folder lock) must not sit between a paced start and its request, or
            # the starts reach the server bunched up.
            if not self._take_request() or not self.bucket.acquire(self._wait) or self._past_deadline():
                return _Outcome(job, stopped=True)
            sent_at = self._clock()
            with self._lock:
                self.report.requests += 1
            try:
                response = fetch(session, request, headers, timeout=self.timeout, max_bytes=c.max_bytes)
            except TransportError as exc:
                self._count(exc.reason, exc.message)
                if exc.fatal:
                    self._fail(ApiError(exc.message, "check --url"))
                    return _Outcome(job, stopped=True)
                verdict = Verdict("retry" if exc.retryable else "skip", exc.reason, exc.message)
            else:
                latency = self._clock() - sent_at
                pause = a.pause_hint(response)
                if pause:
                    self.bucket.pause_until(self._clock() + min(pause, MAX_HONOURED_WAIT))
                if 200 <= response.status < 300:
                    try:
                        generated = a.parse(response, job)
                    except BadResponse as exc:
                        verdict = exc.verdict
                        self._count(verdict.reason, verdict.message)
                    else:
                        with self._lock:
                            self.report.ok_requests += 1
                            self.report.latency_sum += latency
                        self.aimd.on_success()
                        return self._decode(job, generated)
                else:
                    verdict = a.classify(response)
                    self._count(verdict.reason, verdict.message)
            if verdict.throttle:
                with self._lock:
                    self.report.rate_limited += 1
                if self.aimd.on_throttle(sent_at):
                    self.on_message(f"rate limited (HTTP 429): slowing down to {self.bucket.rate:.3g} requests/s")
            if verdict.action == "fatal":
                self._fail(ApiError(verdict.message, verdict.hint))
                return _Outcome(job, stopped=True)
            if verdict.action == "skip" or attempt >= c.retries:
                return _Outcome(job, failed=verdict.reason)
            wait = verdict.wait
            if wait is not None and wait > MAX_HONOURED_WAIT:
                self._fail(
                    ApiError(
                        f"the {a.name} API asks to wait {wait:.0f} s before retrying ({verdict.message})",
                        "stopping now; rerun the same command later, e.g. from cron",
                    )
                )
                return _Outcome(job, stopped=True)
            if wait is None:
                wait = backoff_delay(attempt, c.backoff, rng=self._rng)
            else:
                # The server said when: everyone holds off until then (a little jitter spreads
                # the threads that all got the same answer).
                self.bucket.pause_until(self._clock() + wait)
                wait += self._rng.uniform(0.0, min(c.backoff, 1.0) * 0.1)
            with self._lock:
                self.report.retries += 1
            attempt += 1
            if not self._wait(wait):
                return _Outcome(job, stopped=True)

    def _decode(self, job: Job, generated: list[Generated]) -> _Outcome:
        items, when = [], utc_now()
        bad = 0
        for i, gen in enumerate(generated):
            name = f"{self.adapter.name} request {job.number} image {i}"
            if gen.data is None:
                bad += 1
                continue
            try:
                image = decode_image(gen.data, name, self.config.max_pixels)
            except BadImageError:
                bad += 1
                continue
            items.append(_Item(image, digest32(pixel_sha256(image[None])[0]), phash(image), gen, when))
        with self._lock:
            self.report.images_received += len(generated)
            self.report.bad_images += bad
            if bad:
                self.report.failures["bad_image"] += bad
        if not items:
            return _Outcome(job, failed="bad_image" if bad else "no_images")
        return _Outcome(job, items=items)

    # ------------------------------------------------------------------ main thread

    def _process(self, outcome: _Outcome) -> None:
        job, report, c = outcome.job, self.report, self.config
        accepted: list[_Item] = []
        reserved = job.count
        try:
            for item in outcome.items:
                if self.state.is_duplicate(item.sha) or any(item.sha == a.sha for a in accepted):
                    report.duplicates += 1
                    continue
                if c.dedup_phash is not None and (
                    self.state.is_near(item.phash, c.dedup_phash)
                    or any(hamming(item.phash, a.phash) <= c.dedup_phash for a in accepted)
                ):
                    report.near_duplicates += 1
                    continue
                if len(accepted) >= reserved:
                    if self._stopping or not self.state.extend(job.label):
                        report.surplus += 1
                        continue
                    reserved += 1
                accepted.append(item)
        finally:
            self.state.settle(job.label, reserved, len(accepted))
        for item in accepted:
            self.state.remember(item.sha, item.phash)
        if accepted:
            self._write(job, accepted)
            report.images += len(accepted)
            if self.on_progress:
                self.on_progress(len(accepted))
        if outcome.failed:
            report.failed_requests += 1
        with self._cv:
            self._inflight -= 1
            self._cv.notify_all()
        if outcome.stopped:
            return
        self._empty_streak = 0 if accepted else self._empty_streak + 1
        if self._empty_streak >= c.max_failures and report.exception is None:
            top = ", ".join(f"{k} {v}" for k, v in report.failures.most_common(3))
            why = (
                f"failures: {top}; last: {report.last_failure}"
                if report.last_failure
                else f"failures: {top}"
                if top
                else f"{report.duplicates} exact and {report.near_duplicates} near duplicates"
            )
            self._fail(
                ApiError(
                    f"the last {self._empty_streak} requests brought no new image ({why})",
                    "--max-failures sets this limit",
                )
            )

    def _series_for(self, size: tuple[int, int]) -> ShardSeriesWriter:
        series = self._series.get(size)
        if series is None:
            prefix = self.state.prefix if not self._series else f"{self.state.prefix}-{size[0]}x{size[1]}"
            series = ShardSeriesWriter(
                self.config.out_dir,
                shard_size=self.config.shard_size,
                classes=self.config.classes,
                image_size=size,
                producer=producer("mine"),
                prefix=prefix,
                provenance=self._provenance(),
                on_shard=self._shard_done,
            )
            self._series[size] = series
        return series

    def _shard_done(self, path: Path) -> None:
        self.state.shard_finished(path)
        self.report.shards.append(path)
        if self.on_shard:
            self.on_shard(path)

    def _write(self, job: Job, items: list[_Item]) -> None:
        a = self.adapter
        by_size: dict[tuple[int, int], list[_Item]] = {}
        for item in items:
            by_size.setdefault(item.image.shape[:2], []).append(item)
        for size, group in by_size.items():
            source = [
                json.dumps(
                    {
                        "api": a.name,
                        "model": it.gen.model or a.model_name(),
                        "request_id": it.gen.request_id,
                        "time": it.time,
                        "worker": self.config.worker,
                        "run": self.state.run,
                        "job": job.number,
                        **it.gen.extra,
                    },
                    sort_keys=True,
                )
                for it in group
            ]
            self._series_for(size).add_batch(
                np.stack([it.image for it in group]),
                np.full(len(group), job.label, np.int16),
                prompt=[job.prompt] * len(group),
                seed=np.array([it.gen.seed for it in group], np.int64),
                source=source,
                sha256=np.array([it.sha for it in group], dtype="S32"),
                origin=np.full(len(group), ORIGIN_FAKE, np.uint8),
                phash=np.array([it.phash for it in group], dtype=np.uint64),
            )

    def _close_series(self, failed: bool) -> None:
        """Finish every open shard with what it holds (abort only after an internal error)."""
        error = None
        for series in self._series.values():
            try:
                if failed:
                    series.abort()
                else:
                    series.close()
            except FakecifarError as exc:
                series.abort()
                error = error or exc
        self._series.clear()
        if error is not None and self.report.exception is None:
            self.report.exception = error


def _signal_word(signum: int) -> str:
    return "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
