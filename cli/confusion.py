"""Confusion matrix of a model (.pt, .onnx, or foreign .th with --arch) on a dataset: counts and
row-normalized percentages as tables (rows: true class, columns: predicted), or --csv / --json;
--png FILE draws a heatmap with class names and cell values."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import ALLOW_INCOMPLETE, emit, emit_json, log, progress, require_inputs, warn


def run(
    model_args: list[str] = typer.Argument(
        None,
        metavar="MODEL",
        help="The model file, optionally followed by datasets (or give them with --on).",
        show_default=False,
    ),
    on: list[str] = typer.Option(None, "--on", help="Shards, directories or quoted globs: one dataset."),
    arch: str = typer.Option(None, "--arch", help="Architecture of a foreign checkpoint (e.g. resnet56), or auto."),
    target: str = typer.Option("auto", "--target", help="auto, class, origin or origin+class."),
    map_classes: bool = typer.Option(False, "--map-classes", help="Match model and dataset classes by name."),
    tta: bool = typer.Option(False, "--tta", help="Average the logits of each image and its mirror."),
    csv: bool = typer.Option(False, "--csv", help="Print the counts as CSV (true class per row)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON line: classes, counts, row-normalized."),
    png: Path = typer.Option(None, "--png", help="Also draw a heatmap PNG here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --png file."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (torch models)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (torch or onnxruntime); default one per core."),
    allow_incomplete: bool = ALLOW_INCOMPLETE,
) -> None:
    from fakecifar.errors import OutputExistsError, UsageError
    from fakecifar.evaluate import evaluate, load_classifier, looks_like_model

    from .eval import split_models_and_datasets

    models, datasets = split_models_and_datasets(list(model_args or []), list(on or []))
    if not models:
        from .common import input_paths

        models = require_inputs([p for p in input_paths(None) if looks_like_model(p)], "model")
    if len(models) != 1:
        raise UsageError(f"confusion takes one model, got {len(models)}", "run it once per model")
    if not datasets:
        raise UsageError("no dataset given", "give one with --on SHARDS")
    if csv and json_output:
        raise UsageError("--csv and --json exclude each other")
    if png is not None and png.exists() and not overwrite:
        raise OutputExistsError(f"{png} already exists", "pass --overwrite to replace it")
    from fakecifar.metrics import confusion_heatmap, row_normalized
    from fakecifar.shards import open_shards

    data = open_shards(datasets, allow_incomplete=allow_incomplete)
    name = datasets[0] if len(datasets) == 1 else f"{datasets[0]} (+{len(datasets) - 1})"
    clf = load_classifier(models[0], arch=arch, device=device, threads=threads)
    with progress(len(data), f"{clf.name} on {name}") as bar:
        result = evaluate(
            clf,
            data,
            target=target,
            map_classes=map_classes,
            batch_size=batch_size,
            tta=tta,
            data_name=name,
            on_progress=bar.advance,
        )
    if result["skipped"]:
        warn(f"{name}: {result['skipped']} image(s) without a {result['target']} target the model knows were skipped")
    classes, cm = result["classes"], result["confusion"]
    frac = row_normalized(cm)
    log(f"{models[0]} on {name}: top-1 {100 * result['top1']:.2f}% on {result['images']} images")
    if png is not None:
        written = confusion_heatmap(cm, classes, png, title=f"{clf.name} on {name}: top-1 {100 * result['top1']:.1f}%")
        log(f"wrote {written}")
    if json_output:
        emit_json(
            {
                "model": str(clf.path),
                "dataset": name,
                "target": result["target"],
                "classes": classes,
                "counts": cm,
                "normalized": frac.round(6),
                "top1": result["top1"],
                "images": result["images"],
                **({"png": str(png)} if png else {}),
            }
        )
        return
    if csv:
        import csv as csvlib
        import sys

        writer = csvlib.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["true\\predicted", *classes])
        for cname, row in zip(classes, cm.tolist()):
            writer.writerow([cname, *row])
        sys.stdout.flush()
        return
    from tabulate import tabulate

    headers = ["true \\ predicted", *classes]
    emit("counts (rows: true class, columns: predicted)")
    emit(tabulate([[c, *row] for c, row in zip(classes, cm.tolist())], headers=headers))
    emit("")
    emit("row-normalized %")
    emit(
        tabulate(
            [[c, *(f"{100 * v:.1f}" for v in row)] for c, row in zip(classes, frac.tolist())],
            headers=headers,
            disable_numparse=True,
            colalign=("left",) + ("right",) * len(classes),
        )
    )
