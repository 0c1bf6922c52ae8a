"""Where a run executes: processes (DDP under torchrun), the device, the autocast dtype, and the
reductions that keep processes in agreement."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import UsageError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """RANK/WORLD_SIZE/LOCAL_RANK as set by torchrun (single process when absent)."""
    try:
        return Dist(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError as exc:
        raise UsageError(f"bad torchrun environment: {exc}") from exc


def process_device(device_spec: str, dist: Dist) -> torch.device:
    """The device of this process: `device_spec` in one process; under torchrun one GPU per
    local rank when CUDA is asked for (or `auto` finds it), else the CPU."""
    if not dist.enabled:
        from ..evaluate import resolve_device

        return resolve_device(device_spec)
    if torch.cuda.is_available() and device_spec in ("auto", "cuda") or str(device_spec).startswith("cuda"):
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def start_processes(device_spec: str, dist: Dist) -> torch.device:
    """The device of this process (process_device); under DDP also joins the process group
    (nccl on CUDA; gloo on CPU, each process then using cores/processes threads)."""
    device = process_device(device_spec, dist)
    if not dist.enabled:
        return device
    import torch.distributed as tdist

    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return device


def finish_processes(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


def all_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """`t` summed over processes, in place (every process must call it)."""
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device, dist: Dist) -> bool:
    """`flag` on any process (every process must call it: all decide together)."""
    if not dist.enabled:
        return bool(flag)
    return all_sum(torch.tensor(float(flag), dtype=torch.float64, device=device), dist).item() > 0


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --precision on this device (None: full fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16":
            return torch.float16
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if precision == "fp16":
        raise UsageError("--precision fp16 needs CUDA", "use bf16 or fp32 on CPU")
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (Intel AMX), where bf16 autocast is ~2-3x faster."""
    try:
        return bool(torch.cpu._is_amx_tile_supported()) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def rank_seed(seed: int, dist: Dist) -> int:
    """The seed of this process's own draws (its images, its noise): rank 0 keeps `seed`, so one
    process draws what it always drew, and every other rank draws apart from it."""
    return seed if dist.rank == 0 else seed + dist.rank * 0x9E37_79B9


def gather_all(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """`t` of every process concatenated along dim 0, rank 0 first, on every process (all
    processes call it with tensors of the same shape)."""
    if not dist.enabled:
        return t
    import torch.distributed as tdist

    parts = [torch.empty_like(t) for _ in range(dist.world_size)]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_main(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """`t` as rank 0 has it, in place on every process (same shape and dtype everywhere)."""
    if dist.enabled:
        import torch.distributed as tdist

        tdist.broadcast(t, src=0)
    return t


def average_gradients(module: torch.nn.Module, dist: Dist) -> None:
    """Average the gradients of `module` over processes (what DDP does for a model it wraps),
    for the second networks of a task -- a generator, a discriminator -- that step on their own."""
    if not dist.enabled:
        return
    import torch.distributed as tdist

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(dist.world_size)
    tdist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
