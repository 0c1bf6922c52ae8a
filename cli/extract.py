"""Turn a trained classifier back into a dataset: images optimised against the teacher, written
as shards with the teacher's logits on them, for `train --soft l2|kl` or `distill`. dfm (Data
from Model): L2 PGD from --background images (any shards, or noise) to random virtual logits;
deepinversion: noise matched to the class, the teacher's BatchNorm statistics and image priors;
data-impressions: noise matched to Dirichlet soft targets from the last layer's class
similarity; class-impressions: noise optimised to a class. Every method needs a white-box
teacher (.pt/.th). Each image costs --steps forward+backward passes and one forward, all
metered by the query ledger DIR/ledger.sqlite (--queries is a hard budget). Resumable shard by
shard: rerun the same command after an interruption. Prints each shard's path as it is
finished; progress and the ledger on stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fakecifar.extract import EXTRACT, EXTRACT_SETTINGS, PANELS, RUNTIME_SETTINGS
from fakecifar.training.config import RUNTIME

from .common import ALLOW_INCOMPLETE, emit, emit_json, input_paths, log, progress, with_settings


@with_settings(EXTRACT_SETTINGS, RUNTIME_SETTINGS, panels=("Teacher and queries", *PANELS, RUNTIME))
def run(
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Directory for the shards (a dataset: manifest.json) and the query ledger (DIR/ledger.sqlite).",
        rich_help_panel=EXTRACT,
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON line (shard paths, throughput, ledger) instead of the paths."
    ),
    allow_incomplete: bool = ALLOW_INCOMPLETE,
    **values: Any,
) -> None:
    from fakecifar.extract import extract, make_settings
    from fakecifar.training.settings import check_values, from_command_line

    if values.get("background") == ["-"]:  # `--background -`: the shard paths on stdin (a pipe)
        values["background"] = input_paths(["-"])
    runtime = from_command_line(RUNTIME_SETTINGS, values)
    check_values(RUNTIME_SETTINGS, runtime)
    settings = make_settings(**from_command_line(EXTRACT_SETTINGS, values))
    if runtime["threads"] is not None:
        import torch

        torch.set_num_threads(runtime["threads"])
    log(f"extracting {settings.images:,} images from {settings.teacher} by {settings.method}")
    with progress(settings.images, f"extracting ({settings.method})") as bar:
        report = extract(
            settings,
            output,
            overwrite=bool(runtime["overwrite"]),
            threads=runtime["threads"],
            allow_incomplete=allow_incomplete,
            on_shard=None if json_output else (lambda p: emit(str(p))),
            on_progress=bar.advance,
            on_message=log,
        )
    if report.already_complete:
        log(
            f"{output} already holds this extraction, complete ({report.images:,} images in {len(report.shards)} "
            "shard(s)); nothing to do (--overwrite redoes it)"
        )
    else:
        if report.resumed_images:
            log(f"resumed: {report.resumed_images:,} images were finished by an interrupted run and kept")
        passes = report.passes_per_image
        rate = f" at {report.images_per_s:.1f} img/s" if report.images_per_s else ""
        agreement = (
            f"; the teacher's top class is the intended one for {100 * report.agreement:.1f}%"
            if report.agreement is not None
            else ""
        )
        log(
            f"extracted {report.made:,} images by {report.method}{rate} "
            f"({passes['backward']} forward+backward passes and 1 forward each){agreement}: "
            f"{report.images:,} images in {len(report.shards)} shard(s) in {output}"
        )
    for line in report.ledger_lines:
        log(line)
    if json_output:
        emit_json(
            {
                "shards": report.shards,
                "images": report.images,
                "made": report.made,
                "resumed_images": report.resumed_images,
                "method": report.method,
                "seconds": report.seconds,
                "images_per_s": report.images_per_s,
                "passes_per_image": report.passes_per_image,
                "agreement": report.agreement,
                "queries": report.ledger,
            }
        )
