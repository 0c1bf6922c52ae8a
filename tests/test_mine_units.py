"""The pieces of `fakecifar mine` on their own: pacing with a fake clock, wait hints, the
perceptual hash, protocol parsing and classification, secrets, and the folder state."""

from __future__ import annotations

import base64
import bisect
import io
import json
import pickle
import random
import threading
import time

import numpy as np
import pytest
from PIL import Image
from requests.structures import CaseInsensitiveDict

from fakecifar.errors import UsageError
from fakecifar.mine import ADAPTERS, ApiOptions, MinerBusyError, MineState, Secret, adapter_class
from fakecifar.mine.adapters import BadResponse, Job, Response, decode_b64, redact_url
from fakecifar.mine.pacing import (
    PACING_MARGIN,
    Aimd,
    TokenBucket,
    backoff_delay,
    parse_duration,
    ratelimit_pause,
    retry_after,
)
from fakecifar.mine.phash import HashIndex, hamming, phash


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> bool:
        self.t += seconds
        return True


# --------------------------------------------------------------------------- pacing


def test_token_bucket_spaces_request_starts():
    clock = FakeClock()
    bucket = TokenBucket(2.0, clock=clock)
    starts = []
    for _ in range(5):
        assert bucket.acquire(clock.sleep)
        starts.append(clock.t)
    assert np.allclose(np.diff(starts), (1 + PACING_MARGIN) / 2.0)


def test_token_bucket_pause_and_rate_change_and_no_credit_while_idle():
    clock = FakeClock()
    bucket = TokenBucket(1.0, clock=clock, margin=0.0)
    assert bucket.try_take() == 0.0
    assert bucket.try_take() == pytest.approx(1.0)
    clock.t += 30  # idle: nothing accrues, one start and then the spacing again
    assert [bucket.try_take(), bucket.try_take()] == [0.0, pytest.approx(1.0)]
    bucket.pause_until(clock.t + 10)
    clock.t += 5
    assert bucket.try_take() == pytest.approx(5.0)  # paused, though the spacing has passed
    clock.t += 5
    assert bucket.try_take() == 0.0
    bucket.rate = 4.0  # the next start is spaced at the new rate from the last one
    assert bucket.try_take() == pytest.approx(0.25)
    clock.t += 0.25
    assert bucket.try_take() == 0.0


def _busiest_window(starts: list[float], window: float = 1.0) -> int:
    """The most starts in any half-open window (t - window, t], the way rate limiters count."""
    starts = sorted(starts)
    return max(bisect.bisect_right(starts, t) - bisect.bisect_right(starts, t - window) for t in starts)


def test_starts_exactly_one_interval_apart_fill_a_window_without_overfilling_it():
    # 0.25 s steps and t = 100 are exact in binary: the boundary itself is tested.
    clock = FakeClock()
    bucket = TokenBucket(4.0, clock=clock, margin=0.0)
    starts = []
    for _ in range(9):
        assert bucket.acquire(clock.sleep)
        starts.append(clock.t)
    assert np.diff(starts).tolist() == [0.25] * 8
    assert _busiest_window(starts) == 4  # 100.0 .. 101.0 are 5 starts, but 100.0 is out of (100, 101]


class SharedClock:
    """A fake monotonic clock on one timeline for several threads: a thread that read t and
    sleeps s wakes at t + s (or at once, if another thread already moved time past it). Each
    thread can ask what it read last: after `acquire` returns, that is its start time."""

    def __init__(self):
        self.t = 100.0
        self._lock = threading.Lock()
        self._local = threading.local()

    def __call__(self) -> float:
        with self._lock:
            self._local.last = self.t
            return self.t

    def sleep(self, seconds: float) -> bool:
        with self._lock:
            self.t = max(self.t, self._local.last + seconds)
        time.sleep(0)  # let the other threads race for the same moment
        return True

    def idle(self, seconds: float) -> None:
        self.sleep(seconds)
        self()

    @property
    def last(self) -> float:
        return self._local.last


@pytest.mark.parametrize("rate", [20.0, 7.0, 3.0])
def test_no_window_of_one_second_ever_holds_more_than_rate_starts(rate):
    """Several threads, bursts of demand between random idle spells, AIMD cuts and recovery:
    never more than `rate` starts in any (t - 1 s, t]."""
    clock = SharedClock()
    bucket = TokenBucket(rate, clock=clock)
    aimd = Aimd(bucket, rate, clock=clock)
    starts: list[float] = []
    record = threading.Lock()

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        clock()
        for _ in range(12):
            for _ in range(rng.randint(1, 3 * int(rate))):  # a burst of demand
                assert bucket.acquire(clock.sleep)
                with record:
                    starts.append(clock.last)
                if rng.random() < 0.03:
                    aimd.on_throttle(clock.last)  # a real 429: the rate halves...
                else:
                    aimd.on_success()  # ...and creeps back, never above `rate`
            clock.idle(rng.choice([0.0, rng.uniform(0.0, 1.5)]))

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(starts) > 10 * rate
    assert _busiest_window(starts) <= rate
    assert bucket.rate <= rate and aimd.cuts > 0


def test_saturated_demand_is_paced_at_the_rate_less_the_margin():
    clock = FakeClock()
    bucket = TokenBucket(20.0, clock=clock)
    starts = []
    for _ in range(201):
        assert bucket.acquire(clock.sleep)
        starts.append(clock.t)
    assert (len(starts) - 1) / (starts[-1] - starts[0]) == pytest.approx(20.0 / (1 + PACING_MARGIN))
    assert _busiest_window(starts) == 20


def test_unlimited_bucket_never_waits_but_honours_pauses():
    clock = FakeClock()
    bucket = TokenBucket(None, clock=clock)
    assert all(bucket.try_take() == 0.0 for _ in range(100))
    bucket.pause_until(clock.t + 2)
    assert bucket.try_take() == pytest.approx(2.0)


def test_acquire_gives_up_when_told_to_stop():
    bucket = TokenBucket(0.001, clock=FakeClock())
    bucket.try_take()
    assert bucket.acquire(lambda s: False) is False


def test_aimd_cuts_once_per_window_and_recovers_gently():
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    aimd = Aimd(bucket, 10.0, clock=clock)
    sent = clock.t
    clock.t += 1
    assert aimd.on_throttle(sent) and bucket.rate == pytest.approx(5.0)
    # 429s for requests sent before the cut are the same event.
    assert not aimd.on_throttle(sent) and bucket.rate == pytest.approx(5.0)
    clock.t += 1
    assert aimd.on_throttle(clock.t) and bucket.rate == pytest.approx(2.5)
    rates = []
    for _ in range(400):
        aimd.on_success()
        rates.append(bucket.rate)
    assert all(b >= a for a, b in zip(rates, rates[1:]))  # additive increase, monotone
    assert rates[-1] == pytest.approx(10.0)  # back to the configured rate, never above
    # Near the rate of the last cut the steps are 10x smaller.
    steps = np.diff([2.5] + rates)
    near = [s for r, s in zip(rates, steps) if 0.85 * 5.0 <= r - s < 5.0]
    assert near and max(near) < 0.021


def test_aimd_cuts_from_the_observed_rate_when_the_limit_is_higher():
    clock = FakeClock()
    bucket = TokenBucket(1000.0, clock=clock)
    aimd = Aimd(bucket, 1000.0, clock=clock)
    for _ in range(10):  # 4 starts per second really happen
        bucket.try_take()
        clock.t += 0.25
    aimd.on_throttle(clock.t)
    assert bucket.rate == pytest.approx(2.0, rel=0.01)


def test_full_jitter_backoff_is_bounded_and_grows():
    rng = random.Random(1)
    for attempt in range(8):
        values = [backoff_delay(attempt, 0.5, cap=10.0, rng=rng) for _ in range(200)]
        assert min(values) >= 0 and max(values) <= min(10.0, 0.5 * 2**attempt)
        assert max(values) > 0.7 * min(10.0, 0.5 * 2**attempt)  # really spread over the range


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("1.5", 1.5),
        ("20ms", 0.02),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("0", 0.0),
        ("", None),
        ("soon", None),
        ("-1", None),
        (None, None),
        ("1s2x", None),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_hints():
    h = CaseInsensitiveDict
    assert retry_after(h({"Retry-After": "7"})) == 7.0
    assert retry_after(h({"retry-after-ms": "250", "Retry-After": "7"})) == pytest.approx(0.25)
    assert retry_after(h({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), now=1445412470.0) == pytest.approx(10.0)
    assert retry_after(h({"Retry-After": "garbage"})) is None
    assert retry_after(h({})) is None
    assert ratelimit_pause(h({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m30s"})) == 90.0
    assert ratelimit_pause(h({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1s"})) is None


# --------------------------------------------------------------------------- phash


def _smooth(seed: int, size: int = 64) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def test_phash_is_robust_to_resizing_noise_and_jpeg_but_tells_images_apart():
    img = _smooth(1)
    h = phash(img)
    assert 0 <= h < 2**64
    resized = np.asarray(Image.fromarray(img).resize((40, 40), Image.Resampling.LANCZOS))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=70)
    jpeg = np.asarray(Image.open(buf).convert("RGB"))
    noisy = np.clip(img.astype(int) + np.random.default_rng(0).integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
    for variant in (resized, jpeg, noisy):
        assert hamming(h, phash(variant)) <= 6
    others = [phash(_smooth(s)) for s in range(2, 40)]
    assert min(hamming(h, o) for o in others) > 6
    assert np.mean([hamming(h, o) for o in others]) > 20


def test_hash_index_finds_neighbours_exactly():
    index = HashIndex()
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(0, 2**63, 3000, dtype=np.int64)]
    for v in values:
        index.add(v)
    assert len(index) == 3000
    probe = values[1234] ^ 0b1011  # 3 bits away
    assert index.near(probe, 3) and not index.near(probe, 2)
    assert index.near(values[5], 0)
    assert not index.near(values[5] ^ 1, 0)


# --------------------------------------------------------------------------- secrets and URLs


def test_secret_never_shows_itself():
    key = Secret("sk-very-secret")
    assert "sk-very" not in repr(key) and "sk-very" not in str(key) and "sk-very" not in f"{key}"
    assert key.reveal() == "sk-very-secret"
    assert key.scrub("bad key sk-very-secret!") == "bad key ***!"
    with pytest.raises(TypeError):
        pickle.dumps(key)
    adapter = adapter_class("openai")("https://user:pw@api.example.com/v1", ApiOptions(), key)
    assert "sk-very" not in repr(adapter) and "pw" not in repr(adapter)
    assert adapter.base == "https://user:pw@api.example.com"  # /v1 is the adapter's to add
    assert adapter.auth_headers() == {"Authorization": "Bearer sk-very-secret"}


def test_redact_url():
    assert redact_url("https://u:p@h.example:8443/x?token=abc") == "https://h.example:8443/x"


def test_registry_lists_every_protocol_and_refuses_others():
    assert {"craiyon", "a1111", "openai", "hf"} <= set(ADAPTERS)
    with pytest.raises(UsageError, match="unknown --api"):
        adapter_class("midjourney")


# --------------------------------------------------------------------------- protocols


def _png(color=(10, 20, 30), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _response(status=200, body=b"", headers=None, url="http://x/y") -> Response:
    return Response(status, CaseInsensitiveDict(headers or {"content-type": "application/json"}), body, url)


JOB = Job(label=0, prompt="a photo of a cat", count=3, seed=42, number=1)


def test_decode_b64_accepts_newlines_and_data_urls_and_refuses_garbage():
    data = _png()
    assert decode_b64(base64.encodebytes(data).decode(), "x") == data
    assert decode_b64("data:image/png;base64," + base64.b64encode(data).decode(), "x") == data
    with pytest.raises(ValueError):
        decode_b64("%%%", "x")
    with pytest.raises(ValueError):
        decode_b64(None, "x")


def test_a1111_info_string_gives_seeds_and_model_and_skips_the_grid():
    adapter = adapter_class("a1111")(None, ApiOptions(batch=2))
    request = adapter.build(JOB)
    assert request.json is not None
    assert request.url == "http://127.0.0.1:7860/sdapi/v1/txt2img" and request.json["batch_size"] == 2
    images = [
        base64.b64encode(_png(size=(16, 8))).decode(),
        base64.b64encode(_png()).decode(),
        base64.b64encode(_png((1, 2, 3))).decode(),
    ]
    info = json.dumps({"all_seeds": [42, 43], "sd_model_name": "dreamshaper", "index_of_first_image": 1})
    out = adapter.parse(_response(body=json.dumps({"images": images, "parameters": {}, "info": info}).encode()), JOB)
    assert [g.seed for g in out] == [42, 43] and {g.model for g in out} == {"dreamshaper"}
    assert out[0].data == _png()
    # Older servers: no index_of_first_image, one image more than seeds means a grid first.
    info = json.dumps({"all_seeds": [42, 43]})
    out = adapter.parse(_response(body=json.dumps({"images": images, "info": info}).encode()), JOB)
    assert len(out) == 2


def test_openai_error_classification():
    adapter = adapter_class("openai")(None, ApiOptions(), Secret("sk-x"))

    def err(status, code, headers=None):
        body = json.dumps({"error": {"message": f"msg {code}", "type": code, "code": code}}).encode()
        return adapter.classify(_response(status, body, {"content-type": "application/json", **(headers or {})}))

    v = err(429, "rate_limit_exceeded", {"retry-after-ms": "1500"})
    assert (v.action, v.reason, v.throttle, v.wait) == ("retry", "rate_limited", True, 1.5)
    assert err(429, "insufficient_quota").action == "fatal"
    assert err(400, "content_policy_violation").action == "skip"
    assert err(400, "invalid_value").action == "fatal"
    assert err(401, "invalid_api_key").action == "fatal"
    assert err(500, "server_error").action == "retry"


def test_cloudflare_pages_are_recognised():
    adapter = adapter_class("craiyon")(None, ApiOptions())
    page = b"<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>cloudflare</body></html>"
    v = adapter.classify(_response(403, page, {"content-type": "text/html", "server": "cloudflare"}))
    assert v.action == "fatal" and "Cloudflare" in v.message and "'Just a moment...'" in v.message
    assert adapter.classify(_response(503, page, {"content-type": "text/html"})).action == "retry"
    with pytest.raises(BadResponse) as info:
        adapter.parse(_response(200, page, {"content-type": "text/html"}), JOB)
    assert info.value.verdict.action == "fatal"


def test_hf_loading_and_json_instead_of_image():
    adapter = adapter_class("hf")(None, ApiOptions(model="org/m"))
    assert adapter.build(JOB).url.endswith("/models/org/m")
    v = adapter.classify(_response(503, b'{"error": "loading", "estimated_time": 12.5}'))
    assert (v.action, v.reason, v.wait, v.throttle) == ("retry", "model_loading", 12.5, False)
    with pytest.raises(BadResponse):
        adapter.parse(_response(200, b'{"error": "oops"}'), JOB)
    out = adapter.parse(_response(200, _png(), {"content-type": "image/png"}), JOB)
    assert out[0].data == _png() and out[0].seed == 42


# --------------------------------------------------------------------------- folder state


def test_claims_of_live_workers_share_the_quota(tmp_path):
    a = MineState(tmp_path, ["cat", "dog"], per_class=6, worker="a").open()
    b = MineState(tmp_path, ["cat", "dog"], per_class=6, worker="b").open()
    try:
        assert a.reserve(5) == (0, 5)
        assert a.reserve(5) == (1, 5)
        assert b.reserve(5) in ((0, 1), (1, 1))
        assert b.reserve(5) in ((0, 1), (1, 1))
        assert b.reserve(5) is None  # a holds the rest
        a.settle(0, 5, 2)  # 2 of 5 came back: 3 are free again
        assert b.reserve(5) == (0, 3)
    finally:
        a.close()
    # a is gone: its claims vanish with its lock.
    assert b.reserve(9) == (1, 5)
    b.close()


def test_one_live_miner_per_worker_id(tmp_path):
    first = MineState(tmp_path, ["cat"], per_class=1).open()
    try:
        with pytest.raises(MinerBusyError, match="already being mined.*--worker"):
            MineState(tmp_path, ["cat"], per_class=1).open()
    finally:
        first.close()
    MineState(tmp_path, ["cat"], per_class=1).open().close()  # released on close


def test_partials_of_dead_workers_are_removed_and_others_kept(tmp_path):
    live = MineState(tmp_path, ["cat"], per_class=1, worker="live").open()
    try:
        dead = tmp_path / "mine-gone-20250101000000-abcd-00003.h5.partial"
        busy = tmp_path / "mine-live-20250101000000-abcd-00000.h5.partial"
        foreign = tmp_path / "other.h5.partial"
        for p in (dead, busy, foreign):
            p.write_bytes(b"x")
        state = MineState(tmp_path, ["cat"], per_class=1, worker="new").open()
        state.close()
        assert not dead.exists() and busy.exists() and foreign.exists()
    finally:
        live.close()


def test_bad_worker_ids_are_refused(tmp_path):
    for bad in ("", "../x", "a/b", "-x", "x" * 65):
        with pytest.raises(UsageError):
            MineState(tmp_path, ["cat"], per_class=1, worker=bad)
