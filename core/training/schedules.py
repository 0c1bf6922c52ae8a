"""Learning-rate schedules: a factor of the base learning rate per optimizer step, which the loop
applies to every param group of every optimizer of the task."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def lr_factor(config: Any, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total_steps`.
    `config` has schedule, warmup, epochs, milestones and gamma (a TrainConfig)."""
    t = min(step / max(total_steps, 1), 1.0)
    if config.schedule == "onecycle":
        # Linear ramp 0.1 -> 1 over the first 25%, then linear decay to 0 (Smith & Topin 2019,
        # in airbench's piecewise-linear form).
        peak = 0.25
        return 0.1 + 0.9 * t / peak if t < peak else max(0.0, (1 - t) / (1 - peak))
    warm = config.warmup * steps_per_epoch
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if config.schedule == "cosine":
        span = max(total_steps - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min((step - warm) / span, 1.0)))
    if config.schedule == "multistep":
        epoch = step / max(steps_per_epoch, 1)
        marks = [m * config.epochs if m <= 1 else m for m in config.milestones]
        return config.gamma ** sum(epoch >= m for m in marks)
    return 1.0


def schedule_of(config: Any, steps_per_epoch: int) -> Callable[[int], float]:
    """`config`'s schedule as a function of the global step, for `Engine(schedule=...)`."""
    total = steps_per_epoch * config.epochs
    return lambda step: lr_factor(config, step, total, steps_per_epoch)
