"""The training loop itself: one epoch of steps, the teacher's side of a batch, evaluation.

Chapter 2 writes this loop by hand first. :func:`train_epoch` is the same loop with the two
things a GPU adds (autocast, a gradient scaler for fp16); :func:`kdutils.train.fit` calls it
once per epoch and adds seeding, checkpoints, resuming and the run record around it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .data import ImageData, normalize
from .dist import all_sum
from .losses import ce_loss, total

Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict | None], "torch.Tensor | dict[str, torch.Tensor]"]
TeacherTargets = Callable[[nn.Module, torch.Tensor], dict]


@dataclass(frozen=True)
class Progress:
    """Where training stands: ``epoch`` (0-based) of ``epochs``. A step that declares a
    ``progress`` keyword receives it (DKD's warm-up follows the epoch)."""

    epoch: int
    epochs: int


@dataclass(frozen=True)
class Teacher:
    """A frozen teacher as a run uses it: the network and ``targets(teacher, x) -> dict``,
    what the step needs from it. ``key`` names its training (a teacher run's ``run_key``);
    without one its weights are hashed. ``outputs``: the targets for every training image,
    computed once (:func:`precompute_teacher`), a function that returns them (called only by
    a run that trains), or an empty dict for the first run to fill."""

    model: nn.Module
    targets: TeacherTargets
    key: str | None = None
    outputs: dict | Callable[[], dict] | None = None


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, message: str, value: float = float("nan"), step: int = 0):
        super().__init__(message)
        self.value, self.step = value, step


def ce_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            t: dict | None) -> dict[str, torch.Tensor]:
    """The plain step (chapter 2): cross-entropy of the model's logits with the labels, as the
    one named term ``"ce"``."""
    return {"ce": ce_loss(model(x), y)}


def takes_progress(step: Step) -> bool:
    """Whether ``step`` declares a ``progress`` keyword (a partial's included, and a wrapper made
    with ``functools.wraps``, whose signature is the wrapped step's: it must pass keywords on)."""
    try:
        return "progress" in inspect.signature(step).parameters
    except (TypeError, ValueError):   # a builtin or a C callable: no signature to read
        return False


def train_epoch(model, batches: Iterable, step: Step, optimizer: torch.optim.Optimizer, *,
                amp: torch.dtype | None = None, scaler=None, scheduler=None,
                bar=None, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """One pass over ``batches`` of ``(x, y, t)``: the loss of each batch by ``step``, its
    gradients, one update of the weights. Returns the mean loss (``"loss"``) and, when the step
    returns named terms (``{"kd": ..., "ce": ...}``, added up in their order), the mean of each.

    ``amp`` is the autocast dtype (None: fp32), ``scaler`` a GradScaler (fp16 only: it scales
    the loss and skips an update whose gradients overflowed), ``scheduler`` a learning-rate
    schedule stepped after every batch (OneCycle), ``bar`` a progress bar. A step that declares
    a ``progress`` keyword is called with ``progress`` (:class:`Progress`).
    """
    model.train()
    if progress is not None and takes_progress(step):
        step = partial(step, progress=progress)
    losses, terms = [], {}
    for x, y, t in batches:
        with torch.autocast(x.device.type, amp or torch.float32, enabled=amp is not None):
            out = step(model, x, y, t)
            loss = total(out)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
        for name, value in (out.items() if isinstance(out, dict) else ()):
            terms.setdefault(name, []).append(value.detach())
        if bar is not None:
            bar.update(1)
        if len(losses) % 50 == 0:
            check_finite(losses)  # a sync with the device every 50 steps, not every step
    check_finite(losses)
    means = {name: torch.stack(values).float().mean() for name, values in terms.items()}
    return {"loss": torch.stack(losses).float().mean(), **means}


def check_finite(losses: list[torch.Tensor]) -> None:
    """Raise :class:`TrainingDiverged` at the first NaN or infinite loss of ``losses``."""
    values = torch.stack(losses)
    bad = ~torch.isfinite(values)
    if bad.any():
        first = int(torch.nonzero(bad)[0])
        value = values[bad][0].item()
        raise TrainingDiverged(f"loss became {value} at step {first + 1}", value, first + 1)


def with_teacher(loader, teacher: nn.Module | None = None,
                 teacher_targets: TeacherTargets | None = None, table: dict | None = None,
                 amp: torch.dtype | None = None) -> Iterator[tuple]:
    """The loader's ``(x, y, index)`` batches as ``(x, y, t)``, ``t`` being what the loss needs
    from the teacher: rows ``index`` of ``table`` (outputs computed once, see
    :func:`precompute_teacher`), else the frozen teacher's outputs on ``x``, else None."""
    for x, y, idx in loader:
        if table is not None:
            t = {k: v[idx] for k, v in table.items()}
        elif teacher is None:
            t = None
        else:
            with torch.inference_mode(), torch.autocast(x.device.type, amp or torch.float32,
                                                        enabled=amp is not None):
                t = teacher_targets(teacher, x)
            # out of inference mode (the loss keeps them for its backward pass), in fp32
            t = {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in t.items()}
        yield x, y, t


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
    batch, and :func:`kdutils.train.fit` calls it per step instead. With fixed ``views``
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
    was_training = model.training
    model.eval()
    correct, ens_correct, count = None, 0, 0
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
        count += len(y)
        n_exits = len(exits)
    model.train(was_training)
    # under torchrun each process saw a shard of the loader: add up the counts of all
    counts = all_sum(torch.cat([correct.double().cpu(), torch.tensor([ens_correct, count], dtype=torch.float64)]))
    correct, ens_correct, count = counts[:n_exits], counts[n_exits].item(), counts[n_exits + 1].item()
    accs = (100.0 * correct / count).tolist()
    out = {"acc": accs[-1]}
    if len(accs) > 1:
        out["exit_acc"] = accs
        out["ensemble_acc"] = 100.0 * ens_correct / count
    return out


def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy in percent over ``loader`` (model put in eval mode, restored after);
    for a multi-exit model, the deepest exit's."""
    return evaluate_exits(model, loader)["acc"]
