"""Device-aware training: mixed precision, compiled steps, fused optimisers, data parallelism.

One code path for CPU and GPU. On CUDA: bf16 autocast, fused AdamW, optional ``torch.compile``,
TF32 matmuls, pinned host memory with non-blocking copies. On CPU: plain fp32, so tests are exact.
Several processes (``torchrun --nproc-per-node N``) train one model with DistributedDataParallel:
NCCL between GPUs, gloo between CPU processes; only rank 0 writes checkpoints, metrics and logs.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from stages.common import resolve_device

log = logging.getLogger(__name__)


def autocast(device: str | torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); nothing on CPU."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_backends(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def make_adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
               device: str | torch.device, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on CUDA."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay, fused=fused, **kwargs)


def maybe_compile(fn: Any, enabled: bool | None, device: str | torch.device, mode: str | None = None) -> Any:
    """``torch.compile`` where it helps: by default on CUDA only (CPU compile time dwarfs our tests)."""
    if enabled is None:
        enabled = torch.device(device).type == "cuda"
    if not enabled:
        return fn
    return torch.compile(fn, mode=mode) if mode else torch.compile(fn)


def to_device(batch: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    """Move tensors; pinned host memory makes the copy asynchronous on CUDA."""
    cuda = torch.device(device).type == "cuda"
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if cuda and not value.is_pinned():
                value = value.pin_memory()
            value = value.to(device, non_blocking=cuda)
        out[key] = value
    return out


def batch_size_of(batch: dict[str, Any]) -> int:
    """Samples in a batch of tensors and lists (the first tensor's length)."""
    return len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))


def share_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of a global batch of ``n`` samples: ``n // world_size``
    each, the last rank also taking the remainder (so a batch smaller than the world leaves the other
    ranks none). `Distributed.split` and the data loader's per-rank batches (`stages.data.shards`) both
    cut by this rule, so a loader's share is what splitting the global batch would give."""
    per = n // world_size
    return rank * per, (rank + 1) * per if rank < world_size - 1 else n


def micro_batches(batch: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """``batch`` cut into ``steps`` contiguous micro-batches of nearly equal size (tensors and lists
    alike); fewer, never empty ones, when the batch has fewer samples than ``steps`` (an epoch's last)."""
    n = batch_size_of(batch)
    if steps <= 1 or n <= 1:
        return [batch]
    sizes = [n // steps + (1 if i < n % steps else 0) for i in range(steps)]
    out, lo = [], 0
    for size in sizes:
        if size:
            out.append({k: v[lo:lo + size] for k, v in batch.items()})
        lo += size
    return out


def capture_rng(device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU (and this CUDA device's) RNG state, to replay a forward pass with the same dropout."""
    cuda = torch.device(device).type == "cuda"
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None


def restore_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: str | torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class Distributed:
    """Where this process sits in a ``torchrun`` job (world_size 1 when run plainly)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        if requested == "cuda" and self.enabled:
            return f"cuda:{self.local_rank}"
        return requested

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        # find_unused_parameters: a stage trains only some heads of the shared model.
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's share of a (globally shuffled) index array, equal-sized on every rank."""
        if not self.enabled:
            return indices
        per_rank = len(indices) // self.world_size
        return indices[self.rank * per_rank:(self.rank + 1) * per_rank]

    def split(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This rank's contiguous share of a global batch (tensors and lists alike), by `share_bounds`."""
        if not self.enabled:
            return batch
        lo, hi = share_bounds(batch_size_of(batch), self.rank, self.world_size)
        return {k: v[lo:hi] for k, v in batch.items()}

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over ranks in one flat all-reduce.

        Used instead of wrapping in DistributedDataParallel where part of the loss (an offline-RL
        critic) runs on a data-dependent subset of the batch: every rank always joins the same
        collective, so no rank waits for a bucket another rank never fills.
        """
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def share(self, counts: Sequence[torch.Tensor | int]) -> list[float]:
        """For each masked mean a rank computed over ``count`` of its samples: the factor
        ``count * world_size / global_count`` that turns the average of the ranks' means (what
        gradient averaging gives) into the mean over every rank's samples (what one process gives)."""
        if not self.enabled:
            return [1.0] * len(counts)
        local = torch.tensor([float(c) for c in counts], dtype=torch.float64)
        total = local.clone()
        if torch.distributed.get_backend() == "nccl":
            total = total.cuda()
        torch.distributed.all_reduce(total)
        total = total.cpu()
        return [float(l * self.world_size / t) if t > 0 else 0.0 for l, t in zip(local, total)]

    def micro_shares(self, counts: Sequence[Sequence[torch.Tensor | int]]) -> list[list[float]]:
        """Weights of masked means taken over micro-batches, on top of :meth:`share`'s across ranks.

        ``counts[m][j]``: the samples of micro-batch ``m`` (of this rank) that masked mean ``j`` averages
        over. Its weight is ``count * world_size / global_count``, the global count summed over every
        micro-batch of every rank: summing the weighted micro-batch gradients, then averaging over
        ranks, gives the gradient of the mean over the whole global batch (what one process on one
        batch gives). With one micro-batch per rank it is :meth:`share`'s factor."""
        if not counts:
            return []
        # One tensor on the counts' device, read back once: one host sync per step, not one per count.
        device = next((c.device for row in counts for c in row if isinstance(c, torch.Tensor)), torch.device("cpu"))
        local = torch.stack([torch.stack([torch.as_tensor(c, dtype=torch.float64, device=device).reshape(())
                                          for c in row]) for row in counts])
        total = local.sum(0)
        if self.enabled:
            if torch.distributed.get_backend() == "nccl":
                total = total.cuda()
            torch.distributed.all_reduce(total)
        local, total = local.cpu().tolist(), total.cpu().tolist()
        return [[c * self.world_size / t if t > 0 else 0.0 for c, t in zip(row, total)] for row in local]

    def gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along dim 0 in rank order, gradients flowing back to each.

        The backward sums every rank's gradient of its (global) loss into each rank's share, i.e.
        ``world_size`` times one loss's gradient; :meth:`average_gradients` then divides by
        ``world_size``, so the result is the gradient one process gets on the global batch. Ranks
        may hold different numbers of rows (an epoch's last batch): padded to the largest, then cut."""
        if not self.enabled:
            return x
        size = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        torch.distributed.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        if x.shape[0] < longest:
            x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
        parts = _GatherWithGrad.apply(x, self.rank, self.world_size)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum Python numbers over ranks (epoch totals of the logged losses)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        """Average a Python number over ranks (for logged losses)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the sum over ranks of the gradient of its rows.

    ``torch.distributed.nn.functional.all_gather`` does the same but is deprecated (torch 2.13) for
    private functional collectives whose names changed between releases; this uses only the public
    ``all_gather`` / ``all_reduce`` (the tensors are embeddings: the extra traffic of an all-reduce
    over a reduce-scatter is a few kB)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, ...]:
        ctx.rank = rank
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        total = torch.stack([g.contiguous() for g in grads])
        torch.distributed.all_reduce(total)
        return total[ctx.rank], None, None


def init_distributed(device: str) -> Distributed:
    """Join the ``torchrun`` process group if there is one (RANK/WORLD_SIZE set), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    dist = Distributed(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                       world_size=world)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group(backend=backend)
        log.info("rank %d/%d joined the %s process group", dist.rank, world, backend)
    return dist


def shutdown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str) -> Iterator[Distributed]:
    dist = init_distributed(device)
    try:
        yield dist
    finally:
        shutdown_distributed()


T = TypeVar("T")


def run_on_ranks(cfg: Any, body: Callable[[Any, Distributed], T]) -> T:
    """A stage's ``run``: ``body(cfg, dist)`` on this process, or as one rank of a ``torchrun`` job."""
    with distributed(resolve_device(cfg.device)) as dist:
        return body(cfg, dist)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
