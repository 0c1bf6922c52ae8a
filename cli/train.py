"""Train a classifier on shards and write a self-describing .pt checkpoint (and, with --onnx, an
.onnx beside it). Prints the path(s) written; one line per epoch on stderr (and as JSON lines in
--log). Hard labels, real/fake or origin x class targets, or soft targets from a `logits`
column. Runs unchanged under torchrun (DDP). --recipe fast: the fastest CPU recipe."""

from __future__ import annotations

from typing import Any

import typer

from fakecifar.training.config import (
    ADAPT_SETTINGS,
    MODEL,
    RECORD_SETTINGS,
    RUN_SETTINGS,
    TRAIN_PANELS,
    TRAIN_SETTINGS,
)

from .common import (
    ALLOW_INCOMPLETE,
    emit,
    input_paths,
    log,
    progress,
    report_gates,
    require_inputs,
    warn,
    with_settings,
)


# Every option but these comes from the settings registry (fakecifar.training.config), where
# `distill` finds the same definitions.
@with_settings(RUN_SETTINGS, RECORD_SETTINGS, ADAPT_SETTINGS, TRAIN_SETTINGS, panels=TRAIN_PANELS)
def run(
    inputs: list[str] = typer.Argument(
        None, metavar="SHARDS", help="Training shards, directories or globs (or paths on stdin).", show_default=False
    ),
    list_models: bool = typer.Option(
        False, "--list-models", help="List the architectures and exit.", rich_help_panel=MODEL
    ),
    allow_incomplete: bool = ALLOW_INCOMPLETE,
    **values: Any,
) -> None:
    if list_models:
        from tabulate import tabulate

        from fakecifar.train import model_table, modifier_lines

        emit(tabulate(model_table(), headers=["model", "params", "description"]))
        emit("\n".join(modifier_lines()))
        return
    from fakecifar.errors import UsageError
    from fakecifar.training.settings import check_values, from_command_line

    opts = from_command_line(RUN_SETTINGS, values)
    records = from_command_line(RECORD_SETTINGS, values)  # --dynamics, --snapshots
    # --adapt-bn, --pseudo-label: unlabelled target shards (fakecifar.training.adapt)
    targets = {name: paths or None for name, paths in from_command_line(ADAPT_SETTINGS, values).items()}
    output, resume, val, log_file = opts["output"], opts["resume"], opts["val"], opts["log_path"]
    if output is None:
        if resume is None:
            raise UsageError("Missing option '--output' / '-o'", "name the checkpoint to write, e.g. -o model.pt")
        output = resume
    from fakecifar.evaluate import target_classes
    from fakecifar.shards import open_shards
    from fakecifar.train import check_outputs, dist_from_env, make_config, stored_run, train

    base, stored_data, stored_val = stored_run(resume) if resume is not None else (None, [], [])
    # --resume alone continues on the data (and validation data) the run was started with.
    paths = input_paths(inputs) or stored_data
    paths = require_inputs(paths)
    if not val and stored_val:
        val = stored_val
    if resume is not None:  # ... and on the target shards of its --adapt-bn/--pseudo-label
        from fakecifar.training.adapt import stored_targets

        for name, stored in zip(("adapt_bn", "pseudo_label"), stored_targets(resume)):
            targets[name] = targets[name] or stored or None

    options = from_command_line(TRAIN_SETTINGS, values)  # parsed: --milestones 0.5,0.75 -> [0.5, 0.75]
    config = make_config(options.pop("recipe"), base, **options)
    check_values(RUN_SETTINGS, opts)
    threads, onnx, overwrite = opts["threads"], opts["onnx"], opts["overwrite"]
    dist = dist_from_env()
    # Refuse what needs no data (existing, unwritable or too long outputs, another architecture
    # on --resume) before any shard is opened: not after an epoch.
    check_outputs(
        output,
        config,
        resume=resume,
        onnx=onnx,
        overwrite=overwrite,
        log_path=log_file,
        dist=dist,
        **records,
        **targets,
    )
    data = open_shards(paths, allow_incomplete=allow_incomplete)
    val_data = open_shards(val, allow_incomplete=allow_incomplete) if val else None
    target_data = {
        name: open_shards(p, allow_incomplete=allow_incomplete) if p else None for name, p in targets.items()
    }
    if any(t is not None for t in target_data.values()):  # one line, before the run's opening line
        from fakecifar.training.adapt import check_targets

        check_targets(data, val_data, config=config, **target_data)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    elif not dist.enabled and (config.device == "cpu" or not torch.cuda.is_available()):
        busy = _load_average()
        if busy is not None and torch.get_num_threads() > 1 and busy > torch.get_num_threads() - 0.5:
            warn(
                f"the CPU is busy (load {busy:.1f} on {torch.get_num_threads()} threads): torch's threads slow "
                "down many times when they share cores with other jobs; consider --threads 1"
            )
    if dist.rank != 0:
        from .common import Settings

        Settings.quiet = True  # one process speaks
    n_classes = len(target_classes(data.classes, config.target))
    log(
        f"training {config.model} on {len(data)} images ({n_classes} classes, target {config.target}), "
        f"{config.epochs} epochs, batch {config.batch_size}, lr {config.lr} {config.schedule}"
        + (f", recipe {config.recipe}" if config.recipe != "standard" else "")
        + (f", adversarial {config.adv} eps {config.adv_eps} x {config.adv_steps} steps" if config.adv else "")
        + (f", resuming {resume}" if resume else "")
        + (f", {dist.world_size} processes" if dist.enabled else "")
        + _adapt_summary(**target_data)
    )

    def on_epoch(r: dict) -> None:
        line = f"epoch {r['epoch']}/{r['epochs']}  loss {r['train_loss']:.4f}  acc {100 * r['train_acc']:.2f}%"
        if "val_loss" in r:
            line += f"  val_loss {r['val_loss']:.4f}  val_acc {100 * r['val_acc']:.2f}%"
        line += f"  lr {r['lr']:.4g}  {r['images_per_s']:.0f} img/s  {r['time_s']:.1f}s"
        log(line)

    with progress(None, "training") as bar:
        result = train(
            data,
            output,
            config,
            val=val_data,
            resume=resume,
            onnx=onnx,
            overwrite=overwrite,
            log_path=log_file,
            on_epoch=on_epoch,
            on_step=bar.advance,
            dist=dist,
            dynamics=records["dynamics"],
            snapshots=records["snapshots"],
            adapt_bn=target_data["adapt_bn"],
            pseudo_label=target_data["pseudo_label"],
            on_message=log,
        )
    if result.stopped == "early-stop":
        log(f"stopped early after epoch {len(result.history)}: no better val loss for {config.patience} epochs")
    if result.best_epoch is not None:
        log(f"kept the weights of epoch {result.best_epoch} (best val loss)")
    if result.checkpoint is not None:
        report_gates(result.checkpoint, config.model, val_data if val_data is not None else data)
    for path in result.paths:
        emit(str(path))


def _adapt_summary(adapt_bn: Any = None, pseudo_label: Any = None) -> str:
    """The fake -> real part of the opening line (the rounds report their own lines)."""
    text = f", then self-training on {len(pseudo_label)} unlabelled target images" if pseudo_label is not None else ""
    if adapt_bn is not None:
        text += f", {'each round ' if pseudo_label is not None else 'then '}BatchNorm-adapted on {len(adapt_bn)}"
        text += " unlabelled target images"
    return text


def _load_average() -> float | None:
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
