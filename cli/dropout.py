"""Score every training image, drop the most harmful and write the kept ones as shards (every
column and attribute kept, the exact --drop count removed). Methods: influence (on the --val
loss, through the last layer's exact Hessian of --model or of a proxy trained here), confident
(confident learning on out-of-sample probabilities of k-fold proxies) and random (the seeded
control every experiment carries). OUT/ also gets report.json (dropped per class and origin,
score histogram, cost), harmful.png (a contact sheet of the most harmful images) and, with
--keep-scores, scores.npz to filter again with --scores FILE --drop N without rescoring.
Prints the shard paths; the report goes to stderr. Never select on a test set: --val is a
validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fakecifar.scores import DEFAULT_DAMPING, DEFAULT_FOLDS, PROXY, SCORERS, proxy_settings

from .common import ALLOW_INCOMPLETE, emit, emit_json, log, progress, require_inputs, with_settings

SCORING, OUTPUT, RUNTIME = "Scoring", "Output", "Runtime"
METHODS = ", ".join(SCORERS)


@with_settings(proxy_settings(), panels=(SCORING, PROXY, OUTPUT, RUNTIME))
def run(
    inputs: list[str] = typer.Argument(
        None, metavar="SHARDS", help="Training shards, directories or globs (or paths on stdin).", show_default=False
    ),
    val: list[str] = typer.Option(
        None,
        "--val",
        help="Validation shards (repeatable): influence is measured on their loss. A validation split, never "
        "the test set.",
        show_default=False,
        rich_help_panel=SCORING,
    ),
    method: str = typer.Option(
        None, "--score", metavar="METHOD", help=f"How to score: {METHODS}.", show_default=False, rich_help_panel=SCORING
    ),
    drop: str = typer.Option(
        ...,
        "--drop",
        metavar="N|P%",
        help="Images to drop: a count (500) or a percentage (10%).",
        rich_help_panel=SCORING,
    ),  # fmt: skip
    model: Path = typer.Option(
        None,
        "--model",
        help="Score with this checkpoint (.pt of the data's classes) instead of training a proxy.",
        show_default=False,
        rich_help_panel=SCORING,
    ),
    scores: Path = typer.Option(
        None,
        "--scores",
        metavar="FILE",
        help="Filter by the scores of an earlier --keep-scores run (the rows must be the same images).",
        show_default=False,
        rich_help_panel=SCORING,
    ),
    dynamics: Path = typer.Option(
        None,
        "--dynamics",
        metavar="FILE",
        help="aum, forgetting, el2n: read what `train --dynamics FILE` recorded on these shards instead of "
        "training a proxy.",
        show_default=False,
        rich_help_panel=SCORING,
    ),
    snapshots: Path = typer.Option(
        None,
        "--snapshots",
        metavar="DIR",
        help="tracin: use the per-epoch weights `train --snapshots DIR` wrote instead of training a proxy.",
        show_default=False,
        rich_help_panel=SCORING,
    ),
    folds: int = typer.Option(
        DEFAULT_FOLDS, "--folds", help="confident: proxies trained, each on the other folds.", rich_help_panel=SCORING
    ),
    damping: float = typer.Option(
        DEFAULT_DAMPING,
        "--damping",
        help="influence: added to the Hessian, times its mean diagonal (plus the model's weight decay).",
        rich_help_panel=SCORING,
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Directory for the kept shards, report and contact sheet.", rich_help_panel=OUTPUT
    ),
    keep_scores: bool = typer.Option(
        False, "--keep-scores", help="Keep OUTPUT/scores.npz (one score per input row).", rich_help_panel=OUTPUT
    ),
    sheet: int = typer.Option(
        48, "--sheet", help="Images on the contact sheet harmful.png (0: none).", rich_help_panel=OUTPUT
    ),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Images per output shard.", rich_help_panel=OUTPUT),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier output.", rich_help_panel=OUTPUT),
    json_output: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON line (the report, with the shard paths) instead of the paths.",
        rich_help_panel=OUTPUT,
    ),  # fmt: skip
    seed: int = typer.Option(0, "--seed", help="Random seed (random scores, folds, proxies).", rich_help_panel=RUNTIME),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=RUNTIME),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch.", rich_help_panel=RUNTIME),
    allow_incomplete: bool = ALLOW_INCOMPLETE,
    **values: Any,
) -> None:
    from fakecifar.dropout import dropout, parse_drop, report_lines
    from fakecifar.errors import UsageError
    from fakecifar.scores import ProxySpec
    from fakecifar.shards import open_shards

    parse_drop(drop)  # a bad --drop is refused before any shard is opened
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    proxy = ProxySpec(**{k.removeprefix("proxy_"): v for k, v in values.items() if k.startswith("proxy_")})
    data = open_shards(require_inputs(inputs), allow_incomplete=allow_incomplete)
    val_data = open_shards(val, allow_incomplete=allow_incomplete) if val else None

    def on_epoch(r: dict) -> None:
        log(f"  epoch {r['epoch']}/{r['epochs']}  loss {r['train_loss']:.4f}  acc {100 * r['train_acc']:.2f}%  "
            f"{r['images_per_s']:.0f} img/s  {r['time_s']:.1f}s")  # fmt: skip

    with progress(None, "scoring") as bar:
        report = dropout(
            data,
            output,
            drop=drop,
            method=method,
            val=val_data,
            model=model,
            scores_file=scores,
            dynamics=dynamics,
            snapshots=snapshots,
            proxy=proxy,
            folds=folds,
            damping=damping,
            seed=seed,
            device=device,
            keep_scores=keep_scores,
            sheet=sheet,
            shard_size=shard_size,
            overwrite=overwrite,
            on_shard=None if json_output else (lambda p: emit(str(p))),
            on_message=log,
            on_epoch=on_epoch,
            on_step=bar.advance,
        )
    if report.already_complete:
        log(f"{output} already holds this dropout, complete; nothing to do (--overwrite redoes it)")
    else:
        if report.resumed_images:
            log(f"resumed: {report.resumed_images} kept images were written by an interrupted run")
        if report.scores_from == "resumed":
            log(f"scores read from {output}/scores.npz, left by an interrupted run")
        for line in report_lines(report.summary):
            log(line)
    if json_output:
        emit_json({**report.summary, "shards": [str(p) for p in report.shards]})
