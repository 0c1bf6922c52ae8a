"""Resize shards to another image size (antialiased Lanczos; upscaling allowed). Every other
column and attribute is kept. Prints each output shard's path as soon as it is complete."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import ALLOW_INCOMPLETE, emit, log, progress, require_inputs


def run(
    inputs: list[str] = typer.Argument(
        None, help="Shards, directories or globs (or paths on stdin).", show_default=False
    ),
    size: str = typer.Option(
        ..., "--size", "-s", help="Target size: N (square) or HxW (height x width), e.g. 32 or 24x32."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the resized shards (same names)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards already in the output directory."),
    allow_incomplete: bool = ALLOW_INCOMPLETE,
) -> None:
    from fakecifar.images import parse_size
    from fakecifar.resize import resize_shards

    paths = require_inputs(inputs)
    target = parse_size(size)
    with progress(None, "resizing") as bar:
        written = resize_shards(
            paths,
            output,
            target,
            overwrite=overwrite,
            on_shard=lambda p: emit(str(p)),
            on_progress=bar.advance,
            allow_incomplete=allow_incomplete,
        )
    log(f"resized {len(written)} shard(s) to {target[0]}x{target[1]} in {output}")
