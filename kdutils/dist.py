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


def main(argv=None) -> dict:
    """``[torchrun ...] python -m kdutils.dist --out DIR``: the appendix's 1-vs-N comparison.

    Trains R5's LightNN with cross-entropy on a CIFAR-10 subset (the same global batch
    whatever the number of processes, each process using its share of the CPU threads) and
    writes rank 0's history and timings to ``DIR/summary-<processes>.json``.
    """
    import argparse
    import json
    import time
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m kdutils.dist", description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--train_size", type=int, default=4000)
    ap.add_argument("--data_dir", default=None)
    args = ap.parse_args(argv)
    from . import data as D
    from .models import build
    from .train import Recipe, fit

    w = setup("cpu")
    threads = max(1, (os.cpu_count() or 1) // w.size)
    torch.set_num_threads(threads)
    with main_first():
        data = D.load_cifar10(args.data_dir, train_size=args.train_size, test_size=1000, verbose=False)
    out = Path(args.out)
    t0 = time.perf_counter()
    run = fit(build("lightnn", seed=0), data, Recipe(epochs=args.epochs, batch_size=args.batch_size),
              chapter="scaleout", method=f"ce-{w.size}proc", device="cpu", ckpt_dir=str(out / "ck"),
              results_dir=str(out / "res"), progress=False)
    summary = {"processes": w.size, "threads_per_process": threads, "seconds": time.perf_counter() - t0,
               "history": run.record["history"], "data_source": data.source,
               "train_size": len(data.train_y), "batch_size": args.batch_size}
    if w.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"summary-{w.size}.json").write_text(json.dumps(summary, indent=1))
    teardown()
    return summary


if __name__ == "__main__":
    main()
