"""Tell real photos from AI-generated images. One line per image on stdout:
PATH<TAB>real|fake<TAB>P_FAKE. Inputs are image files, folders, shards (.h5) or '-' (image
bytes on stdin, or paths one a line); with no inputs, stdin is read. The default model ships
with fakecifar (trained on CIFAKE: real CIFAR-10 vs Stable Diffusion 1.4, 32x32). Exit status
1 if any input could not be read, else 0."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from .common import emit, emit_json, log, warn

MAX_CAUTIONS = 10


def run(
    inputs: list[str] = typer.Argument(
        None, help="Images, folders, shards or '-' (default: stdin).", show_default=False
    ),
    model: Path = typer.Option(
        None, "--model", "-m", help="A real/fake model (.onnx or .pt) instead of the built-in one."
    ),
    arch: str = typer.Option(None, "--arch", help="Architecture of a foreign .th checkpoint given to --model."),
    threshold: float = typer.Option(0.5, "--threshold", "-t", help="Call an image fake when P(fake) >= this."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward pass."),
    tta: bool = typer.Option(
        False, "--tta", help="Average over each image and its mirror: twice the work, usually a little more accurate."
    ),
    json_output: bool = typer.Option(False, "--json", help="JSON lines {path, label, p_fake, model}."),
) -> None:
    from fakecifar.detect import Detector, check_stdin, detect, iter_items
    from fakecifar.errors import UsageError
    from fakecifar.text import printable

    sources = list(inputs or [])
    if not sources:
        if sys.stdin.isatty():
            raise UsageError("no image given", "give image files, folders or shards, or pipe them on stdin")
        sources = ["-"]
    stdin_data = sys.stdin.buffer.read() if "-" in sources else b""
    if "-" in sources:
        check_stdin(stdin_data)  # binary junk on stdin is refused before the model loads or anything prints
    detector = Detector(model, arch=arch, tta=tta)
    model_name = str(model) if model else "builtin:" + detector.path.name
    failures: list[str] = []
    cautions: list[str] = []

    def on_error(exc) -> None:
        failures.append(str(exc))
        warn(str(exc))

    def on_caution(path: str, why: str) -> None:
        cautions.append(path)
        if len(cautions) <= MAX_CAUTIONS:
            warn(f"{path}: {why}; the answer is less trustworthy")

    start, count = time.perf_counter(), 0
    for verdict in detect(
        detector,
        iter_items(sources, stdin=lambda: stdin_data, on_skip=log),
        threshold=threshold,
        batch_size=batch_size,
        on_error=on_error,
        on_caution=on_caution,
    ):
        count += 1
        if json_output:
            emit_json(
                {"path": verdict.path, "label": verdict.label, "p_fake": round(verdict.p_fake, 6), "model": model_name}
            )
        else:
            # A tab or control byte in a file name must not split the line or reach the terminal.
            emit(f"{printable(verdict.path)}\t{verdict.label}\t{verdict.p_fake:.3f}")
    if count == 0 and not failures:  # an empty folder, shard or stdin: saying nothing would look like success
        given = ", ".join("stdin" if s == "-" else s for s in sources[:3]) + (", ..." if len(sources) > 3 else "")
        raise UsageError(
            f"no image given: {given} held no images", "give image files, folders or shards, or pipe them on stdin"
        )
    if len(cautions) > MAX_CAUTIONS:
        warn(f"{len(cautions) - MAX_CAUTIONS} more images far from the training size")
    elapsed = time.perf_counter() - start
    if count > 1:
        log(f"{count} images in {elapsed:.2f} s ({count / elapsed:,.0f} images/s)")
    if failures:
        log(f"{len(failures)} input(s) could not be read")
        raise typer.Exit(1)
