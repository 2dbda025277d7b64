"""Data-parallel training under `torchrun`: PyTorch's own engine, thin helpers around it.

`torchrun --nproc-per-node K -m prerank train ...` starts K copies of the same command; each
reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from the environment that torchrun sets.
`session` joins the process group (gloo on CPU, NCCL on CUDA) and leaves it cleanly; the trainer
then wraps the model in `DistributedDataParallel`, reads its shard of every epoch's shuffled order
(`shard_order`, DistributedSampler's semantics) and gathers evaluation predictions from every rank
(`gather_predictions`) so metrics are computed on the full set, never averaged per rank.

Choices where PyTorch leaves it to us:
- `TrainConfig.batch_size` is the *global* batch: each rank takes batch_size / K rows, so the
  same command gives the same optimisation (same global batches, gradient averaged by DDP) on any
  number of processes.
- BatchNorm stays local (no SyncBatchNorm): each rank normalises with its own B/K rows' statistics
  and DDP broadcasts rank 0's running statistics every step. SyncBatchNorm only runs on GPUs
  (not on gloo/CPU), costs one collective per BN layer per step, and would replace our
  last-dimension BatchNorm with one that normalises dim 1 of [B, N, d] inputs. With B/K in the
  hundreds the statistics are as good; models with BatchNorm therefore match a single-process run
  approximately, models without it to float tolerance.
- No `find_unused_parameters`: the contract test checks that every parameter gets a gradient
  from `forward` (auxiliary losses included), which is what DDP's default assumes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def context() -> Context:
    """This process's place in the current process group (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    return Context()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(device: str = "cpu"):
    """Join the process group when launched by torchrun; yields the device this rank trains on.

    Every rank waits at a barrier before the group is destroyed: without it two gloo processes
    sometimes abort at exit after finishing their work. On an error the barrier is skipped (the
    other ranks would wait forever; torchrun stops them when this one exits non-zero).
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield device
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested under torchrun, but CUDA is not available")
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    ok = False
    try:
        yield device
        ok = True
    finally:
        if ok:
            dist.barrier()
        dist.destroy_process_group()
        # Free what still references the group's work (DDP reducers of finished trainers) while the
        # interpreter is alive: freed at interpreter exit instead, gloo's threads can take the GIL
        # mid-teardown and abort the process (seen once in CI under load, exit -6 after all work).
        gc.collect()


def data_parallel(command):
    """Run a command taking a `device` keyword inside `session(device)` (for CLI commands)."""

    @functools.wraps(command)
    def run(*args, device: str = "cpu", **kwargs):
        with session(device) as rank_device:
            return command(*args, device=rank_device, **kwargs)

    return run


def per_rank_batch_size(global_batch_size: int, ctx: Context) -> int:
    if global_batch_size % ctx.world_size:
        raise ValueError(f"batch_size {global_batch_size} is the global batch and must be divisible by "
                         f"the number of processes ({ctx.world_size})")
    return global_batch_size // ctx.world_size


def shard_order(order: Tensor, ctx: Context) -> Tensor:
    """This rank's share of an epoch's row order, as `DistributedSampler(drop_last=False)` does it:
    pad by repeating the head so every rank gets the same count, then take every K-th row from
    position `rank`. With per-rank batches of B/K, the K ranks' j-th batches together are exactly
    the rows of the single-process j-th batch of size B (up to the K-1 padded rows)."""
    if not ctx.enabled:
        return order
    padding = (-len(order)) % ctx.world_size
    if padding:
        order = torch.cat([order, order[:padding]])
    return order[ctx.rank :: ctx.world_size]


def wrap(model: nn.Module, device: torch.device, ctx: Context) -> nn.Module:
    """The module to call for training steps: DDP over `model` under torchrun, `model` otherwise."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def eval_rows(n: int, ctx: Context) -> np.ndarray:
    """This rank's contiguous slice of an evaluation table's rows."""
    bounds = np.linspace(0, n, ctx.world_size + 1).round().astype(int)
    return np.arange(bounds[ctx.rank], bounds[ctx.rank + 1])


def broadcast_buffers(model: nn.Module, ctx: Context) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts them at the
    start of each training forward, so after the last step each rank holds its own update; without
    this, ranks would evaluate their shares with slightly different statistics than the checkpoint."""
    if ctx.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def gather_predictions(local: np.ndarray, n: int, ctx: Context, device: torch.device) -> np.ndarray:
    """Concatenate every rank's `local` predictions (rank order = row order, see `eval_rows`)."""
    if not ctx.enabled:
        return local
    sizes = [len(eval_rows(n, Context(r, ctx.world_size))) for r in range(ctx.world_size)]
    # all_gather needs equal shapes (NCCL: on the GPU): pad to the largest slice, cut after.
    padded = torch.zeros(max(sizes), dtype=torch.float32, device=device)
    padded[: len(local)] = torch.as_tensor(local, dtype=torch.float32, device=device)
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu().numpy()


def sum_over_ranks(values: list[float], ctx: Context, device: torch.device) -> list[float]:
    """Sums of per-rank running totals (loss sums, row counts), for logging the global epoch loss."""
    if not ctx.enabled:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()
