"""Evaluate models (.pt, .onnx, or foreign .th with --arch) on datasets: top-1, top-5, per-class
precision/recall/F1/F2 and macro averages for one model on one dataset; the cross table of
top-1 accuracy (rows: models, columns: datasets) for several. An .onnx runs on onnxruntime
alone. --attack pgd-l2 adds robust accuracy at each --eps. --json: one JSON line per pair."""

from __future__ import annotations

import typer

from .common import ALLOW_INCOMPLETE, emit, emit_json, input_paths, log, progress, warn


def split_models_and_datasets(args: list[str], on: list[str]) -> tuple[list[str], list[str]]:
    """`eval A B --on X Y` reaches us as args [A, B, Y] and on [X]: model files are told from
    datasets (directories, .h5 shards, globs) by their names."""
    from fakecifar.evaluate import looks_like_model

    models = [a for a in args if looks_like_model(a)]
    datasets = list(on) + [a for a in args if not looks_like_model(a)]
    return models, datasets


def run(
    model_args: list[str] = typer.Argument(
        None,
        metavar="MODEL",
        help="Model files (.pt, .onnx, .th), or paths on stdin; datasets may follow --on.",
        show_default=False,
    ),
    on: list[str] = typer.Option(
        None,
        "--on",
        help="Dataset(s) to evaluate on: each a shard, a directory or a quoted glob; `--on A B` or `--on A --on B`.",
    ),
    arch: str = typer.Option(
        None,
        "--arch",
        help="Architecture of foreign checkpoints (e.g. resnet56 for the "
        "ResNet-CIFAR .th files), or auto: the one whose "
        "layer names and shapes fit each file.",
    ),
    target: str = typer.Option(
        "auto",
        "--target",
        help="auto, class, origin (real/fake) or origin+class; auto follows the model's class names.",
    ),
    map_classes: bool = typer.Option(
        False,
        "--map-classes",
        help="Match model and dataset classes by name (images of classes the model lacks are skipped).",
    ),
    attack: str = typer.Option(
        None, "--attack", help="pgd-l2: robust accuracy under an L2 PGD attack in [0,1] pixel space (torch models)."
    ),
    eps: str = typer.Option("0,0.5,1,2", "--eps", help="Attack radii, comma-separated."),
    steps: int = typer.Option(20, "--steps", help="Attack steps (step size 2.5*eps/steps)."),
    tta: bool = typer.Option(False, "--tta", help="Average the logits of each image and its mirror."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (torch models)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (torch or onnxruntime); default one per core."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line per model and dataset, with every metric."),
    allow_incomplete: bool = ALLOW_INCOMPLETE,
) -> None:
    from fakecifar.errors import UsageError
    from fakecifar.evaluate import looks_like_model

    from .common import require_inputs

    models, datasets = split_models_and_datasets(list(model_args or []), list(on or []))
    if not models:  # `fakecifar train ... | fakecifar eval --on val`
        models = require_inputs([p for p in input_paths(None) if looks_like_model(p)], "models")
    if not datasets:
        raise UsageError("no dataset to evaluate on", "give one with --on SHARDS")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    radii: list[float] = []
    if attack is not None:
        from fakecifar.attacks import parse_eps

        if attack not in ("pgd-l2",):
            raise UsageError(f"unknown --attack {attack!r}", "available: pgd-l2")
        radii = parse_eps(eps)
    from fakecifar.evaluate import evaluate, load_classifier
    from fakecifar.shards import open_shards

    sets = [(name, open_shards([name], allow_incomplete=allow_incomplete)) for name in datasets]
    results, grid = [], {}
    for model_path in models:
        clf = load_classifier(model_path, arch=arch, device=device, threads=threads)
        for name, data in sets:
            with progress(len(data), f"{clf.name} on {name}") as bar:
                result = evaluate(
                    clf,
                    data,
                    target=target,
                    map_classes=map_classes,
                    batch_size=batch_size,
                    tta=tta,
                    attack=attack,
                    eps=radii,
                    steps=steps,
                    data_name=name,
                    on_progress=bar.advance,
                )
            if result["skipped"]:
                warn(
                    f"{name}: {result['skipped']} image(s) without a {result['target']} target the model knows "
                    "were skipped"
                )
            log(
                f"{model_path} on {name}: top-1 {100 * result['top1']:.2f}% ({result['images']} images, "
                f"{result['runtime']})"
            )
            results.append(result)
            grid[(model_path, name)] = result
            if json_output:
                emit_json({k: v for k, v in result.items() if not k.startswith("_")})
    if json_output:
        return
    if len(models) == 1 and len(sets) == 1:
        print_single(results[0])
    else:
        print_cross(grid, models, [n for n, _ in sets])


def print_single(r: dict) -> None:
    from tabulate import tabulate

    from fakecifar.metrics import percent

    emit(
        f"model {r['model']} ({r['arch']}, {r['runtime']}) on {r['dataset']}: {r['images']} images, "
        f"target {r['target']}" + (", flip TTA" if r["tta"] else "")
    )
    emit(f"top-1 {percent(r['top1'])}%   top-5 {percent(r['top5'])}" + ("%" if r["top5"] is not None else ""))
    rows = []
    for name, m in r["per_class"].items():
        rows.append(
            [name, percent(m["precision"]), percent(m["recall"]), percent(m["f1"]), percent(m["f2"]), m["support"]]
        )
    mac = r["macro"]
    rows.append(
        [
            "macro avg",
            percent(mac["precision"]),
            percent(mac["recall"]),
            percent(mac["f1"]),
            percent(mac["f2"]),
            r["images"],
        ]
    )
    emit(
        tabulate(
            rows,
            headers=["class", "precision %", "recall %", "F1 %", "F2 %", "support"],
            disable_numparse=True,
            colalign=("left", "right", "right", "right", "right", "right"),
        )
    )
    if r.get("robust"):
        emit(
            tabulate(
                [[e, percent(a)] for e, a in r["robust"].items()],
                headers=[f"{r['attack']} eps (L2, steps {r['steps']})", "robust top-1 %"],
                disable_numparse=True,
                colalign=("right", "right"),
            )
        )


def print_cross(by: dict, models: list[str], datasets: list[str]) -> None:
    from tabulate import tabulate

    from fakecifar.metrics import percent

    results = list(by.values())
    eps_keys = list(results[0].get("robust", {}).keys()) if results and results[0].get("robust") else []
    rows = []
    for model in models:
        cells = [by.get((model, d)) for d in datasets]
        rows.append([model] + [percent(c["top1"]) if c else "-" for c in cells])
        for e in eps_keys:
            if float(e) > 0:
                rows.append([f"{model} eps={e}"] + [percent(c["robust"][e]) if c else "-" for c in cells])
    emit(
        tabulate(
            rows, headers=["top-1 %"] + datasets, disable_numparse=True, colalign=("left",) + ("right",) * len(datasets)
        )
    )
