"""Several processes, one run: what the loop needs from ``torch.distributed`` (appendix "Scale-out").

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``), :func:`setup` joins the process group: NCCL when every process has a GPU,
gloo on CPUs. Without torchrun nothing changes: rank 0 of a world of 1.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes checkpoints, records and progress bars (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place in the running process group (rank 0 of 1 without one)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return World(torch_dist.get_rank(), torch_dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def setup(device: str = "auto") -> World:
    """Join the process group that ``torchrun`` set up the environment for; a no-op otherwise.

    The backend is NCCL when the processes train on CUDA GPUs (each takes the GPU of its
    ``LOCAL_RANK``), gloo on CPUs. Returns :func:`world`.
    """
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size <= 1 or torch_dist.is_initialized():
        return world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return world()


def device_for(device: str, w: World) -> str:
    """Under torchrun, ``auto``/``cuda`` mean this process's own GPU (``cuda:LOCAL_RANK``)."""
    if w.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{w.local_rank}"
    return device


def teardown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all processes (``t`` itself in a single process)."""
    if world().distributed:
        t = t.clone()
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if world().distributed:
        torch_dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. decoding a dataset into its cache), the others after."""
    w = world()
    if w.distributed and not w.main:
        torch_dist.barrier()
    yield
    if w.distributed and w.main:
        torch_dist.barrier()


class Replica:
    """What a training step sees when the model is wrapped (DistributedDataParallel under
    torchrun, or ``torch.compile``): calling it runs the wrapper, so DDP averages the
    gradients across processes, and attributes (``model.student``, ``model.proj``) are the
    model's own. A step must run its forward pass through ``model(...)``; submodules may be
    used on its outputs (a regressor, a projection)."""

    def __init__(self, wrapper, module: torch.nn.Module):
        self.wrapper, self.module = wrapper, module

    def __call__(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)
