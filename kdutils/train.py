"""The one training loop of the book (introduced in chapter 2).

A chapter passes what differs: the model, the ``step`` (its loss), and optionally a frozen
teacher with ``teacher_targets`` (what the loss needs from it). :func:`fit` does the rest:
seeding, device, batches, the optimiser and schedule, a progress bar, evaluation after every
epoch, a checkpoint after every epoch, resuming a run that was interrupted, and the run record.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import settings
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, load_state_dict_strict
from .data import FixedViews, ImageData, loaders, normalize
from .results import make_record, write_record
from .speed import (Speed, choose_layout, choose_precision,  # noqa: F401 (re-exported)
                    cuda_native_bf16)

Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict | None], torch.Tensor]
TeacherTargets = Callable[[nn.Module, torch.Tensor], dict]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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
OPTIONAL_RECIPE_FIELDS = {"autoaugment": False, "erasing": 0.0, "views": 0, "view_seed": 0}


@dataclass
class Run:
    """What :func:`fit` returns: the trained model, its run record and where it is stored."""

    model: nn.Module
    record: dict
    checkpoint: Path
    record_path: Path | None = None
    resumed_from_epoch: int = 0

    @property
    def history(self):
        import pandas as pd
        return pd.DataFrame(self.record["history"])

    @property
    def test_acc(self) -> float:
        return self.record["test_acc"]


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


def ce_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: dict | None) -> torch.Tensor:
    """The plain step: cross-entropy of the model's logits with the labels."""
    return F.cross_entropy(model(x), y)


def _exit_logits(out) -> list[torch.Tensor]:
    """A model's output as a list of exit logits: ``[logits]`` for a plain model, the logits
    list of a multi-exit model (``(logits list, features list)``), deepest exit last."""
    if isinstance(out, tuple):
        out = out[0]
    return list(out) if isinstance(out, list) else [out]


@torch.no_grad()
def evaluate_exits(model: nn.Module, loader, autocast_dtype: torch.dtype | None = None) -> dict:
    """Top-1 accuracy (percent) of every exit and of their ensemble over ``loader``.

    Returns ``{"acc": deepest exit, "exit_acc": [...], "ensemble_acc": ...}``; the last two
    only for a multi-exit model. The ensemble averages the exits' softmax probabilities.
    """
    from .dist import all_sum
    was_training = model.training
    model.eval()
    correct, ens_correct, total = None, 0, 0
    n_exits = None
    for x, y, _ in loader:
        with torch.autocast(x.device.type, autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            exits = _exit_logits(model(x))
        hits = torch.stack([(p.argmax(1) == y).sum() for p in exits])
        correct = hits if correct is None else correct + hits
        if len(exits) > 1:
            probs = torch.stack([p.float().softmax(1) for p in exits]).mean(0)
            ens_correct += (probs.argmax(1) == y).sum().item()
        total += len(y)
        n_exits = len(exits)
    model.train(was_training)
    # under torchrun each process saw a shard of the loader: add up the counts of all
    counts = all_sum(torch.cat([correct.double().cpu(), torch.tensor([ens_correct, total], dtype=torch.float64)]))
    correct, ens_correct, total = counts[:n_exits], counts[n_exits].item(), counts[n_exits + 1].item()
    accs = (100.0 * correct / total).tolist()
    out = {"acc": accs[-1]}
    if len(accs) > 1:
        out["exit_acc"] = accs
        out["ensemble_acc"] = 100.0 * ens_correct / total
    return out


def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy in percent over ``loader`` (model put in eval mode, restored after);
    for a multi-exit model, the deepest exit's."""
    return evaluate_exits(model, loader)["acc"]


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a frozen teacher neither learns nor changes its BN/dropout."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None  # left over from the teacher's own training
    return teacher


@torch.no_grad()
def precompute_teacher(teacher: nn.Module, teacher_targets: TeacherTargets, data: ImageData,
                       device: torch.device, batch_size: int = 500,
                       views=None) -> dict[str, torch.Tensor]:
    """``teacher_targets`` for every training image, in dataset order, computed once.

    Exact only without augmentation: then an image is the same tensor every epoch, and so
    is the frozen teacher's output. With augmentation the teacher must see each augmented
    batch, and :func:`fit` calls it per step instead. With fixed ``views``
    (:class:`kdutils.data.FixedViews`) the teacher sees every view of every image once; row
    ``view * N + image`` holds its output for that view.
    """
    images = data.train_x.to(device)
    n = len(images)
    parts: dict[str, list] = {}
    for v in range(views.views if views is not None else 1):
        for b in range(0, n, batch_size):
            idx = torch.arange(b, min(b + batch_size, n))
            x = images[b:b + batch_size]
            if views is not None:
                x = views.apply(x, idx, torch.full_like(idx, v))
            x = normalize(x, data.mean, data.std)
            for k, out in teacher_targets(teacher, x).items():
                parts.setdefault(k, []).append(out)
    return {k: torch.cat(v) for k, v in parts.items()}


def run_key(**parts) -> str:
    """A short, stable hash of everything that defines a run."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_paths(model: nn.Module, data: ImageData, recipe: Recipe, *, chapter: str, method: str,
              params: dict, profile: str, teacher_key: str | None, ckpt_dir=None,
              results_dir=None) -> tuple[str, Path, Path]:
    """The run's key (a hash of all that defines it), checkpoint path and record path."""
    key = run_key(chapter=chapter, method=method, recipe=recipe.key(), params=params,
                  data=data.source, train=len(data.train_y), test=len(data.test_y),
                  teacher=teacher_key, model=type(model).__name__)
    name = f"{method}-{profile}-seed{recipe.seed}-{key}"
    return (key, settings.ckpt_dir(ckpt_dir) / chapter / f"{name}.pt",
            settings.results_dir(results_dir) / chapter / f"{name}.json")


def is_finished(checkpoint: Path, epochs: int) -> bool:
    """Whether ``checkpoint`` exists and holds all ``epochs`` of its run."""
    try:
        return checkpoint.is_file() and load_checkpoint(checkpoint).get("epoch") == epochs
    except (CheckpointError, OSError):
        return False


def fit(model: nn.Module, data: ImageData, recipe: Recipe, *, chapter: str, method: str,
        step: Step = ce_step, teacher: nn.Module | None = None,
        teacher_targets: TeacherTargets | None = None, teacher_key: str | None = None,
        teacher_outputs: dict[str, torch.Tensor] | None = None, params: dict | None = None,
        profile: str = "full", device="auto", speed: Speed = Speed(), select: str = "last",
        sync_bn: bool = False, ckpt_dir=None, results_dir=None, progress: bool = True,
        write: bool = True) -> Run:
    """Train ``model`` on ``data`` by ``recipe`` with ``step`` as the loss; resume if possible.

    ``step(model, x, y, t)`` returns the loss of a batch; ``t`` is the dict that
    ``teacher_targets(teacher, x)`` returned for the same images (None without a teacher).
    Without augmentation the teacher's outputs are computed once for the whole training set
    (or taken from ``teacher_outputs``, the result of :func:`precompute_teacher`, so that
    several seeds share one pass) and looked up per batch; with augmentation the teacher
    runs on every batch, in inference mode and (on a GPU) reduced precision.

    ``speed`` says how fast to train (:class:`Speed`: memory layout, autocast, compile); it
    is written into the record but is not part of the run's identity. With a held-out set
    (``data.holdout``) the validation accuracy is recorded every epoch, and
    ``select="val"`` keeps the weights of the epoch with the best validation accuracy.
    The run's checkpoint name is a hash of everything that defines it, so starting the same
    run again continues from its last finished epoch (and a finished run only reloads).

    Under ``torchrun`` (:func:`kdutils.dist.setup` called first) the same call trains with
    DistributedDataParallel: ``recipe.batch_size`` is the global batch, each process takes
    its share of every batch, metrics are summed over processes, and only rank 0 writes
    checkpoints, records and the progress bar. ``sync_bn`` turns BatchNorm layers into
    SyncBatchNorm (GPUs), so that their statistics span the global batch.
    """
    from . import dist
    w = dist.world()
    write = write and w.main
    if select not in ("last", "val"):
        raise ValueError(f"select must be 'last' or 'val', got {select!r}")
    if select == "val" and data.val_x is None:
        raise ValueError("select='val' needs a held-out set: pass data.holdout(val_size)")
    if teacher is not None and teacher_targets is None:
        raise ValueError("a teacher was given without teacher_targets (what the loss needs from it)")
    dev = pick_device(dist.device_for(str(device), w))
    speed.precision(dev)  # an unknown amp is refused before anything else
    params = dict(params or {})
    key, ckpt, record_path = run_paths(model, data, recipe, chapter=chapter, method=method,
                                       params=params, profile=profile, teacher_key=teacher_key,
                                       ckpt_dir=ckpt_dir, results_dir=results_dir)
    best_path = ckpt.with_name(ckpt.stem + ".best.pt")
    out_dir = record_path.parent
    for folder in ((ckpt.parent, out_dir) if write else (ckpt.parent,)) if w.main else ():
        _check_writable(folder)

    # precision and layout; with Speed(measure=True) on a CPU, measured once per machine, model
    # and batch size (cached), unless the run is finished (only reloaded) or spread over processes
    setting = speed.resolve(model, dev, recipe.batch_size, data.train_x.shape[-1],
                            cache=settings.ckpt_dir(ckpt_dir) / "speed" / "cpu_choices.json",
                            measure=speed.measure and not w.distributed
                            and not is_finished(ckpt, recipe.epochs))
    amp, cl = setting["amp"], setting["channels_last"]
    fmt = torch.channels_last if cl else torch.contiguous_format
    model.to(dev, memory_format=fmt)
    if teacher is not None:
        freeze(teacher.to(dev, memory_format=fmt))
    views = (FixedViews.draw(len(data.train_y), recipe.views, recipe.view_seed)
             if recipe.views else None)
    train_loader, test_loader = loaders(data, recipe.batch_size, seed=recipe.seed,
                                        augment=recipe.augment, device=dev,
                                        channels_last=cl, views=views,
                                        autoaugment=recipe.autoaugment, erasing=recipe.erasing)
    val_loader = None
    if data.val_x is not None:
        from .data import TensorLoader
        val_loader = TensorLoader(data.val_x, data.val_y, 1000, shuffle=False, mean=data.mean,
                                  std=data.std, device=dev, channels_last=cl)
    for loader in (train_loader, test_loader, val_loader):
        if loader is not None and w.distributed:
            loader.shard(w.rank, w.size)
    steps = len(train_loader)
    opt = _optimizer(model, recipe)
    sched = _scheduler(opt, recipe, steps)
    scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None  # fp16 only

    history: list[dict] = []
    start = 0
    extra_s = 0.0
    if ckpt.is_file():
        state = load_checkpoint(ckpt, map_location=dev)
        if state.get("key") != key:
            raise CheckpointError(f"checkpoint {ckpt} belongs to another run (key "
                                  f"{state.get('key')!r}, expected {key!r}); delete it to start over")
        load_state_dict_strict(model, state["model"], str(ckpt))
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        history, start, extra_s = state["history"], state["epoch"], state.get("extra_s", 0.0)
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])

    cached = None
    if teacher_outputs is not None:
        if recipe.augments:
            raise ValueError("teacher_outputs were given, but the recipe augments: the teacher "
                             "must see every augmented batch, so outputs cannot be precomputed")
        n = len(data.train_y) * max(1, recipe.views)
        if any(len(v) != n for v in teacher_outputs.values()):
            raise ValueError(f"teacher_outputs must hold one row per training image"
                             f"{' and view' if recipe.views else ''} ({n})")
        cached = {k: v.to(dev) for k, v in teacher_outputs.items()}
    elif (teacher is not None and start < recipe.epochs
          and not recipe.augments):
        t0 = time.perf_counter()
        cached = precompute_teacher(teacher, teacher_targets, data, dev, views=views)
        extra_s += time.perf_counter() - t0

    run_model = model
    if w.distributed:
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Every trainable parameter must take part in every step's loss (the book's steps
        # keep a projection in the graph even when its loss weight is 0).
        run_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if speed.compile and start < recipe.epochs:
        run_model = torch.compile(run_model)
    if run_model is not model:  # the step calls it; attributes still reach the model
        run_model = dist.Replica(run_model, model)
    bar = None
    if progress and start < recipe.epochs and w.main:
        from tqdm.auto import tqdm
        bar = tqdm(total=recipe.epochs * steps, initial=start * steps, mininterval=2,
                   desc=f"{chapter}/{method} seed {recipe.seed}", leave=False)
    loop = _Loop(run_model, train_loader, test_loader, val_loader, opt, sched, scaler, amp, step,
                 teacher, teacher_targets, cached, recipe, ckpt, bar, model, w.rank)
    # The loop reseeds the global generators every epoch; fork_rng hands the caller's back.
    rng = torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])
    try:
        with rng:
            for epoch in range(start, recipe.epochs):
                history.append(loop.epoch(epoch))
                if not w.main:
                    continue
                # the first epoch with the best held-out accuracy (ties keep the earlier one)
                if select == "val" and history[-1]["val_acc"] > max(
                        (h["val_acc"] for h in history[:-1]), default=-1.0):
                    atomic_save({"key": key, "epoch": epoch + 1, "model": model.state_dict()},
                                best_path)
                atomic_save({"key": key, "epoch": epoch + 1, "model": model.state_dict(),
                             "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict() if sched is not None else None,
                             "scaler": scaler.state_dict() if scaler is not None else None,
                             "history": history, "extra_s": extra_s}, ckpt)
    finally:
        if bar is not None:
            bar.close()
    dist.barrier()  # rank 0's files are complete before any process reads them

    extra = {"speed": {"channels_last": cl,
                       "amp": str(amp).replace("torch.", "") if amp else "off",
                       "compile": speed.compile}}
    if setting["choice"] is not None:
        extra["speed"]["choice"] = setting["choice"]
    if w.distributed:
        extra["processes"] = w.size
    if "exit_acc" in history[-1]:
        extra.update(exit_acc=history[-1]["exit_acc"], ensemble_acc=history[-1]["ensemble_acc"])
    if select == "val":
        best = max(range(len(history)), key=lambda i: (history[i]["val_acc"], -i))
        state = load_checkpoint(best_path, map_location=dev)
        load_state_dict_strict(model, state["model"], str(best_path))
        extra.update(selected_epoch=best + 1, select="val", val_acc=history[best]["val_acc"])
    if start == recipe.epochs and record_path.is_file() and w.main:
        # A finished run that was only reloaded: its record already says how it was made.
        return Run(model, json.loads(record_path.read_text()), ckpt, record_path, start)
    record = make_record(chapter=chapter, method=method, profile=profile, device=dev,
                         data=data, recipe=recipe, params=params, history=history,
                         model=model, key=key, teacher_key=teacher_key,
                         wall_time_s=sum(h["seconds"] for h in history) + extra_s, extra=extra)
    if select == "val":
        record["test_acc"] = history[extra["selected_epoch"] - 1]["test_acc"]
    record_path = write_record(record, record_path) if write else None
    return Run(model, record, ckpt, record_path, resumed_from_epoch=start)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".kdutils-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to {folder} ({e.strerror or e}); choose another "
                              "folder with ckpt_dir / results_dir or KD_CKPT_DIR / KD_RESULTS_DIR")


def _optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if r.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    return torch.optim.Adam(trainable, lr=r.lr, weight_decay=r.weight_decay)


def _scheduler(opt, r: Recipe, steps_per_epoch: int):
    if r.schedule == "cosine":      # stepped once per epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=r.epochs)
    if r.schedule == "onecycle":    # stepped once per batch
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr,
                                                   total_steps=r.epochs * steps_per_epoch)
    return None


@dataclass
class _Loop:
    """One epoch of training and evaluation; what stays the same across epochs is held here."""

    model: nn.Module
    train_loader: object
    test_loader: object
    val_loader: object
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    amp: torch.dtype | None
    step: Step
    teacher: nn.Module | None
    teacher_targets: TeacherTargets | None
    cached: dict | None
    recipe: Recipe
    ckpt: Path
    bar: object
    module: nn.Module | None = None  # the model itself (``model`` may be its DDP/compiled wrapper)
    rank: int = 0

    def __post_init__(self):
        if self.module is None:
            self.module = self.model

    def _teacher(self, x, idx):
        if self.cached is not None:
            return {k: v[idx] for k, v in self.cached.items()}
        if self.teacher is None:
            return None
        with torch.inference_mode(), self._autocast(x):
            t = self.teacher_targets(self.teacher, x)
        # Leave inference mode (the loss keeps these for its backward pass) in fp32.
        return {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in t.items()}

    def _autocast(self, x):
        return torch.autocast(x.device.type, self.amp or torch.float32, enabled=self.amp is not None)

    def epoch(self, epoch: int) -> dict:
        # Every random draw of an epoch (batch order, augmentation, dropout) follows from
        # (seed, epoch), so a run resumed at this epoch repeats it bit for bit.
        r = self.recipe
        torch.manual_seed(r.seed * 100_003 + epoch + 7_919 * self.rank)  # own dropout per process
        self.train_loader.set_epoch(epoch)
        self.module.train()
        lr = self.opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        losses = []
        for i, (x, y, idx) in enumerate(self.train_loader):
            t = self._teacher(x, idx)
            with self._autocast(x):
                loss = self.step(self.model, x, y, t)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                self.opt.step()
            if r.schedule == "onecycle":
                self.sched.step()
            losses.append(loss.detach())
            if self.bar is not None:
                self.bar.update(1)
            if (i + 1) % 50 == 0:
                _check_finite(losses, epoch, lr, self.ckpt)  # a sync every 50 steps, not every step
        _check_finite(losses, epoch, lr, self.ckpt)
        from .dist import all_sum, world
        train_loss = (all_sum(torch.stack(losses).float().mean().detach().cpu()) / world().size).item()
        if self.sched is not None and r.schedule != "onecycle":
            self.sched.step()
        ev = evaluate_exits(self.module, self.test_loader, self.amp)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "test_acc": ev["acc"], "lr": lr}
        if "exit_acc" in ev:
            row.update(exit_acc=ev["exit_acc"], ensemble_acc=ev["ensemble_acc"])
        if self.val_loader is not None:
            row["val_acc"] = evaluate_exits(self.module, self.val_loader, self.amp)["acc"]
        row["seconds"] = time.perf_counter() - t0
        if self.bar is not None:
            self.bar.set_postfix(epoch=epoch + 1, loss=f"{train_loss:.3f}", acc=f"{ev['acc']:.2f}")
        return row


def _check_finite(losses, epoch, lr, ckpt):
    vals = torch.stack(losses)
    bad = ~torch.isfinite(vals)
    if bad.any():
        first = int(torch.nonzero(bad)[0])
        kept = (f"the last good checkpoint {ckpt} is kept" if ckpt.is_file()
                else "no checkpoint was written yet")
        raise TrainingDiverged(
            f"loss became {vals[bad][0].item()} at epoch {epoch + 1}, step {first + 1} "
            f"(learning rate {lr:g}); {kept}. Lower the learning rate or check the inputs.")
