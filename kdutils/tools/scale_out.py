"""The appendix "Scaling out": one process against several, same global batch.

    [torchrun --standalone --nproc_per_node=N] python -m kdutils.tools.scale_out --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .. import data as D
from ..dist import main_first, setup, teardown
from ..models import build
from ..settings import RunOptions
from ..train import Recipe, fit


def main(argv=None) -> dict:
    """``[torchrun ...] python -m kdutils.tools.scale_out --out DIR``: the appendix's 1-vs-N comparison.

    Trains R5's LightNN with cross-entropy on a CIFAR-10 subset (the same global batch
    whatever the number of processes, each process using its share of the CPU threads) and
    writes rank 0's history and timings to ``DIR/summary-<processes>.json``.
    """
    ap = argparse.ArgumentParser(prog="python -m kdutils.tools.scale_out", description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--train_size", type=int, default=4000)
    ap.add_argument("--data_dir", default=None)
    args = ap.parse_args(argv)
    w = setup("cpu")
    threads = max(1, (os.cpu_count() or 1) // w.size)
    torch.set_num_threads(threads)
    with main_first():
        data = D.load_cifar10(args.data_dir, train_size=args.train_size, test_size=1000, verbose=False)
    out = Path(args.out)
    t0 = time.perf_counter()
    run = fit(build("lightnn", seed=0), data, Recipe(epochs=args.epochs, batch_size=args.batch_size),
              chapter="appendix_scale_out", method=f"ce-{w.size}proc",
              options=RunOptions(device="cpu", ckpt_dir=str(out / "ck"), results_dir=str(out / "res"),
                                 progress=False))
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
