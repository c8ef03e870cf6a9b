"""Throughput benchmark: the reference notebooks' training step against kdutils', side by side.

    python -m kdutils.tools.bench                # every setup, sizes adapted to the device
    python -m kdutils.tools.bench --setups lightnn_kd deepnn_ce --steps 20 --repeats 5

For each setup it times, in the same process, a full training step (data, teacher, student
forward and backward, optimiser) in two styles:

* ``reference``: a torchvision ``DataLoader`` over PIL images with per-sample transforms,
  fp32, NCHW, the teacher in fp32 run at every step (as the R notebooks do);
* ``kdutils``: :func:`kdutils.loop.train_epoch`, the loop every chapter trains with, on
  batches cut from uint8 tensors on the device and augmented there, in the precision and
  memory layout the loop would pick with
  ``Speed(chooser=kdutils.tools.chooser.choose_cpu_setting)``
  (:meth:`kdutils.speed.Speed.resolve`: bf16 and channels_last on a recent GPU; on a CPU, the
  fastest admissible setting, timed on the spot), the teacher in inference mode through
  :func:`kdutils.loop.with_teacher` (its outputs precomputed when nothing is augmented, as
  the chapters do).

On a CPU both are timed twice. First each setup's reference beside kdutils with the
process's default memory handling, which is also the loop's default (as R5's code runs:
"kdutils img/s, memory returned"), then both again once the process keeps the memory a step
frees (:func:`kdutils.speed.keep_freed_memory`, which :class:`~kdutils.speed.Speed` does when
asked: ``keep_memory=True`` or ``KD_KEEP_MEMORY=1``: "reference img/s, memory kept" and
"kdutils img/s"). "speed-up" is the book's loop with memory kept against the reference as it
runs; "speed-up, memory returned in both" and "speed-up, memory kept in both" are like for like.
It prints images/s of the step (median over repeats, warm-up excluded), the ratios, the
setting the loop picked, the data pipeline alone, and the process's peak memory so far. Where the setup uses R1's
AutoAugment, the data pipeline is also timed with torchvision's AutoAugment applied image by
image (what kdutils did before :mod:`kdutils.autoaugment`), and the ratio of the two. ``--out`` defaults to
``results/bench/<device kind>.json`` (``cpu-avx2``, ``cpu-avx512``, ``cuda-<gpu>``): one file per
machine type.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import torch

from .. import data as D
from .. import methods, settings
from ..autoaugment import auto_augment_per_image
from ..loop import precompute_teacher, train_epoch, with_teacher
from ..losses import total
from ..models import build
from ..results import device_name
from ..speed import Speed, freed_memory_kept, keep_freed_memory, setting_name
from ..train import Recipe, make_optimizer, pick_device
from .chooser import choose_cpu_setting

COMMAND = "python -m kdutils.tools.bench"


@dataclass(frozen=True)
class Setup:
    student: str
    teacher: str | None = None
    loss: str = "ce"
    augment: bool = False
    optimizer: str = "adam"
    r1_augment: bool = False  # R1's AutoAugment + RandomErasing on top of crop and flip


SETUPS = {
    "lightnn_ce": Setup("lightnn"),
    "lightnn_kd": Setup("lightnn", "deepnn", "kd"),
    "deepnn_ce": Setup("deepnn"),
    "resnet18_ce": Setup("resnet18", augment=True, optimizer="sgd"),
    "resnet18_kd": Setup("resnet18", "resnet50", "kd", augment=True, optimizer="sgd"),
    "resnet18_byot": Setup("resnet18_multiexit", loss="byot", augment=True, optimizer="sgd",
                           r1_augment=True),
}


def _step_and_optimizer(setup: Setup, model):
    """The chapters' own step function and optimiser for this setup."""
    if setup.optimizer == "sgd":
        recipe = Recipe(epochs=1, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4)
    else:
        recipe = Recipe(epochs=1)
    if setup.loss == "byot":
        step = methods.byot_step
    elif setup.loss == "kd":
        step = partial(methods.kd_step, T=4.0, alpha=0.5)
    else:
        step = methods.ce_step
    return step, make_optimizer(model, recipe)


class _PILDataset(torch.utils.data.Dataset):
    """Images as PIL objects with per-sample torchvision transforms, like the R notebooks."""

    def __init__(self, x_uint8, y, augment, mean, std, r1_augment=False):
        from PIL import Image
        from torchvision import transforms as T
        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x_uint8]
        self.y = y.tolist()
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
        if r1_augment:
            steps.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
        after = [T.RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)] if r1_augment else []
        self.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)] + after)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.y[i]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(train, batches, device, warmup, steps, repeats, batch_size, min_seconds=1.0):
    """Median images/s of ``train(batches)`` over ``repeats`` runs of ``steps`` batches each,
    after ``warmup`` batches; ``batches()`` is started again whenever it runs out. Where
    ``steps`` batches take less than ``min_seconds``, more are timed per repeat (a repeat of a
    few milliseconds measures the machine's noise, not the step)."""
    def endless():
        while True:
            yield from batches()
    it = endless()
    train(islice(it, warmup))
    _sync(device)
    t0 = time.perf_counter()
    train(islice(it, steps))
    _sync(device)
    took = time.perf_counter() - t0
    if took < min_seconds:
        steps = min(50 * steps, math.ceil(steps * min_seconds / max(took, 1e-6)))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train(islice(it, steps))
        _sync(device)
        rates.append(steps * batch_size / (time.perf_counter() - t0))
    return statistics.median(rates)


def _images(images, labels, batch_size, warmup, steps, repeats):
    n_needed = batch_size * (warmup + steps * repeats + 1)
    return images[:n_needed], labels[:n_needed]


def bench_reference(name: str, images, labels, *, device, batch_size, warmup, steps, repeats,
                    workers, step_only: bool = False, min_seconds: float = 1.0) -> dict:
    """The reference style's row for setup ``name``: step and (unless ``step_only``) data
    images/s, each repeat lasting at least ``min_seconds`` (:func:`time_batches`)."""
    setup = SETUPS[name]
    timer = partial(time_batches, min_seconds=min_seconds)
    x, y = _images(images, labels, batch_size, warmup, steps, repeats)
    mean, std = D.CIFAR10_MEAN, D.CIFAR10_STD
    row = {"setup": name, "device": str(device), "batch": batch_size}
    ds = _PILDataset(x, y, setup.augment, mean, std, setup.r1_augment)
    # persistent workers: a timed repeat may outlast the few batches of data here, and starting
    # the workers again inside it would bill their start-up to every step
    loader = lambda: torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,  # noqa: E731
                                                 num_workers=workers, drop_last=True,
                                                 persistent_workers=workers > 0)
    student = build(setup.student, seed=0).to(device).train()
    teacher = build(setup.teacher, seed=1).to(device).eval() if setup.teacher else None
    step, opt = _step_and_optimizer(setup, student)

    def ref_step(batch):
        xb, yb = batch[0].to(device), batch[1].to(device)
        t = None
        if teacher is not None:
            with torch.no_grad():
                t = {"logits": teacher(xb)}
        loss = total(step(student, xb, yb, t))
        opt.zero_grad()
        loss.backward()
        opt.step()

    row["reference img/s"] = timer(lambda b: [ref_step(batch) for batch in b], loader, device,
                                   warmup, steps, repeats, batch_size)
    if not step_only:
        row["reference data img/s"] = timer(lambda b: sum(1 for _ in b), loader, device, 1,
                                            steps, repeats, batch_size)
    return row


def bench_kdutils(name: str, images, labels, *, device, batch_size, warmup, steps, repeats, amp,
                  keep_memory: bool = True, step_only: bool = False, min_seconds: float = 1.0) -> dict:
    """kdutils' columns for setup ``name``: the setting :class:`~kdutils.speed.Speed` picks
    with the chooser (:func:`~kdutils.tools.chooser.choose_cpu_setting`) and ``keep_memory``,
    step images/s and, unless ``step_only``, data images/s and the process's peak memory so
    far; each repeat lasts at least ``min_seconds``."""
    setup = SETUPS[name]
    timer = partial(time_batches, min_seconds=min_seconds)
    x, y = _images(images, labels, batch_size, warmup, steps, repeats)
    row = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    student = build(setup.student, seed=0)
    chosen = Speed(amp="auto" if amp else "off", chooser=choose_cpu_setting,
                   keep_memory=keep_memory).resolve(student, device, batch_size)
    use_cl, amp_dtype = chosen["channels_last"], chosen["amp"]
    row["kdutils setting"] = setting_name(amp_dtype, use_cl)
    if chosen["choice"] and "seconds" in chosen["choice"]:
        row["choosing (s)"] = chosen["choice"]["seconds"]
    cl = torch.channels_last if use_cl else torch.contiguous_format
    student = student.to(device, memory_format=cl).train()
    teacher = build(setup.teacher, seed=1).to(device, memory_format=cl).eval() if setup.teacher else None
    step, opt = _step_and_optimizer(setup, student)
    def kd_loader(autoaugment):
        return D.TensorLoader(x, y, batch_size, shuffle=True, augment=setup.augment, device=device,
                              drop_last=True, channels_last=use_cl, autoaugment=autoaugment,
                              erasing=0.5 if setup.r1_augment else 0.0)
    tl = kd_loader(setup.r1_augment)
    table = None
    if teacher is not None and not setup.augment:  # exact: the teacher sees the same tensors every epoch
        images = D.ImageData(x, y, x[:1], y[:1], D.CIFAR10_CLASSES, "bench")
        table = precompute_teacher(teacher, methods.kd_targets, images, device)

    def train(batches):  # the loop every chapter trains with, on the batches fit would give it
        train_epoch(student, batches, step, opt, amp=amp_dtype)

    row["kdutils img/s"] = timer(
        train, lambda: with_teacher(tl, teacher, methods.kd_targets, table, amp_dtype),
        device, warmup, steps, repeats, batch_size)
    if step_only:
        return row
    row["kdutils data img/s"] = timer(lambda b: sum(1 for _ in b), lambda: tl, device, 1,
                                      steps, repeats, batch_size)
    if setup.r1_augment:  # the same data path with torchvision's AutoAugment image by image
        per_image = kd_loader(auto_augment_per_image)
        row["data img/s, AutoAugment per image"] = timer(
            lambda b: sum(1 for _ in b), lambda: per_image, device, 1, steps, repeats, batch_size)
        row["data speed-up"] = row["kdutils data img/s"] / row["data img/s, AutoAugment per image"]
    if device.type == "cuda":
        row["peak GPU memory (MB)"] = torch.cuda.max_memory_allocated(device) / 2**20
    row["peak RSS (MB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def device_kind(device: torch.device) -> str:
    """A file name for the kind of machine: ``cpu-avx2``, ``cpu-avx512``, ``cuda-nvidia-l4``..."""
    if device.type == "cuda":
        return "cuda-" + torch.cuda.get_device_name(device).lower().replace(" ", "-")
    if device.type == "cpu":
        return "cpu-" + torch.backends.cpu.get_cpu_capability().lower().replace(" ", "-")
    return device.type


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of ``python -m kdutils.tools.bench``; bad sizes exit with a message."""
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per repeat (more where they take under --min-seconds)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=1.0,
                    help="a timed repeat lasts at least this long (0: exactly --steps steps)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference style")
    ap.add_argument("--no-amp", action="store_true", help="no autocast (fp32 on every device)")
    ap.add_argument("--synthetic", action="store_true", help="random images instead of CIFAR-10")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="write the table and its context to this JSON file "
                    "(default: results/bench/<device kind>.json; '-': none)")
    args = ap.parse_args(argv)
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.min_seconds < 0:
        ap.error("--min-seconds must be >= 0")
    return args


def _training_images(args: argparse.Namespace, steps: int):
    """Images, labels and the data's name: CIFAR-10's training set, or just enough random
    images (``--synthetic``)."""
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        n = args.batch_size * (args.warmup + steps * args.repeats + 1)
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        return images, torch.randint(0, 10, (n,), generator=g), "synthetic"
    d = D.load_cifar10(args.data_dir, verbose=False)
    return d.train_x, d.train_y, d.source


def _memory_returned(args: argparse.Namespace, run: dict, compare: bool) -> list[dict]:
    """The first pass, in the process's default memory handling (as R5's code runs): each
    setup's reference and, where ``compare``, kdutils beside it with memory returned."""
    rows = []
    for name in args.setups:
        row = bench_reference(name, workers=args.workers, **run)
        line = f"{name}: reference {row['reference img/s']:.0f} img/s"
        if compare:
            returned = bench_kdutils(name, amp=not args.no_amp, keep_memory=False, step_only=True,
                                     **run)
            row["kdutils setting, memory returned"] = returned["kdutils setting"]
            row["kdutils img/s, memory returned"] = returned["kdutils img/s"]
            line += f", kdutils {returned['kdutils img/s']:.0f} img/s (memory returned)"
        rows.append(row)
        print(line, flush=True)
    return rows


def _memory_kept(rows: list[dict], args: argparse.Namespace, run: dict, compare: bool) -> None:
    """The second pass, once freed memory is kept (which a process cannot undo): kdutils for
    every row and, where ``compare``, the reference again; the ratios."""
    for row in rows:
        if compare:
            row["reference img/s, memory kept"] = bench_reference(
                row["setup"], workers=args.workers, step_only=True, **run)["reference img/s"]
        row.update(bench_kdutils(row["setup"], amp=not args.no_amp, **run))
        row["speed-up"] = row["kdutils img/s"] / row["reference img/s"]
        line = (f"{row['setup']}: kdutils {row['kdutils img/s']:.0f} img/s in "
                f"{row['kdutils setting']}, {row['speed-up']:.2f}x the reference")
        if compare:
            row["speed-up, memory returned in both"] = (row["kdutils img/s, memory returned"]
                                                        / row["reference img/s"])
            both = row["speed-up, memory kept in both"] = (row["kdutils img/s"]
                                                           / row["reference img/s, memory kept"])
            line += f", {both:.2f}x with memory kept in both"
        print(line, flush=True)


def _save(out: str | Path, argv, context: str, device: torch.device, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({
        "command": settings.shown_command(f"{COMMAND} " + " ".join(argv if argv is not None else sys.argv[1:])),
        "context": context, "device": device_name(device), "torch_version": torch.__version__,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows}, indent=1))


def main(argv=None):
    """Run the benchmark (the module's docstring says what it times); returns the table."""
    args = parse_args(argv)
    device = pick_device(args.device)
    steps = args.steps or (50 if device.type == "cuda" else 5)
    images, labels, source = _training_images(args, steps)
    import pandas as pd
    run = dict(images=images, labels=labels, device=device, batch_size=args.batch_size,
               warmup=args.warmup, steps=steps, repeats=args.repeats, min_seconds=args.min_seconds)
    # first in the process's default memory handling, each setup's reference beside kdutils
    # with memory returned; then, on a CPU, both with freed memory kept
    compare = device.type == "cpu" and not freed_memory_kept()
    rows = _memory_returned(args, run, compare)
    if compare:
        keep_freed_memory()
    _memory_kept(rows, args, run, compare)
    table = pd.DataFrame(rows)
    context = (f"device: {device_name(device)} | data: {source} | batch {args.batch_size} | "
               f"{steps} steps (or {args.min_seconds:g} s) x {args.repeats} repeats after "
               f"{args.warmup} warm-up | {args.workers} DataLoader workers | torch {torch.__version__}"
               + (" | freed memory already kept when the reference ran"
                  if device.type == "cpu" and not compare else ""))
    print("\n" + context)
    print(table.round(2).to_string(index=False))
    out = args.out or (settings.results_dir() / "bench" / f"{device_kind(device)}.json")
    if out != "-":
        _save(out, argv, context, device, rows)
    return table


if __name__ == "__main__":
    main()
