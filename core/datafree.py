"""Data-free distillation and black-box extraction: `fakecifar distill --method M` without the
command line. No transfer set: a generator makes the images (fakecifar.generator), the teacher
answers them through the run's query ledger, the student learns (the methods:
fakecifar.training.datafree).

    from fakecifar.datafree import distill_datafree
    from fakecifar.distill_config import make_settings
    from fakecifar.train import make_config
    result = distill_datafree("clone.pt", make_config(model="resnet20", epochs=10, batch_size=256),
                              make_settings(teacher="http://127.0.0.1:8000", method="dfme", queries=1_000_000))

The protocol is honest: the student delivered is the final one (no selection: `--val` real
images are only reported, per epoch and at the end with the teacher's agreement there); a
black-box method never reads the victim's weights or gradients (it asks `fakecifar serve`, an
.onnx, or a .pt through its answers only); every teacher call is metered by the ledger and
`--queries` is a hard budget. With a budget, the run is sized to spend it: steps per epoch =
budget / (epochs x queries per step), so the learning-rate schedule ends where the budget
does.

Resume: the checkpoint's resume state holds the student, EMA, the generator (and the dfms
discriminator), the replay buffer, every optimizer, the position; the latent codes and every
random draw of a step are a function of (seed, epoch, step), so on CPU a resumed run is the
same run (on CUDA, kernels are not made deterministic: close, not bit-equal). After a kill -9
the steps since the last save are done again: their black-box answers come from the ledger's
cache, free; white-box forwards cannot be cached and are charged again, so a budget-limited
white-box run stops that much earlier.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UsageError
from .text import format_classes, format_size

# Used when the teacher's input normalisation is unknown (remote and .onnx teachers give none):
# the student's own input normalisation only, any fixed values work.
DEFAULT_MEAN, DEFAULT_STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def method_options(settings, method: str):
    """The method's knobs from the distill settings of the same names (fakecifar.distill_config)."""
    from dataclasses import fields

    from .training.datafree import STUDENT_STEPS, DataFreeOptions

    values = {f.name: getattr(settings, f.name) for f in fields(DataFreeOptions) if f.name != "method"}
    values["student_steps"] = settings.student_steps or STUDENT_STEPS[method]
    return DataFreeOptions(method=method, **values)


def open_proxy(given, *, stored=None, allow_incomplete: bool = False):
    """The proxy shards of a dfms run: those `given`, or on resume the ones the run `stored`
    (another set on resume is another run: refused). None: no proxy."""
    from .shards import open_shards

    stored = [str(p) for p in stored or []]
    if not given and not stored:
        return None
    proxy = open_shards(list(given or []) or stored, allow_incomplete=allow_incomplete)
    if given and stored and [str(p) for p in proxy.paths] != stored:
        raise UsageError(
            f"--resume: the run was started with --proxy {' '.join(stored)}",
            "resume with the run's own proxy set (or without --proxy), or start a new run with -o",
        )
    return proxy


def check_method(method: str, teacher) -> None:
    """Refuse what the teacher cannot give the method: gradients, or soft answers."""
    from .training.datafree import WHITE_BOX

    if method in WHITE_BOX and not teacher.white_box:
        raise UsageError(
            f"--method {method} is white-box: it needs the teacher's weights and gradients, and "
            f"{teacher.name} is a black-box {teacher.kind} teacher",
            "give a .pt/.th teacher, or use a black-box method: --method dfme (probabilities) or dfms (labels)",
        )
    if method == "dfme" and teacher.mode.kind == "label":
        raise UsageError(
            f"--method dfme needs probabilities or logits, and the teacher answers {teacher.mode}",
            "ask another --mode (probs, logits), or use --method dfms (hard labels)",
        )


def distill_datafree(
    output: str | os.PathLike,
    config,
    settings,
    *,
    val=None,
    proxy=None,
    resume: str | os.PathLike | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    log_path: str | os.PathLike | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_message: Callable[[str], None] | None = None,
):
    """Distill `settings.teacher` into `config.model` by `settings.method`; see the module doc.
    `val`: real labelled shards (reported only); `proxy`: shards of any images (dfms)."""
    import torch

    from .distill import DistillResult, _agreement
    from .generator import Discriminator, Generator
    from .ledger import run_ledger
    from .models import build_model
    from .teachers import open_teacher
    from .train import _load_resume, check_outputs, dist_from_env
    from .training import datafree as methods
    from .training.callbacks import Checkpoint, Hooks, JsonlLog, ResumeValues, SaveBest
    from .training.loop import Engine
    from .training.runtime import autocast_dtype, finish_processes, process_device, rank_seed, start_processes
    from .training.schedules import schedule_of

    say = on_message or (lambda _: None)
    method = settings.method
    dist = dist_from_env()
    output = Path(output)
    log_path = Path(log_path) if log_path else None
    check_outputs(output, config, resume=resume, onnx=onnx, overwrite=overwrite, log_path=log_path, dist=dist)
    if settings.bn_prior and method not in ("dafl", "zskt", "dfad"):
        raise UsageError(
            f"--bn-prior needs the teacher's batch-norm statistics: a white-box method "
            f"(dafl, zskt, dfad), not {method}",
            "drop --bn-prior",
        )
    if method == "zskt" and settings.replay:
        raise UsageError("--replay works with dafl, dfad, dfme and dfms", "drop --replay for zskt")
    if method == "dfms" and proxy is None:
        raise UsageError("--method dfms needs a proxy set to pre-train its generator", "give --proxy SHARDS")
    options = method_options(settings, method)
    # --batch-size is the whole step's, as in train: each process makes its share of the images.
    per_rank = max(1, config.batch_size // dist.world_size)
    cost = methods.queries_per_step(options, per_rank) * dist.world_size
    knobs = "--batch-size / --student-steps" + (" / --directions / --generator-steps" if method == "dfme" else "")
    if settings.queries is not None and settings.queries < cost:
        raise UsageError(
            f"--queries {settings.queries:,} is spent before the first generator step: one iteration of {method} "
            f"asks {cost:,} images (batch {config.batch_size})",
            f"raise --queries, or lower {knobs}",
        )
    if settings.queries is not None and not resume and settings.queries < cost * config.epochs:
        raise UsageError(
            f"--queries {settings.queries:,} pays for {settings.queries // cost:,} iterations of {method} "
            f"({cost:,} images each), fewer than --epochs {config.epochs}",
            f"lower --epochs to {max(1, settings.queries // cost)} or less, or raise --queries",
        )
    state: dict[str, Any] = {}
    if resume:
        _, state = _load_resume(Path(resume), config)
    teacher = open_teacher(
        settings.teacher,
        mode=settings.mode or ("label" if method == "dfms" else None),
        arch=settings.teacher_arch,
        api_key_env=settings.api_key_env,
        batch_size=settings.query_batch,
        fast=settings.fast_teacher,
        # A white-box teacher's gradients meet the generator's on one device: this process's.
        device=str(process_device(config.device, dist)),
    )
    with teacher:
        check_method(method, teacher)
        if proxy is not None and tuple(proxy.image_size) != tuple(teacher.input_size):
            raise UsageError(
                f"{proxy.paths[0]}: --proxy images are {format_size(proxy.image_size)}, the teacher "
                f"takes {format_size(teacher.input_size)}",
                f"resize them first: fakecifar resize --size {format_size(teacher.input_size)}",
            )
        if tuple(teacher.input_size)[0] % 4 or tuple(teacher.input_size)[1] % 4:
            raise UsageError(
                f"the generator makes images whose sides divide by 4; the teacher takes {teacher.input_size}"
            )
        if val is not None and list(val.classes) != teacher.classes:
            raise UsageError(
                f"{val.paths[0]}: --val classes {format_classes(val.classes)} differ from the teacher's "
                f"{format_classes(teacher.classes)}",
                "give --val shards of the teacher's classes",
            )
        clf = getattr(teacher, "clf", None)
        teacher_meta = clf.meta if clf is not None else {}
        mean = list(teacher_meta.get("mean") or DEFAULT_MEAN)
        std = list(teacher_meta.get("std") or DEFAULT_STD)
        # Rank 0 keeps the one ledger and asks the teacher for every process (TeacherAccess).
        with run_ledger(output, teacher, budget=settings.queries, cache=settings.cache, main=dist.main) as ledger:
            if settings.queries is not None:
                steps = max(1, math.floor(settings.queries / (cost * config.epochs)))
            else:
                steps = settings.steps_per_epoch
            if state:
                steps = int(state.get("steps_per_epoch", steps))
            device = start_processes(config.device, dist)
            try:
                torch.manual_seed(config.seed)
                amp_dtype = autocast_dtype(config.precision, device)
                num_classes = teacher.num_classes
                model = build_model(config.model, num_classes, **config.arch_kwargs)
                generator = Generator(options.latent, options.generator_width, teacher.input_size)
                stages = methods.STAGES if method == "zskt" else ()
                access = methods.TeacherAccess(
                    teacher,
                    ledger,
                    device,
                    white_box=method in methods.WHITE_BOX,
                    stages=stages,
                    bn_prior=options.bn_prior > 0,
                    dist=dist,
                )
                if access.prior is not None and not access.prior.layers:
                    raise UsageError(
                        f"--bn-prior: {teacher.name} has no BatchNorm2d layer to take statistics from"
                        + (" (--fast-teacher folds them into the convolutions)" if settings.fast_teacher else ""),
                        "drop --bn-prior" + (" or --fast-teacher" if settings.fast_teacher else ""),
                    )
                val_loader = _val_loader(val, mean, std, device, dist) if val is not None else None
                common = {"mean": mean, "std": std, "val": val_loader, "seed": config.seed}
                if method == "dfms":
                    images = torch.from_numpy(proxy.read("images"))
                    task: methods.DataFreeTask = methods.DFMS(
                        config,
                        options,
                        access,
                        generator,
                        proxy=images,
                        discriminator=Discriminator(options.generator_width, teacher.input_size),
                        **common,
                    )
                else:
                    task = methods.TASKS[method](config, options, access, generator, **common)
                meta = {
                    "arch": config.model,
                    "arch_kwargs": config.arch_kwargs,
                    "classes": teacher.classes,
                    "mean": mean,
                    "std": std,
                    "input_size": list(teacher.input_size),
                }
                distill_meta = {
                    **settings.to_dict(),
                    "method": method,
                    "mode": str(teacher.mode),
                    "teacher_describe": teacher.describe(),
                    "generator": generator.options(),
                    "queries_per_step": cost,
                    "proxy": [str(p) for p in proxy.paths] if proxy is not None else [],
                }
                info = {
                    "data": [],
                    "val": [str(p) for p in val.paths] if val is not None else None,
                    "images": steps * options.student_steps * per_rank * dist.world_size,
                    "device": str(device),
                    "world_size": dist.world_size,
                    "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                    "selection": "final checkpoint (--val is reported, never selected on)",
                    "target": "class",
                }
                log = JsonlLog(log_path, append=bool(resume)) if log_path else None
                engine = Engine(
                    model,
                    task,
                    methods.latent_batches(steps, per_rank, options.latent, rank_seed(config.seed, dist), device),
                    epochs=config.epochs,
                    schedule=schedule_of(config, steps),
                    device=device,
                    dist=dist,
                    amp_dtype=amp_dtype,
                    channels_last=bool(config.channels_last),
                    ema=config.ema,
                    callbacks=[
                        Checkpoint(
                            output,
                            meta=meta,
                            info=lambda: {
                                **info,
                                "distill": distill_meta,
                                "queries": ledger.summary() if ledger else {},
                            },
                            args=config.to_dict,
                            build=lambda: build_model(config.model, num_classes, **config.arch_kwargs),
                            best=SaveBest(enabled=False),
                        ),
                        ResumeValues(steps_per_epoch=steps),
                        *([log] if log else []),
                        Hooks(on_step=on_step, on_epoch=on_epoch),
                    ],
                    resume=state,
                    output=output,
                    command="fakecifar distill",
                )
                if method == "dfms" and not task.pretrained:  # type: ignore[attr-defined]
                    gan_steps = methods.proxy_steps(options, len(proxy), per_rank * dist.world_size)
                    say(
                        f"pre-training the generator on {len(proxy):,} proxy images ({gan_steps:,} GAN steps, no query)"
                    )
                    task.pretrain(gan_steps, per_rank, options.latent)  # type: ignore[attr-defined]
                stopped = engine.run()
            finally:
                finish_processes(dist)
            if ledger is None:  # another torchrun process: rank 0 reports
                return DistillResult(None, None, engine.history, stopped, {}, [], None, {}, None)
            written_onnx = None
            if onnx:
                from .checkpoint import export_onnx, load_checkpoint

                final, final_meta = load_checkpoint(output)
                written_onnx = export_onnx(final, final_meta, output.with_suffix(".onnx"))
            with torch.no_grad():
                generator.eval()
                z = torch.randn(256, options.latent, generator=torch.Generator().manual_seed(config.seed))
                probe = ((generator(z.to(device)) - task.mean) / task.std).cpu()
            metrics = _agreement(output, teacher, val, ledger) if val is not None else {}
            summary, lines = ledger.summary(), ledger.report_lines()
    return DistillResult(output, written_onnx, engine.history, stopped, summary, lines, None, metrics, probe)


def _val_loader(val, mean, std, device, dist):
    import numpy as np

    from .loader import BatchLoader

    labels = val.read("labels")
    return BatchLoader(
        val,
        256,
        shuffle=False,
        mean=mean,
        std=std,
        device=device,
        columns=("labels",),
        indices=np.nonzero(labels >= 0)[0][dist.rank :: dist.world_size],  # each process its slice
    )
