"""Serve a model (.pt, .onnx, or foreign .th with --arch) behind a small HTTP JSON API, as a
pay-per-query service would: the victim of extraction experiments. The protocol is
docs/serve.md: GET /v1/health, POST /v1/predict, GET /v1/usage. When it listens, the base URL
is the one line on stdout (so `--port 0`, a free port, can be read by a script); messages and
one log line per request go to stderr. SIGTERM or Ctrl-C stops it cleanly (requests in flight
finish), prints the usage of each key on stderr and exits 0."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import emit, log, warn

LIMITS = "Accounts and limits"
NETWORK = "Network"
MODEL = "Model"


def run(
    model: Path = typer.Argument(..., metavar="MODEL", help="The model file (.pt, .onnx, or .th with --arch)."),
    output: str = typer.Option(
        "probs",
        "--output",
        help="What an answer reveals: logits, probs, probs:K (K decimals), topk:K or label.",
        rich_help_panel=MODEL,
    ),
    arch: str = typer.Option(
        None, "--arch", help="Architecture of a foreign checkpoint (e.g. resnet56), or auto.", rich_help_panel=MODEL
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto, cpu, cuda or cuda:N (torch models).", rich_help_panel=MODEL
    ),
    threads: int = typer.Option(
        None, "--threads", help="CPU threads (torch or onnxruntime); default one per core.", rich_help_panel=MODEL
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface).", rich_help_panel=NETWORK
    ),
    port: int = typer.Option(
        8765, "--port", help="TCP port; 0 picks a free one (read the URL on stdout).", rich_help_panel=NETWORK
    ),
    keys: Path = typer.Option(
        None,
        "--keys",
        help="API keys, one a line: KEY [BUDGET] (# comments). Without it anyone may query, as one anonymous account.",
        rich_help_panel=LIMITS,
    ),
    budget: int = typer.Option(
        None,
        "--budget",
        help="Images each account may query in all (a key's own BUDGET wins); then 402.",
        rich_help_panel=LIMITS,
    ),
    rate: float = typer.Option(
        None,
        "--rate",
        help="Predict requests per second per account (1/rate s apart); then 429.",
        rich_help_panel=LIMITS,
    ),
    max_batch: int = typer.Option(
        256, "--max-batch", help="Images per request at most; then 413.", rich_help_panel=LIMITS
    ),
    max_bytes: int = typer.Option(
        16 * 1024 * 1024, "--max-bytes", help="Request body size at most, in bytes; then 413.", rich_help_panel=LIMITS
    ),
    usage_file: Path = typer.Option(
        None,
        "--usage-file",
        help="Write every account's usage (JSON) here, atomically, after each answered query.",
        rich_help_panel=LIMITS,
    ),
) -> None:
    from fakecifar.answers import parse_mode
    from fakecifar.errors import Terminated
    from fakecifar.outputs import check_output_path
    from fakecifar.serve import QueryServer, RequestLog, read_keys
    from fakecifar.text import format_size

    mode = parse_mode(output)  # usage errors before the model loads
    key_list = read_keys(keys, default_budget=budget) if keys is not None else None
    if usage_file is not None:
        check_output_path(usage_file, option="--usage-file")

    from fakecifar.evaluate import load_classifier
    from fakecifar.serve import classifier_model

    clf = load_classifier(model, arch=arch, device=device, threads=threads)
    served = classifier_model(clf)
    if mode.kind == "topk" and (mode.k or 0) > len(served.classes):
        warn(f"--output {mode}: the model has {len(served.classes)} classes; answers hold all of them")

    def on_request(entry: RequestLog) -> None:
        who = f" {entry.account}" if entry.account else ""
        what = f" {entry.images} images" if entry.images else ""
        why = f" {entry.code}" if entry.code else ""
        path = entry.path if len(entry.path) <= 60 else entry.path[:57] + "..."
        log(f"{entry.client} {entry.method} {path} {entry.status}{why}{who}{what} {1000 * entry.seconds:.0f} ms")

    server = QueryServer(
        served,
        mode=mode,
        keys=key_list,
        budget=None if key_list else budget,
        rate=rate,
        max_batch=max_batch,
        max_bytes=max_bytes,
        host=host,
        port=port,
        usage_file=usage_file,
        on_request=on_request,
        on_error=warn,
    )
    stop = _StopSignals()
    try:
        with stop:
            server.start()
            emit(server.url)  # the one line on stdout, flushed: what a script reads
            limits = [f"output {mode}", f"{len(key_list)} keys" if key_list else "no keys (open)"]
            if budget is not None:
                limits.append(f"budget {budget:,} images per account")
            if rate is not None:
                limits.append(f"{rate:g} requests/s per account")
            log(
                f"serving {served.name} ({len(served.classes)} classes, {format_size(served.input_size)}) at "
                f"{server.url} ({', '.join(limits)}); Ctrl-C or SIGTERM stops it"
            )
            if host not in ("127.0.0.1", "localhost", "::1") and not key_list:
                warn(f"listening on {host} without --keys: anyone who reaches this machine can query the model")
            while not stop.requested.wait(0.5):
                pass
            log(f"{stop.name}: stopping; requests in flight finish")
            server.stop()
    except (KeyboardInterrupt, Terminated) as exc:  # where no handler could be installed
        log(f"{'SIGTERM' if isinstance(exc, Terminated) else 'interrupted'}: stopping; requests in flight finish")
    finally:
        server.stop()
    print_usage(server)


class _StopSignals:
    """SIGTERM and SIGINT set `requested` (and name the signal) instead of raising, for as
    long as the block runs: the server stops gracefully once, however many signals arrive
    (`timeout` sends SIGTERM to the command and again to its process group). The previous
    handlers come back on exit. Outside the main thread nothing is installed; a signal the
    process was started ignoring stays ignored."""

    def __init__(self) -> None:
        import threading

        self.requested = threading.Event()
        self.name = ""
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        import signal

        if not self.requested.is_set():
            self.name = "SIGTERM" if signum == signal.SIGTERM else "interrupted"
            self.requested.set()

    def __enter__(self) -> _StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                # An ignored SIGINT stays ignored (`fakecifar serve ... &` in a script: the
                # shell's Ctrl-C is not meant for background jobs).
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def print_usage(server) -> None:
    """One line per account on stderr (and a total when there are several)."""
    accounts = server.accounts()
    for name, usage in accounts.items():
        line = f"usage: {name}: {usage['images']} images in {usage['requests']} requests"
        if usage["budget"] is not None:
            line += f" (budget {usage['budget']}, {usage['remaining']} left)"
        log(line)
    if len(accounts) > 1:
        total = server.totals()
        log(f"usage: total: {total['images']} images in {total['requests']} requests")
