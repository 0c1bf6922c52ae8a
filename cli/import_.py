"""Import image folders, CIFAKE-style REAL/FAKE folders, CIFAR python batches or .tar(.gz)
archives of them into shards. Prints each shard's path as soon as it is complete."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import emit, joined, log, progress, require_inputs, warn


def run(
    sources: list[str] = typer.Argument(
        None, help="Folders, archives or CIFAR batch files (or paths on stdin).", show_default=False
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the shards."),
    classes: str = typer.Option(
        None,
        "--classes",
        help="Class names in label order: 'cifar10', 'a,b,c' or a file with one a line. "
        "Default: folder names sorted, or the layout's own list.",
    ),
    origin: str = typer.Option(
        None, "--origin", help="Mark every image real or fake (CIFAKE folders say it themselves)."
    ),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Images per shard."),
    dedup: bool = typer.Option(False, "--dedup", help="Drop exact duplicates (same pixels), keeping the first."),
    size: str = typer.Option(
        None, "--size", help="Image size HxW (height x width) or N (square); default: the first image's."
    ),
    on_mismatch: str = typer.Option(
        "error", "--on-mismatch", help="Images of another size: error, resize (antialiased) or skip."
    ),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first undecodable image instead of skipping it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards already in the output directory."),
    sample: bool = typer.Option(
        False,
        "--sample",
        help="Import the 400-image CIFAKE sample shipped with fakecifar (20 real + 20 fake per CIFAR-10 class).",
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON summary line (with the shard paths) instead of the paths."
    ),
) -> None:
    from fakecifar.images import parse_size
    from fakecifar.importing import import_sources, parse_classes
    from fakecifar.samples import CIFAKE_SAMPLE

    paths = [str(CIFAKE_SAMPLE)] if sample and not sources else require_inputs(sources, "sources")
    with progress(None, "importing") as bar:
        report = import_sources(
            paths,
            output,
            classes=parse_classes(classes),
            origin=origin,
            shard_size=shard_size,
            dedup=dedup,
            size=parse_size(size) if size else None,
            on_mismatch=on_mismatch,
            strict=strict,
            overwrite=overwrite,
            on_shard=None if json_output else (lambda p: emit(str(p))),
            on_progress=bar.advance,
        )
    if report.already_complete:
        log(
            f"{output} already holds this import, complete ({report.images} images in {len(report.written)} "
            "shard(s)); nothing to do (--overwrite redoes it)"
        )
    elif report.resumed_shards:
        log(f"resumed: {report.resumed_shards} shard(s) were finished by an interrupted run and kept")
    if report.skipped:
        warn(f"skipped {len(report.skipped)} image(s): {joined(report.skipped, 10)} (--strict makes this fatal)")
    assert report.image_size is not None  # an import with no images is an error, so every report has one
    h, w = report.image_size
    if not report.already_complete:
        log(
            f"imported {report.images} images ({h}x{w}, {len(report.classes)} classes) into "
            f"{len(report.written)} shard(s) in {output}"
            + (f"; dropped {report.duplicates} exact duplicates" if report.duplicates else "")
            + (f"; resized {report.resized}" if report.resized else "")
            + (f"; ignored {report.ignored_files} non-image files" if report.ignored_files else "")
        )
    if json_output:
        from .common import emit_json

        emit_json(
            {
                "images": report.images,
                "shards": [str(p) for p in report.written],
                "classes": report.classes,
                "image_size": list(report.image_size),
                "duplicates": report.duplicates,
                "skipped": report.skipped,
                "resized": report.resized,
                "per_class": report.per_class,
            }
        )
