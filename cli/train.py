"""Train a classifier on shards and write a self-describing .pt checkpoint (and, with --onnx, an
.onnx beside it). Prints the path(s) written; one line per epoch on stderr (and as JSON lines in
--log). Hard labels, real/fake or origin x class targets, or soft targets from a `logits`
column. Runs unchanged under torchrun (DDP). --recipe fast: the fastest CPU recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import ALLOW_INCOMPLETE, emit, input_paths, log, progress, require_inputs, warn


def run(
    inputs: list[str] = typer.Argument(
        None, metavar="SHARDS", help="Training shards, directories or globs (or paths on stdin).", show_default=False
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Checkpoint to write (.pt). Default with --resume: the resumed file."
    ),
    model: str = typer.Option(None, "--model", "-m", help="Architecture (see --list-models). Default: resnet20."),
    list_models: bool = typer.Option(False, "--list-models", help="List the architectures and exit."),
    recipe: str = typer.Option(
        None,
        "--recipe",
        help="standard (the defaults below) or fast (CPU time-to-accuracy: "
        "resnet20, 16 epochs, one-cycle, EMA, label smoothing, "
        "whitened stem, alternating flips, flip TTA).",
    ),
    epochs: int = typer.Option(None, "--epochs", "-e", help="Epochs. Default: 30."),
    batch_size: int = typer.Option(
        None, "--batch-size", "-b", help="Global batch size (split over DDP processes). [default: 256]"
    ),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (SGD). Default: 0.1."),
    momentum: float = typer.Option(None, "--momentum", help="SGD momentum. Default: 0.9."),
    weight_decay: float = typer.Option(None, "--wd", "--weight-decay", help="Weight decay. Default: 5e-4."),
    nesterov: bool = typer.Option(
        None, "--nesterov/--no-nesterov", help="Nesterov momentum. Default: on.", show_default=False
    ),
    schedule: str = typer.Option(None, "--schedule", help="cosine, onecycle, multistep or constant. [default: cosine]"),
    warmup: float = typer.Option(None, "--warmup", help="Epochs of linear warm-up (cosine/multistep/constant)."),
    milestones: str = typer.Option(
        None,
        "--milestones",
        help="multistep: epochs (or fractions <= 1) where the lr is multiplied by --gamma. Default: 0.5,0.75.",
    ),
    gamma: float = typer.Option(None, "--gamma", help="multistep factor. Default: 0.1."),
    label_smoothing: float = typer.Option(None, "--label-smoothing", help="Label smoothing. Default: 0."),
    augment: str = typer.Option(
        None,
        "--augment",
        help="Batch augmentation on tensors: crop,flip (pad-crop by --pad, "
        "horizontal flip), crop, flip or none. Default: crop,flip.",
    ),
    pad: int = typer.Option(None, "--pad", help="Padding of the random crop, pixels. Default: 4."),
    flip: str = typer.Option(
        None, "--flip", help="random, or alternate (each image flipped every other epoch). [default: random]"
    ),
    ema: float = typer.Option(
        None,
        "--ema",
        help="Keep an exponential moving average of the weights with this decay per step and deliver it (e.g. 0.98).",
    ),
    tta: bool = typer.Option(None, "--tta/--no-tta", help="Validate on the image and its mirror.", show_default=False),
    whiten: bool = typer.Option(
        None,
        "--whiten/--no-whiten",
        help="Initialise the first conv as a patch-whitening filter bank.",
        show_default=False,
    ),
    precision: str = typer.Option(
        None,
        "--precision",
        help="auto (fp16/bf16 mixed precision on CUDA, bf16 on CPUs with "
        "AMX, else fp32), fp32, bf16 or fp16. Default: auto.",
    ),
    channels_last: bool = typer.Option(
        None,
        "--channels-last/--no-channels-last",
        help="NHWC memory layout. Default: on with CUDA or bf16.",
        show_default=False,
    ),
    target: str = typer.Option(
        None,
        "--target",
        help="class (labels), origin (real/fake, 2 classes) or origin+class "
        "(2K classes 'real/cat' ...). Default: class.",
    ),
    soft: str = typer.Option(None, "--soft", help="Train on the shards' `logits` column: kl (softened KL) or l2."),
    temperature: float = typer.Option(None, "--temperature", "-T", help="Temperature of --soft kl. Default: 4."),
    alpha: float = typer.Option(
        None, "--alpha", help="Weight of the soft loss; 1-alpha goes to hard labels. [default: 1]"
    ),
    val: list[str] = typer.Option(
        None,
        "--val",
        help="Validation shards (repeatable): per-epoch val metrics, save-best on val loss, early stopping.",
    ),
    patience: int = typer.Option(None, "--patience", help="Stop after this many epochs without a better val loss."),
    resume: Path = typer.Option(
        None,
        "--resume",
        help="Continue from a checkpoint written by train: its data, "
        "--val data and options are reused unless given again here "
        "(typically --epochs to go further).",
    ),
    onnx: bool = typer.Option(
        False, "--onnx", help="Also export OUTPUT with suffix .onnx (onnxruntime, normalization baked in)."
    ),
    log_file: Path = typer.Option(None, "--log", help="Append one JSON line per epoch to this file."),
    seed: int = typer.Option(None, "--seed", help="Random seed (init, shuffling, augmentation). Default: 0."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N. Default: auto."),
    threads: int = typer.Option(
        None,
        "--threads",
        help="CPU threads for torch (default: torch's, one per core). Use 1 per job when several jobs share the cores.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    allow_incomplete: bool = ALLOW_INCOMPLETE,
) -> None:
    if list_models:
        from tabulate import tabulate

        from fakecifar.train import model_table

        emit(tabulate(model_table(), headers=["model", "params", "description"]))
        return
    from fakecifar.errors import UsageError

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

    milestone_list = None
    if milestones is not None:
        try:
            milestone_list = [float(m) for m in milestones.split(",") if m.strip()]
        except ValueError as exc:
            raise UsageError(
                f"--milestones {milestones!r} is not a list of numbers", "e.g. 100,150 or 0.5,0.75"
            ) from exc
    config = make_config(
        recipe,
        base,
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        schedule=schedule,
        warmup=warmup,
        milestones=milestone_list,
        gamma=gamma,
        label_smoothing=label_smoothing,
        augment=augment,
        pad=pad,
        flip=flip,
        ema=ema,
        tta=tta,
        whiten=whiten,
        precision=precision,
        channels_last=channels_last,
        target=target,
        soft=soft,
        temperature=temperature,
        alpha=alpha,
        seed=seed,
        device=device,
        patience=patience,
    )
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    dist = dist_from_env()
    # Refuse what needs no data (existing, unwritable or too long outputs, another architecture
    # on --resume) before any shard is opened: not after an epoch.
    check_outputs(output, config, resume=resume, onnx=onnx, overwrite=overwrite, log_path=log_file, dist=dist)
    data = open_shards(paths, allow_incomplete=allow_incomplete)
    val_data = open_shards(val, allow_incomplete=allow_incomplete) if val else None
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
        + (f", resuming {resume}" if resume else "")
        + (f", {dist.world_size} processes" if dist.enabled else "")
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
        )
    if result.stopped == "early-stop":
        log(f"stopped early after epoch {len(result.history)}: no better val loss for {config.patience} epochs")
    if result.best_epoch is not None:
        log(f"kept the weights of epoch {result.best_epoch} (best val loss)")
    for path in result.paths:
        emit(str(path))


def _load_average() -> float | None:
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
