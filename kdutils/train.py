"""Training a run of the book (introduced in chapter 2).

A chapter passes what differs: the model, the ``step`` (its loss), and optionally a frozen
:class:`~kdutils.loop.Teacher` (the network and what the loss needs from it). :func:`fit` does the rest:
device and precision, batches, the optimiser and schedule, a progress bar, the epochs
themselves (:func:`kdutils.loop.train_epoch`), evaluation after every epoch, and, through
:mod:`kdutils.runs`, a checkpoint after every epoch, resuming and the run record.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from . import dist, settings
from .data import FixedViews, ImageData, TensorLoader, loaders
from .loop import (Progress, Step, Teacher, TrainingDiverged, ce_step, evaluate_exits, freeze,
                   precompute_teacher, train_epoch, with_teacher)
from .results import OPTIONAL_RECIPE_FIELDS, make_record
from .runs import Run, RunFiles, check_writable, is_finished, run_code, run_paths, teacher_identity
from .settings import RunOptions
from .speed import Speed, speed_record


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: every value that changes the result, and nothing else."""

    epochs: int
    batch_size: int = 128
    lr: float = 1e-3                 # the peak learning rate for "onecycle"
    optimizer: str = "adam"          # "adam" | "sgd"
    momentum: float = 0.9            # sgd only
    weight_decay: float = 0.0
    schedule: str = "constant"       # "constant" | "cosine" (per epoch) | "onecycle" (per step)
    augment: bool = False            # random crop (padding 4) + horizontal flip
    seed: int = 0
    autoaugment: bool = False        # AutoAugment, CIFAR-10 policy, per image (R1)
    erasing: float = 0.0             # RandomErasing probability per image (R1: 0.5)
    views: int = 0                   # > 0: crop + flip from this many fixed views per image
    view_seed: int = 0               # which fixed views (shared by all seeds, like the teacher)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, "
                             f"got {self.schedule!r}")
        if not 0 <= self.erasing <= 1:
            raise ValueError(f"erasing must be a probability in [0, 1], got {self.erasing}")
        if self.views < 0:
            raise ValueError(f"views must be >= 0, got {self.views}")
        if self.views and (self.augment or self.autoaugment or self.erasing):
            raise ValueError("views replace the random crop and flip: set augment=False "
                             "(and no AutoAugment or erasing) with views > 0")

    @property
    def augments(self) -> bool:
        """Whether a batch differs between epochs in a way no table can hold (then a teacher
        must see every batch). Fixed ``views`` do not count: the teacher sees each view once."""
        return self.augment or self.autoaugment or self.erasing > 0

    def key(self) -> dict:
        """The recipe as it enters a run's key. The optional fields (``autoaugment``,
        ``erasing``, ``views``, ``view_seed``) enter only when set, so that runs without them
        keep their names and checkpoints."""
        d = asdict(self)
        for name, default in OPTIONAL_RECIPE_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d


SCHEDULES = ("constant", "cosine", "onecycle")


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; an explicit device must exist."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was asked for, but PyTorch sees no CUDA GPU "
                               "here; use device='auto' or 'cpu'")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r} was asked for, but only "
                               f"{torch.cuda.device_count()} CUDA device(s) exist")
    if device == "mps" and not (getattr(torch.backends, "mps", None)
                                and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' was asked for, but this PyTorch has no usable MPS "
                           "backend; use device='auto' or 'cpu'")
    return torch.device(device)


def make_optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser over the model's trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if r.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    return torch.optim.Adam(trainable, lr=r.lr, weight_decay=r.weight_decay)


def make_scheduler(opt, r: Recipe, steps_per_epoch: int):
    """The recipe's learning-rate schedule (None for a constant rate)."""
    if r.schedule == "cosine":      # stepped once per epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=r.epochs)
    if r.schedule == "onecycle":    # stepped once per batch
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr,
                                                   total_steps=r.epochs * steps_per_epoch)
    return None


def fit(model: nn.Module, data: ImageData, recipe: Recipe, *, chapter: str, method: str,
        step: Step = ce_step, teacher: Teacher | None = None, params: dict | None = None,
        speed: Speed = Speed(), select: str = "last", sync_bn: bool = False,
        options: RunOptions = RunOptions()) -> Run:
    """Train ``model`` on ``data`` by ``recipe`` with ``step`` as the loss; resume if possible.

    ``step(model, x, y, t)`` returns the loss of a batch or its named terms (a dict, added up
    and recorded apart); ``t`` is what ``teacher.targets(teacher.model, x)`` gave for the same
    images (None without a :class:`~kdutils.loop.Teacher`). A step with a ``progress`` keyword
    also gets the epoch (:class:`~kdutils.loop.Progress`). Without augmentation the teacher's
    outputs are computed once for the training set (or taken from ``teacher.outputs``; an
    empty dict is filled for the next run to share); with it the teacher sees every batch.

    A run is named by all that defines it (:func:`kdutils.runs.run_paths`): chapter, method,
    recipe, ``params`` (its loss weights), data, the teacher (its key, else its weights), the
    student's class and initial weights. Each epoch is :func:`kdutils.loop.train_epoch` and an
    evaluation; ``fit`` seeds it from (seed, epoch) and checkpoints it, resumes an interrupted
    run, only reloads a finished one (saying so) and writes the run record. Neither ``speed``
    (:class:`~kdutils.speed.Speed`) nor ``options`` (:class:`~kdutils.settings.RunOptions`)
    is part of a run's identity. ``select="val"`` keeps the weights of the epoch with the best
    accuracy on the held-out set (``data.holdout``). Under ``torchrun`` the same call trains
    with DistributedDataParallel (``recipe.batch_size`` is the global batch; ``sync_bn``
    spans BatchNorm statistics over it); only rank 0 writes files.
    """
    w = dist.world()
    _check_fit_arguments(data, select)
    dev = pick_device(dist.device_for(str(options.device), w))
    speed.precision(dev)  # an unknown amp is refused before anything else
    params = dict(params or {})
    files = RunFiles(*run_paths(model, data, recipe, chapter=chapter, method=method, params=params,
                                teacher=teacher, options=options),
                     code=run_code(model, step, *((teacher.targets, teacher.model) if teacher else ())))
    for folder in (files.checkpoint.parent, files.record_path.parent) if w.main else ():
        check_writable(folder)
    setting = speed.resolve(model, dev, recipe.batch_size, data.train_x.shape[-1],
                            cache=settings.ckpt_dir(options.ckpt_dir) / "speed" / "cpu_choices.json",
                            measure=speed.measure and not w.distributed
                            and not is_finished(files.checkpoint, recipe.epochs, files.code))
    tr = _prepare(model, data, recipe, step, teacher, files, dev, setting, w,
                  compile_=speed.compile, sync_bn=sync_bn)
    bar = _progress_bar(options.progress and tr.start < recipe.epochs and w.main, recipe,
                        len(tr.train), tr.start, f"{chapter}/{method} seed {recipe.seed}")
    rng = torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])  # caller's RNG back
    try:
        with rng:
            for epoch in range(tr.start, recipe.epochs):
                tr.history.append(_epoch(tr, epoch, bar))
                if w.main:
                    _save(tr, select)
    finally:
        if bar is not None:
            bar.close()
    dist.barrier()  # rank 0's files are complete before any process reads them
    identity = dict(chapter=chapter, method=method, profile=options.profile, params=params,
                    teacher_key=teacher_identity(teacher))
    return _finish(tr, data, setting, speed, w, select, identity)


def _check_fit_arguments(data, select) -> None:
    if select not in ("last", "val"):
        raise ValueError(f"select must be 'last' or 'val', got {select!r}")
    if select == "val" and data.val_x is None:
        raise ValueError("select='val' needs a held-out set: pass data.holdout(val_size)")


@dataclass
class _Training:
    """What the epochs of one run share, built once by :func:`_prepare`."""

    model: nn.Module
    run_model: nn.Module            # what the step calls: the model, or its DDP/compiled wrapper
    step: Step
    batches: Callable[[], Iterator]  # the epoch's (x, y, t) batches, read after set_epoch
    train: TensorLoader
    evals: tuple                    # (test loader, validation loader or None)
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    amp: torch.dtype | None
    recipe: Recipe
    files: RunFiles
    device: torch.device
    rank: int
    history: list
    start: int
    extra_s: float                  # seconds spent outside epochs (the teacher's table)


def _prepare(model, data, recipe, step, teacher, files, dev, setting, w, *, compile_: bool,
             sync_bn: bool) -> _Training:
    """Device and layout, loaders, optimiser and schedule, the resumed state, the teacher's
    table: everything the epochs need."""
    amp, layout = setting["amp"], _layout(setting["channels_last"])
    model.to(dev, memory_format=layout)
    if teacher is not None:
        freeze(teacher.model.to(dev, memory_format=layout))
    train, test, val, views = _loaders(data, recipe, dev, setting["channels_last"], w)
    opt = make_optimizer(model, recipe)
    sched = make_scheduler(opt, recipe, len(train))
    scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None  # fp16 only
    history, start, extra_s = files.resume(model, opt, sched, scaler, dev)
    if start == recipe.epochs:
        print(f"{files.checkpoint.name}: finished run, reloaded")
    table, seconds = _teacher_table(teacher, data, recipe, dev, views, needed=start < recipe.epochs)
    net_t, targets = (teacher.model, teacher.targets) if teacher is not None else (None, None)
    return _Training(
        model=model, run_model=_wrap(model, dev, w, sync_bn, compile_ and start < recipe.epochs),
        step=step, batches=lambda: with_teacher(train, net_t, targets, table, amp), train=train,
        evals=(test, val), opt=opt, sched=sched, scaler=scaler, amp=amp, recipe=recipe,
        files=files, device=dev, rank=w.rank, history=history, start=start, extra_s=extra_s + seconds)


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _loaders(data: ImageData, recipe: Recipe, dev, channels_last: bool, w):
    """Training, test and (with a held-out set) validation loaders, each process's share."""
    views = (FixedViews.draw(len(data.train_y), recipe.views, recipe.view_seed)
             if recipe.views else None)
    train, test = loaders(data, recipe.batch_size, seed=recipe.seed, augment=recipe.augment,
                          device=dev, channels_last=channels_last, views=views,
                          autoaugment=recipe.autoaugment, erasing=recipe.erasing)
    val = None
    if data.val_x is not None:
        val = TensorLoader(data.val_x, data.val_y, 1000, shuffle=False, mean=data.mean,
                           std=data.std, device=dev, channels_last=channels_last)
    for loader in (train, test, val):
        if loader is not None and w.distributed:
            loader.shard(w.rank, w.size)
    return train, test, val, views


def _teacher_table(teacher: Teacher | None, data, recipe, dev, views, *,
                   needed: bool) -> tuple[dict | None, float]:
    """The teacher's outputs for every training image (and view) when they can be computed
    once: given (``teacher.outputs``) or computed now; None when the teacher must see every
    batch (augmentation) or there is none. Also returns the seconds it took."""
    given = teacher.outputs if teacher is not None else None
    if callable(given):   # computed only for a run that trains
        given = given() if needed else None
    if given:
        if recipe.augments:
            raise ValueError("teacher outputs were given, but the recipe augments: the teacher "
                             "must see every augmented batch, so outputs cannot be precomputed")
        n = len(data.train_y) * max(1, recipe.views)
        if any(len(v) != n for v in given.values()):
            raise ValueError(f"teacher outputs must hold one row per training image"
                             f"{' and view' if recipe.views else ''} ({n})")
        return {k: v.to(dev) for k, v in given.items()}, 0.0
    if teacher is None or not needed or recipe.augments:
        return None, 0.0
    t0 = time.perf_counter()
    table = precompute_teacher(teacher.model, teacher.targets, data, dev, views=views)
    if given is not None:   # an empty dict to fill: the next run shares this pass
        given.update(table)
    return table, time.perf_counter() - t0


def _wrap(model: nn.Module, dev, w, sync_bn: bool, compile_: bool):
    """What the step calls: the model itself, or its DDP and/or compiled wrapper (through a
    :class:`kdutils.dist.Replica`, so that the step still reaches the model's attributes)."""
    run_model = model
    if w.distributed:
        if sync_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BN layers in place
        # Every trainable parameter must take part in every step's loss (the book's steps
        # keep a projection in the graph even when its loss weight is 0).
        run_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if compile_:
        run_model = torch.compile(run_model)
    return run_model if run_model is model else dist.Replica(run_model, model)


def _progress_bar(show: bool, recipe: Recipe, steps: int, start: int, desc: str):
    if not show:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=recipe.epochs * steps, initial=start * steps, mininterval=2, desc=desc,
                leave=False)


def _epoch(tr: _Training, epoch: int, bar) -> dict:
    """One epoch: seeding, :func:`train_epoch`, the per-epoch schedule, evaluation."""
    r = tr.recipe
    # Every random draw of an epoch (batch order, augmentation, dropout) follows from
    # (seed, epoch), so a run resumed at this epoch repeats it bit for bit.
    torch.manual_seed(r.seed * 100_003 + epoch + 7_919 * tr.rank)  # own dropout per process
    tr.train.set_epoch(epoch)
    lr = tr.opt.param_groups[0]["lr"]
    t0 = time.perf_counter()
    try:
        means = train_epoch(tr.run_model, tr.batches(), tr.step, tr.opt, amp=tr.amp,
                            scaler=tr.scaler, bar=bar, progress=Progress(epoch, r.epochs),
                            scheduler=tr.sched if r.schedule == "onecycle" else None)
    except TrainingDiverged as e:
        ckpt = tr.files.checkpoint
        kept = (f"the last good checkpoint {ckpt} is kept" if ckpt.is_file()
                else "no checkpoint was written yet")
        raise TrainingDiverged(
            f"loss became {e.value} at epoch {epoch + 1}, step {e.step} (learning rate {lr:g}); "
            f"{kept}. Lower the learning rate or check the inputs.", e.value, e.step) from None
    means = {k: (dist.all_sum(v.detach().cpu()) / dist.world().size).item() for k, v in means.items()}
    train_loss = means.pop("loss")
    if tr.sched is not None and r.schedule != "onecycle":
        tr.sched.step()
    row = {"epoch": epoch + 1, "train_loss": train_loss, **_evaluation(tr), "lr": lr}
    if means:  # the step's named terms, each averaged over the epoch
        row["loss_terms"] = means
    row["seconds"] = time.perf_counter() - t0
    if bar is not None:
        bar.set_postfix(epoch=epoch + 1, loss=f"{train_loss:.3f}", acc=f"{row['test_acc']:.2f}")
    return row


def _evaluation(tr: _Training) -> dict:
    """Test accuracy (every exit's and their ensemble's for a multi-exit model) and, with a
    held-out set, validation accuracy."""
    test, val = tr.evals
    ev = evaluate_exits(tr.model, test, tr.amp)
    row = {"test_acc": ev["acc"]}
    if "exit_acc" in ev:
        row.update(exit_acc=ev["exit_acc"], ensemble_acc=ev["ensemble_acc"])
    if val is not None:
        row["val_acc"] = evaluate_exits(tr.model, val, tr.amp)["acc"]
    return row


def _save(tr: _Training, select: str) -> None:
    """The epoch's checkpoint, and the best-validation weights when this epoch is the first
    with the best held-out accuracy (ties keep the earlier one)."""
    h = tr.history
    if select == "val" and h[-1]["val_acc"] > max((e["val_acc"] for e in h[:-1]), default=-1.0):
        tr.files.save_best(tr.model, len(h))
    tr.files.save(tr.model, tr.opt, tr.sched, tr.scaler, h, tr.extra_s)


def _finish(tr: _Training, data, setting, speed, w, select, identity: dict) -> Run:
    """The run's record (written by rank 0) with the selected weights loaded; a finished run
    that was only reloaded keeps the record that says how it was made."""
    files, history, recipe = tr.files, tr.history, tr.recipe
    extra = {"speed": speed_record(setting, compile=speed.compile), "code": files.code}
    if w.distributed:
        extra["processes"] = w.size
    if "exit_acc" in history[-1]:
        extra.update(exit_acc=history[-1]["exit_acc"], ensemble_acc=history[-1]["ensemble_acc"])
    if select == "val":
        best = max(range(len(history)), key=lambda i: (history[i]["val_acc"], -i))
        files.load_best(tr.model, tr.device)
        extra.update(selected_epoch=best + 1, select="val", val_acc=history[best]["val_acc"])
    existing = files.existing_record(history) if tr.start == recipe.epochs and w.main else None
    if existing is not None:
        return Run(tr.model, existing, files.checkpoint, files.record_path, tr.start)
    record = make_record(**identity, device=tr.device, data=data,
                         recipe=recipe, history=history, model=tr.model, key=files.key,
                         wall_time_s=sum(h["seconds"] for h in history) + tr.extra_s, extra=extra)
    if select == "val":
        record["test_acc"] = history[best]["test_acc"]
    path = files.write_record(record) if w.main else None
    return Run(tr.model, record, files.checkpoint, path, resumed_from_epoch=tr.start)
