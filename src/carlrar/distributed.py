"""Data-parallel training on the GPUs of one node, launched with ``torchrun``.

Every rank holds the full model and the full CARL memory banks. A global batch of ``batch_size`` examples is
split across the ranks; after the K FreeLB passes the parameter gradients are averaged over the ranks, weighted
by each rank's share of the batch, so one step equals the single-process step on the whole batch (for the
mean cross-entropy). The memory banks stay identical on every rank because each rank writes the rows of the
whole global batch (features and indices are gathered first), and the negative sampler draws from the global
batch's classes with the same seeded RNG everywhere.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class Collective:
    """The single-process case: every collective is the identity. Also the interface CARL uses."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order (sizes may differ)."""
        return tensor

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean of a tensor over the ranks."""
        return tensor

    def reduce_gradients(self, params: list[torch.nn.Parameter], local_examples: int) -> None:
        """Turn each rank's mean-over-its-examples gradient into the mean over the global batch."""

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Leave the process group (nothing to leave for a single process)."""


class ProcessGroupCollective(Collective):
    """Collectives over the default process group (gloo on CPU, NCCL on CUDA)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def gather(self, tensor: Tensor) -> Tensor:
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[: int(n.item())] for part, n in zip(parts, sizes, strict=True)])

    def mean(self, tensor: Tensor) -> Tensor:
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def reduce_gradients(self, params: list[torch.nn.Parameter], local_examples: int) -> None:
        device = params[0].device
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads) * local_examples
        count = torch.tensor([float(local_examples)], device=device)
        dist.all_reduce(flat)
        dist.all_reduce(count)
        flat /= count
        for param, reduced in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            param.grad = reduced

    def gather_objects(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then tear the group down: a gloo group left to interpreter exit can abort the
        process ("terminate called without an active exception") after all the work is done."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_collective(device_request: str) -> tuple[Collective, torch.device | None]:
    """Join the process group when started by ``torchrun``; return the collective and this rank's device.

    The device is None for a single process (the caller picks one, leasing a free GPU); under torchrun each
    rank uses the GPU of its LOCAL_RANK, or the CPU with gloo.
    """
    if not launched_by_torchrun():
        return Collective(), None
    use_cuda = torch.cuda.is_available() and device_request != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ProcessGroupCollective(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
