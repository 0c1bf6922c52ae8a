"""Distill a teacher into a student on a transfer set of any images (real, mined, generated or
another dataset's): KL with temperature on soft answers, L1/L2 on logits, or cross-entropy on
the teacher's labels for label-only victims (Knockoff Nets). The teacher is a .pt/.th (torch),
an .onnx, or the URL of `fakecifar serve`; every image it is asked about goes through the run's
query ledger (OUTPUT.queries: metered where the teacher is called, --queries is a hard budget,
answers are cached so a resumed or re-run job never pays twice). Offline (the default) asks
about each transfer image once and keeps the answers as a labelled transfer set (a `logits`
column, OUTPUT.transfer/ or --save-transfer); --online asks about every augmented view. Every
`train` option applies to the student. Prints the checkpoint path; the ledger and the
student's accuracy and agreement with the teacher on --val on stderr."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import typer

from fakecifar.distill_config import DATAFREE, DISTILL, DISTILL_SETTINGS
from fakecifar.training.config import PANELS, RUN_SETTINGS, TRAIN_SETTINGS

from .common import (
    ALLOW_INCOMPLETE,
    emit,
    emit_json,
    input_paths,
    log,
    progress,
    report_gates,
    require_inputs,
    with_settings,
)

# The student's options are train's (one definition, fakecifar.training.config), less --soft
# (what the teacher's answers are trained with is --loss here) and --adv (adversarial training
# attacks hard labels; a student learns the teacher's answers), and the self-training knobs of
# --pseudo-label (train's alone).
NOT_FOR_STUDENTS = ("soft", "adv", "adv_eps", "adv_steps", "threshold", "rounds")
# The architecture is the student's: --student NAME (train's --model/-m still work).
STUDENT_SETTINGS = tuple(
    replace(
        s,
        flags=("--student", *s.flags),
        help="The student's architecture (see train --list-models). Default: resnet20.",
    )
    if s.name == "model"
    else s
    for s in TRAIN_SETTINGS
    if s.name not in NOT_FOR_STUDENTS
)


@with_settings(RUN_SETTINGS, DISTILL_SETTINGS, STUDENT_SETTINGS, panels=(PANELS[0], DISTILL, DATAFREE, *PANELS[1:]))
def run(
    inputs: list[str] = typer.Option(
        None,
        "--transfer",
        help="Transfer shards, directories or globs (repeatable; or paths on stdin).",
        show_default=False,
        rich_help_panel=DISTILL,
    ),
    proxy: list[str] = typer.Option(
        None,
        "--proxy",
        help="dfms: shards of any images (e.g. mined) to pre-train the generator on (repeatable).",
        show_default=False,
        rich_help_panel=DATAFREE,
    ),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON line (paths, metrics, ledger) instead."),
    allow_incomplete: bool = ALLOW_INCOMPLETE,
    **values: Any,
) -> None:
    from fakecifar.distill import distill
    from fakecifar.distill_config import make_settings
    from fakecifar.errors import UsageError
    from fakecifar.shards import open_shards
    from fakecifar.train import make_config, stored_run
    from fakecifar.training.settings import check_values, from_command_line

    opts = from_command_line(RUN_SETTINGS, values)
    check_values(RUN_SETTINGS, opts)
    output, resume, val = opts["output"], opts["resume"], opts["val"]
    if output is None:
        if resume is None:
            raise UsageError("Missing option '--output' / '-o'", "name the student checkpoint, e.g. -o student.pt")
        output = resume
    base, stored_data, stored_val = stored_run(resume) if resume is not None else (None, [], [])
    # --resume alone continues with the teacher, budget and losses the run was started with.
    settings = make_settings(_stored_distill(resume), **from_command_line(DISTILL_SETTINGS, values))
    options = from_command_line(STUDENT_SETTINGS, values)
    config = make_config(options.pop("recipe"), base, **options)
    if opts["threads"] is not None:
        import torch

        torch.set_num_threads(opts["threads"])
    from fakecifar.train import dist_from_env

    if dist_from_env().rank != 0:
        from .common import Settings

        Settings.quiet = True  # one process speaks
    val = val or stored_val
    datafree = settings.method != "transfer"
    if datafree:
        if inputs:
            raise UsageError(
                f"--method {settings.method} makes its own images: --transfer is for --method transfer",
                "drop --transfer (dfms pre-trains on --proxy)",
            )
        from fakecifar.datafree import open_proxy

        proxy_data = open_proxy(proxy, stored=_stored_distill(resume).get("proxy"), allow_incomplete=allow_incomplete)
    else:
        paths = input_paths(inputs) or _stored_transfer(resume, stored_data)
        transfer = open_shards(require_inputs(paths, "transfer shards"), allow_incomplete=allow_incomplete)
    val_data = open_shards(val, allow_incomplete=allow_incomplete) if val else None
    source = (
        f"by {settings.method}, no transfer set"
        if datafree
        else f"on {len(transfer):,} transfer images ({'online' if settings.online else 'offline'})"
    )
    log(
        f"distilling {settings.teacher} into {config.model} {source}, {config.epochs} epochs"
        + (f", budget {settings.queries:,} queries" if settings.queries else "")
    )

    def on_epoch(r: dict) -> None:
        line = f"epoch {r['epoch']}/{r['epochs']}  loss {r['train_loss']:.4f}"
        if "val_loss" in r:
            line += f"  val_loss {r['val_loss']:.4f}  val_acc {100 * r['val_acc']:.2f}%"
        if "generator_loss" in r:
            line += f"  generator_loss {r['generator_loss']:.4f}  queries {int(r['queries']):,}"
        log(line + f"  {r['images_per_s']:.0f} img/s  {r['time_s']:.1f}s")

    common = {
        "val": val_data,
        "resume": resume,
        "onnx": opts["onnx"],
        "overwrite": opts["overwrite"],
        "log_path": opts["log_path"],
        "on_epoch": on_epoch,
        "on_message": log,
    }
    with progress(None, "distilling") as bar:
        if datafree:
            from fakecifar.datafree import distill_datafree

            result = distill_datafree(output, config, settings, proxy=proxy_data, on_step=bar.advance, **common)
        else:
            result = distill(transfer, output, config, settings, on_step=bar.advance, **common)
    if result.stopped == "budget":
        log(
            f"the query budget is spent: training stopped there, state saved to {output} "
            f"(continue with a larger budget: fakecifar distill --resume {output} --queries N)"
        )
    for line in result.ledger_lines:
        log(line)
    m = result.val_metrics
    if m:
        text = f"student on --val: accuracy {100 * m['val_acc']:.2f}% ({int(m['val_images']):,} images)"
        if "teacher_agreement" in m:
            text += f", agreement with the teacher {100 * m['teacher_agreement']:.2f}%"
        log(text)
    if result.checkpoint is not None:
        if val_data is not None or not datafree:
            report_gates(result.checkpoint, config.model, val_data if val_data is not None else transfer)
        else:
            report_gates(result.checkpoint, config.model, images=result.probe)
    if json_output:
        emit_json(
            {
                "checkpoint": result.checkpoint,
                "onnx": result.onnx,
                "stopped": result.stopped,
                "metrics": m,
                "queries": result.ledger,
                "history": result.history,
            }
        )
        return
    for path in (result.checkpoint, result.onnx):
        if path is not None:
            emit(str(path))


def _stored_distill(resume) -> dict[str, Any]:
    """The distill metadata of a resumed student ({} for none)."""
    if resume is None:
        return {}
    from fakecifar.checkpoint import load_checkpoint

    _, meta = load_checkpoint(resume)
    stored = (meta.get("train") or {}).get("distill")
    return dict(stored) if isinstance(stored, dict) else {}


def _stored_transfer(resume, stored: list[str]) -> list[str]:
    """--resume alone: the transfer set the run started with (offline, train recorded its
    labelled copy; the original is in the distill metadata)."""
    recorded = _stored_distill(resume).get("transfer") or []
    return [str(p) for p in recorded] or stored
