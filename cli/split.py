"""Split shards into OUT/train and OUT/val: seeded, stratified by class (and origin), with
identical images kept on one side. Prints the paths of the shards written."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import ALLOW_INCOMPLETE, emit, log, require_inputs


def run(
    inputs: list[str] = typer.Argument(
        None, help="Shards, directories or globs (or paths on stdin).", show_default=False
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Directory that gets train/ and val/."),
    ratio: str = typer.Option(None, "--ratio", help="TRAIN:VAL, e.g. 5:1."),
    val: float = typer.Option(None, "--val", help="Validation fraction, e.g. 0.2 (the default)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same split."),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Images per output shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards already in train/ and val/."),
    allow_incomplete: bool = ALLOW_INCOMPLETE,
) -> None:
    from fakecifar.shards import open_shards
    from fakecifar.split import parse_ratio, split_dataset

    fraction = parse_ratio(ratio, val)
    data = open_shards(require_inputs(inputs), allow_incomplete=allow_incomplete)
    report = split_dataset(
        data,
        output,
        fraction=fraction,
        seed=seed,
        shard_size=shard_size,
        overwrite=overwrite,
        on_shard=lambda p: emit(str(p)),
    )
    log(
        f"split {len(data)} images: {report.train_images} train, {report.val_images} val "
        f"({fraction:.1%} asked) in {output}"
        + (f"; {report.duplicate_groups} duplicate images kept with their twins" if report.duplicate_groups else "")
    )
