"""Benchmark `fakecifar mine` against a loopback Craiyon-like server with a hard rate limit.

The server (tests/mine_server.py, in its own process) answers each request after LATENCY
seconds with 9 unique images and refuses with 429 (no Retry-After) any request above R per
second. The ceiling is therefore 9*R images/s. Measured:

  1. the miner told the limit (--rate R): images/s vs the ceiling (goal >= 95%), counted
     over the whole run (start to last image, so one latency of ramp-up is included) and in
     the steady state (between the first and the last answer); lost and duplicated images
     (every image the server sent must be in exactly one shard); RSS early vs at the end;
  2. the miner not told the limit (--rate 2R): AIMD has to find it from the 429s;
  3. a naive sequential client (one request at a time, sleep on 429) on the same server.

Those three face a token bucket with a second of burst (lenient). Then, side by side, the
miner told the limit against a strict server -- at most R requests in any sliding second,
(now - 1 s, now], the 429 for the (R+1)th -- pacing as before (starts exactly 1/R apart,
margin 0) and as now (PACING_MARGIN wider): achieved requests/s / R, the 429s it earned, the
rate it ended at (each 429 halves it) and the busiest second the server saw.

    .venv/bin/python bench/bench_mine.py                # ~3.5 minutes
    .venv/bin/python bench/bench_mine.py --seconds 20   # quicker, noisier
    .venv/bin/python bench/bench_mine.py --strict-only  # the strict pair only, ~1 minute

Prints tables and lines to paste into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from fakecifar.mine.pacing import PACING_MARGIN

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10


def start_server(args, rate_limit: float, limiter: str = "bucket") -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "mine_server.py"),
        "--api",
        "craiyon",
        "--latency",
        str(args.latency),
        "--images",
        "9",
        "--size",
        str(args.size),
        "--rate-limit",
        str(rate_limit),
        "--limiter",
        limiter,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise SystemExit(f"the test server did not start: {url!r}")
    return proc, url


def server_stats(url: str) -> dict:
    return requests.get(f"{url}/_stats", timeout=30).json()


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# The miner as `fakecifar mine` runs it, but with the pacing margin set: the CLI has no option
# for it, and the strict runs compare two margins.
MARGIN_RUNNER = """
import json, sys
from pathlib import Path
from fakecifar.importing import parse_classes
from fakecifar.mine import MineConfig, Miner
a = json.loads(sys.argv[1])
config = MineConfig(api="craiyon", url=a["url"], out_dir=Path(a["out"]), per_class=a["per_class"],
                    classes=parse_classes("cifar10"), rate=a["rate"], concurrency=a["concurrency"],
                    retries=20, shard_size=500)
with Miner(config, on_message=lambda m: print(m, file=sys.stderr)) as miner:
    miner.bucket.margin = a["margin"]
    report = miner.run()
print(json.dumps(report.to_dict()))
"""


def run_miner(args, url: str, out: Path, rate: float, seconds: float, margin: float | None = None) -> dict:
    per_class = max(9, int(round(9 * args.rate * seconds / CLASSES / 9)) * 9)  # whole calls: no surplus
    if margin is None:
        cmd = [
            sys.executable,
            "-m",
            "fakecifar",
            "-q",
            "mine",
            "--api",
            "craiyon",
            "--url",
            url,
            "-o",
            str(out),
            "--per-class",
            str(per_class),
            "--rate",
            str(rate),
            "--concurrency",
            str(args.concurrency),
            "--shard-size",
            "500",
            "--retries",
            "20",
            "--json",
        ]
    else:
        cmd = [
            sys.executable,
            "-c",
            MARGIN_RUNNER,
            json.dumps(
                {
                    "url": url,
                    "out": str(out),
                    "per_class": per_class,
                    "rate": rate,
                    "concurrency": args.concurrency,
                    "margin": margin,
                }
            ),
        ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    samples: list[tuple[float, float]] = []

    def sample():
        while proc.poll() is None:
            value = rss_mib(proc.pid)
            if value:
                samples.append((time.monotonic() - start, value))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.monotonic() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"miner failed ({proc.returncode}): {stderr.strip()}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    early = [v for t, v in samples if t >= 0.1 * wall] or [v for _, v in samples]
    return {
        "summary": summary,
        "wall": wall,
        "per_class": per_class,
        "stderr": stderr,
        "rss_early": early[0] if early else None,
        "rss_end": samples[-1][1] if samples else None,
        "rss_peak": max((v for _, v in samples), default=None),
    }


def check_images(out: Path, served: list[str]) -> dict:
    from fakecifar.shards import Shard

    stored = []
    for path in sorted(out.glob("*.h5")):
        shard = Shard(path)
        # numpy strips trailing NUL bytes from S32 values: pad back to the 32-byte digest
        stored += [bytes(s).ljust(32, b"\0").hex() for s in shard.read("sha256")]
        shard.close()
    stored_set, served_set = set(stored), set(served)
    return {
        "stored": len(stored),
        "duplicated": len(stored) - len(stored_set),
        "lost": len(served_set - stored_set),
        "unknown": len(stored_set - served_set),
        "served_dupes": len(served) - len(served_set),
    }


def steady_rate(stats: dict, images_per_call: int = 9) -> float:
    times = sorted(stats["ok_times"])
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return images_per_call * (len(times) - 1) / (times[-1] - times[0])


def busiest_second(times: list[float]) -> int:
    """The most requests that arrived in any (t - 1 s, t], the strict server's window."""
    times = sorted(times)
    return max((bisect.bisect_right(times, t) - bisect.bisect_right(times, t - 1.0) for t in times), default=0)


def naive_client(url: str, seconds: float) -> float:
    import base64

    from fakecifar.images import decode_image

    session = requests.Session()
    images, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        r = session.post(f"{url}/generate", json={"prompt": "a photo of a cat"}, timeout=60)
        if r.status_code == 429:
            time.sleep(float(r.headers.get("Retry-After", 1)))
            continue
        r.raise_for_status()
        for item in r.json()["images"]:
            decode_image(base64.b64decode(item))
            images += 1
    return images / (time.monotonic() - start)


def scenario(
    args, name: str, client_rate: float, seconds: float, tmp: Path, limiter: str = "bucket", margin: float | None = None
) -> dict:
    proc, url = start_server(args, args.rate, limiter)
    try:
        out = tmp / name
        result = run_miner(args, url, out, client_rate, seconds, margin)
        stats = server_stats(url)
    finally:
        proc.terminate()
        proc.wait()
    s = result["summary"]
    ceiling = 9 * args.rate
    result.update(check_images(out, stats["served_sha"]))
    result.update(
        {
            "name": name,
            "client_rate": client_rate,
            "images": s["images"],
            "elapsed": s["elapsed_s"],
            "images_per_s": s["images_per_s"],
            "efficiency": s["images_per_s"] / ceiling,
            "steady": steady_rate(stats),
            "steady_efficiency": steady_rate(stats) / ceiling,
            "requests": s["requests"],
            "rate_limited": s["rate_limited"],
            "final_rate": s["final_rate"],
            "mean_latency": s["mean_latency_s"],
            "margin": margin,
            "busiest": busiest_second(stats["arrivals"]),
            "cuts": result["stderr"].count("slowing down"),
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5.0, help="the server's hard limit R, requests/s")
    parser.add_argument("--latency", type=float, default=2.0, help="seconds per request")
    parser.add_argument("--seconds", type=float, default=50.0, help="length of each miner run (approx.)")
    parser.add_argument("--naive-seconds", type=float, default=16.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--skip-unknown", action="store_true", help="skip the run with the limit unknown")
    parser.add_argument("--strict-seconds", type=float, default=20.0, help="length of each strict-window run")
    parser.add_argument("--strict-only", action="store_true", help="only the strict-window pair")
    args = parser.parse_args()
    ceiling = 9 * args.rate
    print(
        f"server: latency {args.latency:g} s, 9 images/call, hard limit {args.rate:g} requests/s "
        f"-> ceiling {ceiling:g} images/s; {os.cpu_count()} CPUs, Python {platform.python_version()}",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="bench_mine_") as tmpdir:
        tmp = Path(tmpdir)
        runs, naive = [], None
        if not args.strict_only:
            proc, url = start_server(args, args.rate)
            try:
                naive = naive_client(url, args.naive_seconds)
            finally:
                proc.terminate()
                proc.wait()
            print(f"naive sequential client: {naive:.2f} images/s", flush=True)
            runs.append(scenario(args, "known", args.rate, args.seconds, tmp))
            print(f"miner --rate {args.rate:g}: {runs[0]['images_per_s']:.2f} images/s", flush=True)
            if not args.skip_unknown:
                runs.append(scenario(args, "unknown", 2 * args.rate, args.seconds, tmp))
                print(f"miner --rate {2 * args.rate:g}: {runs[1]['images_per_s']:.2f} images/s", flush=True)
        strict = []
        for name, margin in (("before", 0.0), ("now", PACING_MARGIN)):
            strict.append(scenario(args, f"strict-{name}", args.rate, args.strict_seconds, tmp, "window", margin))
            r = strict[-1]
            print(
                f"miner --rate {args.rate:g} vs a strict window, margin {margin:g}: {r['rate_limited']} 429s, "
                f"{r['steady_efficiency'] * args.rate:.3f} requests/s",
                flush=True,
            )

    if runs:
        lenient_table(args, runs, naive)
    strict_table(args, strict)


def print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def lenient_table(args, runs: list[dict], naive: float | None) -> None:
    ceiling = 9 * args.rate
    print("\nagainst a token bucket with a second of burst:")
    header = (
        "run",
        "--rate",
        "images",
        "s",
        "img/s",
        "of ceiling",
        "steady",
        "429s",
        "requests",
        "lost",
        "dup",
        "RSS MiB early->end (peak)",
    )
    rows = []
    for r in runs:
        rows.append(
            (
                r["name"],
                f"{r['client_rate']:g}",
                r["images"],
                f"{r['elapsed']:.1f}",
                f"{r['images_per_s']:.2f}",
                f"{100 * r['efficiency']:.1f}%",
                f"{100 * r['steady_efficiency']:.1f}%",
                r["rate_limited"],
                r["requests"],
                r["lost"],
                r["duplicated"],
                f"{r['rss_early']:.0f}->{r['rss_end']:.0f} ({r['rss_peak']:.0f})",
            )
        )
    print_table(header, rows)
    known = runs[0]
    ratio = known["images_per_s"] / naive if naive else float("inf")
    print(f"\nnaive sequential client: {naive:.2f} images/s; the miner is {ratio:.1f}x faster")
    ok = known["efficiency"] >= 0.95 and all(r["lost"] == 0 and r["duplicated"] == 0 for r in runs)
    print(f"goal (>= 95% of the ceiling, nothing lost or duplicated): {'met' if ok else 'NOT met'}")
    unknown = (
        f", limit unknown (--rate {2 * args.rate:g}, AIMD) {100 * runs[1]['efficiency']:.1f}% "
        f"(steady {100 * runs[1]['steady_efficiency']:.1f}%, {runs[1]['rate_limited']} 429s)"
        if len(runs) > 1
        else ""
    )
    print("\nfor bench/RESULTS.md:")
    print(
        f"| {dt.date.today()} | bench_mine | R={args.rate:g} req/s, latency {args.latency:g} s, 9 img/call, "
        f"{os.cpu_count()} CPUs | {known['images_per_s']:.2f} img/s = {100 * known['efficiency']:.1f}% of "
        f"{ceiling:g} (steady {100 * known['steady_efficiency']:.1f}%){unknown}; lost "
        f"{sum(r['lost'] for r in runs)}, duplicated {sum(r['duplicated'] for r in runs)}; naive sequential "
        f"{naive:.2f} img/s (miner {ratio:.1f}x); RSS {known['rss_early']:.0f}->{known['rss_end']:.0f} MiB |"
    )


def strict_table(args, runs: list[dict]) -> None:
    print(f"\nagainst a strict window (at most {args.rate:g} requests in any (t - 1 s, t]), --rate {args.rate:g}:")
    header = (
        "pacing",
        "margin",
        "requests",
        "429s",
        "rate cuts",
        "final rate",
        "busiest second",
        "steady req/s",
        "of allowed",
        "img/s",
        "of ceiling",
        "lost",
        "dup",
    )
    rows = []
    for r in runs:
        rows.append(
            (
                r["name"].removeprefix("strict-"),
                f"{r['margin']:g}",
                r["requests"],
                r["rate_limited"],
                r["cuts"],
                f"{r['final_rate']:.3g}",
                r["busiest"],
                f"{r['steady_efficiency'] * args.rate:.3f}",
                f"{100 * r['steady_efficiency']:.1f}%",
                f"{r['images_per_s']:.2f}",
                f"{100 * r['efficiency']:.1f}%",
                r["lost"],
                r["duplicated"],
            )
        )
    print_table(header, rows)
    before, now = runs
    print(
        f"\nachieved / allowed (steady requests/s / {args.rate:g}): {before['steady_efficiency']:.3f} before "
        f"({before['rate_limited']} 429s), {now['steady_efficiency']:.3f} now ({now['rate_limited']} 429s); "
        f"now / before {now['steady_efficiency'] / before['steady_efficiency']:.3f}"
    )
    print("\nfor bench/RESULTS.md:")
    print(
        f"| {dt.date.today()} | bench_mine strict | R={args.rate:g} req/s in any sliding second, latency "
        f"{args.latency:g} s, {args.strict_seconds:g} s per run, {os.cpu_count()} CPUs | margin 0 (before): "
        f"{before['rate_limited']} 429s, {before['cuts']} rate cuts, ends at {before['final_rate']:.3g}/s, "
        f"{100 * before['steady_efficiency']:.1f}% of allowed; margin {now['margin']:g} (now): "
        f"{now['rate_limited']} 429s, {now['cuts']} cuts, {100 * now['steady_efficiency']:.1f}% of allowed, "
        f"busiest second {now['busiest']} |"
    )


if __name__ == "__main__":
    main()
