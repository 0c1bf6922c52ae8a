"""Mine AI-generated images from a text-to-image API into shards: rate-limited, resumable, cron-safe.

Asks the API for images of each class ("a photo of a {class}") until the output folder holds
--per-class images of every class, then stops. Images are decoded, verified and stored at
their native size with their label, prompt, seed, source (API, model, request id, UTC time),
pixel sha256 and origin=fake. Each shard is finished atomically and its path printed as soon
as it is complete, so the next command in a pipe starts on it at once:

\b
  fakecifar mine --api craiyon --per-class 500 -o raw/ \\
      | fakecifar resize --size 32 -o small/

APIs (--api): craiyon (Craiyon v1, 9 images per call, no key); a1111 (AUTOMATIC1111 WebUI or
SD.Next with --api, http://127.0.0.1:7860, one request at a time); openai (and compatible
servers; key in OPENAI_API_KEY; dall-e-2 256x256 by default); hf (Hugging Face Inference
API, one image per call; key in HF_TOKEN). --url points at another server of the same kind.

Resuming and cron: running the same command again continues where the folder stands: the
per-class counts are read from the finished shards (a killed run loses only its unfinished
shard, which the next run deletes) and a run with nothing left to do says so and exits 0.
Exact duplicates (same pixels) are dropped against the whole folder; --dedup-phash D also
drops near-duplicates. --max-requests and --max-minutes bound one run, e.g. hourly:

\b
  0 * * * *  fakecifar -q mine --api craiyon --per-class 5000 \\
                 -o /data/raw --max-minutes 55

Pacing: request starts go through a token bucket (--rate per second) with at most
--concurrency in flight. HTTP 408, 429, 5xx and network errors are retried (--retries) after
the server's Retry-After / retry-after-ms or a full-jitter exponential backoff; each 429 also
halves the rate, which then creeps back up. 400, 401, 403, an exhausted quota, or an HTML
page (a Cloudflare block) instead of the API stop the run at once with the server's reason.

Several miners: a lock per worker id makes a second run on the same folder exit at once
(exit 1). Give concurrent miners distinct --worker IDs (on one host or on several sharing
the folder): they write distinct shard names and share the quota through the folder, so the
counts stay exact. See docs/mine.md.

Keys are read from an environment variable (--api-key-env) or a file (--api-key-file), never
from the command line, and never appear in logs, errors or the shards' provenance.

A summary (requests, images, failures by reason, 429s, images/s, mean latency) goes to stderr;
--json prints it as one JSON line on stdout instead of the shard paths, and --stats FILE
appends it to FILE. Exit status: 0 done or bounded by --max-*, 1 the API or the network
failed (or another run holds the lock), 2 bad usage or a folder holding other classes,
130 interrupted, 143 terminated by SIGTERM (the open shard is finished first)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import typer

from .common import emit, emit_json, log, progress, warn


def _reflow(text: str) -> str:
    """Join the lines of each prose paragraph (the help renderer keeps single newlines);
    indented example lines keep theirs."""
    paragraphs = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        paragraphs.append(
            para if any(line.startswith("  ") for line in lines) else " ".join(line.strip() for line in lines)
        )
    return "\n\n".join(paragraphs)


__doc__ = _reflow(__doc__)


def _key(api_cls, env_name: str | None, key_file: Path | None):
    from fakecifar.errors import UsageError
    from fakecifar.mine import Secret

    if env_name and key_file:
        raise UsageError("give either --api-key-env or --api-key-file, not both")
    if key_file is not None:
        try:
            value = key_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --api-key-file {key_file}: {exc.strerror or exc}") from None
        if not value:
            raise UsageError(f"--api-key-file {key_file} is empty")
        return Secret(value)
    if env_name:
        value = os.environ.get(env_name, "").strip()
        if not value:
            raise UsageError(f"--api-key-env {env_name}: the variable is not set or empty")
        return Secret(value)
    default = api_cls.key_env
    value = os.environ.get(default, "").strip() if default else ""
    return Secret(value) if value else None


def _summary(report, output: Path, per_class: int) -> None:
    r = report
    shards = len(r.shards)
    line = (
        f"{r.images} new image(s) in {shards} shard(s) in {r.elapsed:.1f} s ({r.images_per_s:.2f} images/s); "
        f"{r.requests} request(s)"
    )
    if r.mean_latency is not None:
        line += f", mean latency {r.mean_latency:.2f} s"
    if r.rate_limited:
        line += f", {r.rate_limited} rate-limited (429)"
    if r.retries:
        line += f", {r.retries} retried"
    log(line)
    if r.failures:
        log("failures: " + ", ".join(f"{k} {v}" for k, v in sorted(r.failures.items(), key=lambda kv: -kv[1])))
    dropped = [
        f"{n} {what}"
        for n, what in (
            (r.duplicates, "exact duplicate(s)"),
            (r.near_duplicates, "near duplicate(s)"),
            (r.surplus, "over the quota"),
            (r.bad_images, "undecodable"),
        )
        if n
    ]
    if dropped:
        log("dropped: " + ", ".join(dropped))
    have = sum(r.per_class.values())
    status = f"{output} holds {have} of {per_class * len(r.per_class)} images ({per_class} per class)"
    if r.stop == "done":
        log(f"{status}: done")
    elif r.stop == "claimed":
        log(f"{status}; the remaining {r.missing} are being mined by other worker(s): {', '.join(r.others) or '?'}")
    elif r.stop in ("max-requests", "max-minutes"):
        log(f"stopped by --{r.stop}: {status}, {r.missing} still missing (rerun the same command to continue)")
    elif r.stop == "interrupted":
        log(f"{status}, {r.missing} still missing")


def run(
    api: str = typer.Option(
        ..., "--api", help="The API's protocol: craiyon, a1111, openai or hf.", rich_help_panel="What to mine"
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Folder for the shards; a rerun resumes from it.", rich_help_panel="What to mine"
    ),
    per_class: int = typer.Option(
        ..., "--per-class", help="Images wanted per class in the folder (the quota).", rich_help_panel="What to mine"
    ),
    url: str = typer.Option(
        None,
        "--url",
        help="Base URL of the API (default: the API's public address; a1111: http://127.0.0.1:7860).",
        rich_help_panel="What to mine",
    ),
    classes: str = typer.Option(
        "cifar10",
        "--classes",
        help="Class names in label order: 'cifar10', 'a,b,c' or a file with one name a line.",
        rich_help_panel="What to mine",
    ),
    prompts: list[str] = typer.Option(
        None,
        "--prompt",
        help="Prompt template; {class} is replaced by the class name. "
        "Repeat to rotate several. Default: 'a photo of a {class}'.",
        rich_help_panel="What to mine",
    ),
    negative_prompt: str = typer.Option(
        None, "--negative-prompt", help="Negative prompt (a1111, hf).", rich_help_panel="What to mine"
    ),
    model: str = typer.Option(
        None,
        "--model",
        help="Model: openai dall-e-2 (default), dall-e-3, gpt-image-1; hf repo "
        "id; a1111 checkpoint (default: the one loaded).",
        rich_help_panel="Generation",
    ),
    size: str = typer.Option(
        None,
        "--size",
        help="Image size HxW (height x width) or N (square) to ask the API for; stored as returned.",
        rich_help_panel="Generation",
    ),
    batch: int = typer.Option(
        None,
        "--batch",
        help="Images per request where the API lets you choose (a1111, openai).",
        rich_help_panel="Generation",
    ),
    steps: int = typer.Option(None, "--steps", help="Sampling steps (a1111, hf).", rich_help_panel="Generation"),
    cfg_scale: float = typer.Option(
        None, "--cfg-scale", help="Classifier-free guidance scale (a1111, hf).", rich_help_panel="Generation"
    ),
    sampler: str = typer.Option(
        None, "--sampler", help="Sampler name (a1111), e.g. 'Euler a'.", rich_help_panel="Generation"
    ),
    seed: int = typer.Option(
        None,
        "--seed",
        help="Seed of the seeds sent to a1111/hf and of the backoff jitter.",
        rich_help_panel="Generation",
    ),
    rate: float = typer.Option(
        None,
        "--rate",
        help="Request starts per second, at most (0: unlimited). Default per "
        "API: craiyon 3.3, openai 0.5, hf 1, a1111 unlimited.",
        rich_help_panel="Pacing and limits",
    ),
    concurrency: int = typer.Option(
        None,
        "--concurrency",
        "-j",
        help="Requests in flight, at most. Default per API: craiyon 16, openai 4, hf 2, a1111 1.",
        rich_help_panel="Pacing and limits",
    ),
    timeout: float = typer.Option(
        None,
        "--timeout",
        help="Seconds for one request, complete (default per API: craiyon 300, a1111 900, openai 180, hf 300).",
        rich_help_panel="Pacing and limits",
    ),
    retries: int = typer.Option(
        5,
        "--retries",
        help="Retries of one request on 408/429/5xx/network errors.",
        rich_help_panel="Pacing and limits",
    ),
    backoff: float = typer.Option(
        1.0,
        "--backoff",
        help="Base of the exponential backoff in seconds (full jitter).",
        rich_help_panel="Pacing and limits",
    ),
    max_requests: int = typer.Option(
        None,
        "--max-requests",
        help="Stop after this many HTTP requests (retries count).",
        rich_help_panel="Pacing and limits",
    ),
    max_minutes: float = typer.Option(
        None,
        "--max-minutes",
        help="Stop starting requests after this many minutes.",
        rich_help_panel="Pacing and limits",
    ),
    max_failures: int = typer.Option(
        20,
        "--max-failures",
        help="Give up after this many requests in a row that brought no new image.",
        rich_help_panel="Pacing and limits",
    ),
    max_mib: float = typer.Option(
        64,
        "--max-mib",
        help="Largest response accepted, MiB (streamed with this cap).",
        rich_help_panel="Pacing and limits",
    ),
    shard_size: int = typer.Option(500, "--shard-size", help="Images per shard.", rich_help_panel="Storage"),
    dedup_phash: int = typer.Option(
        None,
        "--dedup-phash",
        help="Also drop near-duplicates: a 64-bit DCT perceptual "
        "hash within this Hamming distance (e.g. 4) of one "
        "already kept.",
        rich_help_panel="Storage",
    ),
    worker: str = typer.Option(
        "main",
        "--worker",
        help="Worker id: one live miner per id and folder; give concurrent miners distinct ids.",
        rich_help_panel="Storage",
    ),
    api_key_env: str = typer.Option(
        None,
        "--api-key-env",
        help="Environment variable holding the API key (default: OPENAI_API_KEY, HF_TOKEN, A1111_API_AUTH).",
        rich_help_panel="Keys and output",
    ),
    api_key_file: Path = typer.Option(
        None, "--api-key-file", help="File holding the API key.", rich_help_panel="Keys and output"
    ),
    json_output: bool = typer.Option(
        False,
        "--json",
        help="Print the run summary as one JSON line instead of the shard paths.",
        rich_help_panel="Keys and output",
    ),
    stats_file: Path = typer.Option(
        None, "--stats", help="Append the run summary as a JSON line to this file.", rich_help_panel="Keys and output"
    ),
) -> None:
    import json
    import math

    from fakecifar.images import parse_size
    from fakecifar.importing import parse_classes
    from fakecifar.mine import DEFAULT_PROMPT, ApiOptions, MineConfig, Miner, adapter_class

    api_cls = adapter_class(api)
    config = MineConfig(
        api=api,
        url=url,
        out_dir=output,
        per_class=per_class,
        classes=parse_classes(classes),
        prompts=list(prompts) if prompts else [DEFAULT_PROMPT],
        options=ApiOptions(
            model=model,
            size=parse_size(size) if size else None,
            batch=batch,
            steps=steps,
            cfg_scale=cfg_scale,
            sampler=sampler,
            negative_prompt=negative_prompt,
        ),
        rate=(math.inf if rate == 0 else rate),
        concurrency=concurrency,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        max_requests=max_requests,
        max_minutes=max_minutes,
        max_failures=max_failures,
        max_bytes=int(max_mib * (1 << 20)),
        shard_size=shard_size,
        dedup_phash=dedup_phash,
        worker=worker,
        api_key=_key(api_cls, api_key_env, api_key_file),
        seed=seed,
    )

    with Miner(config, on_shard=None if json_output else (lambda p: emit(str(p))), on_message=log) as miner:
        # Ctrl-C and SIGTERM (cron's timeout, systemd, kill) stop the run gracefully: requests in
        # flight are abandoned, the open shard is finished, the summary printed (exit 130).
        # A second Ctrl-C stops at once and drops the open shard.
        def _graceful(signum, frame):
            if miner.interrupting:
                raise KeyboardInterrupt
            miner.interrupt(signum)

        previous = {sig: signal.signal(sig, _graceful) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            missing = miner.prepare()
            with progress(missing or None, "mining") as bar:
                miner.on_progress = bar.advance
                report = miner.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if report.stop == "nothing-to-do":
        log(f"nothing to do: {output} already holds {per_class} images of each of the {len(config.classes)} classes")
    else:
        _summary(report, output, per_class)
    line = report.to_dict()
    if json_output:
        emit_json(line)
    if stats_file is not None:
        try:
            with open(stats_file, "a") as fh:
                fh.write(json.dumps(line) + "\n")
        except OSError as exc:
            warn(f"cannot append the summary to {stats_file}: {exc.strerror or exc}")
    report.check()  # the fatal error (exit 1), or MineInterrupted (exit 130)
