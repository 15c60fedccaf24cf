"""Process-group set-up for torchrun (DDP), and no-ops on a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def shutdown_distributed() -> None:
    """Leave the process group once every process is done: an interpreter that exits with gloo's
    threads still up can abort at teardown ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def agree(n_good: int, bad_in_a_row: int) -> tuple[int, int]:
    """The smallest good-sample count and the longest bad run over all processes."""
    if not dist.is_initialized():
        return n_good, bad_in_a_row
    t = torch.tensor([-n_good, bad_in_a_row])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return -int(t[0]), int(t[1])


def all_reduce_int(n: int, device, op: str = "sum") -> int:
    """`n` summed (or its maximum, op "max") over all processes."""
    if not dist.is_initialized():
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return int(t)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for our rows.  Local batches may
    differ in size (bad samples are dropped per process), so rows are padded to the largest."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank, top = dist.get_rank(), max(sizes)
        padded = x.new_zeros((top, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.rank, ctx.start = rank, sum(sizes[:rank])
        ctx.n = x.shape[0]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.n], None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `x` [b, ...] from every process along dim 0, keeping the autograd graph so
    negatives from other processes send gradient back to their owners.  Returns the gathered
    tensor and the offset of this process's rows in it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    return _GatherWithGrad.apply(x, sizes), sum(sizes[: dist.get_rank()])
