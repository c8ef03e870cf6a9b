"""The one training loop of the book (introduced in chapter 2).

A chapter passes what differs: the model, the ``step`` (its loss), and optionally a frozen
teacher with ``teacher_targets`` (what the loss needs from it). :func:`fit` does the rest:
seeding, device, batches, the optimiser and schedule, a progress bar, evaluation after every
epoch, a checkpoint after every epoch, resuming a run that was interrupted, and the run record.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import settings
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, load_state_dict_strict
from .data import ImageData, loaders
from .results import make_record, write_record

Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict | None], torch.Tensor]
TeacherTargets = Callable[[nn.Module, torch.Tensor], dict]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: every value that changes the result, and nothing else."""

    epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"          # "adam" | "sgd"
    momentum: float = 0.9            # sgd only
    weight_decay: float = 0.0
    schedule: str = "constant"       # "constant" | "cosine" (per epoch)
    augment: bool = False            # random crop (padding 4) + horizontal flip
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")


@dataclass
class Run:
    """What :func:`fit` returns: the trained model, its run record and where it is stored."""

    model: nn.Module
    record: dict
    checkpoint: Path
    record_path: Path | None = None
    resumed_from_epoch: int = 0
    extras: dict = field(default_factory=dict)

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


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy in percent over ``loader`` (model put in eval mode, restored after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y, _ in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / total


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a frozen teacher neither learns nor changes its BN/dropout."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None  # left over from the teacher's own training
    return teacher


@torch.no_grad()
def precompute_teacher(teacher: nn.Module, teacher_targets: TeacherTargets, data: ImageData,
                       device: torch.device, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """``teacher_targets`` for every training image, in dataset order, computed once.

    Exact only without augmentation: then an image is the same tensor every epoch, and so
    is the frozen teacher's output. With augmentation the teacher must see each augmented
    batch, and :func:`fit` calls it per step instead.
    """
    from .data import TensorLoader
    loader = TensorLoader(data.train_x, data.train_y, batch_size, shuffle=False,
                          mean=data.mean, std=data.std, device=device)
    parts: dict[str, list] = {}
    for x, _, _ in loader:
        for k, v in teacher_targets(teacher, x).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def run_key(**parts) -> str:
    """A short, stable hash of everything that defines a run."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_paths(model: nn.Module, data: ImageData, recipe: Recipe, *, chapter: str, method: str,
              params: dict, profile: str, teacher_key: str | None, ckpt_dir=None,
              results_dir=None) -> tuple[str, Path, Path]:
    """The run's key (a hash of all that defines it), checkpoint path and record path."""
    key = run_key(chapter=chapter, method=method, recipe=asdict(recipe), params=params,
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
        teacher_outputs: dict[str, torch.Tensor] | None = None, params: dict | None = None, profile: str = "full", device="auto",
        ckpt_dir=None, results_dir=None, progress: bool = True, write: bool = True) -> Run:
    """Train ``model`` on ``data`` by ``recipe`` with ``step`` as the loss; resume if possible.

    ``step(model, x, y, t)`` returns the loss of a batch; ``t`` is the dict that
    ``teacher_targets(teacher, x)`` returned for the same images (None without a teacher).
    Without augmentation the teacher's outputs are computed once for the whole training set
    (or taken from ``teacher_outputs``, the result of :func:`precompute_teacher`, so that
    several seeds share one pass) and looked up per batch.
    The run's checkpoint name is a hash of everything that defines it, so starting the same
    run again continues from its last finished epoch (and a finished run only reloads).
    """
    dev = pick_device(device)
    params = dict(params or {})
    key, ckpt, record_path = run_paths(model, data, recipe, chapter=chapter, method=method,
                                       params=params, profile=profile, teacher_key=teacher_key,
                                       ckpt_dir=ckpt_dir, results_dir=results_dir)
    out_dir = record_path.parent
    for folder in (ckpt.parent, out_dir) if write else (ckpt.parent,):
        _check_writable(folder)

    model.to(dev)
    if teacher is not None:
        freeze(teacher.to(dev))
    if teacher is not None and teacher_targets is None:
        raise ValueError("a teacher was given without teacher_targets (what the loss needs from it)")
    opt = _optimizer(model, recipe)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
             if recipe.schedule == "cosine" else None)

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

    train_loader, test_loader = loaders(data, recipe.batch_size, seed=recipe.seed,
                                        augment=recipe.augment, device=dev)
    cached = None
    if teacher_outputs is not None:
        if recipe.augment:
            raise ValueError("teacher_outputs were given, but the recipe augments: the teacher "
                             "must see every augmented batch, so outputs cannot be precomputed")
        n = len(data.train_y)
        if any(len(v) != n for v in teacher_outputs.values()):
            raise ValueError(f"teacher_outputs must hold one row per training image ({n})")
        cached = {k: v.to(dev) for k, v in teacher_outputs.items()}
    elif teacher is not None and start < recipe.epochs and not recipe.augment:
        t0 = time.perf_counter()
        cached = precompute_teacher(teacher, teacher_targets, data, dev)
        extra_s += time.perf_counter() - t0

    steps = len(train_loader)
    bar = None
    if progress and start < recipe.epochs:
        from tqdm.auto import tqdm
        bar = tqdm(total=recipe.epochs * steps, initial=start * steps, mininterval=2,
                   desc=f"{chapter}/{method} seed {recipe.seed}", leave=False)
    # The loop reseeds the global generators every epoch; fork_rng hands the caller's back.
    rng = torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])
    try:
        with rng:
            for epoch in range(start, recipe.epochs):
                history.append(_train_epoch(model, train_loader, test_loader, opt, sched, step,
                                            teacher, teacher_targets, cached, recipe, epoch,
                                            ckpt, bar))
                atomic_save({"key": key, "epoch": epoch + 1, "model": model.state_dict(),
                             "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict() if sched is not None else None,
                             "history": history, "extra_s": extra_s}, ckpt)
    finally:
        if bar is not None:
            bar.close()

    if start == recipe.epochs and record_path.is_file():
        # A finished run that was only reloaded: its record already says how it was made.
        return Run(model, json.loads(record_path.read_text()), ckpt, record_path, start)
    record = make_record(chapter=chapter, method=method, profile=profile, device=dev,
                         data=data, recipe=recipe, params=params, history=history,
                         model=model, key=key, teacher_key=teacher_key,
                         wall_time_s=sum(h["seconds"] for h in history) + extra_s)
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


def _train_epoch(model, train_loader, test_loader, opt, sched, step, teacher, teacher_targets,
                 cached, recipe, epoch, ckpt, bar) -> dict:
    # Every random draw of an epoch (batch order, augmentation, dropout) follows from
    # (seed, epoch), so a run resumed at this epoch repeats it bit for bit.
    torch.manual_seed(recipe.seed * 100_003 + epoch)
    train_loader.set_epoch(epoch)
    model.train()
    if teacher is not None:
        teacher.eval()
    lr = opt.param_groups[0]["lr"]
    t0 = time.perf_counter()
    losses = []
    for i, (x, y, idx) in enumerate(train_loader):
        if cached is not None:
            t = {k: v[idx] for k, v in cached.items()}
        elif teacher is not None:
            with torch.no_grad():
                t = teacher_targets(teacher, x)
        else:
            t = None
        loss = step(model, x, y, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if bar is not None:
            bar.update(1)
        if (i + 1) % 50 == 0:
            _check_finite(losses, epoch, lr, ckpt)  # a sync every 50 steps, not every step
    _check_finite(losses, epoch, lr, ckpt)
    train_loss = torch.stack(losses).float().mean().item()
    if sched is not None:
        sched.step()
    acc = evaluate(model, test_loader)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.set_postfix(epoch=epoch + 1, loss=f"{train_loss:.3f}", acc=f"{acc:.2f}")
    return {"epoch": epoch + 1, "train_loss": train_loss, "test_acc": acc, "lr": lr,
            "seconds": seconds}


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
